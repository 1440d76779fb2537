"""Lever ablation of issue #11: `progan train` runs that differ from one baseline in one option each, trained for the
same number of images, then scored together (FID and SWD against the held-out images, colour flicker, noise control).

    python tools/ablate.py ../shared/UTKFace --out runs/ablate --jobs 2            # every arm below, seed 0
    python tools/ablate.py ../shared/UTKFace --out runs/ablate --arms baseline,hinge --seeds 0,1
    python tools/ablate.py ../shared/UTKFace --out runs/ablate --arms baseline --seeds 1 --no-score   # add a seed

The baseline is `progan train` with --base-flags (default: a 32 px version of the cpu64 preset with 6k-image
phases, so that one arm takes ~8 minutes on one CPU thread); an arm adds its flags (ARMS below) to it. Arms run
--jobs at a time, each as its own process with --threads torch threads, and stop after --images images (steps =
images / batch). A finished arm (its checkpoint holds the budget) is not trained again, so the command resumes and
new seeds or arms can be added later. Scoring runs tools/score_generators.py on the EMA generators (--n generated
faces against the held-out split at the model's resolution) and reads each run's log for img/s, the largest noise
epsilon, and its cellcolours.jsonl for the colour flicker of the fixed-latent grid (EMA and raw G) over the last
--flicker-images images. Writes OUT/ablation.json and prints a markdown table (means over seeds, and the spread).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

BASE_FLAGS = ("--size 32 --g-channels 64,64,32,16 --d-channels 64,64,32,16 --fade-images 6000 --stable-images 6000 "
              "--epochs 1000 --video-every 10 --keep 1")

# name -> flags added to the baseline; each is one lever of issue #11 turned the other way from the default
ARMS: dict[str, str] = {
    "baseline": "",
    "diffaugment": "--augment color,translation,cutout",
    "hinge": "--loss hinge",
    "diversity-all-layers": "--diversity-layers all",
    "no-diversity": "--diversity 0",
    "no-r1": "--r1-gamma 0",
    "no-r1-no-noise-control": "--r1-gamma 0 --noise-step 0",
    "no-noise-control": "--noise-step 0",
    "no-mbstd": "--no-mbstd",
    "no-pixel-norm": "--no-pixel-norm",
    "no-eq-lr": "--no-eq-lr",
    "two-timescale": "--lr-d 2e-3",
    "batch-64": "--batch 64 --lr-g 1.4e-3 --lr-d 1.4e-3",
}


def flag_value(flags: list[str], name: str, default: str) -> str:
    """The value of the last `name` in flags (the one click uses), or default."""
    at = [i for i, f in enumerate(flags[:-1]) if f == name]
    return flags[at[-1] + 1] if at else default


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-s{seed}"


def images_shown(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    from progan import checkpoint

    return int(checkpoint.load(run / "checkpoints" / latest.read_text().strip())["nimg"])


def train_arm(data: str, out: Path, arm: str, seed: int, base: list[str], images: int, threads: int,
              cache_dir: str | None) -> dict:
    flags = base + shlex.split(ARMS[arm]) + ["--seed", str(seed)]
    batch = int(flag_value(flags, "--batch", "32"))
    steps = -(-images // batch)
    run = run_dir(out, arm, seed)
    if images_shown(run) >= steps * batch:
        return {"arm": arm, "seed": seed, "trained": False}
    cmd = [sys.executable, "-m", "progan", "train", data, "--out", str(run), "--max-steps", str(steps),
           "--no-progress", "--device", "cpu", *flags] + (["--cache-dir", cache_dir] if cache_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] train {run.name}: {' '.join(flags)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out / f"{run.name}.train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"ablate: arm {run.name} failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    wall = time.perf_counter() - t0
    print(f"[{time.strftime('%H:%M:%S')}] done  {run.name} in {wall / 60:.1f} min", flush=True)
    return {"arm": arm, "seed": seed, "trained": True, "wall_s": wall}


def run_stats(run: Path, flicker_images: int) -> dict:
    """img/s, largest noise epsilon and the flicker of the fixed-latent grid, from the run's own records."""
    from progan import metrics
    from progan.config import TrainConfig

    cfg = TrainConfig.load(run / "config.json")
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in logs if "img_per_s" in r]
    frames = max(2, flicker_images // (cfg.batch * cfg.video_every))
    flicker = metrics.run_flicker(run, frames)
    return {"nimg": images_shown(run),
            "img_per_s": float(np.median([r["img_per_s"] for r in steps])) if steps else None,
            "eps_max": max((r.get("eps", 0.0) for r in steps), default=0.0),
            "eps_mean": float(np.mean([r.get("eps", 0.0) for r in steps])) if steps else 0.0,
            "flicker_ema": flicker["ema"], "flicker_raw": flicker["raw"], "flicker_frames": flicker["frames"]}


def score(data: str, out: Path, runs: list[Path], n: int, holdout: float, cache_dir: str | None) -> dict[str, dict]:
    result_file = out / "scores.json"
    cmd = [sys.executable, str(ROOT / "tools" / "score_generators.py"), data, *map(str, runs), "--n", str(n),
           "--holdout", str(holdout), "--json", str(result_file)] + (["--cache-dir", cache_dir] if cache_dir else [])
    proc = subprocess.run(cmd, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ablate: scoring failed (exit {proc.returncode})")
    return {Path(r["generator"]).name: r for r in json.loads(result_file.read_text())}


def table(rows: list[dict]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = [r for r in rows if r["arm"] == "baseline" and r.get("fid") is not None]
    base_fid = np.mean([r["fid"] for r in base]) if base else None
    lines = ["| arm | flags | seeds | FID | SWD ×10³ | ΔFID vs baseline | flicker EMA / raw | max ε | img/s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm and r.get("fid") is not None]
        if not rs:
            continue

        def fmt(key: str, digits: int = 1) -> str:
            v = [r[key] for r in rs if r.get(key) is not None]
            if not v:
                return "–"
            return f"{np.mean(v):.{digits}f}" + (f" ± {np.std(v):.{digits}f}" if len(v) > 1 else "")

        delta = "" if base_fid is None or arm == "baseline" else f"{np.mean([r['fid'] for r in rs]) - base_fid:+.1f}"
        lines.append(f"| {arm} | `{ARMS[arm] or '(none)'}` | {','.join(str(r['seed']) for r in rs)} | {fmt('fid')} | "
                     f"{fmt('swd')} | {delta} | {fmt('flicker_ema', 2)} / {fmt('flicker_raw', 1)} | "
                     f"{max(r['eps_max'] for r in rs):.3f} | {fmt('img_per_s', 0)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder (the held-out split is the FID reference)")
    p.add_argument("--out", default="runs/ablate", help="folder for the arms' runs and ablation.json")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} [all]")
    p.add_argument("--seeds", default="0", help="comma list of seeds [0]")
    p.add_argument("--base-flags", default=BASE_FLAGS, help=f"flags of every arm [{BASE_FLAGS}]")
    p.add_argument("--images", type=int, default=60_000, help="training images per arm [60000]")
    p.add_argument("--jobs", type=int, default=2, help="arms trained at once [2]")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm [1]")
    p.add_argument("--n", type=int, default=1000, help="generated faces per arm for FID [1000]")
    p.add_argument("--holdout", type=float, default=0.03, help="held-out fraction, as in training [0.03]")
    p.add_argument("--flicker-images", type=int, default=12_000,
                   help="colour flicker over the video frames of the last N images [12000]")
    p.add_argument("--no-score", action="store_true", help="train only")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in arms:
        if a not in ARMS:
            p.error(f"--arms: unknown arm '{a}' (choose from {', '.join(ARMS)})")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: '{args.seeds}' is not a comma list of integers")
    if not Path(args.data).is_dir() and args.data != "digits":
        p.error(f"'{args.data}' is not a folder of images")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = shlex.split(args.base_flags) + ["--holdout", str(args.holdout)]
    if (out / "ablation.json").is_file():
        old = json.loads((out / "ablation.json").read_text())
        if (old["base_flags"], old["images"]) != (args.base_flags, args.images):
            p.error(f"{out / 'ablation.json'} was made with other --base-flags or --images; use another --out")
    jobs = [(a, s) for s in seeds for a in arms]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        trained = list(pool.map(lambda job: train_arm(args.data, out, job[0], job[1], base, args.images,
                                                      args.threads, args.cache_dir), jobs))
    wall = {(t["arm"], t["seed"]): t.get("wall_s") for t in trained}
    if args.no_score:
        return
    runs = [run_dir(out, a, s) for a, s in jobs]
    scores = score(args.data, out, runs, args.n, args.holdout, args.cache_dir)
    previous = {(r["arm"], r["seed"]): r for r in (json.loads((out / "ablation.json").read_text())["rows"]
                                                   if (out / "ablation.json").is_file() else [])}
    for (a, s), run in zip(jobs, runs):
        sc = scores[run.name]
        row = {"arm": a, "seed": s, "flags": ARMS[a], "fid": sc["fid"], "swd": sc["swd"], "n_fake": sc["n_fake"],
               "n_real": sc["n_real"], **run_stats(run, args.flicker_images)}
        old_wall = previous.get((a, s), {}).get("wall_s")
        row["wall_s"] = wall[(a, s)] if wall[(a, s)] is not None else old_wall
        previous[(a, s)] = row
    rows = sorted(previous.values(), key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    (out / "ablation.json").write_text(json.dumps({"base_flags": args.base_flags, "images": args.images,
                                                   "n": args.n, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
