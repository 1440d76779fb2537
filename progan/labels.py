"""The label space of conditional runs: which labels, their names, parsing user values, encoding them as tensors.

A conditional run's labels are a float tensor N x K aligned with `cfg.condition`: age in years as a float, a
categorical label (gender, race, folder class) as its class index stored as a float. Labels come from UTKFace file
names (age_gender_race_date.jpg) or, for `folders`, from the first directory level (ImageFolder layout).
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from progan.errors import ProganError

if TYPE_CHECKING:  # torch only on use: the CLI parses conditions before anything heavy is imported
    import torch

    from progan.config import TrainConfig
    from progan.facedata import FaceData

ATTRIBUTES = ("age", "gender", "race")      # UTKFace's annotations, in the canonical order
FOLDERS = "folders"
CONDITIONS = ATTRIBUTES + (FOLDERS,)
# UTKFace's codes: gender 0 male, 1 female; race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
NAMES: dict[str, tuple[str, ...]] = {
    "gender": ("male", "female"),
    "race": ("White", "Black", "Asian", "Indian", "Others"),
}
AGE_SCALE = 100.0                         # years -> the embedding's input unit (fixed, so nets never depend on data)
AGE_FREQUENCIES = (1.0, 2.0, 4.0, 8.0)    # Fourier features: periods 200 down to 25 years, smooth in age
AGE_FEATURES = 1 + 2 * len(AGE_FREQUENCIES)
LABEL_SEED_OFFSET = 1_000_003             # random labels come from their own stream, never shifting the latents
CHUNK = 1024                              # random labels drawn in fixed chunks: face i's label is the same for any n


def parse_condition(text: str | None) -> tuple[str, ...]:
    """'age,gender,race' -> ('age', 'gender', 'race') in canonical order; 'folders'; '' or 'none' -> ()."""
    if text is None:
        return ()
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if parts in ([], ["none"]):
        return ()
    unknown = [p for p in parts if p not in CONDITIONS]
    if unknown:
        raise ProganError(f"--condition: unknown label '{unknown[0]}' (use any of age, gender, race; or folders)")
    if FOLDERS in parts and len(parts) > 1:
        raise ProganError("--condition folders cannot be combined with age, gender or race")
    if len(set(parts)) != len(parts):
        raise ProganError(f"--condition names a label twice: '{text}'")
    return tuple(c for c in CONDITIONS if c in parts)


def check_config(cfg: TrainConfig) -> None:
    """Consistency of condition / classes / age_range (called by TrainConfig.__post_init__)."""
    cond = cfg.condition
    if any(c not in CONDITIONS for c in cond) or len(set(cond)) != len(cond):
        raise ProganError(f"bad condition {cond!r} (use any of age, gender, race; or folders)")
    if FOLDERS in cond and len(cond) > 1:
        raise ProganError("condition 'folders' cannot be combined with age, gender or race")
    if cfg.classes and cond != (FOLDERS,):
        raise ProganError("class names are only used with condition 'folders'")
    if cfg.age_range and (len(cfg.age_range) != 2 or cfg.age_range[0] > cfg.age_range[1]):
        raise ProganError(f"bad age_range {cfg.age_range!r} (expected (youngest, oldest))")
    if cond and cfg.label_dim < 1:
        raise ProganError("label_dim must be at least 1")


def num_classes(cfg: TrainConfig, name: str) -> int:
    """Classes of a categorical label (0 for age)."""
    if name == "age":
        return 0
    if name == FOLDERS:
        return len(cfg.classes)
    return len(NAMES[name])


def class_names(cfg: TrainConfig, name: str) -> tuple[str, ...]:
    return cfg.classes if name == FOLDERS else NAMES[name]


def age_range(cfg: TrainConfig) -> tuple[float, float]:
    """The trained age range; UTKFace's whole range when the config has none (a run made outside `train`)."""
    return (float(cfg.age_range[0]), float(cfg.age_range[1])) if cfg.age_range else (1.0, 116.0)


def age_features(age: torch.Tensor) -> torch.Tensor:
    """N ages in years -> N x AGE_FEATURES: the normalised age and its sines/cosines, so nearby ages embed nearby
    (a continuous, smooth input; ages between the training ones interpolate)."""
    import torch

    t = age.float()[:, None] / AGE_SCALE
    f = torch.tensor(AGE_FREQUENCIES, dtype=t.dtype, device=t.device) * math.pi
    return torch.cat([t, torch.sin(t * f), torch.cos(t * f)], dim=1)


def describe(cfg: TrainConfig) -> dict[str, Any] | None:
    """The label space as plain values (for inspect), None for an unconditional run."""
    if not cfg.condition:
        return None
    out: dict[str, Any] = {"condition": list(cfg.condition)}
    for name in cfg.condition:
        out[name] = list(age_range(cfg)) if name == "age" else list(class_names(cfg, name))
    return out


# ----------------------------------------------------------------------------- labels from a dataset


def folder_classes(names: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(sorted class names, class index per image, -1 for images directly in the root) from relative paths."""
    tops = [n.split("/", 1)[0] if "/" in n else None for n in names]
    classes = tuple(sorted({t for t in tops if t is not None}))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([index[t] if t is not None else -1 for t in tops], dtype=np.int64)


def prepare(data: FaceData, cfg: TrainConfig, source: str) -> tuple[FaceData, TrainConfig, np.ndarray]:
    """The images usable for conditioning, the config completed with the label space, float32 N x K labels.

    Images without the labels asked for (misnamed UTKFace files, files outside class folders) are skipped with a
    count; a folder where none has them is an error. A resumed run's classes must still match the folder.
    """
    import dataclasses

    from progan.facedata import FaceData as _FaceData

    cond = cfg.condition
    if cond == (FOLDERS,):
        classes, idx = folder_classes(data.names)
        if len(classes) < 2:
            raise ProganError(f"--condition folders needs images in at least 2 subfolders of {source} (one class per "
                              f"subfolder), found {len(classes)}")
        if cfg.classes and cfg.classes != classes:
            raise ProganError(f"the class folders of {source} changed since the run started (now "
                              f"{', '.join(classes)}; was {', '.join(cfg.classes)}); start fresh with --fresh")
        columns = [idx]
        what = "outside a class subfolder"
        cfg = dataclasses.replace(cfg, classes=classes)
    else:
        missing = [c for c in cond if c not in data.labels]
        if missing:
            raise ProganError(f"--condition {','.join(cond)}: {source} has no {missing[0]} labels")
        columns = [np.asarray(data.labels[c], dtype=np.int64) for c in cond]
        what = "without UTKFace labels in their names (age_gender_race_...)"
    ok = np.all(np.stack(columns) >= 0, axis=0)
    n_ok = int(ok.sum())
    if n_ok == 0:
        need = "images in class subfolders" if cond == (FOLDERS,) else "UTKFace file names (age_gender_race_date.jpg)"
        raise ProganError(f"--condition {','.join(cond)} needs {need}, but none of the {len(data)} images in "
                          f"{source} has them")
    if n_ok < len(data):
        first = data.names[int(np.flatnonzero(~ok)[0])]
        print(f"conditioning: skipped {len(data) - n_ok} of {len(data)} images {what} (first: {first})",
              file=sys.stderr)
        keep = np.flatnonzero(ok)
        data = _FaceData(images=data.images[keep], names=[data.names[i] for i in keep],
                         labels={k: v[keep] for k, v in data.labels.items()}, skipped=list(data.skipped),
                         root=data.root)
        columns = [c[keep] for c in columns]
    values = np.stack(columns, axis=1).astype(np.float32)
    if "age" in cond and not cfg.age_range:
        ages = values[:, cond.index("age")]
        cfg = dataclasses.replace(cfg, age_range=(int(ages.min()), int(ages.max())))
    return data, cfg, values


# ----------------------------------------------------------------------------- labels from users


def parse_value(cfg: TrainConfig, name: str, value: Any) -> float:
    """One user value (a name or an index; an age in years) -> its float encoding, or a one-line error."""
    if name == "age":
        try:
            age = float(value)
        except (TypeError, ValueError):
            raise ProganError(f"age must be a number of years, got '{value}'") from None
        lo, hi = age_range(cfg)
        if not lo <= age <= hi:
            raise ProganError(f"age {age:g} is outside the trained range {lo:g}..{hi:g}")
        return age
    names = class_names(cfg, name)
    label = "class" if name == FOLDERS else name
    text = str(value).strip()
    for i, n in enumerate(names):
        if text.lower() == n.lower():
            return float(i)
    if text.lstrip("-").isdigit():
        i = int(text)
        if 0 <= i < len(names):
            return float(i)
    raise ProganError(f"unknown {label} '{value}' (this run knows: "
                      + ", ".join(f"{i} {n}" for i, n in enumerate(names)) + ")")


def check_names(cfg: TrainConfig, values: Mapping[str, Any], where: str = "") -> None:
    """Refuse labels the run was not trained with (e.g. --age on an unconditional run)."""
    for name in values:
        key = FOLDERS if name == "class" else name
        if key in cfg.condition:
            continue
        opt = f"--{name}"
        if not cfg.condition:
            raise ProganError(f"{opt} needs a conditional run, but {where or 'this run'} was trained without "
                              f"--condition")
        raise ProganError(f"{opt} is not a label of {where or 'this run'} (trained with --condition "
                          f"{','.join(cfg.condition)})")


def random_labels(cfg: TrainConfig, n: int, seed: int = 0) -> torch.Tensor:
    """n x K labels drawn uniformly over the label space (ages uniform in the trained range), from the seed's own
    stream in fixed chunks, so label i is the same for every n."""
    import torch

    rng = torch.Generator().manual_seed(seed + LABEL_SEED_OFFSET)
    k = len(cfg.condition)
    chunks = []
    for _ in range(math.ceil(n / CHUNK)):
        u = torch.rand(CHUNK, k, generator=rng)
        cols = []
        for j, name in enumerate(cfg.condition):
            if name == "age":
                lo, hi = age_range(cfg)
                cols.append(torch.round(lo + u[:, j] * (hi - lo)))
            else:
                cols.append(torch.floor(u[:, j] * num_classes(cfg, name)).clamp_max(num_classes(cfg, name) - 1))
        chunks.append(torch.stack(cols, dim=1))
    return torch.cat(chunks)[:n] if chunks else torch.empty(0, k)


def build(cfg: TrainConfig, values: Mapping[str, Any] | None = None, n: int = 1, seed: int = 0,
          where: str = "") -> torch.Tensor:
    """n x K labels from user values such as {"age": 70, "gender": "female"} (names or indices; "class" for a
    folder class). Labels not given are random per face (see random_labels)."""
    import torch

    values = {k: v for k, v in (values or {}).items() if v is not None}
    check_names(cfg, values, where)
    if not cfg.condition:
        return torch.empty(n, 0)
    out = random_labels(cfg, n, seed)
    for name, v in values.items():
        key = FOLDERS if name == "class" else name
        out[:, cfg.condition.index(key)] = parse_value(cfg, key, v)
    return out


def fixed_labels(cfg: TrainConfig, n: int, cols: int = 8) -> torch.Tensor:
    """Labels of the training video's fixed latents, spread over the label space without any randomness: ages
    rise along each row, gender alternates by row, groups and classes change every half row."""
    import torch

    rows = []
    for i in range(n):
        r, c = divmod(i, cols)
        row = []
        for name in cfg.condition:
            if name == "age":
                lo, hi = age_range(cfg)
                row.append(round(lo + (hi - lo) * c / max(cols - 1, 1)))
            elif name == "gender":
                row.append(r % 2)
            elif name == "race":
                row.append((2 * r + 2 * c // cols) % 5)
            else:
                row.append(i % max(num_classes(cfg, name), 1))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).view(n, len(cfg.condition))


def split_axis(cfg: TrainConfig, spec: str) -> tuple[str, list[float], list[str]]:
    """One --grid axis: 'age=5:85:8' (start:stop:count), 'age' (8 ages over the trained range), 'race', 'gender'
    or 'class' (all classes) -> (label name, encoded values, captions)."""
    name, _, rng = spec.strip().partition("=")
    name = name.strip().lower()
    key = FOLDERS if name == "class" else name
    if key not in CONDITIONS or key == FOLDERS and name != "class":
        raise ProganError(f"--grid: unknown label '{name}' (use age, gender, race or class)")
    check_names(cfg, {name: 1})
    if key == "age":
        lo, hi = age_range(cfg)
        start, stop, count = lo, hi, 8
        if rng:
            try:
                a, b, k = rng.split(":")
                start, stop, count = float(a), float(b), int(k)
            except ValueError:
                raise ProganError(f"--grid: age range must be start:stop:count (e.g. age=5:85:8), "
                                  f"got '{rng}'") from None
            if count < 1:
                raise ProganError(f"--grid: age count must be at least 1, got {count}")
        ages = np.linspace(start, stop, count).tolist() if count > 1 else [start]
        return key, [parse_value(cfg, "age", a) for a in ages], [f"{round(a, 1):g}" for a in ages]
    if rng:
        vals = [parse_value(cfg, key, v) for v in rng.split(":")]
    else:
        vals = [float(i) for i in range(num_classes(cfg, key))]
    names = class_names(cfg, key)
    return key, vals, [names[int(v)] for v in vals]
