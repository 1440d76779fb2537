"""Train the age / gender / ethnicity classifier on a labelled face folder (UTKFace) and score it on held-out faces.

    python tools/label_classifier.py /work/shared/UTKFace --out label-classifier.pt --minutes 12

Training uses split_holdout(data, 0.03)[0], the same training part a GAN run uses; the scores are on the held-out
part, beside a majority-class (median-age) baseline that ignores the image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from progan.errors import ProganError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", help="Folder of UTKFace-named images (age_gender_race_date.jpg)")
    ap.add_argument("--out", required=True, help="Where to save the classifier (.pt)")
    ap.add_argument("--minutes", type=float, default=None, help="Training budget in minutes of wall time")
    ap.add_argument("--epochs", type=int, default=None, help="Training budget in epochs (default: 10 if no --minutes)")
    ap.add_argument("--size", type=int, default=64, help="Image side the classifier works at [64]")
    ap.add_argument("--holdout", type=float, default=0.03, help="Held-out fraction (by file-name hash) [0.03]")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="Cache of decoded images [$PROGAN_CACHE or ~/.cache/progan]")
    args = ap.parse_args(argv)

    import torch

    from progan import label_classifier as lc
    from progan.facedata import load_folder, split_holdout

    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        data = load_folder(args.images, args.size, cache_dir=args.cache_dir)
        train, held = split_holdout(data, args.holdout)
        print(f"{len(train)} training / {len(held)} held-out images at {args.size} px", file=sys.stderr)
        epochs = args.epochs if args.epochs is not None or args.minutes is not None else 10
        t0 = time.perf_counter()
        model = lc.train_classifier(train, minutes=args.minutes, epochs=epochs, batch=args.batch, seed=args.seed,
                                    log=lambda m: print(m, file=sys.stderr))
        seconds = time.perf_counter() - t0
        res = lc.evaluate(model, held, train)
        res.update(train_images=len(train), heldout_images=len(held), train_seconds=round(seconds, 1))
        lc.save(model, args.out, info=res)
    except ProganError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    c, b = res["classifier"], res["baseline"]
    print(f"held-out ({len(held)} faces)   classifier   majority baseline")
    print(f"age MAE (years)          {c['age_mae']:10.2f}   {b['age_mae']:10.2f}")
    print(f"gender accuracy          {c['gender_acc']:10.3f}   {b['gender_acc']:10.3f}")
    print(f"race accuracy            {c['race_acc']:10.3f}   {b['race_acc']:10.3f}")
    print(json.dumps(res))
    print(f"wrote {args.out} (trained {seconds / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
