"""Training speed of progan against references, measured in one run on one machine.

    python tools/bench.py                                   # CPU or CUDA, whichever is there
    python tools/bench.py --device cuda --precision bf16 --compile

Times steady-state training steps (G step + D step, noise control and diversity on) at every resolution for
  (1) progan's default configuration at --size,
  (2) progan as the seed report ran it (preset seed2019: G 128 / D 32 channels, batch 16, up to 160 px),
      and any other preset named in --models (e.g. gpu64, cpu64), at its own size and batch,
  (3) the PyTorch DCGAN tutorial model at 64 px (progan.reference), batch 128,
plus the data path alone, FLOPs per image and model-FLOP utilisation. Prints a table and writes bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from progan.config import PRESETS, TrainConfig
from progan.facedata import ImageBank
from progan.gantrain import Trainer, level_start, phase_lengths
from progan.reference import DCGANTrainer

# Dense peak throughput in TFLOP/s, for model-FLOP utilisation (MFU). CPU peak is not knowable portably:
# pass --peak-tflops for it.
PEAKS = {"H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}, "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0},
         "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batch: int, device: torch.device, min_seconds: float, min_steps: int, warmup: int) -> float:
    """img/s of step() in steady state: warm-up steps, then at least min_steps and min_seconds."""
    for _ in range(warmup):
        step()
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < min_steps or time.perf_counter() - t0 < min_seconds:
        step()
        n += 1
        if n % 4 == 0:
            sync(device)
    sync(device)
    return n * batch / (time.perf_counter() - t0)


def flops_per_image(step, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops() / batch


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAKS.items():
            if key in name:
                return peaks[precision]
    return None


def bench_progan(name: str, cfg: TrainConfig, device: torch.device, args) -> list[dict]:
    n = max(cfg.batch * 4, 256)
    rng = np.random.default_rng(0)
    bank = ImageBank(rng.integers(0, 256, (n, cfg.size, cfg.size, 3), dtype=np.uint8), device)
    trainer = Trainer(cfg, bank, device, precision=args.precision, compile=args.compile)
    rows = []
    for level in range(cfg.levels):
        res = cfg.resolution(level)
        if res > args.max_res:
            break
        if res < args.min_res:
            continue
        # Stable phase of this level (alpha = 1): the steady state a run spends most of its time in.
        start = level_start(level, cfg.fade_images, cfg.stable_images, cfg.phase_images) + (
            phase_lengths(level, cfg.fade_images, cfg.stable_images, cfg.phase_images)[0] if level else 0)

        def step():
            trainer.nimg = start
            trainer.step()

        big = res >= 128 and device.type == "cpu"
        # On CUDA the warm-up must include a lazy-R1 step: cuDNN autotunes its double-backward convolutions the first
        # time, which takes seconds and would otherwise land inside the timed window.
        warmup = cfg.r1_every + 1 if device.type == "cuda" else (1 if big else 2)
        ips = timed(step, cfg.batch, device, args.seconds, 1 if big else 3, warmup)
        row = {"model": name, "res": res, "batch": cfg.batch, "img_per_s": ips}
        if not args.no_flops:
            row["gflop_per_img"] = flops_per_image(step, cfg.batch) / 1e9
        rows.append(row)
        print(f"  {name:9s} {res:4d}px  {ips:9.1f} img/s", flush=True)
    return rows


def bench_dcgan(device: torch.device, args) -> dict:
    trainer = DCGANTrainer(device, precision=args.dcgan_precision)
    real = torch.rand(DCGANTrainer.batch, 3, 64, 64, device=device) * 2 - 1
    step = lambda: trainer.step(real)  # noqa: E731
    ips = timed(step, DCGANTrainer.batch, device, args.seconds, 2, 1)
    row = {"model": "dcgan64", "res": 64, "batch": DCGANTrainer.batch, "img_per_s": ips}
    if not args.no_flops:
        row["gflop_per_img"] = flops_per_image(step, DCGANTrainer.batch) / 1e9
    print(f"  dcgan64     64px  {ips:9.1f} img/s", flush=True)
    return row


def bench_data(cfg: TrainConfig, device: torch.device, args) -> float:
    """Images/s the data path delivers alone: index sampling + uint8 -> float + per-level area downsampling."""
    n = 4096
    bank = ImageBank(np.random.default_rng(1).integers(0, 256, (n, cfg.size, cfg.size, 3), dtype=np.uint8), device)
    trainer = Trainer(cfg, bank, device)
    level = cfg.levels - 1
    step = lambda: trainer.real_batch(level, 1.0)  # noqa: E731
    return timed(step, cfg.batch, device, 1.0, 20, 5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=64, help="progan default configuration's final size")
    p.add_argument("--precision", default=None, choices=["fp32", "tf32", "bf16"],
                   help="default: as progan train (bf16 on CUDA and CPUs with native bf16, else fp32)")
    p.add_argument("--dcgan-precision", default="fp32", choices=["fp32", "bf16"],
                   help="the DCGAN reference's forward passes [fp32, as the tutorial]")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (falls back if unsupported)")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    p.add_argument("--max-res", type=int, default=None, help="skip resolutions above this [CPU: 80, CUDA: all]")
    p.add_argument("--min-res", type=int, default=1, help="skip resolutions below this")
    p.add_argument("--models", default="default,seed2019,dcgan",
                   help="comma list: default (at --size/--batch), dcgan, or any preset name such as seed2019, cpu64, "
                        "gpu64 (ratios need dcgan) [default,seed2019,dcgan]")
    p.add_argument("--batch", type=int, default=None, help="progan default batch override")
    p.add_argument("--threads", type=int, default=None, help="CPU threads [default: all cores]")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known for H100/H200/A100)")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--json", default="bench.json")
    args = p.parse_args()

    from progan.run import default_precision, pick_device, setup_backend

    device = pick_device(args.device)
    args.precision = args.precision or default_precision(device)
    setup_backend(device, args.precision, args.threads)
    if args.max_res is None:
        args.max_res = 80 if device.type == "cpu" else 10 ** 6
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"device: {desc}  precision: {args.precision} (DCGAN {args.dcgan_precision})  compile: {args.compile}  "
          f"torch {torch.__version__}")

    default = TrainConfig(size=args.size, **({"batch": args.batch} if args.batch else {}))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = set(PRESETS) | {"dcgan"}
    if not set(models) <= known:
        p.error(f"--models: unknown {sorted(set(models) - known)} (choose from {', '.join(sorted(known))})")
    rows = []
    for name in models:
        if name == "default":
            rows += bench_progan("default", default, device, args)
        elif name != "dcgan":
            # any other preset at its own size and batch, e.g. seed2019 (the seed's report) or gpu64
            rows += bench_progan(name, TrainConfig(**PRESETS[name]), device, args)
    ref = bench_dcgan(device, args) if "dcgan" in models else None
    rows += [ref] if ref else []
    data_ips = bench_data(default, device, args)
    peak = peak_tflops(device, args.precision, args.peak_tflops)

    print(f"\n{'model':10s} {'res':>5s} {'batch':>6s} {'img/s':>10s} {'x DCGAN':>8s} {'GFLOP/img':>10s} {'MFU':>7s}")
    for r in rows:
        r["ratio_to_dcgan"] = r["img_per_s"] / ref["img_per_s"] if ref else float("nan")
        gf = r.get("gflop_per_img")
        if gf is not None and peak:
            r["mfu"] = gf * r["img_per_s"] / (peak * 1e3)
        mfu = f"{r['mfu']:7.1%}" if "mfu" in r else "      -"
        gfs = f"{gf:10.2f}" if gf is not None else "         -"
        print(f"{r['model']:10s} {r['res']:5d} {r['batch']:6d} {r['img_per_s']:10.1f} {r['ratio_to_dcgan']:8.2f} {gfs} {mfu}")
    step_ips = [r["img_per_s"] for r in rows if r["model"] == "default" and r["res"] == args.size]
    print(f"\ndata path alone: {data_ips:,.0f} img/s at {args.size}px"
          + (f" ({data_ips / step_ips[0]:.0f}x the training step's rate)" if step_ips else ""))
    out = {"device": desc, "precision": args.precision, "dcgan_precision": args.dcgan_precision,
           "compile": args.compile, "torch": torch.__version__,
           "rows": rows, "data_img_per_s": data_ips, "peak_tflops": peak}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
