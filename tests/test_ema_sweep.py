"""tools/ema_sweep.py: several EMA settings measured on one training run. Each copy must be exactly the EMA the
Trainer would have kept with that setting, and the command line writes flicker and FID/SWD points per variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blobs import write_blob_images
from inception import needs_inception
from test_core import tiny_bank, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import ema_sweep  # noqa: E402

from progan.errors import ProganError  # noqa: E402
from progan.gantrain import Trainer  # noqa: E402
from progan.run import default_precision  # noqa: E402


def test_parse_variants_reads_pairs_and_refuses_bad_ones():
    assert ema_sweep.parse_variants("10000:0.05, 20000:0.5,10000:0.05") == [(10000, 0.05), (20000, 0.5)]
    assert ema_sweep.parse_variants("64") == [(64, 0.0)]
    for bad in ("", "abc:0.1", "0:0.1", "100:-1"):
        with pytest.raises(ProganError):
            ema_sweep.parse_variants(bad)
    assert ema_sweep.parse_window("100-200") == (100, 200)
    for bad in ("200-100", "5", "a-b"):
        with pytest.raises(ProganError):
            ema_sweep.parse_window(bad)


def test_each_copy_is_the_ema_a_run_with_that_setting_keeps():
    cfg = tiny_cfg(ema_half_life=64, ema_rampup=0.5)
    sweep = ema_sweep.EmaSweep(Trainer(cfg, tiny_bank()), [(64, 0.5), (4096, 0.0), (1, 0.0)])
    for k in range(12):
        sweep.step()
        if k % 3 == 2:
            sweep.record_colours()
    t = sweep.t
    params = {v: list(G.parameters()) for v, G in sweep.G.items()}
    # the run's own setting: Trainer.G_ema bit for bit
    assert all(torch.equal(a, b) for a, b in zip(params[64, 0.5], t.G_ema.parameters()))
    # a 1-image half-life follows G (beta = 0.5 ** 8), a 4096-image one has barely left the initial weights
    @torch.no_grad()
    def gap(copy):   # largest weight difference from the raw generator
        return max(float((a - b).abs().max()) for a, b in zip(params[copy], t.G.parameters()))

    assert gap((1, 0.0)) < 0.01 * gap((4096, 0.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        init = Trainer(cfg, tiny_bank()).G   # the same initial weights
    with torch.no_grad():
        drift = max(float((a - b).abs().max()) for a, b in zip(params[4096, 0.0], init.parameters()))
        moved = max(float((a - b).abs().max()) for a, b in zip(t.G.parameters(), init.parameters()))
    assert drift < 0.05 * moved
    # four recorded frames per copy; the slow copy's colours change less between them than the fast one's
    assert all(len(c) == 4 for c in sweep.colours.values())
    slow, _ = sweep.flicker((4096, 0.0), 0, t.nimg)
    fast, frames = sweep.flicker((1, 0.0), 0, t.nimg)
    assert frames == 4 and slow < fast
    with pytest.raises(ValueError):
        ema_sweep.EmaSweep(t, [(64, 0.5)])   # not fresh: the copies would not start from the initial weights


@needs_inception
def test_command_line_scores_every_variant(tmp_path):
    write_blob_images(tmp_path / "faces", 60, 16)
    out = tmp_path / "ema"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROGAN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tools" / "ema_sweep.py"), str(tmp_path / "faces"), "--out", str(out),
           "--size", "16", "--preset", "default", "--set", "fade_images=128", "--set", "stable_images=128",
           "--variants", "10000:0.05,500:0", "--at", "256", "--flicker-window", "0-256", "--video-every", "2",
           "--n", "16", "--holdout", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "ema.json").read_text())
    assert res["own_variant_equals_G_ema"] is True
    assert res["precision"] == default_precision(torch.device("cpu"))   # progan train's choice for this CPU
    assert set(res["variants"]) == {"hl10000-r0.05", "hl500-r0"}
    for name, v in res["variants"].items():
        assert [p["nimg"] for p in v["points"]] == [256]
        assert np.isfinite(v["points"][0]["fid"]) and v["points"][0]["swd"] > 0
        assert v["flicker_frames"] == 4   # 256 images of batch 32, a frame every 2 steps and v["flicker_ema"] > 0
        assert (out / name / "snap-0000256.pt").is_file()
    bad = subprocess.run(cmd[:-12] + ["--variants", "x:1"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 1 and "--variants" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(cmd[:-12] + ["--at", "20k"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and "--at" in bad.stderr and "Traceback" not in bad.stderr
