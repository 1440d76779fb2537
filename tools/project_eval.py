"""How well does `progan project` reconstruct real faces the run never trained on?

    python tools/project_eval.py runs/utk64 /work/shared/UTKFace --k 8 --distances pixel,l1,dfeat,pixel+dfeat

Projects K held-out faces (split_holdout(data, 0.03)[1], the faces a run with the default held-out fraction never
saw) with each named distance and reports, per distance, the mean per-pixel absolute error in [0, 255] and a
neutral perceptual error that none of the distances optimises (the distance between Inception pool3 features of
target and reconstruction, as a fraction of that between two different real faces, when the FID Inception weights
are installed). The baseline is the best of the --starts random latents, chosen by pixel L2, before optimisation.
Optionally writes a grid PNG: rows = faces, columns = target, best random latent, one reconstruction per distance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="Run folder or checkpoint")
    ap.add_argument("images", help="The run's training folder (UTKFace)")
    ap.add_argument("--k", type=int, default=8, help="Held-out faces to project [8]")
    ap.add_argument("--distances", default="pixel,l1,dfeat,pixel+dfeat", help="Comma-separated names")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--starts", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="Peak learning rate [the default settings']")
    ap.add_argument("--noise", type=float, default=None, help="Initial latent noise [the default settings']")
    ap.add_argument("--holdout", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0, help="Seed of the face choice and of the projections")
    ap.add_argument("--grid", default=None, help="Write a PNG grid of the reconstructions here")
    ap.add_argument("--no-inception", action="store_true", help="Skip the Inception-feature error")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)

    from progan import projection as P
    from progan.errors import ProganError
    from progan.facedata import load_folder, split_holdout
    from progan.generate import load_generator

    try:
        gen = load_generator(args.run, "cpu")
        D = P.load_discriminator(gen)
        names = [n.strip() for n in args.distances.split(",") if n.strip()]
        overrides = {k: v for k, v in (("lr", args.lr), ("noise", args.noise)) if v is not None}
        settings = {n: P.settings_for(n, steps=args.steps, starts=args.starts, seed=args.seed, **overrides)
                    for n in names}
        data = load_folder(args.images, gen.resolution, cache_dir=args.cache_dir, progress=False)
    except ProganError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _, held = split_holdout(data, args.holdout)
    pick = np.random.default_rng(args.seed).choice(len(held), size=min(args.k, len(held)), replace=False)
    targets = np.stack([np.asarray(held.images[i]) for i in np.sort(pick)])
    print(f"{len(targets)} held-out faces of {len(held)}, {args.steps} steps, best of {args.starts} starts",
          file=sys.stderr)

    recon: dict[str, list[np.ndarray]] = {n: [] for n in names}
    recon["random"] = []
    rows: dict[str, dict[str, list[float]]] = {n: {"mae": [], "seconds": []} for n in ["random", *names]}
    for i, target in enumerate(targets):
        # The baseline: best random start by pixel L2 (projection with no optimisation steps).
        base = P.project(gen, target, P.settings_for("pixel", steps=0, starts=args.starts, seed=args.seed), D=D)
        recon["random"].append(base.image)
        rows["random"]["mae"].append(base.mae)
        for n in names:
            t0 = time.perf_counter()
            r = P.project(gen, target, settings[n], D=D)
            rows[n]["seconds"].append(time.perf_counter() - t0)
            rows[n]["mae"].append(r.mae)
            recon[n].append(r.image)
        print(f"face {i}: " + "  ".join(f"{n} {rows[n]['mae'][-1]:.1f}" for n in rows), file=sys.stderr)

    incep = None
    if not args.no_inception:
        try:
            from progan.metrics import inception_features, load_inception

            model = load_inception("cpu")
            ft = inception_features(targets, model=model)
            # Scale: mean distance between two different real targets (all pairs).
            pair = [np.linalg.norm(ft[a] - ft[b]) for a in range(len(ft)) for b in range(a + 1, len(ft))]
            scale = float(np.mean(pair)) if pair else 1.0
            incep = {}
            for n in rows:
                fr = inception_features(np.stack(recon[n]), model=model)
                incep[n] = float(np.linalg.norm(fr - ft, axis=1).mean() / scale)
        except ProganError as e:
            print(f"note: no Inception error ({e})", file=sys.stderr)

    result = {"faces": len(targets), "steps": args.steps, "starts": args.starts, "run": str(args.run),
              "distances": {}}
    print(f"{'distance':<14}{'MAE [0,255]':>12}{'Inception err':>15}{'s/face':>8}")
    for n in rows:
        mae = float(np.mean(rows[n]["mae"]))
        sec = float(np.mean(rows[n]["seconds"])) if rows[n]["seconds"] else 0.0
        inc = incep[n] if incep else float("nan")
        result["distances"][n] = {"mae": mae, "mae_std": float(np.std(rows[n]["mae"])), "inception": inc,
                                  "seconds": sec}
        label = "best random" if n == "random" else n
        print(f"{label:<14}{mae:12.2f}{inc:15.3f}{sec:8.1f}")
    print(json.dumps(result))

    if args.grid:
        from PIL import Image

        from progan import visualization

        cols = ["random", *names]
        cells = np.stack([x for i in range(len(targets)) for x in [targets[i]] + [recon[c][i] for c in cols]])
        grid = visualization.image_grid(visualization.upscale_nearest(cells, 2 * cells.shape[1]), len(cols) + 1,
                                        pad=2)
        Image.fromarray(grid).save(args.grid)
        print(f"wrote {args.grid} (columns: target, {', '.join(cols)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
