"""Does a conditional run draw the faces it is asked for? Label fidelity judged by the label classifier.

    python tools/label_fidelity.py runs/utk64-cond --classifier label-classifier.pt --n 1000 [--real UTKFace/]

Asks RUN's EMA generator for N faces with requested labels (from the held-out real faces of --real, else uniform),
reads age / gender / ethnicity back with the classifier, and prints how often gender and ethnicity match and the
age MAE, beside the classifier's scores on real held-out faces (fresh from --real, else those stored with the
classifier). For runs conditioned on age, also the identity drift of age sweeps (--sweep-ages).
Unconditional runs are refused: there is nothing requested to compare with.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="Run folder, checkpoint or export of a conditional run")
    ap.add_argument("--classifier", required=True, help="Label classifier from tools/label_classifier.py")
    ap.add_argument("--n", type=int, default=1000, help="Generated faces [1000]")
    ap.add_argument("--real", default=None, help="The run's labelled image folder (requested labels and real scores)")
    ap.add_argument("--holdout", type=float, default=0.03)
    ap.add_argument("--sweep-ages", default="15,65", help="Ages at the two ends of the identity-drift sweeps [15,65]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from progan import label_classifier as lc
    from progan import label_fidelity as lf
    from progan import visualization
    from progan.errors import ProganError
    from progan.generate import load_generator

    try:
        gen = load_generator(args.run, args.device)
        condition = tuple(getattr(gen.config, "condition", ()))
        if not condition:
            raise ProganError(f"{args.run} is an unconditional run: label fidelity needs a run trained with labels")
        model = lc.load(args.classifier, gen.device)
        real = None
        if args.real:
            from progan.facedata import load_folder, split_holdout

            real = split_holdout(load_folder(args.real, model.size, cache_dir=args.cache_dir, progress=False),
                                 args.holdout)[1]
        try:
            a0, a1 = (float(v) for v in args.sweep_ages.split(","))
        except ValueError:
            raise ProganError(f"--sweep-ages must look like 15,65, got '{args.sweep_ages}'") from None

        def render(z: torch.Tensor, rows: np.ndarray) -> np.ndarray:
            labels = torch.from_numpy(rows.astype(np.float32)).to(gen.device)
            with torch.inference_mode():
                return visualization.to_uint8(gen.G(z.to(gen.device), gen.level, gen.alpha, labels=labels))

        z_all = gen.latents(args.n, args.seed)
        cursor = [0]

        def generate(rows: np.ndarray) -> np.ndarray:
            s = cursor[0]
            cursor[0] += len(rows)
            return render(z_all[s:s + len(rows)], rows)

        stored = getattr(model, "info", {}).get("classifier")
        report = lf.fidelity_report(generate, model, condition, n=args.n, seed=args.seed, real=real,
                                    real_scores=stored, batch=args.batch)
        if "age" in condition:
            m = min(args.n, 256)
            rows = lf.requested_labels(condition, m, args.seed + 1, real)
            j = condition.index("age")
            young, old = rows.copy(), rows.copy()
            young[:, j], old[:, j] = a0, a1
            z = gen.latents(m, args.seed + 1)
            ends = [np.concatenate([render(z[s:s + args.batch], r[s:s + args.batch])
                                    for s in range(0, m, args.batch)]) for r in (young, old)]
            report["drift"] = lf.identity_drift(model, *ends)
            report["drift"]["ages"] = [a0, a1]
    except ProganError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(lf.format_report(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
