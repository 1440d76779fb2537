"""Cost of the DDP wrapping on one device: training img/s unwrapped vs DDP-wrapped, same config, same run.

    python tools/ddp_bench.py                       # one process, a group of one made here (gloo on CPU, NCCL on CUDA)
    torchrun --nproc_per_node 1 tools/ddp_bench.py --device cuda --size 128
    python tools/ddp_bench.py --device cpu --size 16 --batch 16 --seconds 3     # quick CPU check

Times steady-state Trainer steps at the final level (stable) and in the last fade-in for
  plain:        the networks unwrapped (what a single-process `progan train` runs),
  ddp-active:   DDP over the parameters active in the phase (what `torchrun ... progan train` runs),
  ddp-unused:   DDP over the whole networks with find_unused_parameters=True (the alternative it was chosen over).
With one process the all-reduce is a no-op copy, so the difference is DDP's own overhead (hooks, bucket copies, and
for ddp-unused the graph walk each backward).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from progan import distributed
from progan.config import TrainConfig
from progan.facedata import ImageBank
from progan.gantrain import Trainer, level_start
from progan.run import default_precision, pick_device, setup_backend


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def img_per_s(trainer: Trainer, nimg: int, seconds: float, warmup: int) -> float:
    trainer.nimg = nimg
    for _ in range(warmup):
        trainer.step()
        trainer.nimg = nimg  # stay in the phase being measured
    sync(trainer.device)
    t0, n = time.perf_counter(), 0
    while n < 5 or time.perf_counter() - t0 < seconds:
        trainer.step()
        trainer.nimg = nimg
        n += 1
    sync(trainer.device)
    return n * trainer.local_batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="per process")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per case")
    ap.add_argument("--warmup", type=int, default=17,
                    help="untimed steps first; > r1_every so the lazy-R1 step (cuDNN autotune on CUDA) is warmed up")
    args = ap.parse_args()

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("ddp_bench measures one process: run it with --nproc_per_node 1 (or without torchrun)")
    device = pick_device(args.device)
    # A process group of one: torchrun's env:// rendezvous when launched by it, else an in-memory store.
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    if "MASTER_ADDR" in os.environ:
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    else:
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    precision = args.precision or default_precision(device)
    setup_backend(device, precision)

    cfg = TrainConfig(size=args.size, batch=args.batch)
    top = cfg.levels - 1
    phases = {"stable": level_start(top, cfg.fade_images, cfg.stable_images) + cfg.fade_images,
              "fade": level_start(top, cfg.fade_images, cfg.stable_images) + cfg.fade_images // 2}
    bank = ImageBank(np.random.default_rng(0).integers(0, 256, (max(4 * args.batch, 256), args.size, args.size, 3),
                                                       dtype=np.uint8), device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{backend}, {precision}, size {args.size}, batch {args.batch}, torch {torch.__version__}")
    print(f"{'phase':8} {'plain':>10} {'ddp-active':>12} {'ddp-unused':>12}   img/s")
    try:
        for phase, nimg in phases.items():
            row = {}
            for name in ("plain", "ddp-active", "ddp-unused"):
                dist = None
                if name != "plain":
                    dist = distributed.Dist(0, 1, 0, device, find_unused=name == "ddp-unused")
                row[name] = img_per_s(Trainer(cfg, bank, device, precision=precision, dist=dist), nimg,
                                      args.seconds, args.warmup)
            print(f"{phase:8} {row['plain']:10.1f} {row['ddp-active']:12.1f} {row['ddp-unused']:12.1f}   "
                  f"(ddp-active {row['ddp-active'] / row['plain'] - 1:+.1%}, "
                  f"ddp-unused {row['ddp-unused'] / row['plain'] - 1:+.1%} vs plain)", flush=True)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
