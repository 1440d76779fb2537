"""tools/race.py smoke test: both contestants train for a few seconds on tiny 64 px images, save snapshots, and the
scoring phase turns every snapshot into an FID and SWD point, a plot and sample grids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from blobs import write_blob_images
from inception import needs_inception

ROOT = Path(__file__).resolve().parents[1]


def _race(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROGAN_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "race.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


@needs_inception
def test_race_trains_both_and_scores(tmp_path):
    data = write_blob_images(tmp_path / "faces", 180, 64)
    out = tmp_path / "race"
    # training only, then the separate scoring phase (as on a GPU machine without Inception weights)
    proc = _race([str(data), "--minutes", "0.04", "--snapshots", "2", "--holdout", "0.2", "--preset", "cpu64",
                  "--out", str(out), "--no-score"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    meta = json.loads((out / "race-train.json").read_text())
    assert meta["train_images"] + meta["heldout_images"] == 180 and meta["heldout_images"] >= 2
    assert meta["complete"] is True
    for name in ("progan", "dcgan64"):
        points = meta["contestants"][name]
        assert len(points) == 2
        assert points[0]["minutes"] <= points[1]["minutes"] and points[1]["minutes"] >= 0.04
        assert 0 < points[0]["nimg"] <= points[1]["nimg"]
        assert all((out / p["file"]).is_file() for p in points)
        # a snapshot due before any further step reuses the previous file instead of writing the same weights
        assert (points[0]["file"] == points[1]["file"]) == (points[0]["nimg"] == points[1]["nimg"])
    assert not (out / "race.json").exists()

    proc = _race(["score", str(out), "--real", str(data), "--n", "16", "--floors"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads((out / "race.json").read_text())
    for name in ("progan", "dcgan64"):
        rows = result["contestants"][name]
        assert [r["nimg"] for r in rows] == [p["nimg"] for p in meta["contestants"][name]]
        assert all(r["fid"] > 0 and r["swd"] > 0 for r in rows)
        grid = Image.open(out / f"{name}-samples.png")
        assert grid.size == (8 * 64, 8 * 64)
        assert name in proc.stdout   # the table
    assert Image.open(out / "race.png").size[0] > 0
    # the floors: real faces at every resolution progan was scored at, and at full size
    floors = {f["res"]: f for f in result["floors"]}
    assert set(floors) == {r["res"] for r in result["contestants"]["progan"]} | {64}
    assert all(f["fid"] > 0 and f["swd"] > 0 for f in floors.values())
    if min(floors) < 64:   # blurring real faces makes them less like the held-out ones
        assert floors[min(floors)]["swd"] > floors[64]["swd"]

    # a second `score` reuses the kept scores (planted here so that reuse is visible) and rescores a changed file
    kept = json.loads((out / "race-scores.json").read_text())
    assert set(kept["entries"]) == {p["file"] for name in meta["contestants"] for p in meta["contestants"][name]}
    first = meta["contestants"]["dcgan64"][0]["file"]
    kept["entries"][first]["fid"] = 12345.0
    (out / "race-scores.json").write_text(json.dumps(kept))
    last = meta["contestants"]["progan"][-1]
    os.utime(out / last["file"], ns=(1, 1))   # as if retrained: its kept score no longer counts
    proc = _race(["score", str(out), "--real", str(data), "--n", "16"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    again = json.loads((out / "race.json").read_text())
    assert again["contestants"]["dcgan64"][0]["fid"] == 12345.0 and "(cached)" in proc.stdout
    assert again["contestants"]["progan"][-1]["fid"] == result["contestants"]["progan"][-1]["fid"]  # rescored
    assert json.loads((out / "race-scores.json").read_text())["entries"][last["file"]]["stamp"][1] == 1

    # --snapshots: scores only the named snapshots; race.json and its plot also take every snapshot whose score an
    # earlier run kept (a race scored in parts ends with one table) and no other; a number the race lacks is refused
    kept = json.loads((out / "race-scores.json").read_text())
    del kept["entries"][meta["contestants"]["progan"][0]["file"]]   # as if never scored
    (out / "race-scores.json").write_text(json.dumps(kept))
    proc = _race(["score", str(out), "--real", str(data), "--n", "16", "--snapshots", "2"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    part = json.loads((out / "race.json").read_text())
    assert part["snapshots_scored"] == [2]
    assert part["contestants"]["dcgan64"] == again["contestants"]["dcgan64"]   # snapshot 1 from the kept scores
    assert part["contestants"]["progan"] == again["contestants"]["progan"][1:]   # its snapshot 1 has none now
    proc = _race(["score", str(out), "--real", str(data), "--n", "16", "--snapshots", "1-3"], tmp_path / "cache")
    assert proc.returncode == 1 and "1-2" in proc.stderr and "Traceback" not in proc.stderr

    # --reference train: the same snapshots against random training faces, in files of their own beside the
    # held-out ones (race.json and the training record race-train.json untouched)
    proc = _race(["score", str(out), "--real", str(data), "--n", "16", "--reference", "train", "--reference-n", "40",
                  "--floors"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    vs_train = json.loads((out / "race-vs-train.json").read_text())
    assert vs_train["reference"] == "train" and vs_train["fid_real_images"] == 40 and vs_train["swd_images"] == 16
    assert json.loads((out / "race.json").read_text()) == part
    assert json.loads((out / "race-train.json").read_text()) == meta
    assert (out / "race-vs-train.png").is_file()
    kept_train = json.loads((out / "race-scores-train.json").read_text())
    assert kept_train["setting"]["reference"] == "train" and kept_train["setting"]["reference_n"] == 40
    assert set(kept_train["entries"]) == {p["file"] for name in meta["contestants"] for p in meta["contestants"][name]}
    for name in ("progan", "dcgan64"):
        rows = vs_train["contestants"][name]
        assert [r["nimg"] for r in rows] == [p["nimg"] for p in meta["contestants"][name]]
        assert all(r["fid"] > 0 and r["swd"] > 0 for r in rows)
        assert rows[-1]["fid"] != again["contestants"][name][-1]["fid"]   # another reference set, another score
    assert {f["res"] for f in vs_train["floors"]} >= {64}
    proc = _race(["score", str(out), "--real", str(data), "--n", "16", "--reference", "train", "--reference-n",
                  str(meta["train_images"])], tmp_path / "cache")   # none left for --floors
    assert proc.returncode == 1 and f"--reference-n {meta['train_images']}" in proc.stderr and "Traceback" not in proc.stderr

    # progan alone with another setting, scored against this race's DCGAN: DCGAN is neither trained nor scored again
    # (the planted score above comes back from this race's kept scores)
    solo = tmp_path / "solo"
    proc = _race([str(data), "--minutes", "0.04", "--snapshots", "2", "--holdout", "0.2", "--preset", "cpu64",
                  "--contestants", "progan", "--set", "phase_images=2000,4000,8000,8000,0", "--out", str(solo),
                  "--dcgan-precision", "bf16", "--no-score"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = _race(["score", str(solo), "--real", str(data), "--n", "16", "--against", str(out)], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    duel = json.loads((solo / "race.json").read_text())
    assert duel["contestants"]["dcgan64"] == again["contestants"]["dcgan64"]
    assert duel["against"]["race"] == str(out) and duel["against"]["contestants"] == ["dcgan64"]
    assert duel["dcgan_precision"] == "fp32"   # the borrowed DCGAN's (the plot's title), not this race's unused bf16
    solo_meta = json.loads((solo / "race-train.json").read_text())
    assert [r["nimg"] for r in duel["contestants"]["progan"]] == [p["nimg"] for p in solo_meta["contestants"]["progan"]]
    assert set(json.loads((solo / "race-scores.json").read_text())["entries"]) == \
        {p["file"] for p in solo_meta["contestants"]["progan"]}
    assert (solo / "dcgan64-samples.png").is_file() and not (solo / "dcgan64").exists()


def test_race_usage_errors(tmp_path):
    proc = _race(["score", str(tmp_path), "--real", str(tmp_path)], tmp_path / "cache")
    assert proc.returncode == 1 and "race-train.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = _race([str(tmp_path), "--minutes", "1", "--size", "32", "--no-score"], tmp_path / "cache")
    assert proc.returncode == 1 and "64" in proc.stderr and "Traceback" not in proc.stderr


def test_cut_off_race_keeps_its_snapshots(tmp_path):
    """race-train.json is rewritten after every snapshot: a race killed midway (e.g. by a time limit) is scorable."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import torch

    import race

    saved: list[list[dict]] = []
    nimg = {"n": 0}
    progress: list[float] = []

    def step(p: float) -> int:
        progress.append(p)
        nimg["n"] += 8
        return nimg["n"]

    points = race.run_contestant("x", step, lambda k, n: {"file": f"snap-{k}.pt", "res": 4}, 0.03, 3,
                                 torch.device("cpu"), 1, record=lambda p: saved.append(list(p)))
    assert [len(s) for s in saved] == [1, 2, 3] and saved[-1] == points
    assert [p["file"] for p in points] == ["snap-1.pt", "snap-2.pt", "snap-3.pt"]   # every step changes nimg
    assert points[-1]["minutes"] >= 0.03 / 60 * 0.99
    # each step is told the fraction of the budget spent so far (for --set lr_rampdown): from about 0 to about 1
    # (the last step starts just before the budget runs out; seconds instead would end near 0.03)
    assert progress[0] < 0.5 and progress == sorted(progress) and 0.5 < progress[-1] < 1.5


def test_race_one_contestant_with_a_changed_setting(tmp_path):
    """--contestants progan trains progan alone; --set changes a config field on top of the preset and the
    snapshots carry it (so a lever can be raced against an earlier race's DCGAN)."""
    data = write_blob_images(tmp_path / "faces", 120, 64)
    out = tmp_path / "race"
    proc = _race([str(data), "--minutes", "0.02", "--snapshots", "1", "--holdout", "0.2", "--preset", "cpu64",
                  "--contestants", "progan", "--set", "eq_lr=false", "--set", "fade_images=5000",
                  "--out", str(out), "--no-score"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    meta = json.loads((out / "race-train.json").read_text())
    assert list(meta["contestants"]) == ["progan"] and not (out / "dcgan64").exists()
    assert meta["overrides"] == {"eq_lr": False, "fade_images": 5000}
    assert meta["progan_config"]["eq_lr"] is False and meta["progan_config"]["fade_images"] == 5000
    import torch

    snap = torch.load(out / meta["contestants"]["progan"][0]["file"], weights_only=False)
    assert snap["config"]["eq_lr"] is False

    for bad in (["--set", "no_such_field=1"], ["--set", "eq_lr"], ["--contestants", "stylegan"]):
        proc = _race([str(data), "--minutes", "0.02", "--out", str(tmp_path / "bad"), "--no-score", *bad],
                     tmp_path / "cache")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert ("--set" in proc.stderr) or ("--contestants" in proc.stderr)


def test_score_cache_resumes_only_for_the_same_setting(tmp_path):
    """The kept scores of an interrupted `score`: reused for the same n/seed/real folder and unchanged snapshot file,
    dropped when any of them differs, and every put is on disk at once."""
    sys.path.insert(0, str(ROOT / "tools"))
    import race

    snap = tmp_path / "progan" / "snap-01.pt"
    snap.parent.mkdir()
    snap.write_bytes(b"weights")
    cache = race.ScoreCache(tmp_path / race.SCORE_CACHE, n=500, seed=0, real="/data")
    assert cache.get(snap) is None
    cache.put(snap, {"fid": 101.5, "swd": 20.25})
    assert race.ScoreCache(tmp_path / race.SCORE_CACHE, n=500, seed=0, real="/data").get(snap) == \
        {"fid": 101.5, "swd": 20.25, "cached": True}
    for other in ({"n": 5000, "seed": 0, "real": "/data"}, {"n": 500, "seed": 1, "real": "/data"},
                  {"n": 500, "seed": 0, "real": "/other"}):
        assert race.ScoreCache(tmp_path / race.SCORE_CACHE, **other).get(snap) is None
    snap.write_bytes(b"new weights")   # a different file under the same name
    assert race.ScoreCache(tmp_path / race.SCORE_CACHE, n=500, seed=0, real="/data").get(snap) is None
    cache = race.ScoreCache(tmp_path / race.SCORE_CACHE, n=500, seed=0, real="/data")
    cache.put(snap, {"fid": 90.0, "swd": 19.0})
    snap.unlink()   # deleted since it was scored: no kept score, and no crash
    assert cache.get(snap) is None


def test_reference_set_draws_training_faces_apart_from_the_floor_pool():
    """--reference train: reference_n training faces, drawn reproducibly by the seed; the faces left for --floors are
    the rest, so the floor compares two disjoint real sets (issue #11's 4.5 for 5,000 against 5,000)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import numpy as np
    import pytest
    import race
    from progan.errors import ProganError

    train = np.arange(50 * 2 * 2 * 3, dtype=np.int32).reshape(50, 2, 2, 3)   # each image tells its index
    held = np.zeros((7, 2, 2, 3), dtype=np.int32)
    ref, pool = race.reference_set(train, held, "heldout", 20, seed=0)
    assert ref is held and pool is train
    ref, pool = race.reference_set(train, held, "train", 20, seed=3)
    ids_ref, ids_pool = set(ref[:, 0, 0, 0] // 12), set(pool[:, 0, 0, 0] // 12)
    assert len(ref) == len(ids_ref) == 20 and len(pool) == 30
    assert not ids_ref & ids_pool and ids_ref | ids_pool == set(range(50))
    assert np.array_equal(race.reference_set(train, held, "train", 20, seed=3)[0], ref)
    assert not np.array_equal(race.reference_set(train, held, "train", 20, seed=4)[0], ref)
    for bad in (1, 50, 60):
        with pytest.raises(ProganError, match="--reference-n"):
            race.reference_set(train, held, "train", bad, seed=0)
    with pytest.raises(ProganError, match="heldout or train"):
        race.reference_set(train, held, "all", 20, seed=0)


def test_score_against_refuses_a_race_that_does_not_line_up(tmp_path):
    """`score --against` borrows only from a race of the same data split, budget and snapshot count."""
    sys.path.insert(0, str(ROOT / "tools"))
    import pytest

    import race
    from progan.errors import ProganError

    base = {"data": str(tmp_path / "faces"), "size": 64, "holdout": 0.03, "minutes": 60.0, "train_images": 900,
            "heldout_images": 30}
    points = [{"minutes": k, "nimg": 100 * k, "file": f"dcgan64/snap-{k:02d}.pt", "res": 64} for k in (1, 2)]
    ours = {**base, "contestants": {"progan": points[:2]}}

    def earlier(name: str, **change) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "race-train.json").write_text(json.dumps({**base, "contestants": {"dcgan64": points}, **change}))
        return folder

    assert race.borrow(ours, earlier("same")) == {"dcgan64": points}
    for name, change, says in (("minutes", {"minutes": 10.0}, "minutes"), ("holdout", {"holdout": 0.1}, "holdout"),
                               ("data", {"data": str(tmp_path / "other")}, "trained on"),
                               ("fewer", {"contestants": {"dcgan64": points[:1]}}, "snapshots"),
                               ("none", {"contestants": {"progan": points}}, "no contestant")):
        with pytest.raises(ProganError, match=says):
            race.borrow(ours, earlier(name, **change))
    with pytest.raises(ProganError, match="race-train.json"):
        race.borrow(ours, tmp_path / "missing")


def test_snapshot_lists_name_snapshots_from_one_in_the_order_given():
    sys.path.insert(0, str(ROOT / "tools"))
    import pytest

    import race
    from progan.errors import ProganError

    assert race.parse_snapshot_spec("1-3,2,5", 6) == [0, 1, 2, 4]
    assert race.parse_snapshot_spec(" 6 , 1-2", 6) == [5, 0, 1]
    for bad in ("0", "7", "3-2", "a", "1-", ""):
        with pytest.raises(ProganError, match="--snapshots"):
            race.parse_snapshot_spec(bad, 6)


def test_scoring_order_is_coarse_to_fine():
    """Every snapshot once; the last first; a cut-off scoring of 60 snapshots has spanned the race after 8."""
    sys.path.insert(0, str(ROOT / "tools"))
    import race

    for count in (0, 1, 2, 7, 60):
        assert sorted(race.coarse_to_fine(count)) == list(range(count))
    order = race.coarse_to_fine(60)
    assert order[0] == 59 and sorted(order[:8]) == [7, 15, 23, 31, 39, 47, 55, 59]


def test_race_progan_alone_at_another_size(tmp_path):
    """The DCGAN reference is 64 px only, but progan alone races at any size (e.g. the 128 px GPU run): snapshots at
    that size, scored at it; asking for DCGAN at another size is still refused."""
    data = write_blob_images(tmp_path / "faces", 120, 32)
    out = tmp_path / "race"
    proc = _race([str(data), "--minutes", "0.02", "--snapshots", "2", "--holdout", "0.2", "--size", "32",
                  "--preset", "default", "--contestants", "progan", "--out", str(out), "--no-score"],
                 tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    meta = json.loads((out / "race-train.json").read_text())
    assert meta["size"] == 32 and meta["progan_config"]["size"] == 32 and list(meta["contestants"]) == ["progan"]
    points = meta["contestants"]["progan"]
    assert len(points) == 2 and all(p["res"] <= 32 for p in points)
    import torch

    assert torch.load(out / points[-1]["file"], weights_only=False)["config"]["size"] == 32
    proc = _race([str(data), "--minutes", "0.02", "--size", "32", "--contestants", "progan,dcgan64", "--no-score",
                  "--out", str(tmp_path / "duel")], tmp_path / "cache")
    assert proc.returncode == 1 and "--contestants progan" in proc.stderr and "Traceback" not in proc.stderr
