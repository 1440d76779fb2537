"""The EMA lever of issue #11 (half-life and ramp-up), measured on one training run.

The EMA generator never feeds back into training, so every EMA setting can be compared on the same trajectory of the
raw generator, with no seed-to-seed noise between the arms: this trains one run (a preset plus --set overrides,
counted in images shown, not wall-clock) and keeps one EMA copy of the generator per --variants HALF_LIFE:RAMPUP
(half-life in images; it is at most RAMPUP x images shown, as TrainConfig.ema_half_life / ema_rampup). For each copy
it records the fixed latents' mean cell colours every --video-every steps, as the training video's cellcolours.jsonl
does, and reports their colour flicker (progan.metrics.colour_flicker) over --flicker-window; and at each --at image
count it saves the copy as a snapshot and scores --n of its faces by FID and SWD against the held-out images, as
tools/race.py scores a race snapshot (below --size, upsampled bilinearly).

    python tools/ema_sweep.py ../shared/UTKFace --out runs/ema --variants 10000:0.05,10000:0.2,20000:0.5 \\
        --at 20000,40000,60000,100000 --flicker-window 36480-48000 --n 500

A variant equal to the run's own ema_half_life:ema_rampup is the run's G_ema (checked at the end). Writes
OUT/ema.json (per variant: flicker and the FID/SWD points) after every score, OUT/<variant>/snap-<images>.pt,
and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from race import fid_swd, load_split, parse_overrides, sample_snapshot, save_generator_snapshot  # noqa: E402

from progan import checkpoint, metrics, visualization  # noqa: E402
from progan.config import PRESETS, TrainConfig, auto_preset  # noqa: E402
from progan.errors import ProganError  # noqa: E402
from progan.facedata import ImageBank  # noqa: E402
from progan.gantrain import Trainer, ema_beta  # noqa: E402
from progan.monitor import cell_means  # noqa: E402


def parse_variants(spec: str) -> list[tuple[int, float]]:
    """'10000:0.05,20000:0.5' -> [(10000, 0.05), (20000, 0.5)]: EMA half-life in images and ramp-up fraction."""
    out: list[tuple[int, float]] = []
    for part in (x.strip() for x in spec.split(",") if x.strip()):
        hl, colon, ramp = part.partition(":")
        try:
            v = (int(hl), float(ramp) if colon else 0.0)
        except ValueError:
            raise ProganError(f"--variants {spec!r}: expected HALF_LIFE:RAMPUP pairs such as 10000:0.05") from None
        if v[0] <= 0 or v[1] < 0:
            raise ProganError(f"--variants {spec!r}: {part} needs a half-life > 0 and a ramp-up >= 0")
        if v not in out:
            out.append(v)
    if not out:
        raise ProganError("--variants: give at least one HALF_LIFE:RAMPUP pair")
    return out


def variant_name(v: tuple[int, float]) -> str:
    return f"hl{v[0]}-r{v[1]:g}"


class EmaSweep:
    """A Trainer plus one EMA copy of its generator per variant, updated after every step as Trainer updates G_ema."""

    def __init__(self, trainer: Trainer, variants: list[tuple[int, float]]):
        self.t = trainer
        self.variants = variants
        if trainer.nimg:
            raise ValueError("EmaSweep starts from a fresh Trainer (its EMA copies start from the initial weights)")
        self.G = {v: copy.deepcopy(trainer.G).eval().requires_grad_(False) for v in variants}
        self.colours: dict[tuple[int, float], list[tuple[int, np.ndarray]]] = {v: [] for v in variants}

    def step(self) -> None:
        t = self.t
        t.step()
        src = list(t.G.parameters())
        for (hl, ramp), G in self.G.items():
            torch._foreach_lerp_(list(G.parameters()), src, 1.0 - ema_beta(t.cfg.batch, t.nimg, hl, ramp))

    @torch.no_grad()
    def record_colours(self) -> None:
        """Each copy's fixed-latent cell colours now (what the training video would show under that EMA)."""
        level, alpha = self.t.phase()
        for v, G in self.G.items():
            images = visualization.to_uint8(G(self.t.fixed_z, level, alpha, labels=self.t.fixed_labels))
            self.colours[v].append((self.t.nimg, np.round(cell_means(images), 2)))

    def flicker(self, v: tuple[int, float], lo: int, hi: int) -> tuple[float, int]:
        """Colour flicker over the recorded frames with lo <= images shown <= hi, and the frame count."""
        frames = [c for n, c in self.colours[v] if lo <= n <= hi]
        return (metrics.colour_flicker(np.stack(frames)) if len(frames) >= 2 else float("nan")), len(frames)


def parse_window(spec: str) -> tuple[int, int]:
    lo, dash, hi = spec.partition("-")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise ProganError(f"--flicker-window {spec!r}: expected LO-HI in images, e.g. 36480-48000") from None
    if not dash or not 0 <= a < b:
        raise ProganError(f"--flicker-window {spec!r}: expected LO-HI with 0 <= LO < HI")
    return a, b


def run(args) -> dict:
    from progan.run import default_precision, pick_device, setup_backend

    device = pick_device(args.device)
    # as progan train: bf16 autocast on CUDA and bf16-native CPUs (sweeps before it existed trained fp32)
    args.precision = args.precision or default_precision(device)
    setup_backend(device, args.precision)
    preset = auto_preset(device.type, args.size) if args.preset == "auto" else args.preset
    cfg = TrainConfig(**{**PRESETS[preset], **args.overrides, "size": args.size, "seed": args.seed})
    variants = parse_variants(args.variants)
    try:
        at = sorted({int(x) for x in args.at.split(",") if x.strip()})
    except ValueError:
        raise ProganError(f"--at {args.at!r}: expected image counts such as 20000,40000") from None
    if at and at[0] <= 0:
        raise ProganError(f"--at {args.at!r}: image counts must be positive")
    lo, hi = parse_window(args.flicker_window)
    total = max(at + [hi])
    train_part, held = load_split(args.data, args.size, args.holdout)
    if len(train_part) < cfg.batch or len(held) < 2:
        raise ProganError(f"{args.data}: {len(train_part)} training and {len(held)} held-out images; need at least "
                          f"{cfg.batch} and 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reals = np.asarray(held.images)
    net = metrics.load_inception(device)
    stats = metrics.real_statistics(reals, device, model=net)
    m = min(args.n, len(reals))
    sweep = EmaSweep(Trainer(cfg, ImageBank(np.asarray(train_part.images), device), device,
                             precision=args.precision), variants)
    t = sweep.t
    result = {"data": str(args.data), "size": args.size, "preset": preset, "overrides": args.overrides,
              "config": cfg.to_dict(), "n": args.n, "fid_real_images": len(reals), "swd_images": m,
              "video_every": args.video_every, "flicker_window": [lo, hi], "device": str(device),
              "precision": args.precision,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "variants": {}}
    rows = {v: [] for v in variants}
    print(f"ema sweep: preset {preset} in {args.precision}, {len(variants)} EMA variants, to {total:,} images; "
          f"FID of {args.n} at {', '.join(f'{a:,}' for a in at)}", flush=True)

    def write() -> None:
        for v in variants:
            fl, frames = sweep.flicker(v, lo, hi)
            result["variants"][variant_name(v)] = {"half_life": v[0], "rampup": v[1], "flicker_ema": fl,
                                                   "flicker_frames": frames, "points": rows[v]}
        path = out / "ema.json"
        checkpoint.atomic_write(path, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))

    pending = list(at)
    while t.nimg < total:
        sweep.step()
        if t.steps % args.video_every == 0:
            sweep.record_colours()
        while pending and t.nimg >= pending[0]:
            pending.pop(0)
            level, _ = t.phase()
            for v in variants:
                path = out / variant_name(v) / f"snap-{t.nimg:07d}.pt"
                path.parent.mkdir(exist_ok=True)
                save_generator_snapshot(path, cfg, sweep.G[v], t.nimg, t.epoch)
                fakes = sample_snapshot("progan", path, args.n, args.size, args.seed, device)
                row = {"nimg": t.nimg, "res": cfg.resolution(level),
                       **fid_swd(fakes, reals, stats, net, m, args.seed, device)}
                rows[v].append(row)
                print(f"  {variant_name(v):16s} {t.nimg:>9,} img  {row['res']:3d} px  FID {row['fid']:8.2f}  "
                      f"SWD {row['swd']:7.2f}", flush=True)
            write()
    own = (cfg.ema_half_life, cfg.ema_rampup)
    if own in sweep.G:   # the same update as Trainer's: the copy must be the run's G_ema, bit for bit
        same = all(torch.equal(a, b) for a, b in zip(sweep.G[own].parameters(), t.G_ema.parameters()))
        result["own_variant_equals_G_ema"] = same
        if not same:
            raise RuntimeError("the sweep's copy of the run's own EMA setting differs from Trainer.G_ema")
    write()
    print(table(result))
    return result


def table(result: dict) -> str:
    lo, hi = result["flicker_window"]
    names = list(result["variants"])
    nimgs = [p["nimg"] for p in result["variants"][names[0]]["points"]] if names else []
    head = f"| EMA half-life : ramp-up | flicker {lo:,}-{hi:,} img | " + " | ".join(
        f"FID / SWD at {n:,} img" for n in nimgs) + " |"
    lines = [head, "| --- " * (2 + len(nimgs)) + "|"]
    for name, v in result["variants"].items():
        cells = [f"{p['fid']:.1f} / {p['swd']:.1f}" for p in v["points"]]
        lines.append(f"| {v['half_life']:,} : {v['rampup']:g} | {v['flicker_ema']:.3f} ({v['flicker_frames']} frames) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="image folder (e.g. UTKFace)")
    p.add_argument("--out", default="runs/ema", help="output folder [runs/ema]")
    p.add_argument("--variants", default="10000:0.05,10000:0.1,10000:0.2,20000:0.5",
                   help="EMA settings HALF_LIFE:RAMPUP, comma-separated [10000:0.05,10000:0.1,10000:0.2,20000:0.5]")
    p.add_argument("--at", default="20000,40000,60000", help="image counts at which to score every variant")
    p.add_argument("--flicker-window", default="36480-48000", metavar="LO-HI",
                   help="images shown over which colour flicker is measured [36480-48000: README's 37 frames]")
    p.add_argument("--video-every", type=int, default=10, help="steps between recorded frames [10]")
    p.add_argument("--n", type=int, default=500, help="generated faces per score [500]")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="training's forward passes [as progan train: bf16 on CUDA and on CPUs with native bf16, "
                        "else fp32]")
    a = p.parse_args(argv)
    try:
        a.overrides = parse_overrides(a.overrides)
        run(a)
    except ProganError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
