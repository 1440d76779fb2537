"""The race of issue #11: progan against the DCGAN-64 reference (progan/reference.py), on the same machine, for the
same wall-clock budget, one after the other, scored by FID and SWD against held-out images.

    python tools/race.py ../shared/UTKFace --minutes 60 [--device cuda] [--precision bf16] [--preset cpu64] --out race/
    python tools/race.py score race/ --real ../shared/UTKFace --n 5000       # e.g. later, on a CPU machine

Training: both contestants see the training part of progan.facedata.split_holdout(data, --holdout) at --size
(64 px). Each trains for --minutes of wall-clock (time spent writing snapshots excluded) and saves its generator at
--snapshots evenly spaced times (the last one at the end) to OUT/<contestant>/snap-KK.pt: progan's EMA generator as
a checkpoint-format file (config, images shown, G_ema; progan's own loaders read it), DCGAN's generator weights.
OUT/race-train.json lists the snapshots.

Scoring (right after training when the Inception weights are present, unless --no-score; or `score` anywhere):
--n faces per snapshot, FID against the held-out images' Inception statistics (cached by progan.metrics) and SWD
against them (both sets cut to the same size, as SWD requires). progan samples at the resolution it has reached
at that time, upsampled bilinearly to --size (align_corners=False) for both metrics: an early 4 px snapshot is
scored as the blurry 64 px image it amounts to. DCGAN samples are always 64 px. Writes OUT/race.json (per
contestant a list of {minutes, nimg, fid, swd}), OUT/race.png (FID and SWD against minutes) and
OUT/<contestant>-samples.png (64 faces of the final snapshot), and prints a table. `score --floors` also scores real
training faces reduced to each resolution progan was scored at and upsampled back (a perfect snapshot at that
resolution), drawn as dotted lines: FID punishes blur hard, so no 8 px snapshot can beat the 8 px floor.
Each snapshot's scores are kept in OUT/race-scores.json as soon as they are measured: a `score` run that is
interrupted (Ctrl-C, end of a session) continues where it stopped when run again with the same --n, --seed and --real.
Snapshots are scored coarse to fine (the last, then every 32nd, 16th, ... one), so that the scores kept by an
interrupted run already span the race; `score --snapshots 1-6,60` scores only those snapshots, in that order.
`score --reference train` compares with --reference-n (5,000) training faces drawn at random instead of the few
held-out ones: the usual protocol (issue #11 states its DCGAN numbers as 5,000 against 5,000, floor 4.5), whose
floor `--floors` measures with real training faces disjoint from that set; written to OUT/race-vs-train.json/png and
kept in OUT/race-scores-train.json, beside the held-out scores.
race.json and race.png hold every snapshot with a score, the ones kept from earlier `score` runs (same --n, --seed
and --real) included, so a race scored in parts ends with one complete table.

A setting can be raced against an earlier race's DCGAN without training DCGAN again: train progan alone
(`--contestants progan --set FIELD=VALUE --out B`), then `score B --against A --real ...` scores the contestants B
lacks from race A's snapshots (same --size, --holdout, --minutes and snapshot count, else an error), keeping their
scores in A's race-scores.json; race.json names A and both races' machines.

At other sizes than 64 px progan runs alone (`--size 128 --contestants progan`): the same wall-clock snapshots and
scores, i.e. FID against wall-clock for one configuration, e.g. the 8-minute GPU run at 128 px of issue #11.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from progan import checkpoint, visualization
from progan.config import PRESETS, TrainConfig, auto_preset
from progan.errors import ProganError
from progan.facedata import ImageBank, epoch_order, split_holdout
from progan.gantrain import Trainer
from progan.reference import DCGANGenerator, DCGANTrainer

CONTESTANTS = ("progan", "dcgan64")
GRID_N = 64


# ----------------------------------------------------------------------------- training


class Clock:
    """Training wall-clock: runs only between start() and stop(), so snapshot time is excluded."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.t0 = device, 0.0, None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        self.sync()
        self.total += time.perf_counter() - self.t0
        self.t0 = None

    def elapsed(self) -> float:
        return self.total + (time.perf_counter() - self.t0 if self.t0 is not None else 0.0)


def run_contestant(name: str, step, snapshot, budget_s: float, snapshots: int, device: torch.device,
                   check_every: int, record=lambda points: None) -> list[dict]:
    """step(progress) trains one round (progress: the fraction of the budget spent, for a learning-rate ramp-down)
    and returns images shown so far; snapshot(k, nimg) saves one. Snapshots are due at
    budget * k / snapshots (k = 1..snapshots); time is checked every `check_every` steps (a device sync on CUDA).
    record(points) is called after every snapshot, so a race cut off midway keeps what it saved."""
    clock = Clock(device)
    points: list[dict] = []
    k, n, nimg = 1, 0, 0
    clock.start()
    while k <= snapshots:
        nimg = step(clock.elapsed() / budget_s)
        n += 1
        if n % check_every and device.type == "cuda":
            continue
        clock.sync()
        while k <= snapshots and clock.elapsed() >= budget_s * k / snapshots:
            clock.stop()
            minutes = clock.total / 60
            # a step longer than the snapshot interval: the weights have not changed, so reuse the last file
            saved = ({kk: points[-1][kk] for kk in ("file", "res")} if points and points[-1]["nimg"] == nimg
                     else snapshot(k, nimg))
            points.append({"minutes": round(minutes, 4), "nimg": nimg, "steps": n, **saved})
            print(f"  {name:8s} snapshot {k:2d}/{snapshots}  {minutes:7.2f} min  {nimg:>10,} img  "
                  f"{nimg / max(clock.total, 1e-9):8.1f} img/s", flush=True)
            record(points)
            k += 1
            clock.start()
    clock.stop()
    return points


def save_generator_snapshot(path: Path, cfg: TrainConfig, G: torch.nn.Module, nimg: int, epoch: int) -> None:
    """A progan generator as a checkpoint-format file with only G_ema (progan.generate.load_generator reads it)."""
    checkpoint.atomic_write(path, lambda f: torch.save(
        {"schema": checkpoint.SCHEMA, "config": cfg.to_dict(), "nimg": nimg, "epoch": epoch,
         "G_ema": {k: v.detach().cpu() for k, v in G.state_dict().items()}}, f))


def train_progan(cfg: TrainConfig, bank: ImageBank, out: Path, args, device: torch.device, record) -> list[dict]:
    t = Trainer(cfg, bank, device, precision=args.precision)

    def step(progress: float) -> int:
        t.set_progress(progress)   # cfg.lr_rampdown: the race's run is --minutes of wall-clock long
        t.step()
        return t.nimg

    def snapshot(k: int, nimg: int) -> dict:
        path = out / "progan" / f"snap-{k:02d}.pt"
        save_generator_snapshot(path, cfg, t.G_ema, nimg, t.epoch)
        level, _ = t.phase()
        return {"file": str(path.relative_to(out)), "res": cfg.resolution(level)}

    (out / "progan").mkdir(parents=True, exist_ok=True)
    return run_contestant("progan", step, snapshot, args.minutes * 60, args.snapshots, device, 10, record)


def train_dcgan(bank: ImageBank, out: Path, args, device: torch.device, record) -> list[dict]:
    ref = DCGANTrainer(device, seed=args.seed, precision=args.dcgan_precision)
    batch = DCGANTrainer.batch
    ipe = (len(bank) // batch) * batch
    state = {"nimg": 0, "order": None}

    def step(progress: float) -> int:
        epoch, pos = divmod(state["nimg"], ipe)
        if state["order"] is None or state["order"][0] != epoch:
            state["order"] = (epoch, epoch_order(len(bank), epoch, args.seed))
        ref.step(bank.batch(state["order"][1][pos:pos + batch], DCGANTrainer.size))
        state["nimg"] += batch
        return state["nimg"]

    def snapshot(k: int, nimg: int) -> dict:
        path = out / "dcgan64" / f"snap-{k:02d}.pt"
        checkpoint.atomic_write(path, lambda f: torch.save(
            {k2: v.detach().cpu() for k2, v in ref.G.state_dict().items()}, f))
        return {"file": str(path.relative_to(out)), "res": DCGANTrainer.size}

    (out / "dcgan64").mkdir(parents=True, exist_ok=True)
    return run_contestant("dcgan64", step, snapshot, args.minutes * 60, args.snapshots, device, 10, record)


def load_split(real: str, size: int, holdout: float, allow_upscale: bool = False):
    from progan.run import load_dataset

    data = load_dataset(real, size, allow_upscale=allow_upscale, progress=False)
    train, held = split_holdout(data, holdout)
    return train, held


def train(args) -> Path:
    from progan.run import default_precision, pick_device, setup_backend

    device = pick_device(args.device)
    args.precision = args.precision or default_precision(device)
    setup_backend(device, args.precision)
    out = Path(args.out)
    if args.preset == "auto":   # as `progan train` without --preset: the preset chosen for this machine and size
        args.preset = auto_preset(device.type, args.size)
    cfg = TrainConfig(**{**PRESETS[args.preset], **args.overrides, "size": args.size, "seed": args.seed})
    if "dcgan64" in args.contestants and DCGANTrainer.size != args.size:
        raise ProganError(f"the DCGAN reference is a 64 px model; --size must be 64 (or --contestants progan), "
                          f"got {args.size}")
    train_part, held = load_split(args.data, args.size, args.holdout, args.allow_upscale)
    need = DCGANTrainer.batch if "dcgan64" in args.contestants else cfg.batch   # one batch of the contestants
    if len(train_part) < need or len(held) < 2:
        raise ProganError(f"{args.data}: {len(train_part)} training and {len(held)} held-out images; need at least "
                          f"{need} and 2")
    bank = ImageBank(np.asarray(train_part.images), device)
    desc = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"race: {len(train_part):,} training / {len(held):,} held-out images at {args.size} px, "
          f"{args.minutes:g} min each on {desc} (progan {args.precision}, DCGAN {args.dcgan_precision}); "
          f"progan preset {args.preset}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "progan-race", "data": str(args.data), "size": args.size, "holdout": args.holdout,
            "train_images": len(train_part), "heldout_images": len(held), "minutes": args.minutes,
            "device": desc, "precision": args.precision, "dcgan_precision": args.dcgan_precision,
            "preset": args.preset, "seed": args.seed,
            "progan_config": cfg.to_dict(), "torch": torch.__version__, "contestants": {}}
    path = out / "race-train.json"

    def recorder(name: str):
        def record(points: list[dict]) -> None:   # rewritten after every snapshot: a cut-off race stays scorable
            meta["contestants"][name] = list(points)
            checkpoint.atomic_write(path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
        return record

    meta["complete"] = False
    meta["overrides"] = args.overrides
    if "progan" in args.contestants:
        meta["contestants"]["progan"] = train_progan(cfg, bank, out, args, device, recorder("progan"))
    if "dcgan64" in args.contestants:
        meta["contestants"]["dcgan64"] = train_dcgan(bank, out, args, device, recorder("dcgan64"))
    meta["complete"] = True
    checkpoint.atomic_write(path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    print(f"wrote {path}", flush=True)
    return out


# ----------------------------------------------------------------------------- scoring


SCORE_CACHE = "race-scores.json"


class ScoreCache:
    """FID/SWD of each scored snapshot, written to OUT/race-scores.json after every one, so that `score` cut off
    part-way (scoring 60 snapshots a contestant takes longer than the race on a CPU) resumes where it stopped.
    An entry counts only for the same n, seed, real folder and snapshot file (size and mtime)."""

    def __init__(self, path: Path, **setting):
        self.path, self.setting = path, setting
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.entries = data.get("entries", {}) if data.get("setting") == setting else {}

    def _key(self, path: Path) -> tuple[str, list[int]]:
        st = path.stat()
        return path.relative_to(self.path.parent).as_posix(), [st.st_size, st.st_mtime_ns]

    def get(self, path: Path) -> dict | None:
        if not path.is_file():   # a snapshot deleted since: its kept score no longer stands for anything
            return None
        key, stamp = self._key(path)
        e = self.entries.get(key)
        return {"fid": e["fid"], "swd": e["swd"], "cached": True} if e and e["stamp"] == stamp else None

    def put(self, path: Path, scores: dict) -> None:
        key, stamp = self._key(path)
        self.entries[key] = {"stamp": stamp, "fid": float(scores["fid"]), "swd": float(scores["swd"])}
        tmp = self.path.with_suffix(".tmp")   # write-then-rename: an interrupt never leaves half a file
        tmp.write_text(json.dumps({"setting": self.setting, "entries": self.entries}, indent=1) + "\n")
        tmp.replace(self.path)


def coarse_to_fine(count: int) -> list[int]:
    """Indices 0..count-1, the last first, then every 2**j-th (j falling): 8 -> [7, 3, 1, 5, 0, 2, 4, 6]."""
    order = [count - 1] if count else []
    stride = 1 << max(count.bit_length() - 1, 0)
    while stride:
        order += [k for k in range(stride - 1, count, stride) if k not in order]
        stride //= 2
    return order


def parse_snapshot_spec(spec: str, count: int) -> list[int]:
    """'1-6,10,20' -> the 0-based snapshot indices [0, 1, 2, 3, 4, 5, 9, 19], in the order given (a repeat counts once);
    numbers as in the snapshot files (snap-01.pt is 1), each between 1 and count."""
    picked: list[int] = []
    for part in (x.strip() for x in spec.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ProganError(f"--snapshots {spec!r}: expected numbers and ranges such as 1-6,10,20") from None
        if not 1 <= first <= last <= count:
            raise ProganError(f"--snapshots {spec!r}: {part} is outside 1-{count} (this race has {count} snapshots "
                              f"a contestant)")
        picked += [k - 1 for k in range(first, last + 1) if k - 1 not in picked]
    return picked


def upsample_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """N x r x r x 3 uint8 -> N x size x size x 3, bilinear (align_corners=False), rounded."""
    if images.shape[1] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def sample_snapshot(contestant: str, path: Path, n: int, size: int, seed: int, device: torch.device) -> np.ndarray:
    if contestant == "progan":
        from progan.generate import load_generator

        gen = load_generator(path, device=device)
        return upsample_uint8(gen.sample(n, seed=seed, batch=64), size)
    G = DCGANGenerator().to(device)
    G.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    G.eval()   # as DCGANTrainer.sample: BatchNorm running statistics
    rng = torch.Generator().manual_seed(seed)
    parts = []
    with torch.inference_mode():
        for i in range(0, n, 64):
            z = torch.randn(min(64, n - i), G.nz, generator=rng)
            parts.append(visualization.to_uint8(G(z.to(device))))
    return np.concatenate(parts)


def downsample_uint8(images: np.ndarray, res: int) -> np.ndarray:
    """N x s x s x 3 uint8 -> N x res x res x 3 by area averaging (what a perfect res-px generator would draw)."""
    if images.shape[1] == res:
        return images
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(res, res), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def fid_swd(fakes: np.ndarray, reals: np.ndarray, stats, net, m: int, seed: int, device: torch.device) -> dict:
    """FID of fakes against the held-out statistics and SWD of the first m of each set (SWD compares equal sizes)."""
    from progan import metrics

    return {"fid": metrics.fid_from_features(metrics.inception_features(fakes, device, model=net), stats.features),
            "swd": metrics.swd(reals[:m], fakes[:m], seed=seed, device=device)["avg"]}


def resolution_floors(train_images: np.ndarray, reals: np.ndarray, stats, net, resolutions: list[int], n: int,
                      m: int, seed: int, device: torch.device) -> list[dict]:
    """FID and SWD of n real *training* faces reduced to each resolution and upsampled back as progan snapshots are:
    what a perfect snapshot at that resolution would score at this n: an 8 px model that scores near the 8 px floor
    has learnt what 8 px can show."""
    size = reals.shape[1]
    pick = np.random.default_rng(seed).choice(len(train_images), min(n, len(train_images)), replace=False)
    base = np.asarray(train_images[np.sort(pick)])
    rows = []
    for res in resolutions:
        fakes = upsample_uint8(downsample_uint8(base, res), size)
        row = {"res": res, **fid_swd(fakes, reals, stats, net, m, seed, device)}
        rows.append(row)
        print(f"  floor    real faces at {res:3d} px  FID {row['fid']:8.2f}  SWD {row['swd']:7.2f}", flush=True)
    return rows


def read_meta(out: Path) -> dict:
    meta_path = out / "race-train.json"
    if not meta_path.is_file():
        raise ProganError(f"{out} has no race-train.json (train first: python tools/race.py DATA --out {out})")
    return json.loads(meta_path.read_text())


def borrow(meta: dict, other: Path) -> dict[str, list[dict]]:
    """The contestants that race `meta` lacks, from the earlier race folder `other`, which must have trained on the
    same data split for the same budget and snapshot count (else its minutes would not line up with ours)."""
    theirs = read_meta(other)
    for key in ("size", "holdout", "minutes", "train_images", "heldout_images"):
        if theirs.get(key) != meta.get(key):
            raise ProganError(f"--against {other}: it has {key} {theirs.get(key)}, this race {meta.get(key)}")
    if Path(theirs["data"]).resolve() != Path(meta["data"]).resolve():
        raise ProganError(f"--against {other}: it trained on {theirs['data']}, this race on {meta['data']}")
    taken = {c: theirs["contestants"][c] for c in CONTESTANTS
             if c not in meta["contestants"] and c in theirs["contestants"]}
    if not taken:
        raise ProganError(f"--against {other}: it has no contestant that this race lacks")
    ours = sorted({len(v) for v in meta["contestants"].values()})
    for c, points in taken.items():
        if ours and ours != [len(points)]:
            raise ProganError(f"--against {other}: its {c} has {len(points)} snapshots, this race "
                              f"{'/'.join(map(str, ours))}")
    return taken


def reference_set(train_images: np.ndarray, held_images: np.ndarray, reference: str, reference_n: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The real faces FID and SWD compare with, and the training faces left for --floors (never the same faces).
    "heldout": the race's held-out images (never trained on; few, so FID's floor is high at any n). "train": reference_n
    training faces drawn at random (seeded), the usual protocol (StyleGAN's FID against the training set, issue #11's
    5,000 against 5,000, whose floor two disjoint real sets measure: --floors)."""
    if reference == "heldout":
        return held_images, train_images
    if reference != "train":
        raise ProganError(f"--reference must be heldout or train, got {reference!r}")
    if reference_n < 2 or reference_n >= len(train_images):
        raise ProganError(f"--reference-n {reference_n}: needs 2 to {len(train_images) - 1} (the training part has "
                          f"{len(train_images)} images, and --floors needs some left over)")
    pick = np.zeros(len(train_images), dtype=bool)
    pick[np.random.default_rng(seed).choice(len(train_images), reference_n, replace=False)] = True
    return train_images[pick], train_images[~pick]


def score(out: Path, real: str, n: int, device_name: str = "auto", seed: int = 0,
          allow_upscale: bool = False, floors: bool = False, against: Path | None = None,
          only: str | None = None, reference: str = "heldout", reference_n: int = 5000) -> dict:
    from progan import metrics
    from progan.run import pick_device

    meta = read_meta(out)
    taken = borrow(meta, against) if against is not None else {}
    snaps = {c: taken.get(c) or meta["contestants"].get(c, []) for c in CONTESTANTS}
    count = max((len(v) for v in snaps.values()), default=0)
    # Coarse to fine, every contestant at each index: a scoring run cut off part-way has matched minutes that span
    # the whole race in the cache. --snapshots: only those, in the order given (e.g. the minutes in question first).
    order = parse_snapshot_spec(only, count) if only is not None else coarse_to_fine(count)
    device = pick_device(device_name)
    size = int(meta["size"])
    train_part, held = load_split(real, size, float(meta["holdout"]), allow_upscale)
    if len(held) != meta["heldout_images"]:
        print(f"warning: {real} gives {len(held)} held-out images, training saw {meta['heldout_images']}",
              file=sys.stderr)
    if len(held) < 2:
        raise ProganError(f"{real}: only {len(held)} held-out images; FID needs at least 2")
    reals, floor_pool = reference_set(np.asarray(train_part.images), np.asarray(held.images), reference, reference_n,
                                      seed)
    net = metrics.load_inception(device)
    stats = metrics.real_statistics(reals, device, model=net)
    m = min(n, len(reals))   # SWD compares sets of one size
    result = {**{k: v for k, v in meta.items() if k != "contestants"}, "n": n, "reference": reference,
              "fid_real_images": len(reals), "swd_images": m, "score_device": str(device), "contestants": {}}
    setting = dict(n=n, seed=seed, real=str(Path(real).resolve()))
    if reference != "heldout":   # scores against another real set are kept apart (held-out keys stay as they were)
        setting.update(reference=reference, reference_n=len(reals))
    cache_name = SCORE_CACHE if reference == "heldout" else SCORE_CACHE.replace(".json", f"-{reference}.json")
    caches = {out: ScoreCache(out / cache_name, **setting)}
    home = {c: out for c in CONTESTANTS}   # the race folder each contestant's snapshots (and kept scores) live in
    if taken:
        theirs = read_meta(against)
        result["against"] = {"race": str(against), "contestants": sorted(taken), "device": theirs["device"],
                             "precision": theirs["precision"], "dcgan_precision": theirs.get("dcgan_precision", "fp32"),
                             "torch": theirs.get("torch")}
        if "dcgan64" in taken:   # the borrowed DCGAN ran at the earlier race's precision, not at this race's setting
            result["dcgan_precision"] = result["against"]["dcgan_precision"]
        caches[against] = ScoreCache(against / cache_name, **setting)
        home.update({c: against for c in taken})
    scored: dict[tuple[str, int], dict] = {}
    for k in order:
        for contestant in CONTESTANTS:
            if k >= len(snaps[contestant]):
                continue
            p = snaps[contestant][k]
            path = home[contestant] / p["file"]
            cache = caches[home[contestant]]
            hit = cache.get(path)
            if hit is None:
                if not path.is_file():
                    raise ProganError(f"{path}: snapshot missing (deleted since the race?); score other ones with "
                                      f"--snapshots")
                fakes = sample_snapshot(contestant, path, n, size, seed, device)
                hit = fid_swd(fakes, reals, stats, net, m, seed, device)
                cache.put(path, hit)
            scored[contestant, k] = hit
            print(f"  {contestant:8s} {p['minutes']:7.2f} min  {p['res']:3d} px  FID {hit['fid']:8.2f}  "
                  f"SWD {hit['swd']:7.2f}{'  (cached)' if hit.get('cached') else ''}", flush=True)
    # Snapshots an earlier `score` with the same setting kept join the table and the plot, so that a race scored in
    # parts (--snapshots, or an interrupted run) ends with one complete race.json.
    for contestant in CONTESTANTS:
        for k, p in enumerate(snaps[contestant]):
            if (contestant, k) not in scored:
                hit = caches[home[contestant]].get(home[contestant] / p["file"])
                if hit is not None:
                    scored[contestant, k] = hit
    for contestant in CONTESTANTS:
        rows = [{"minutes": p["minutes"], "nimg": p["nimg"], "res": p["res"], "fid": scored[contestant, k]["fid"],
                 "swd": scored[contestant, k]["swd"]} for k, p in enumerate(snaps[contestant])
                if (contestant, k) in scored]
        result["contestants"][contestant] = rows
        if rows:
            last = snaps[contestant][-1]
            grid = visualization.image_grid(sample_snapshot(contestant, home[contestant] / last["file"], GRID_N, size,
                                                            seed + 1, device), 8)
            from PIL import Image

            Image.fromarray(grid).save(out / f"{contestant}-samples.png")
    if floors:   # every resolution progan was scored at
        res = sorted({r["res"] for r in result["contestants"].get("progan", [])} | {size})
        result["floors"] = resolution_floors(floor_pool, reals, stats, net, res, n, m, seed, device)
    what = "held-out images" if reference == "heldout" else f"training images drawn at random (seed {seed})"
    result["notes"] = [
        f"FID: {n} generated faces vs {len(reals)} {what} (low-rank exact form when either set has "
        f"<= 2048 images); biased upward for small sets, so compare only at the same n and reference",
        f"SWD x1e3 (ProGAN's, average over pyramid levels) on {m} generated vs {m} of those real images",
        f"progan snapshots below {size} px are upsampled bilinearly to {size} px before scoring",
    ]
    if only is not None:
        result["snapshots_scored"] = [k + 1 for k in sorted(order)]
        shown = sorted({k for _, k in scored})
        result["notes"].append(f"snapshots {only} of {count} scored by this run (--snapshots); {len(shown)} with "
                               f"scores in all, the others kept from earlier runs")
    stem = "race" if reference == "heldout" else f"race-vs-{reference}"   # the held-out table stays beside this one
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{stem}.png")
    print(table(result))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    borrowed = result.get("against", {})
    for contestant, rows in result["contestants"].items():
        if not rows:   # a contestant that did not run (e.g. progan alone at 128 px): no empty legend entry
            continue
        mins = [r["minutes"] for r in rows]
        label = (f"{contestant} (race {Path(borrowed['race']).name})" if contestant in borrowed.get("contestants", [])
                 else contestant)
        axes[0].plot(mins, [r["fid"] for r in rows], marker="o", label=label)
        axes[1].plot(mins, [r["swd"] for r in rows], marker="o", label=label)
    floors = result.get("floors", [])
    floor_label = "real faces at " + ", ".join(str(f["res"]) for f in floors) + " px"
    for i, f in enumerate(floors):   # real faces at each resolution: a perfect snapshot's score
        for ax, key in zip(axes, ("fid", "swd")):
            ax.axhline(f[key], color="grey", ls=":", lw=1, label=floor_label if i == 0 else None)
            ax.annotate(f"{f['res']} px", (1.0, f[key]), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", ha="right", va="bottom")
    reals = "held-out" if result.get("reference", "heldout") == "heldout" else "training"
    axes[0].set_ylabel(f"FID (n={result['n']} vs {result['fid_real_images']} {reals})")
    axes[1].set_ylabel("SWD x1e3")
    for ax in axes:
        ax.set_xlabel("training wall-clock (min)")
        ax.grid(alpha=0.3)
        ax.legend()
    # races before --dcgan-precision ran DCGAN in fp32
    fig.suptitle(f"{result['size']} px, {result['device']} (progan {result['precision']}, "
                 f"DCGAN {result.get('dcgan_precision', 'fp32')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    lines = [f"{'contestant':10s} {'minutes':>8s} {'images':>11s} {'res':>4s} {'FID':>9s} {'SWD':>8s}"]
    for contestant, rows in result["contestants"].items():
        for r in rows:
            lines.append(f"{contestant:10s} {r['minutes']:8.2f} {r['nimg']:11,d} {r['res']:4d} {r['fid']:9.2f} "
                         f"{r['swd']:8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parse_overrides(items: list[str]) -> dict:
    """['eq_lr=false', 'g_channels=64,64,32,16,16'] -> TrainConfig fields on top of the preset (JSON values; a comma
    list for tuple fields; bare words as strings)."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ProganError(f"--set {item!r}: expected FIELD=VALUE with a TrainConfig field "
                              f"(e.g. eq_lr=false, fade_images=8000)")
        if key in ("size", "seed"):
            raise ProganError(f"--set {key}: use --{key}")
        if str(fields[key].type).startswith("tuple"):
            out[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "score":
            p = argparse.ArgumentParser(prog="race.py score", description="Score the snapshots of a race folder.")
            p.add_argument("out", help="the race folder (holds race-train.json)")
            p.add_argument("--real", required=True, help="the image folder the race trained on")
            p.add_argument("--n", type=int, default=5000, help="generated faces per snapshot [5000]")
            p.add_argument("--device", default="auto")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--allow-upscale", action="store_true")
            p.add_argument("--floors", action="store_true",
                           help="also score real training faces reduced to each snapshot resolution and upsampled "
                                "back (what a perfect snapshot at that resolution would score); dotted lines in race.png")
            p.add_argument("--against", default=None, metavar="RACE",
                           help="an earlier race folder: score the contestants this race did not train from its "
                                "snapshots (same size, holdout, minutes and snapshot count)")
            p.add_argument("--snapshots", default=None, metavar="LIST",
                           help="score only these snapshot numbers, in this order, e.g. 1-6,10,20,30 (a long race in "
                                "parts; kept scores are reused, and race.json shows every kept one) [all, coarse "
                                "to fine]")
            p.add_argument("--reference", choices=["heldout", "train"], default="heldout",
                           help="the real faces to compare with: the held-out images, or --reference-n training "
                                "images (the usual protocol, e.g. 5,000 against 5,000; writes race-vs-train.json/png "
                                "beside the held-out race.json) [heldout]")
            p.add_argument("--reference-n", type=int, default=5000,
                           help="training images in the reference set for --reference train [5000]")
            a = p.parse_args(argv[1:])
            if a.n < 2:
                raise ProganError(f"--n must be at least 2, got {a.n}")
            score(Path(a.out), a.real, a.n, a.device, a.seed, a.allow_upscale, a.floors,
                  Path(a.against) if a.against else None, a.snapshots, a.reference, a.reference_n)
            return
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("data", help="image folder (e.g. UTKFace)")
        p.add_argument("--minutes", type=float, required=True, help="wall-clock training budget per contestant")
        p.add_argument("--out", default="race", help="output folder [race]")
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                       help="progan's forward passes [as progan train: bf16 on CUDA and on CPUs with native bf16, "
                            "else fp32]; TF32 matmuls on CUDA when this is tf32 or bf16 (for both contestants)")
        p.add_argument("--dcgan-precision", choices=["fp32", "bf16"], default="fp32",
                       help="DCGAN's forward passes [fp32, as the tutorial]; bf16 gives it progan's bf16 autocast")
        p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                       help="progan preset [auto: progan train's default for the device, cpu64 / gpu64 at 64 px]")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="change one progan config field on top of the preset, e.g. --set eq_lr=false (repeatable)")
        p.add_argument("--contestants", default=",".join(CONTESTANTS),
                       help=f"comma list of who trains [{','.join(CONTESTANTS)}]; e.g. progan alone to try a "
                            "setting against an earlier race's DCGAN (then: score OUT --against EARLIER)")
        p.add_argument("--size", type=int, default=64,
                       help="resolution (the DCGAN reference is 64 px; other sizes race progan alone, e.g. --size 128 "
                            "--contestants progan) [64]")
        p.add_argument("--snapshots", type=int, default=10, help="snapshots per contestant [10]")
        p.add_argument("--holdout", type=float, default=0.03, help="held-out fraction for FID [0.03]")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n", type=int, default=5000, help="generated faces per snapshot when scoring [5000]")
        p.add_argument("--score", dest="score", action="store_true", default=None,
                       help="score right after training [default: when the Inception weights are present]")
        p.add_argument("--no-score", dest="score", action="store_false")
        p.add_argument("--allow-upscale", action="store_true")
        a = p.parse_args(argv)
        if a.minutes <= 0 or a.snapshots < 1:
            raise ProganError("--minutes must be positive and --snapshots at least 1")
        a.overrides = parse_overrides(a.overrides)
        a.contestants = tuple(c.strip() for c in a.contestants.split(",") if c.strip())
        bad = [c for c in a.contestants if c not in CONTESTANTS]
        if bad or not a.contestants:
            raise ProganError(f"--contestants: unknown {bad} (choose from {', '.join(CONTESTANTS)})")
        if a.score is None:
            from progan.metrics import fid_weights_path

            try:
                fid_weights_path()
                a.score = True
            except ProganError:
                a.score = False
                print("no Inception weights here: training only; score later with "
                      f"python tools/race.py score {a.out} --real {a.data}", file=sys.stderr)
        out = train(a)
        if a.score:
            score(out, a.data, a.n, a.device, a.seed, a.allow_upscale)
    except ProganError as e:
        print(f"race.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
