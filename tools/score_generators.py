"""FID and SWD of exported generators (or run folders) against the held-out split of an image folder, in one table.

    python tools/score_generators.py ../shared/UTKFace runs/a.safetensors runs/b.safetensors --n 5000
    python tools/score_generators.py ../shared/UTKFace cond.safetensors uncond.safetensors --per-group gender,race

The reference is the held-out part of progan.facedata.split_holdout(folder, --holdout), the images a default
`progan train` never trains on; its Inception statistics are cached. FID compares --n generated faces with all
held-out images; SWD compares equally many of each (the smaller count). For runs trained elsewhere (e.g. on a GPU
machine without the Inception weights), export the EMA generator there and score here.

Conditional generators need labels for every face. `--labels data` (the default) gives face i the labels of a
held-out image drawn at random, so the generated set has the reference's label distribution, as a FID needs;
`--labels uniform` draws them uniformly over the label space (every age equally often), which a FID penalises.

`--per-group gender,race` adds FID per value of those UTKFace labels (e.g. race = Asian). The held-out groups are
too small for a FID, so each group's reference is --group-n images of that group from the *training* split, as is
usual for GAN FIDs. A conditional generator is asked for the group (its other labels drawn from that group's
images) and, as the baseline, also scored with its ordinary samples (labels drawn from all held-out images); an
unconditional generator has only its ordinary samples. Groups with fewer than --group-n training images are skipped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def label_rows(gen, data, n: int, seed: int, mode: str = "data", among: np.ndarray | None = None) -> torch.Tensor | None:
    """n x K labels for a conditional generator: rows of data's labelled images (only those indexed by `among`, if
    given) drawn with replacement (mode data), or uniform over the label space (mode uniform); None for an
    unconditional generator."""
    from progan import labels as labels_mod

    cond = gen.condition
    if not cond:
        return None
    if mode == "uniform":
        return labels_mod.random_labels(gen.config, n, seed)
    if cond == (labels_mod.FOLDERS,):
        classes, idx = labels_mod.folder_classes(data.names)
        lookup = {c: gen.config.classes.index(c) for c in classes if c in gen.config.classes}
        cols = [np.asarray([lookup.get(classes[i], -1) if i >= 0 else -1 for i in idx])]
    else:
        cols = [np.asarray(data.labels[c]) for c in cond]
    labelled = np.all(np.stack(cols) >= 0, axis=0)
    if among is not None:
        labelled &= np.isin(np.arange(len(labelled)), among)
    ok = np.flatnonzero(labelled)
    if len(ok) == 0:
        raise SystemExit(f"no labelled images to draw {','.join(cond)} labels from")
    pick = np.random.default_rng(seed + 17).choice(ok, n, replace=True)
    rows = np.stack([c[pick] for c in cols], axis=1).astype(np.float32)
    if "age" in cond:
        lo, hi = labels_mod.age_range(gen.config)
        j = cond.index("age")
        rows[:, j] = np.clip(rows[:, j], lo, hi)
    return torch.from_numpy(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the training image folder (its held-out split is the reference)")
    p.add_argument("generators", nargs="+", help="exported .safetensors, checkpoints or run folders")
    p.add_argument("--n", type=int, default=5000, help="generated faces per generator [5000]")
    p.add_argument("--holdout", type=float, default=0.03, help="held-out fraction, as in training [0.03]")
    p.add_argument("--seed", type=int, default=0, help="latent seed [0]")
    p.add_argument("--labels", choices=["data", "uniform"], default="data",
                   help="labels of a conditional generator's faces: drawn from the held-out images or uniform [data]")
    p.add_argument("--per-group", default="", help="comma list of UTKFace labels (gender, race) for per-group FID")
    p.add_argument("--group-n", type=int, default=500, help="reference and generated faces per group [500]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    groups = [g.strip() for g in args.per_group.split(",") if g.strip()]
    from progan.labels import NAMES

    for g in groups:
        if g not in NAMES:
            p.error(f"--per-group: '{g}' is not one of {', '.join(NAMES)}")

    from progan import metrics
    from progan.facedata import load_folder, split_holdout
    from progan.generate import load_generator

    rows = []
    net = metrics.load_inception("cpu")
    splits: dict[int, tuple] = {}
    for path in args.generators:
        gen = load_generator(path, "cpu")
        size = gen.resolution  # the size it makes (below config.size for a run stopped mid-growth)
        if size not in splits:
            splits[size] = split_holdout(load_folder(args.folder, size, cache_dir=args.cache_dir, progress=False),
                                         args.holdout)
        train, held = splits[size]
        stats = metrics.real_statistics(held.images, "cpu", cache_dir=args.cache_dir, model=net)
        t0 = time.perf_counter()
        fakes = gen.sample(args.n, seed=args.seed, labels=label_rows(gen, held, args.n, args.seed, args.labels))
        feats = metrics.inception_features(fakes, "cpu", model=net)
        m = min(len(fakes), len(held))
        s = metrics.swd(held.images[:m], fakes[:m], seed=args.seed)
        row = {"generator": str(path), "n_fake": len(fakes), "n_real": len(held),
               "labels": args.labels if gen.condition else None,
               "fid": metrics.fid_from_features(feats, stats.features), "swd": s["avg"],
               "swd_levels": s["levels"], "groups": {}}
        print(f"{Path(path).name:40s} FID {row['fid']:8.2f}  SWD {row['swd']:7.2f}  "
              f"({row['n_fake']} generated vs {row['n_real']} held-out)", flush=True)
        for g in groups:
            for v, name in enumerate(NAMES[g]):
                members = np.flatnonzero(np.asarray(train.labels[g]) == v)
                if len(members) < args.group_n:
                    print(f"  {g}={name}: {len(members)} training images < --group-n {args.group_n}; skipped")
                    continue
                pick = np.sort(np.random.default_rng(args.seed + v).choice(members, args.group_n, replace=False))
                ref = metrics.real_statistics(train.images[pick], "cpu", cache_dir=args.cache_dir, model=net)
                # the same model's ordinary samples (labels of the whole data) against the group: the baseline
                base = metrics.fid_from_features(feats[:args.group_n], ref.features)
                fid, how = base, "ordinary samples"
                if gen.condition and g in gen.condition:
                    y = label_rows(gen, train, args.group_n, args.seed + 100 + v, among=pick)
                    gfeats = metrics.inception_features(
                        gen.sample(args.group_n, seed=args.seed + 1 + v, labels=y), "cpu", model=net)
                    fid, how = metrics.fid_from_features(gfeats, ref.features), "conditioned on the group"
                row["groups"][f"{g}={name}"] = {"fid": fid, "fid_ordinary_samples": base, "n": args.group_n,
                                                "how": how}
                print(f"  {g}={name:8s} FID {fid:8.2f}  ({args.group_n} {how} vs {args.group_n} training images "
                      f"of the group; its ordinary samples: {base:.2f})", flush=True)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
