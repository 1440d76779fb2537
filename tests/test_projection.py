"""`progan project`: recover the latent of a face, the agreed .npz file, the CLI and its one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from progan import latent
from progan import projection as P
from progan.errors import ProganError
from progan.generate import export
from tiny_run import tiny_generator, write_tiny_run


@pytest.fixture(scope="module")
def tiny():
    gen, D = tiny_generator(seed=0)
    z = latent.random(24, gen.config.latent_dim, generator=torch.Generator().manual_seed(5))
    return gen, D, gen.render(z)


def test_projection_recovers_a_generated_face(tiny):
    gen, _, images = tiny
    for j in (0, 1):
        target = images[j]
        others = np.abs(np.delete(images, j, 0).astype(np.float64) - target).mean()   # a random latent's error
        r = P.project(gen, target, P.settings_for("pixel", steps=150, starts=16, seed=1))
        assert r.mae < 0.25 * others, (r.mae, others)
        assert r.mae < r.start_mae and r.distance < r.start_distance
        assert r.image.shape == target.shape and r.image.dtype == np.uint8
        # z stays on the sphere of radius sqrt(dim) and reproduces the reported image.
        assert np.linalg.norm(r.z) == pytest.approx(np.sqrt(gen.config.latent_dim), rel=1e-4)
        assert np.abs(gen.render(torch.from_numpy(r.z)).astype(int) - r.image).max() <= 1


def test_discriminator_feature_distance(tiny):
    gen, D, images = tiny
    target = images[2]
    s = P.settings_for("pixel+dfeat", steps=60, starts=8, seed=0)
    dist = P.Distance(P.to_tensor(target, gen.device), s, D, gen.level, gen.alpha)
    same = dist(P.to_tensor(target, gen.device))
    other = dist(P.to_tensor(images[3], gen.device))
    assert float(same) == pytest.approx(0.0, abs=1e-6) and float(other) > 1e-3
    maps = P.d_feature_maps(D, P.to_tensor(target, gen.device), gen.level, gen.alpha)
    assert len(maps) == gen.config.levels     # fromRGB + one per down block
    r = P.project(gen, target, s, D=D)
    assert r.distance < r.start_distance and r.mae < r.start_mae
    with pytest.raises(ProganError, match="discriminator"):
        P.Distance(P.to_tensor(target, gen.device), s, None)


def test_schedule_ramps():
    s = P.ProjectionSettings(steps=100)
    assert P.lr_at(0.0, s) == 0.0
    assert P.lr_at(0.5, s) == pytest.approx(s.lr)
    assert P.lr_at(0.99, s) < 0.01 * s.lr


def test_latent_file_keys(tmp_path, tiny):
    gen, _, images = tiny
    r = P.project(gen, images[0], P.settings_for("pixel", steps=2, starts=2))
    path = P.save_latent(r, tmp_path / "me.npz", "runs/x")
    with np.load(path) as f:
        assert set(f.files) == {"z", "run"}
        assert f["z"].shape == (1, gen.config.latent_dim) and f["z"].dtype == np.float32
        assert str(f["run"]) == "runs/x"
    # A conditional projection carries its labels and their names.
    r.labels, r.condition = np.array([[30.0, 1.0]], np.float32), ("age", "gender")
    with np.load(P.save_latent(r, tmp_path / "c.npz", "r")) as f:
        assert f["labels"].shape == (1, 2) and f["labels"].dtype == np.float32
        assert [str(c) for c in f["condition"]] == ["age", "gender"]
    png = P.save_pair(r, tmp_path / "pair.png")
    w, h = Image.open(png).size
    assert h >= 128 and w > 2 * h - 8


def test_labels_from_flags_and_utkface_names():
    assert P.resolve_labels((), "me.jpg") is None
    with pytest.raises(ProganError, match="unconditional"):
        P.resolve_labels((), "me.jpg", age=30)
    row = P.resolve_labels(("age", "gender", "race"), "dir/26_1_2_20170116.jpg.chip.jpg")
    assert row.tolist() == [[26.0, 1.0, 2.0]] and row.dtype == np.float32
    row = P.resolve_labels(("age", "gender", "race"), "26_1_2_x.jpg", age=60, gender="male", race="Indian")
    assert row.tolist() == [[60.0, 0.0, 3.0]]
    with pytest.raises(ProganError, match="--gender"):
        P.resolve_labels(("gender",), "me.jpg")
    with pytest.raises(ProganError, match="--race"):
        P.resolve_labels(("race",), "me.jpg", race="purple")


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "progan", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_project(tmp_path, tiny):
    gen, _, images = tiny
    write_tiny_run(tmp_path / "run", seed=0)
    photo = tmp_path / "face.png"
    # A larger photo of a generated face: load_image centre-crops and resizes it as for training.
    Image.fromarray(images[0]).resize((32, 32), Image.Resampling.NEAREST).save(photo)
    r = _cli("project", "run", "face.png", "--out", "me.npz", "--steps", "40", "--starts", "8", "--no-progress",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "MAE" in r.stderr and "distance" in r.stderr
    with np.load(tmp_path / "me.npz") as f:
        assert f["z"].shape == (1, 16) and str(f["run"]) == "run"
    assert (tmp_path / "me.png").is_file()

    # An export holds no discriminator: the default distance falls back to pixels alone.
    export(tmp_path / "run", tmp_path / "g.safetensors")
    r = _cli("project", "g.safetensors", "face.png", "--out", "e.npz", "--steps", "5", "--starts", "4",
             "--no-progress", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "e.npz").is_file(), r.stderr

    (tmp_path / "notes.jpg").write_text("not an image")
    for args, words in [(("run", "missing.jpg"), "no such photo"),
                        (("run", "notes.jpg"), "not an image"),
                        (("run", "face.png", "--age", "30"), "unconditional"),
                        (("nowhere", "face.png"), "no such run")]:
        r = _cli("project", *args, "--out", "x.npz", "--steps", "1", cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and words in lines[0], r.stderr


def test_project_eval_tool(tmp_path):
    from blobs import write_blob_images

    write_tiny_run(tmp_path / "run")
    write_blob_images(tmp_path / "faces", 12, 16)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "project_eval.py")
    r = subprocess.run([sys.executable, tool, str(tmp_path / "run"), str(tmp_path / "faces"), "--k", "2",
                        "--steps", "30", "--starts", "4", "--holdout", "0.5", "--no-inception",
                        "--distances", "l1,l1+dfeat", "--cache-dir", str(tmp_path / "cache"),
                        "--grid", str(tmp_path / "grid.png")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    res = json.loads(r.stdout.strip().splitlines()[-1])
    d = res["distances"]
    assert res["faces"] == 2 and set(d) == {"random", "l1", "l1+dfeat"}
    assert d["l1"]["mae"] < d["random"]["mae"] and d["l1+dfeat"]["mae"] < d["random"]["mae"]
    assert Image.open(tmp_path / "grid.png").size == (4 * 32 + 3 * 2, 2 * 32 + 2)
