"""A small CNN that reads age, gender and ethnicity off a face, to check what a (conditional) generator draws.

Three heads on one shared trunk: age as a regression on log(1 + years) with an L1 loss (an error of 5 years
matters more at 8 than at 60, and the log keeps the rare old ages from dominating), gender (2 classes) and race
(5 classes, UTKFace's coding) as softmax classifiers. Unknown labels (-1) are left out of their head's loss.
Saved as a plain dict of tensors and values, so it loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from progan.errors import ProganError
from progan.facedata import FaceData

FORMAT = "progan-label-classifier"
SCHEMA = 1
CLASSES = {"gender": 2, "race": 5}
HEADS = ("age", "gender", "race")
GENDER_NAMES = ("male", "female")
RACE_NAMES = ("White", "Black", "Asian", "Indian", "Others")


class LabelClassifier(nn.Module):
    """Conv trunk (three 2x poolings) -> 4x4 adaptive pool -> penultimate features -> age / gender / race heads."""

    def __init__(self, size: int = 64, width: int = 32, features: int = 256):
        super().__init__()
        self.size, self.width, self.n_features = int(size), int(width), int(features)
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),
            *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.MaxPool2d(2),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(4 * w * 16, features), nn.ReLU(inplace=True),
        )
        self.age = nn.Linear(features, 1)
        self.gender = nn.Linear(features, CLASSES["gender"])
        self.race = nn.Linear(features, CLASSES["race"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of N x 3 x size x size images in [-1, 1]."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {"log_age": self.age(f).squeeze(1), "gender": self.gender(f), "race": self.race(f), "features": f}

    def metadata(self) -> dict[str, int]:
        return {"size": self.size, "width": self.width, "features": self.n_features}


# ----------------------------------------------------------------------------- image conversion


def to_input(images: np.ndarray, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x size x size in [-1, 1] (area-resized when H != size)."""
    if images.ndim != 4 or images.shape[3] != 3:
        raise ProganError(f"expected N x H x W x 3 images, got shape {tuple(images.shape)}")
    x = torch.from_numpy(np.array(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[2] != size or x.shape[3] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[2] > size else "bilinear",
                          align_corners=None if x.shape[2] > size else False)
    return x


@torch.no_grad()
def predict(model: LabelClassifier, images: np.ndarray, batch: int = 256,
            with_features: bool = False) -> dict[str, np.ndarray]:
    """Age in years (float), gender and race class indices, optionally the penultimate features, per image."""
    model.eval()
    dev = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {"age": [], "gender": [], "race": [], "features": []}
    for s in range(0, len(images), batch):
        r = model(to_input(images[s:s + batch], model.size, dev))
        out["age"].append(torch.expm1(r["log_age"]).clamp_min(0).cpu().numpy())
        out["gender"].append(r["gender"].argmax(1).cpu().numpy())
        out["race"].append(r["race"].argmax(1).cpu().numpy())
        if with_features:
            out["features"].append(r["features"].cpu().numpy())
    res = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items() if k != "features" or with_features}
    return res


# ----------------------------------------------------------------------------- training


def _losses(r: dict[str, torch.Tensor], age: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
    """Sum of the three heads' mean losses, each over the samples whose label is known."""
    total = r["log_age"].new_zeros(())
    known = age >= 0
    if known.any():
        total = total + F.l1_loss(r["log_age"][known], torch.log1p(age[known].float()))
    for name, y in (("gender", gender), ("race", race)):
        known = y >= 0
        if known.any():
            total = total + F.cross_entropy(r[name][known], y[known])
    return total


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random mirror and a shift of up to 1/16 of the side (reflect padding): faces are roughly aligned."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None].to(x.device), x.flip(3), x)
    pad = max(1, s // 16)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return xp[:, :, dy:dy + s, dx:dx + s]


def train_classifier(data: FaceData, minutes: float | None = None, epochs: int | None = None, batch: int = 64,
                     lr: float = 2e-3, seed: int = 0, size: int | None = None, width: int = 32,
                     device: torch.device | str = "cpu",
                     log: Callable[[str], None] | None = None) -> LabelClassifier:
    """Train on `data` (use the training split) until `epochs` passes or `minutes` of wall time, whichever first.

    The learning rate follows a cosine from lr to 0 over the planned budget: by epochs when given, else by time.
    """
    if epochs is None and minutes is None:
        raise ProganError("give --minutes or --epochs for the label classifier")
    if len(data) < 2:
        raise ProganError(f"need at least 2 labelled images to train the label classifier, got {len(data)}")
    labels = {k: data.labels.get(k, np.full(len(data), -1, np.int64)) for k in HEADS}
    if all((labels[k] < 0).all() for k in HEADS):
        raise ProganError("no image has an age, gender or race label (UTKFace names: age_gender_race_date.jpg)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    size = int(size or data.images.shape[1])
    model = LabelClassifier(size=size, width=width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    lab = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in labels.items()}
    n = len(data)
    steps_per_epoch = max(1, n // batch)
    planned_steps = epochs * steps_per_epoch if epochs is not None else None
    budget = minutes * 60.0 if minutes is not None else math.inf
    t0 = time.perf_counter()
    step, epoch, running = 0, 0, 0.0
    done = False
    model.train()
    while not done:
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            elapsed = time.perf_counter() - t0
            frac = step / planned_steps if planned_steps else elapsed / budget
            if frac >= 1.0 or elapsed >= budget:
                done = True
                break
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            idx = order[b * batch:(b + 1) * batch]
            x = _augment(to_input(data.images[idx.numpy()], size, device), gen)
            loss = _losses(model(x), *(lab[k][idx].to(device) for k in HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            running = 0.98 * running + 0.02 * value if step else value
            step += 1
        else:
            epoch += 1
            if log is not None:
                log(f"epoch {epoch}: {step} steps, loss {running:.3f}, {time.perf_counter() - t0:.0f} s")
            if epochs is not None and epoch >= epochs:
                done = True
    if log is not None:
        log(f"trained {step} steps ({step * batch / n:.2f} epochs) in {time.perf_counter() - t0:.0f} s")
    return model.eval()


# ----------------------------------------------------------------------------- evaluation


def majority_baseline(train: FaceData) -> dict[str, float]:
    """What a classifier that ignores the image would answer: the training set's median age and commonest classes."""
    out: dict[str, float] = {}
    age = train.labels["age"][train.labels["age"] >= 0]
    out["age"] = float(np.median(age)) if len(age) else 0.0
    for k in CLASSES:
        y = train.labels[k][train.labels[k] >= 0]
        out[k] = float(np.bincount(y, minlength=CLASSES[k]).argmax()) if len(y) else 0.0
    return out


def score(pred: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """age_mae (years), gender_acc, race_acc over the samples whose label is known (nan where none is)."""
    out: dict[str, float] = {}
    known = labels["age"] >= 0
    out["age_mae"] = float(np.abs(pred["age"][known] - labels["age"][known]).mean()) if known.any() else math.nan
    for k in CLASSES:
        known = labels[k] >= 0
        out[f"{k}_acc"] = float((pred[k][known] == labels[k][known]).mean()) if known.any() else math.nan
    out["n"] = float(len(labels["age"]))
    return out


def evaluate(model: LabelClassifier, heldout: FaceData, train: FaceData | None = None) -> dict[str, Any]:
    """The classifier's scores on held-out faces, and (with the training split) the majority-class baseline's."""
    res: dict[str, Any] = {"classifier": score(predict(model, heldout.images), heldout.labels)}
    if train is not None:
        base = majority_baseline(train)
        n = len(heldout)
        const = {"age": np.full(n, base["age"]), "gender": np.full(n, int(base["gender"])),
                 "race": np.full(n, int(base["race"]))}
        res["baseline"] = score(const, heldout.labels)
    return res


# ----------------------------------------------------------------------------- files


def save(model: LabelClassifier, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the weights and metadata as one plain dict (weights_only-loadable)."""
    from progan.checkpoint import atomic_write

    path = Path(path)
    state = {"format": FORMAT, "schema": SCHEMA, "meta": model.metadata(), "info": dict(info or {}),
             "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise ProganError(f"could not write {path}: {e.strerror or e}") from None
    return path


def load(path: str | Path, device: torch.device | str = "cpu") -> LabelClassifier:
    """Load a saved classifier (weights_only=True); one-line errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise ProganError(f"no such label classifier: {path} (train one with tools/label_classifier.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not our file"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProganError(f"{path} is not a progan label classifier ({msg[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ProganError(f"{path} is not a progan label classifier (no '{FORMAT}' format tag)")
    if int(state.get("schema", 0)) > SCHEMA:
        raise ProganError(f"{path} has label-classifier schema {state['schema']}, newer than this progan ({SCHEMA})")
    meta = state["meta"]
    model = LabelClassifier(size=int(meta["size"]), width=int(meta["width"]), features=int(meta["features"]))
    try:
        model.load_state_dict(state["state"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise ProganError(f"{path}: weights do not match its metadata ({str(e).splitlines()[0][:120]})") from None
    model.info = dict(state.get("info", {}))  # type: ignore[attr-defined]
    return model.to(device).eval()
