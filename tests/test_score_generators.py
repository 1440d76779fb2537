"""tools/score_generators.py: the labels a conditional generator is scored with follow the reference images."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from progan.config import TrainConfig
from progan.facedata import FaceData

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("score_generators", ROOT / "tools" / "score_generators.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["score_generators"] = mod
    spec.loader.exec_module(mod)
    return mod


def _data(n: int = 40) -> FaceData:
    rng = np.random.default_rng(0)
    age = rng.integers(1, 90, n)
    gender = rng.integers(0, 2, n)
    race = np.where(np.arange(n) < 30, 2, 0)      # 30 Asian, 10 White
    race[5] = -1                                  # one misnamed file: never drawn
    return FaceData(images=np.zeros((n, 4, 4, 3), np.uint8), names=[f"{i}.jpg" for i in range(n)],
                    labels={"age": age, "gender": gender, "race": race})


def _gen(condition=("age", "gender", "race")):
    cfg = TrainConfig(size=8, condition=condition, age_range=(1, 116) if "age" in condition else ())
    return SimpleNamespace(condition=cfg.condition, config=cfg)


def test_data_labels_are_rows_of_labelled_images(tool):
    data = _data()
    rows = tool.label_rows(_gen(), data, 500, seed=3).numpy()
    assert rows.shape == (500, 3)
    real = {tuple(map(float, (data.labels["age"][i], data.labels["gender"][i], data.labels["race"][i])))
            for i in range(len(data)) if i != 5}
    assert {tuple(r) for r in rows} <= real
    # the label distribution follows the data (75% Asian), which uniform labels (20% per group) do not
    assert 0.65 < np.mean(rows[:, 2] == 2) < 0.85
    uniform = tool.label_rows(_gen(), data, 2000, seed=3, mode="uniform").numpy()
    assert 0.15 < np.mean(uniform[:, 2] == 2) < 0.25


def test_group_labels_stay_in_the_group(tool):
    data = _data()
    white = np.flatnonzero(data.labels["race"] == 0)
    rows = tool.label_rows(_gen(), data, 200, seed=1, among=white).numpy()
    assert set(rows[:, 2]) == {0.0}
    assert set(rows[:, 0]) <= set(map(float, data.labels["age"][white]))


def test_unconditional_generator_takes_no_labels(tool):
    assert tool.label_rows(_gen(()), _data(), 10, seed=0) is None
