"""The age / gender / race classifier and the label-fidelity report, on tiny colour-coded faces."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from progan import label_classifier as lc
from progan import label_fidelity as lf
from progan.errors import ProganError
from progan.facedata import FaceData, split_holdout
from tiny_run import write_tiny_run

AGES = np.array([4, 12, 25, 45, 75])
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def coded_faces(n: int, size: int = 16, seed: int = 0) -> FaceData:
    """Labels drawn in the pixels: gender = red level of the left half, race = colour of the top-right patch,
    age = brightness of the bottom-right patch (log scale), on noise; about 10% of each label unknown (-1)."""
    rng = np.random.default_rng(seed)
    age = AGES[rng.integers(0, len(AGES), n)]
    gender = rng.integers(0, 2, n)
    race = rng.integers(0, 5, n)
    palette = np.array([[255, 255, 255], [0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 255]])
    img = rng.normal(90, 30, (n, size, size, 3))
    h = size // 2
    img[:, :, :h, 0] = np.where(gender == 0, 40, 220)[:, None, None] + rng.normal(0, 15, (n, size, h))
    img[:, :h, h:] = palette[race][:, None, None, :] * 0.8 + rng.normal(0, 15, (n, h, size - h, 3))
    level = np.log1p(age) / np.log1p(AGES.max()) * 255
    img[:, h:, h:] = level[:, None, None, None] + rng.normal(0, 8, (n, size - h, size - h, 3))
    labels = {"age": age.astype(np.int64), "gender": gender.astype(np.int64), "race": race.astype(np.int64)}
    for k in labels:   # unknown labels must be ignored, not learned as a class
        labels[k][rng.random(n) < 0.1] = -1
    names = [f"face{i:04d}.png" for i in range(n)]
    return FaceData(images=np.clip(img, 0, 255).astype(np.uint8), names=names, labels=labels)


@pytest.fixture(scope="module")
def trained():
    data = coded_faces(700)
    train, held = split_holdout(data, 0.3)
    model = lc.train_classifier(train, epochs=10, batch=32, lr=3e-3, width=8, seed=0)
    return model, train, held


def test_classifier_learns_coded_labels(trained):
    model, train, held = trained
    assert len(held) > 150
    res = lc.evaluate(model, held, train)
    c, b = res["classifier"], res["baseline"]
    assert c["gender_acc"] >= 0.95 and c["race_acc"] >= 0.9, c
    assert b["gender_acc"] < 0.65 and b["race_acc"] < 0.35, b
    assert c["age_mae"] < 0.4 * b["age_mae"], (c, b)


def test_save_and_load_round_trip(tmp_path, trained):
    model, _, held = trained
    path = lc.save(model, tmp_path / "lc.pt", info={"classifier": {"gender_acc": 0.5}})
    state = torch.load(path, weights_only=True)          # plain tensors and values only
    assert state["format"] == lc.FORMAT and state["meta"]["size"] == 16
    again = lc.load(path)
    a, b = lc.predict(model, held.images[:40]), lc.predict(again, held.images[:40])
    for k in ("gender", "race"):
        assert (a[k] == b[k]).all()
    assert np.allclose(a["age"], b["age"], atol=1e-4)
    assert again.info["classifier"]["gender_acc"] == 0.5
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ProganError, match="not a progan label classifier"):
        lc.load(tmp_path / "junk.pt")
    with pytest.raises(ProganError, match="no such label classifier"):
        lc.load(tmp_path / "missing.pt")


def test_fidelity_of_a_generator_that_returns_real_faces(trained):
    """A 'generator' that answers each requested label row with a held-out real face of exactly those labels
    must get the classifier's real-data scores back."""
    model, _, held = trained
    condition = ("age", "gender", "race")
    known = np.stack([held.labels[c] for c in condition], 1)
    rng = np.random.default_rng(1)

    def generate(rows: np.ndarray, cols: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
        """For each row, a random held-out face whose labels in `cols` are those of the row."""
        picks = []
        for r in rows:
            match = np.flatnonzero((known[:, cols] == np.rint(r[list(cols)]).astype(np.int64)).all(1))
            picks.append(held.images[rng.choice(match)])
        return np.stack(picks)

    report = lf.fidelity_report(generate, model, condition, n=300, seed=0, real=held, batch=64)
    g, r = report["generated"], report["real"]
    assert g["n"] == 300
    assert abs(g["gender_acc"] - r["gender_acc"]) < 0.05 and abs(g["race_acc"] - r["race_acc"]) < 0.06, (g, r)
    assert abs(g["age_mae"] - r["age_mae"]) < 0.5 * r["age_mae"] + 1.0, (g, r)
    # A generator that draws the opposite gender (right race, any age) is caught.
    flipped = lf.generated_scores(lambda rows: generate(rows * np.array([1, -1, 1]) + np.array([0, 1, 0]), (1, 2)),
                                  model, condition, lf.requested_labels(condition, 200, 2, held))
    assert flipped["gender_acc"] < 0.1 and flipped["race_acc"] > 0.85
    table = lf.format_report(report)
    assert "gender as requested" in table and "age MAE" in table


def test_partial_condition_and_uniform_requests(trained):
    model, _, held = trained
    rows = lf.requested_labels(("gender",), 50, seed=3)
    assert rows.shape == (50, 1) and set(np.unique(rows)) <= {0.0, 1.0}
    rep = lf.fidelity_report(lambda r: held.images[: len(r)], model, ("gender",), n=50, real_scores={"gender_acc": 0.9})
    assert np.isnan(rep["generated"]["race_acc"]) and rep["real"]["gender_acc"] == 0.9
    with pytest.raises(ProganError, match="no label classifier head"):
        lf.requested_labels(("smile",), 5)


def test_identity_drift(trained):
    model, _, held = trained
    faces = held.images[:64]
    same = lf.identity_drift(model, faces, faces)
    assert same["sweep"] == pytest.approx(0.0, abs=1e-6) and same["random_pair"] > 0.05
    other = lf.identity_drift(model, faces, held.images[64:128])
    assert 0.5 < other["ratio"] < 2.0


def test_fidelity_tool_refuses_unconditional_runs(tmp_path, trained):
    model, _, _ = trained
    write_tiny_run(tmp_path / "run")
    lc.save(model, tmp_path / "lc.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(TOOLS / "label_fidelity.py"), str(tmp_path / "run"), "--classifier",
                        str(tmp_path / "lc.pt"), "--n", "10"], env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "unconditional" in lines[0], r.stderr


def test_label_classifier_tool(tmp_path):
    from PIL import Image

    data = coded_faces(80, seed=4)
    folder = tmp_path / "utk"
    folder.mkdir()
    for i, img in enumerate(data.images):
        a, g, r = (max(0, int(data.labels[k][i])) for k in ("age", "gender", "race"))
        Image.fromarray(img).save(folder / f"{a}_{g}_{r}_2017{i:04d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(TOOLS / "label_classifier.py"), str(folder), "--out",
                        str(tmp_path / "lc.pt"), "--size", "16", "--epochs", "1", "--holdout", "0.3",
                        "--cache-dir", str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gender accuracy" in r.stdout and "majority baseline" in r.stdout
    model = lc.load(tmp_path / "lc.pt")
    assert model.size == 16 and model.info["heldout_images"] + model.info["train_images"] == 80
