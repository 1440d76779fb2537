"""Tests for the stacked-digits channel classifier (progan.digits_classifier) and tools/mode_coverage.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from progan.digits_classifier import (
    channel_labels,
    codes_from_channels,
    heldout_mask,
    mode_stats,
    split_channels,
    stacked_channels,
    summarise,
    train_classifier,
)
from progan.facedata import stacked_digits

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mode_coverage.py"

# A tiny generator/discriminator so a whole training run is a few seconds on one thread.
TINY = ["--set", "g_channels=16,16,8", "--set", "d_channels=16,16,8", "--set", "inject_channels=4",
        "--set", "batch=16", "--set", "fade_images=400", "--set", "stable_images=400"]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mode_coverage", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clf():
    return train_classifier(size=32, n_train=1000, n_eval=1000, augment_copies=2)


# --------------------------------------------------------------------------- labels


def test_label_decoding_round_trip():
    codes = np.arange(1000)
    digits = channel_labels(codes)
    assert digits.shape == (1000, 3) and digits.min() == 0 and digits.max() == 9
    assert digits[123].tolist() == [1, 2, 3] and digits[7].tolist() == [0, 0, 7] and digits[990].tolist() == [9, 9, 0]
    assert np.array_equal(codes_from_channels(digits), codes)
    with pytest.raises(ValueError):
        channel_labels(np.array([1000]))


def test_channel_labels_match_source_digits():
    """The per-channel labels decoded from labels['digits'] are the targets of the digits in those channels."""
    from sklearn.datasets import load_digits

    src = load_digits()
    raw = np.rint(src.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    by_pixels = {}
    for img, target in zip(raw, src.target):
        by_pixels.setdefault(img.tobytes(), set()).add(int(target))
    d = stacked_digits(n=200, size=8, seed=5)
    digits = channel_labels(d.labels["digits"])
    for i in range(len(d)):
        for c in range(3):
            assert digits[i, c] in by_pixels[d.images[i, :, :, c].tobytes()]
    ch = stacked_channels(200, 32, seed=5)
    assert np.array_equal(ch.digits, digits.reshape(-1))
    assert ch.pixels.shape == (600, 32, 32)
    # channel order is image by image, R G B
    big = stacked_digits(n=200, size=32, seed=5)
    assert np.array_equal(split_channels(big.images)[4], big.images[1, :, :, 1])


def test_source_split_is_by_pixels_and_deterministic():
    ch = stacked_channels(3000, 16, seed=1)
    held = heldout_mask(ch.source, 0.2)
    assert np.array_equal(held, heldout_mask(ch.source, 0.2))
    assert not np.array_equal(held, heldout_mask(ch.source, 0.2, split_seed=1))
    # the same source digit is always on the same side
    for s in np.unique(ch.source)[:200]:
        assert len(set(held[ch.source == s].tolist())) == 1
    unique, first = np.unique(ch.source, return_index=True)
    assert len(unique) > 1500  # ~1790 of the 1797 sources appear in 9000 channels
    assert 0.15 < held[first].mean() < 0.25


# --------------------------------------------------------------------------- metrics


def test_mode_stats_uniform_and_collapsed():
    uniform = mode_stats(np.tile(np.arange(1000), 7))
    assert uniform["modes"] == 1000 and abs(uniform["kl"]) < 1e-12 and uniform["n"] == 7000
    one = mode_stats(np.full(500, 42))
    assert one["modes"] == 1 and one["kl"] == pytest.approx(math.log(1000))
    two = mode_stats(np.array([3, 999] * 50))
    assert two["modes"] == 2 and two["kl"] == pytest.approx(math.log(500))
    skewed = mode_stats(np.concatenate([np.arange(1000), np.zeros(1000, dtype=np.int64)]))
    assert skewed["modes"] == 1000 and 0 < skewed["kl"] < math.log(1000)
    for bad in (np.array([], dtype=np.int64), np.array([-1]), np.array([1000])):
        with pytest.raises(ValueError):
            mode_stats(bad)


def test_summarise():
    assert summarise([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (ddof=1)
    assert summarise([5.0]) == (5.0, 0.0)


# --------------------------------------------------------------------------- classifier


def test_classifier_heldout_accuracy(clf):
    r = clf.report
    held, fresh = r["heldout_sources"], r["fresh_images"]
    assert held["unique_source_digits"] > 200 and held["n_channels"] > 400
    # digits the classifier never saw, one channel and three at a time
    assert held["channel_acc"] >= 0.95
    assert held["three_digit_acc"] >= 0.85
    assert held["channel_acc_augmented"] >= 0.9  # shifted, rescaled, noisy copies
    # fresh stacked images (another seed), as in the benchmark's real-data reference
    assert fresh["three_digit_acc"] >= 0.93 and min(fresh["channel_acc_rgb"]) >= 0.97
    assert fresh["predicted"]["modes"] >= fresh["true"]["modes"] - 20


def test_classifier_reads_images_at_any_resolution(clf):
    d = stacked_digits(n=300, size=32, seed=77)
    truth = d.labels["digits"]
    assert (clf.predict(d.images) == truth).mean() >= 0.93
    # a run saved before it reached full size makes 16 px images: they are area-reduced the same way
    small = d.images.reshape(300, 16, 2, 16, 2, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    assert (clf.predict(small) == truth).mean() >= 0.9
    assert clf.predict_digits(d.images[:5]).shape == (5, 3)


# --------------------------------------------------------------------------- the tool


def test_train_run_resumes_and_skips(tool, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from progan.config import PRESETS

    requested = {**PRESETS["digits"], "size": 16, "g_channels": (16, 16, 8), "d_channels": (16, 16, 8),
                 "inject_channels": 4, "batch": 16, "video_every": tool.NO_VIDEO, "diversity": 1.0, "seed": 0}
    requested, target = tool.plan(requested, 300)
    assert target == 304 and requested["epochs"] == 1  # rounded up to whole batches
    run = tmp_path / "run"
    first = tool.train_run(run, requested, 160, "cpu", progress=False)  # as if stopped part-way
    assert first["trained"] and tool.final_nimg(run) == 160
    assert tool.train_run(run, requested, target, "cpu", progress=False)["trained"]  # resumes
    assert tool.final_nimg(run) == target
    assert tool.train_run(run, requested, target, "cpu", progress=False) == {"trained": False, "train_seconds": 0.0}


def test_main_smoke(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "report" / "mc.json"
    argv = ["--budget-images", "2000", "--seeds", "1", "--diversity", "0,1", "--size", "16", "--n-eval", "200",
            "--clf-train-images", "1000", "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--device", "cpu",
            "--no-progress", *TINY]
    report = tool.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("protocol", "budget_images", "size", "n_eval", "seeds", "diversity", "config", "classifier",
                "reference", "runs", "summary"):
        assert key in saved
    assert saved["size"] == 16 and saved["n_eval"] == 200 and saved["diversity"] == [0.0, 1.0]
    assert saved["config"]["video_every"] == tool.NO_VIDEO and saved["config"]["g_channels"] == [16, 16, 8]
    assert [(r["diversity"], r["seed"]) for r in saved["runs"]] == [(0.0, 0), (1.0, 0)]
    for r in saved["runs"]:
        assert 1 <= r["modes"] <= 200 and 0.0 <= r["kl"] <= math.log(1000) + 1e-9
        assert r["trained"] and r["images_shown"] == 2000 and r["resolution"] == 16
        assert Path(r["run_dir"]).parent == tmp_path / "runs"
    assert [s["diversity"] for s in saved["summary"]] == [0.0, 1.0]
    assert all(s["n_seeds"] == 1 and s["modes_std"] is None for s in saved["summary"])
    assert saved["classifier"]["heldout_sources"]["channel_acc"] >= 0.9
    assert saved["reference"]["modes"] > 150  # 200 real images: ~181 distinct labels expected
    text = capsys.readouterr().out
    assert "modes" in text and "real" in text and "diversity 1" in text

    # the same command again trains nothing and gives the same numbers
    again = tool.main(argv)
    assert [r["trained"] for r in again["runs"]] == [False, False]
    assert [(r["modes"], r["kl"]) for r in again["runs"]] == [(r["modes"], r["kl"]) for r in saved["runs"]]


def test_main_rejects_bad_options(tool, tmp_path):
    base = ["--work-dir", str(tmp_path), "--out", str(tmp_path / "x.json")]
    for extra in (["--set", "diversity=2"], ["--set", "nonsense=1"], ["--set", "batch=abc"], ["--diversity", "-1"],
                  ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            tool.main(base + extra)
    assert not (tmp_path / "x.json").exists()
