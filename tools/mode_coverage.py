"""Mode coverage on the built-in stacked digits (the Stacked-MNIST protocol, offline): does diversity learning help?

    python tools/mode_coverage.py --budget-images 200000 --seeds 3 --diversity 0,1 --threads 1

For every diversity value and seed (0 .. --seeds - 1) this trains progan on `digits` with the `digits` preset for
--budget-images images (a run folder under --work-dir per run; a run that already has them is not trained again, an
interrupted one resumes), samples --n-eval images from its EMA generator, reads the digit in each channel with a
classifier trained on the stacked-digits channels (progan.digits_classifier), and counts

  modes  the distinct 3-digit labels among the samples (of 1000),
  KL     KL(p_generated || uniform over the 1000 labels) in nats, as in VEEGAN / PacGAN.

The same numbers for --n-eval real images (a seed the GAN never saw) are the reference row: with 10,000 samples a
perfect generator covers ~1000 modes with KL ~0.05 (a finite-sample floor, not zero). Prints a table and the
mean +- std (ddof=1) per diversity value, and writes everything to --out (JSON).

Options of the training config can be changed with --set KEY=VALUE (e.g. --set batch=64 --set g_channels=64,64,32,16);
such runs get their own folders. Training writes no video unless --video is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

NO_VIDEO = 10 ** 9  # video_every: no frames within any budget


def parse_float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return values


def parse_override(text: str, fields: dict[str, Any]) -> tuple[str, Any]:
    """'KEY=VALUE' -> (key, value) typed like TrainConfig's field (tuples as comma-separated ints)."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in fields:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
    default = fields[key]
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return key, value.lower() in ("1", "true", "yes")
        if isinstance(default, tuple):
            return key, tuple(int(v) for v in value.split(",") if v.strip())
        if isinstance(default, int):
            return key, int(value)
        return key, float(value)
    except ValueError:
        raise SystemExit(f"--set {text!r}: bad value for {key} (default {default!r})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--budget-images", type=int, default=200_000, help="Images shown per training run [200000].")
    p.add_argument("--seeds", type=int, default=3, help="Training seeds per diversity value: 0 .. N-1 [3].")
    p.add_argument("--diversity", type=parse_float_list, default=[0.0, 1.0],
                   help="Comma-separated diversity strengths to compare [0,1].")
    p.add_argument("--size", type=int, default=None, help="Image size [the digits preset's, 32].")
    p.add_argument("--n-eval", type=int, default=10_000, help="Samples per run (and real images for reference).")
    p.add_argument("--sample-seed", type=int, default=0, help="Latent seed for the evaluation samples [0].")
    p.add_argument("--work-dir", default="runs/mode_coverage", help="Where the run folders go [runs/mode_coverage].")
    p.add_argument("--out", default="mode_coverage.json", help="The JSON report [mode_coverage.json].")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Change a TrainConfig option for all runs (repeatable).")
    p.add_argument("--video", action="store_true", help="Write training.mkv as usual (costs time).")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto].")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (sets OMP_NUM_THREADS for training too) [OMP_NUM_THREADS or all cores].")
    p.add_argument("--clf-train-images", type=int, default=3000, help="Stacked images the classifier learns from.")
    p.add_argument("--eval-only", action="store_true", help="Never train: evaluate the runs that are complete.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return p


def run_name(diversity: float, seed: int, size: int, budget: int, overrides: dict[str, Any]) -> str:
    name = f"div{diversity:g}-seed{seed}-{size}px-{budget}img"
    if overrides:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=list).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return name


def final_nimg(run_dir: Path) -> int:
    """Images shown at the run's latest checkpoint (0 when it has none)."""
    from progan import checkpoint

    path = checkpoint.latest(run_dir)
    return int(checkpoint.load(path).get("nimg", 0)) if path is not None else 0


def plan(requested: dict[str, Any], budget: int) -> tuple[dict[str, Any], int]:
    """(requested with epochs set, target images): budget rounded up to whole batches, epochs to cover it."""
    from progan.config import TrainConfig
    from progan.run import load_dataset

    from progan.facedata import split_holdout

    cfg = TrainConfig(**requested)
    # the training part of the set train() uses (it keeps cfg.holdout of it out of training)
    n = len(split_holdout(load_dataset("digits", cfg.size, progress=False), cfg.holdout)[0])
    per_epoch = (n // cfg.batch) * cfg.batch
    target = math.ceil(budget / cfg.batch) * cfg.batch
    return {**requested, "epochs": max(1, math.ceil(target / per_epoch))}, target


def train_run(run_dir: Path, requested: dict[str, Any], target: int, device: str, progress: bool) -> dict[str, Any]:
    """Train run_dir up to `target` images (resuming), unless it is there already. Raises SystemExit on a signal."""
    from progan.config import TrainConfig
    from progan.run import train

    done = final_nimg(run_dir)
    if done >= target:
        return {"trained": False, "train_seconds": 0.0}
    steps = (target - done) // TrainConfig(**requested).batch
    t0 = time.perf_counter()
    result = train("digits", run_dir, requested, explicit=set(requested), device=device, progress=progress,
                   max_steps=steps)
    seconds = time.perf_counter() - t0
    if result.signal is not None:
        print(f"stopped by signal at {result.nimg:,} images; run the same command again to resume", file=sys.stderr)
        raise SystemExit(128 + result.signal)
    if result.nimg < target:
        raise SystemExit(f"{run_dir} stopped at {result.nimg:,} of {target:,} images")
    return {"trained": True, "train_seconds": round(seconds, 1),
            "img_per_s": round((result.nimg - done) / max(seconds, 1e-9), 1)}


def evaluate_run(run_dir: Path, clf, n_eval: int, sample_seed: int, device: str) -> dict[str, Any]:
    from progan.digits_classifier import mode_stats
    from progan.generate import load_generator

    t0 = time.perf_counter()
    gen = load_generator(run_dir, device)
    images = gen.sample(n_eval, seed=sample_seed)
    stats = mode_stats(clf.predict(images))
    return {"modes": stats["modes"], "kl": stats["kl"], "images_shown": gen.nimg, "resolution": gen.resolution,
            "checkpoint": str(gen.source), "eval_seconds": round(time.perf_counter() - t0, 1)}


def print_table(report: dict[str, Any]) -> None:
    ref = report["reference"]
    print(f"\nmode coverage: {report['budget_images']:,} images per run, {report['n_eval']:,} samples, "
          f"{report['size']} px (classifier 3-digit accuracy {report['classifier']['fresh_images']['three_digit_acc']:.3f}"
          f" on real images, {report['classifier']['heldout_sources']['three_digit_acc']:.3f} on held-out digits)")
    print(f"{'diversity':>9} {'seed':>5} {'modes':>6} {'KL':>7}  images")
    for r in report["runs"]:
        print(f"{r['diversity']:>9g} {r['seed']:>5} {r['modes']:>6} {r['kl']:>7.3f}  {r['images_shown']:,}")
    print(f"{'real':>9} {'-':>5} {ref['modes']:>6} {ref['kl']:>7.3f}  (classifier on {ref['n']:,} real images)")
    print("\nper diversity (mean +- std over seeds, ddof=1):")
    for s in report["summary"]:
        def pm(mean: float, std: float | None, digits: int) -> str:
            return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else " (one seed, no std)")

        print(f"  diversity {s['diversity']:g}: modes {pm(s['modes_mean'], s['modes_std'], 1)}, "
              f"KL {pm(s['kl_mean'], s['kl_std'], 3)}  ({s['n_seeds']} seed{'s' if s['n_seeds'] != 1 else ''})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be at least 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # train()'s setup_backend then keeps this setting
    import torch

    from progan.config import PRESETS, TrainConfig
    from progan.digits_classifier import summarise, train_classifier
    from progan.errors import ProganError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.budget_images < 1 or args.seeds < 1 or args.n_eval < 1:
        raise SystemExit("--budget-images, --seeds and --n-eval must be positive")

    fields = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}
    overrides = dict(parse_override(o, fields) for o in args.overrides)
    for key in ("diversity", "seed", "epochs"):
        if key in overrides:
            raise SystemExit(f"--set {key}=...: the benchmark sets {key} itself")
    base = dict(PRESETS["digits"])
    if args.size is not None:
        base["size"] = args.size
    if not args.video:
        base["video_every"] = NO_VIDEO
    base.update(overrides)
    try:
        size = TrainConfig(**base).size
    except (ProganError, TypeError) as e:
        raise SystemExit(f"bad training config: {e}") from None

    t0 = time.perf_counter()
    print(f"training the channel classifier at {size} px ...", file=sys.stderr)
    clf = train_classifier(size=size, n_train=args.clf_train_images, n_eval=args.n_eval)
    acc = clf.report
    print(f"classifier: single-channel {acc['fresh_images']['channel_acc']:.4f}, 3-digit "
          f"{acc['fresh_images']['three_digit_acc']:.4f} on real images; held-out digits: single-channel "
          f"{acc['heldout_sources']['channel_acc']:.4f}, 3-digit {acc['heldout_sources']['three_digit_acc']:.4f}",
          file=sys.stderr)

    work = Path(args.work_dir)
    runs = []
    for diversity in args.diversity:
        for seed in range(args.seeds):
            requested, target = plan({**base, "diversity": diversity, "seed": seed}, args.budget_images)
            run_dir = work / run_name(diversity, seed, size, args.budget_images, overrides)
            row: dict[str, Any] = {"diversity": diversity, "seed": seed, "run_dir": str(run_dir),
                                   "target_images": target}
            try:
                if args.eval_only:
                    if final_nimg(run_dir) < target:
                        print(f"skipping {run_dir}: not trained to {target:,} images", file=sys.stderr)
                        continue
                    row.update(trained=False, train_seconds=0.0)
                else:
                    print(f"run {run_dir} (diversity {diversity:g}, seed {seed}, {target:,} images)", file=sys.stderr)
                    row.update(train_run(run_dir, requested, target, args.device, not args.no_progress))
                row.update(evaluate_run(run_dir, clf, args.n_eval, args.sample_seed, args.device))
            except ProganError as e:
                raise SystemExit(f"{run_dir}: {e}") from None
            print(f"  modes {row['modes']}, KL {row['kl']:.3f}", file=sys.stderr)
            runs.append(row)

    summary = []
    for diversity in args.diversity:
        rows = [r for r in runs if r["diversity"] == diversity]
        if not rows:
            continue
        m_mean, m_std = summarise([float(r["modes"]) for r in rows])
        k_mean, k_std = summarise([r["kl"] for r in rows])
        if len(rows) < 2:  # a standard deviation needs two seeds
            m_std = k_std = None
        summary.append({"diversity": diversity, "n_seeds": len(rows), "modes_mean": m_mean, "modes_std": m_std,
                        "kl_mean": k_mean, "kl_std": k_std})

    report = {
        "protocol": "Stacked-MNIST mode coverage on progan's built-in stacked digits: modes = distinct predicted "
                    "3-digit labels among n_eval samples of the EMA generator (of 1000); kl = KL(p_generated || "
                    "uniform over 1000) in nats; std over seeds with ddof=1",
        "budget_images": args.budget_images,
        "size": size,
        "n_eval": args.n_eval,
        "sample_seed": args.sample_seed,
        "seeds": list(range(args.seeds)),
        "diversity": args.diversity,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()},
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "device": args.device,
        "threads": torch.get_num_threads(),
        "classifier": acc,
        "reference": {**acc["fresh_images"]["predicted"], "what": "classifier on real stacked digits (seed "
                      f"{acc['fresh_images']['seed']}), n = n_eval"},
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
