"""FID and SWD of exported generators (or run folders) against the held-out split of an image folder, in one table.

    python tools/score_generators.py ../shared/UTKFace runs/a.safetensors runs/b.safetensors --n 5000

The reference is the held-out part of progan.facedata.split_holdout(folder, --holdout), the images a default
`progan train` never trains on; its Inception statistics are cached. FID compares --n generated faces with all
held-out images; SWD compares equally many of each (the smaller count). For runs trained elsewhere (e.g. on a GPU
machine without the Inception weights), export the EMA generator there and score here. Conditional generators get
labels drawn uniformly over their label space (FaceGenerator.sample's default).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the training image folder (its held-out split is the reference)")
    p.add_argument("generators", nargs="+", help="exported .safetensors, checkpoints or run folders")
    p.add_argument("--n", type=int, default=5000, help="generated faces per generator [5000]")
    p.add_argument("--holdout", type=float, default=0.03, help="held-out fraction, as in training [0.03]")
    p.add_argument("--seed", type=int, default=0, help="latent seed [0]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    from progan import metrics
    from progan.facedata import load_folder, split_holdout
    from progan.generate import load_generator

    rows = []
    net = metrics.load_inception("cpu")
    held_by_size: dict[int, object] = {}
    for path in args.generators:
        gen = load_generator(path, "cpu")
        size = gen.resolution  # the size it makes (below config.size for a run stopped mid-growth)
        if size not in held_by_size:
            held_by_size[size] = split_holdout(load_folder(args.folder, size, cache_dir=args.cache_dir,
                                                           progress=False), args.holdout)[1].images
        held = held_by_size[size]
        stats = metrics.real_statistics(held, "cpu", cache_dir=args.cache_dir, model=net)
        t0 = time.perf_counter()
        fakes = gen.sample(args.n, seed=args.seed)
        feats = metrics.inception_features(fakes, "cpu", model=net)
        m = min(len(fakes), len(held))
        s = metrics.swd(held[:m], fakes[:m], seed=args.seed)
        row = {"generator": str(path), "n_fake": len(fakes), "n_real": len(held),
               "fid": metrics.fid_from_features(feats, stats.features), "swd": s["avg"],
               "swd_levels": s["levels"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{Path(path).name:40s} FID {row['fid']:8.2f}  SWD {row['swd']:7.2f}  "
              f"({row['n_fake']} generated vs {row['n_real']} held-out, {row['seconds']:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
