"""Tests for progan.generate and the generate / interpolate / inspect / export commands, on a tiny trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan import checkpoint, visualization
from progan.config import TrainConfig
from progan.errors import ProganError
from progan.generate import blocks, describe, export, interpolate, load_generator, resize_cells

STEPS = 15   # 120 images: the last level (16 px) is fading in with alpha 0.75
EPOCH = 3    # 32 training images per epoch
LATEST = "epoch-0003-img-000000120.pt"


def tiny_config() -> TrainConfig:
    return TrainConfig(size=16, batch=8, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4,
                       fade_images=32, stable_images=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from progan.facedata import ImageBank
    from progan.gantrain import Trainer

    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    trainer = Trainer(cfg, ImageBank(images))
    for _ in range(STEPS):
        trainer.step()
    # An earlier checkpoint (8 px, fading in) and the latest one (16 px, alpha 0.75).
    early = trainer.state_dict()
    early["nimg"] = 40
    checkpoint.save(early, run / "checkpoints", "epoch-0000-img-000000040.pt")
    checkpoint.save(trainer.state_dict(), run / "checkpoints", LATEST)
    cfg.save(run / "config.json")
    return run


@pytest.fixture(scope="module")
def gen(run_dir):
    return load_generator(run_dir)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "progan", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ----------------------------------------------------------------------------- library


def test_phase_and_properties(gen, run_dir):
    assert gen.nimg == STEPS * 8 and gen.epoch == EPOCH
    assert (gen.level, gen.alpha, gen.resolution) == (2, 0.75, 16)
    assert gen.config == tiny_config()
    assert not any(p.requires_grad for p in gen.G.parameters())
    early = load_generator(run_dir / "checkpoints" / "epoch-0000-img-000000040.pt")
    assert (early.level, early.alpha, early.resolution) == (1, 0.25, 8)
    assert early.sample(3).shape == (3, 8, 8, 3)


def test_sample_deterministic_and_batch_independent(gen):
    a = gen.sample(5, seed=1)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, gen.sample(5, seed=1))
    assert not np.array_equal(a, gen.sample(5, seed=2))
    big = gen.sample(1100, seed=1, batch=8)    # many batches and more than one latent chunk
    assert big.shape[0] == 1100
    assert np.array_equal(big[:5], a)
    assert np.array_equal(gen.sample(1100, seed=1, batch=100)[:300], gen.sample(300, seed=1, batch=100))
    # Different --batch: the same faces up to float rounding.
    assert np.abs(big[:300].astype(int) - gen.sample(300, seed=1, batch=100)).max() <= 1
    z = gen.latents(1100, seed=1)
    assert torch.equal(z[:7], gen.latents(7, seed=1))
    assert np.array_equal(gen.render(z[1000:1010]), big[1000:1010])
    assert np.array_equal(gen.sample(4, z=z[:4]), a[:4])
    # Latents live on the sphere of radius sqrt(dim).
    assert torch.allclose(z.norm(dim=1), torch.full((1100,), 10.0))


def test_blocks_do_not_depend_on_n():
    assert list(blocks(70, 256)) == [(0, 8, 8), (8, 16, 8), (16, 32, 16), (32, 64, 32), (64, 70, 64)]
    assert list(blocks(20, 8)) == [(0, 8, 8), (8, 16, 8), (16, 20, 8)]
    assert list(blocks(3, 2)) == [(0, 2, 2), (2, 3, 2)]
    big = list(blocks(10_000, 100))
    assert all(size <= 100 for _, _, size in big) and big[-1][1] == 10_000
    for n in (1, 9, 33, 500):
        assert [(a, size) for a, _, size in blocks(n, 100)] == [(a, size) for a, _, size in big if a < n]


def test_raw_generator_differs(run_dir, gen):
    raw = load_generator(run_dir, ema=False)
    assert not np.array_equal(raw.sample(4, seed=3), gen.sample(4, seed=3))


def test_export_roundtrip_identical(run_dir, gen, tmp_path):
    out = export(run_dir, tmp_path / "g.safetensors")
    loaded = load_generator(out)
    assert (loaded.level, loaded.alpha, loaded.nimg, loaded.epoch) == (gen.level, gen.alpha, gen.nimg, gen.epoch)
    assert loaded.config == gen.config
    for k, v in gen.G.state_dict().items():
        assert torch.equal(v, loaded.G.state_dict()[k])
    assert np.array_equal(loaded.sample(20, seed=4), gen.sample(20, seed=4))
    # Detected by content as well as by extension.
    renamed = tmp_path / "generator.bin"
    renamed.write_bytes(out.read_bytes())
    assert np.array_equal(load_generator(renamed).sample(3, seed=4), gen.sample(3, seed=4))
    with pytest.raises(ProganError, match="only the EMA"):
        load_generator(out, ema=False)
    info = describe(out)
    assert info["kind"] == "export" and info["parameters"]["G"] == sum(p.numel() for p in gen.G.parameters())


def test_interpolation_is_smooth_and_loops(gen, tmp_path):
    keys, fpk = 3, 12
    out = tmp_path / "walk.mp4"
    frames, w, h = interpolate(gen, out, keys=keys, frames_per_key=fpk, grid=(2, 1), seed=5, cell=64)
    assert (frames, w, h) == (keys * fpk, 128, 64)
    assert visualization.read_video(out) == (keys * fpk, 128, 64)
    video = visualization.read_frames(out).astype(np.float64)
    consecutive = np.mean([mean_abs(video[i], video[i + 1]) for i in range(len(video) - 1)])
    wrap = mean_abs(video[-1], video[0])
    samples = resize_cells(gen.sample(16, seed=99), 64)
    independent = np.mean([mean_abs(samples[i], samples[i + 1]) for i in range(0, 16, 2)])
    assert consecutive < independent / 3
    assert wrap < 3 * consecutive + 1.0   # no jump where the loop closes
    # Each cell walks its own keys: the two halves of a frame differ.
    assert mean_abs(video[0][:, :64], video[0][:, 64:]) > consecutive


# ----------------------------------------------------------------------------- command line


def test_cli_and_package_import_light():
    code = ("import sys, progan, progan.cli; assert 'torch' not in sys.modules; "
            "assert callable(progan.load_generator) and 'torch' in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_cli_generate_grid(run_dir, tmp_path):
    out = tmp_path / "faces.png"
    r = cli("generate", str(run_dir), "--n", "10", "--seed", "1", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (4 * 16, 3 * 16)
    r = cli("generate", str(run_dir), "--n", "6", "--cols", "6", "--out", str(tmp_path / "row.jpg"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "row.jpg").size == (96, 16)


def test_cli_generate_folder(run_dir, tmp_path, gen):
    out = tmp_path / "faces"
    r = cli("generate", str(run_dir), "--n", "21", "--batch", "8", "--seed", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files[:2]] == ["000000.png", "000001.png"] and len(files) == 21
    assert np.array_equal(np.asarray(Image.open(files[20])), gen.sample(21, seed=2)[20])


@pytest.mark.parametrize("ext", [".mp4", ".gif"])
def test_cli_interpolate(run_dir, tmp_path, ext):
    out = tmp_path / f"morph{ext}"
    r = cli("interpolate", str(run_dir), "--out", str(out), "--keys", "3", "--frames-per-key", "4",
            "--grid", "2x1", "--seed", "2", "--ease", "--fps", "12")
    assert r.returncode == 0, r.stderr
    # Default cell: 16 px scaled by an integer to at least 128.
    assert visualization.read_video(out) == (12, 256, 128)


def test_cli_inspect(run_dir):
    r = cli("inspect", str(run_dir))
    assert r.returncode == 0, r.stderr
    for text in (LATEST, "images shown", "16x16", "alpha 0.75", "fade_images", "parameters", "schema 1"):
        assert text in r.stdout
    r = cli("inspect", str(run_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["nimg"] == STEPS * 8 and info["epoch"] == EPOCH and info["schema"] == checkpoint.SCHEMA
    assert (info["resolution"], info["alpha"], info["level"]) == (16, 0.75, 2)
    assert info["config"] == json.loads(json.dumps(tiny_config().to_dict()))
    assert info["parameters"]["G"] > 0 and info["parameters"]["D"] > 0
    assert isinstance(info["eps"], float) and info["file_size"] == Path(info["path"]).stat().st_size


def test_cli_export_then_generate(run_dir, tmp_path):
    exported = tmp_path / "g.safetensors"
    r = cli("export", str(run_dir), "--out", str(exported))
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "progan-generator" and meta["schema"] == "1"
    assert TrainConfig.from_dict(json.loads(meta["config"])) == tiny_config()
    assert (meta["level"], float(meta["alpha"]), meta["nimg"], meta["epoch"]) == ("2", 0.75, str(STEPS * 8), str(EPOCH))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert cli("generate", str(run_dir), "--n", "9", "--seed", "3", "--out", str(a)).returncode == 0
    assert cli("generate", str(exported), "--n", "9", "--seed", "3", "--out", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    r = cli("inspect", str(exported), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "export" and info["nimg"] == STEPS * 8 and info["parameters"]["D"] is None


def _bad_inputs(tmp: Path, run_dir: Path) -> dict[str, Path]:
    empty = tmp / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    garbage = tmp / "x.pt"
    garbage.write_text("this is not a checkpoint\n" * 20)
    rand = tmp / "random.safetensors"
    rand.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    from safetensors.torch import save_file

    foreign = tmp / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"hello": "world"})
    state = checkpoint.load(checkpoint.latest(run_dir))
    state["schema"] = 999
    newer = tmp / "newer.pt"
    torch.save(state, newer)
    return {"missing": tmp / "nope", "empty": empty, "garbage": garbage, "random": rand, "foreign": foreign,
            "newer": newer}


@pytest.mark.parametrize("case, command", [
    ("missing", "generate"), ("empty", "inspect"), ("garbage", "generate"), ("random", "interpolate"),
    ("foreign", "export"), ("newer", "generate"),
])
def test_cli_bad_inputs(run_dir, tmp_path, case, command):
    path = _bad_inputs(tmp_path, run_dir)[case]
    extra = {"generate": ["--out", str(tmp_path / "o.png")], "interpolate": ["--out", str(tmp_path / "o.gif")],
             "export": ["--out", str(tmp_path / "o.safetensors")], "inspect": []}[command]
    r = cli(command, str(path), *extra)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("progan: error:"), r.stderr
    expected = {"missing": "no such run", "empty": "no checkpoints", "garbage": "not a progan checkpoint",
                "random": "not a progan generator export", "foreign": "not a progan generator export",
                "newer": "schema 999"}[case]
    assert expected in lines[0]


def test_library_bad_inputs(run_dir, tmp_path):
    for case, path in _bad_inputs(tmp_path, run_dir).items():
        with pytest.raises(ProganError):
            load_generator(path)
        with pytest.raises(ProganError):
            describe(path)
