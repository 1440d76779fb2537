"""Label fidelity of a conditional generator, judged by the label classifier (progan.label_classifier).

Ask the generator for faces with given labels, let the classifier read the labels back, and compare: how often the
face has the requested gender and ethnicity, and the mean absolute error between requested and read age. The same
classifier's scores on held-out real faces say how much of the gap is the classifier's own error. For age sweeps,
identity drift compares the classifier's penultimate features of the two ends of each sweep (same latent, different
age) with those of two different faces.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from progan.errors import ProganError
from progan.facedata import FaceData
from progan.label_classifier import CLASSES, LabelClassifier, predict, score

LABELS = ("age", "gender", "race")


def requested_labels(condition: Sequence[str], n: int, seed: int = 0, real: FaceData | None = None) -> np.ndarray:
    """n label rows (float32 n x K, columns in `condition` order) to ask a generator for.

    With real faces: rows of real faces whose conditioned labels are all known (so the mix matches the data and the
    real-data scores are a fair reference); without: ages uniform in 1..80, classes uniform.
    """
    if n < 1:
        raise ProganError(f"--n must be at least 1, got {n}")
    unknown = [c for c in condition if c not in LABELS]
    if unknown:
        raise ProganError(f"no label classifier head for {', '.join(unknown)} (it reads {', '.join(LABELS)})")
    rng = np.random.default_rng(seed)
    if real is not None:
        known = np.ones(len(real), bool)
        for c in condition:
            known &= real.labels[c] >= 0
        idx = np.flatnonzero(known)
        if len(idx) == 0:
            raise ProganError("no real face has all of the run's condition labels")
        pick = rng.choice(idx, size=n, replace=n > len(idx))
        return np.stack([real.labels[c][pick] for c in condition], 1).astype(np.float32)
    cols = [rng.integers(1, 81, n) if c == "age" else rng.integers(0, CLASSES[c], n) for c in condition]
    return np.stack(cols, 1).astype(np.float32)


def _as_labels(condition: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Label rows -> score()'s dict of int64 arrays, -1 for labels the run is not conditioned on."""
    n = rows.shape[0]
    out = {k: np.full(n, -1, np.int64) for k in LABELS}
    for j, c in enumerate(condition):
        out[c] = np.rint(rows[:, j]).astype(np.int64)
    return out


def generated_scores(generate: Callable[[np.ndarray], np.ndarray], model: LabelClassifier,
                     condition: Sequence[str], rows: np.ndarray, batch: int = 64) -> dict[str, float]:
    """Classifier scores of generate(rows) against the requested rows: age_mae, gender_acc, race_acc (nan for
    labels the run is not conditioned on)."""
    preds: list[dict[str, np.ndarray]] = []
    for s in range(0, len(rows), batch):
        images = generate(rows[s:s + batch])
        if images.ndim != 4 or images.shape[0] != len(rows[s:s + batch]) or images.dtype != np.uint8:
            raise ProganError(f"generate() must return uint8 N x H x W x 3 for N label rows, got "
                              f"{images.dtype} {tuple(images.shape)}")
        preds.append(predict(model, images))
    pred = {k: np.concatenate([p[k] for p in preds]) for k in LABELS}
    # Age is compared with the requested (float) age, not a rounded one.
    req = _as_labels(condition, rows)
    res = score(pred, req)
    if "age" in condition:
        res["age_mae"] = float(np.abs(pred["age"] - rows[:, list(condition).index("age")]).mean())
    return res


def identity_drift(model: LabelClassifier, start: np.ndarray, end: np.ndarray) -> dict[str, float]:
    """Mean cosine distance of the classifier's penultimate features between the two ends of each sweep
    (start[i] and end[i]: the same latent at two ages), beside the same between two different faces
    (start[i] and start[i+1]). A ratio near 1 means the sweep changes the face as much as a new face would."""
    if len(start) != len(end) or len(start) < 2:
        raise ProganError("identity drift needs at least 2 sweeps with both ends")
    fa = predict(model, start, with_features=True)["features"]
    fb = predict(model, end, with_features=True)["features"]

    def cos_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return 1.0 - (a * b).sum(1)

    sweep = float(cos_dist(fa, fb).mean())
    rand = float(cos_dist(fa, np.roll(fa, -1, axis=0)).mean())
    return {"sweep": sweep, "random_pair": rand, "ratio": sweep / rand if rand > 0 else math.nan}


def fidelity_report(generate: Callable[[np.ndarray], np.ndarray], model: LabelClassifier,
                    condition: Sequence[str], n: int = 1000, seed: int = 0, real: FaceData | None = None,
                    real_scores: dict[str, float] | None = None, batch: int = 64) -> dict[str, Any]:
    """{"generated": scores of n generated faces, "real": the classifier's scores on real held-out faces
    (computed from `real`, else the given `real_scores`, e.g. those stored with the classifier), "n", "condition"}."""
    rows = requested_labels(condition, n, seed, real)
    out: dict[str, Any] = {"n": n, "condition": list(condition),
                           "generated": generated_scores(generate, model, condition, rows, batch)}
    if real is not None:
        out["real"] = score(predict(model, real.images), real.labels)
    elif real_scores is not None:
        out["real"] = dict(real_scores)
    return out


def format_report(report: dict[str, Any]) -> str:
    """A small table: requested-label fidelity of generated faces beside the classifier on real faces."""
    gen, real = report["generated"], report.get("real", {})
    lines = [f"{'':24}{'generated':>10}{'real held-out':>15}"]
    for key, label, fmt in (("gender_acc", "gender as requested", "{:10.3f}"),
                            ("race_acc", "race as requested", "{:10.3f}"),
                            ("age_mae", "age MAE (years)", "{:10.2f}")):
        name = key.split("_")[0]
        if name not in report["condition"]:
            continue
        r = real.get(key)
        lines.append(f"{label:<24}{fmt.format(gen[key])}{'' if r is None else fmt.format(r):>15}")
    if "drift" in report:
        d = report["drift"]
        lines.append(f"identity drift: age sweep {d['sweep']:.3f} vs two random faces {d['random_pair']:.3f} "
                     f"(ratio {d['ratio']:.2f}; classifier-feature cosine distance)")
    return "\n".join(lines)
