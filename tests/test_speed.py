"""Speed settings must not change results, and the benchmark tool must run (no timings are asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from progan.config import TrainConfig
from progan.facedata import ImageBank
from progan.gantrain import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _cfg() -> TrainConfig:
    return TrainConfig(size=16, batch=8, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4,
                       fade_images=16, stable_images=16, r1_every=2)


def _losses(precision: str, steps: int = 4) -> list[tuple[float, float]]:
    bank = ImageBank(np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    t = Trainer(_cfg(), bank, "cpu", precision=precision)
    out = []
    for _ in range(steps):
        t.step()
        s = t.read_stats()
        out.append((s.g_loss, s.d_loss))
    return out


def test_bf16_autocast_losses_close_to_fp32():
    fp32, bf16 = np.array(_losses("fp32")), np.array(_losses("bf16"))
    assert np.all(np.isfinite(bf16))
    assert not np.array_equal(fp32, bf16)              # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.02)


def test_default_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    import torch

    from progan import run

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(run, "cpu_has_native_bf16", lambda native=native: native)
        assert run.default_precision(torch.device("cpu")) == expected
    assert run.default_precision(torch.device("cuda")) == "bf16"
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), None) \
        if Path("/proc/cpuinfo").exists() else None
    monkeypatch.undo()
    if flags is not None:   # the real check reads this CPU's flags
        assert run.cpu_has_native_bf16() == ("avx512_bf16" in flags.split() or "amx_bf16" in flags.split())


def test_dcgan_reference_bf16_runs_convolutions_in_bf16_and_keeps_fp32_weights():
    import pytest
    import torch

    from progan.reference import DCGANTrainer

    real = torch.rand(4, 3, 64, 64) * 2 - 1
    seen = {}
    for precision in ("fp32", "bf16"):
        ref = DCGANTrainer("cpu", seed=0, precision=precision)
        conv = ref.D.main[0]
        hook = conv.register_forward_hook(lambda m, i, o, p=precision: seen.update({p: o.dtype}) and None)
        before = conv.weight.detach().clone()
        ref.step(real)
        hook.remove()
        assert conv.weight.dtype == torch.float32 and torch.isfinite(conv.weight).all()
        assert not torch.equal(before, conv.weight)     # the step trained D
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    with pytest.raises(ValueError, match="precision"):
        DCGANTrainer("cpu", precision="fp16")


def test_bench_tool_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--device", "cpu", "--seconds", "0.05",
                           "--max-res", "8", "--size", "16", "--batch", "8", "--no-flops", "--threads", "1",
                           "--dcgan-precision", "bf16", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    models = {(r["model"], r["res"]) for r in data["rows"]}
    assert {("default", 4), ("default", 8), ("dcgan64", 64)} <= models
    assert all(r["img_per_s"] > 0 for r in data["rows"])
    assert data["data_img_per_s"] > 0
    assert "x DCGAN" in proc.stdout
    assert data["dcgan_precision"] == "bf16" and "(DCGAN bf16)" in proc.stdout
