"""tools/ablate.py smoke test: arms train as separate `progan train` runs for the same number of images, a finished
arm is not trained again, and scoring gives one table row per arm with FID, SWD, flicker and noise epsilon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blobs import write_blob_images
from inception import needs_inception

ROOT = Path(__file__).resolve().parents[1]
BASE = "--size 16 --batch 8 --fade-images 16 --stable-images 16 --video-every 1"


def _ablate(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROGAN_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "ablate.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@needs_inception
def test_ablation_trains_equal_budgets_and_scores(tmp_path):
    data = write_blob_images(tmp_path / "faces", 100, 32)
    out = tmp_path / "abl"
    common = [str(data), "--out", str(out), "--images", "64", "--base-flags", BASE, "--holdout", "0.2",
              "--flicker-images", "32", "--n", "16"]
    proc = _ablate([*common, "--arms", "baseline,hinge,batch-64", "--no-score"], tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    from progan import checkpoint
    from progan.config import TrainConfig

    for name, batch in (("baseline-s0", 8), ("hinge-s0", 8), ("batch-64-s0", 64)):
        run = out / name
        state = checkpoint.load(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
        assert state["nimg"] == 64 and TrainConfig.load(run / "config.json").batch == batch
    assert TrainConfig.load(out / "hinge-s0" / "config.json").loss == "hinge"
    mtime = (out / "baseline-s0" / "config.json").stat().st_mtime_ns

    proc = _ablate([*common, "--arms", "baseline,hinge"], tmp_path)     # scores; trains nothing again
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "train baseline" not in proc.stdout and (out / "baseline-s0" / "config.json").stat().st_mtime_ns == mtime
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["arm"], r["seed"]) for r in rows] == [("baseline", 0), ("hinge", 0)]
    for r in rows:
        assert r["fid"] > 0 and r["swd"] > 0 and r["nimg"] == 64 and r["flicker_ema"] >= 0 and r["eps_max"] >= 0
    assert "| hinge | `--loss hinge` | 0 |" in proc.stdout

    proc = _ablate([*common, "--images", "128", "--arms", "baseline"], tmp_path)   # another budget: refused
    assert proc.returncode == 2 and "another --out" in proc.stderr


def test_ablation_usage_errors(tmp_path):
    proc = _ablate([str(tmp_path), "--arms", "baseline,nonsense"], tmp_path)
    assert proc.returncode == 2 and "unknown arm 'nonsense'" in proc.stderr
    proc = _ablate([str(tmp_path / "missing")], tmp_path)
    assert proc.returncode == 2 and "not a folder" in proc.stderr
