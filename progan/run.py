"""A training run folder and the loop around Trainer: resume, progress bar, log.jsonl, training.mkv, checkpoints,
and a clean stop on Ctrl-C / SIGTERM.

Run folder layout:
    config.json            the run's TrainConfig
    log.jsonl              scalars every `log_every` steps; {"kind": "eval", ...} lines with --eval-every
    heldout.txt            names of the images kept out of training (--holdout), one per line
    data.json              the training source and its split (what `progan evaluate` needs to find the held-out set)
    cellcolours.jsonl      per-cell mean colours of the EMA and raw generator at every video frame (colour flicker)
    metrics.png            FID and SWD curves (with --eval-every)
    training.mkv           the fixed-latent video of the whole run (segments in video/ joined after each session)
    checkpoints/epoch-NNNN.pt, checkpoints/latest
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch

from progan import checkpoint
from progan.config import RESUMABLE_CHANGES, TrainConfig
from progan.distributed import Dist, local_batch
from progan.errors import ProganError


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int
    nimg: int
    signal: int | None  # the signal that stopped training early, else None
    checkpoint: Path | None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ProganError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProganError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16), where oneDNN's bf16 convolutions
    beat fp32; elsewhere bf16 is emulated and slower. Linux only (reads /proc/cpuinfo); False where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def default_precision(device: torch.device) -> str:
    """bf16 autocast on CUDA and on CPUs with native bf16; fp32 elsewhere. On the 2-core AMD EPYC development VM
    (AVX512-BF16) bf16 trains `cpu64` 1.3-1.4x as fast as fp32 at 16-64 px (README, Speed)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def setup_backend(device: torch.device, precision: str, threads: int | None = None) -> None:
    """Process-wide speed settings, applied by the CLI and tools (never at import): CPU threads; on CUDA cuDNN
    autotuning and TF32 matmuls for tf32/bf16."""
    if device.type == "cpu":
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
            return  # torch already follows the user's OMP_NUM_THREADS; overriding it oversubscribes shared CPUs
        torch.set_num_threads(threads or os.cpu_count() or 1)
    else:
        torch.backends.cudnn.benchmark = True
        fast = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast


def load_dataset(source: str, size: int, cache_dir: str | None = None, allow_upscale: bool = False,
                 progress: bool = True):
    """An image folder, or the built-in offline set 'digits' (coloured stacked digits) when no such folder exists."""
    from progan import facedata

    if source == "digits" and not Path(source).exists():
        return facedata.stacked_digits(size=size)
    return facedata.load_folder(source, size, cache_dir=cache_dir, allow_upscale=allow_upscale, progress=progress)


def resolve_config(run_dir: Path, requested: dict[str, Any], explicit: set[str], fresh: bool
                   ) -> tuple[TrainConfig, dict | None]:
    """The config to train with and the checkpoint to resume from (None for a new run).

    On resume the saved config wins; options given explicitly on the command line may only change what is safe
    to change mid-run (epochs, video/log frequency, keep), anything else is refused with a way out.
    """
    ckpt_path = None if fresh else checkpoint.latest(run_dir)
    if ckpt_path is None:
        return TrainConfig(**requested), None
    state = checkpoint.load(ckpt_path)
    saved = TrainConfig.from_dict(state["config"])
    old = saved.to_dict()
    changes = {}
    for key in sorted(explicit & set(requested)):
        new = tuple(requested[key]) if isinstance(requested[key], list) else requested[key]
        if new == old[key]:
            continue
        if key not in RESUMABLE_CHANGES:
            def show(v):  # tuples (channels, condition) as the command line writes them
                return ",".join(map(str, v)) or "none" if isinstance(v, tuple) else v
            raise ProganError(
                f"{run_dir} was trained with {key}={show(old[key])} but {key}={show(new)} was asked for; "
                f"resume without "
                f"changing it, or start fresh with --fresh or another --out")
        changes[key] = new
    cfg = TrainConfig(**{**old, **changes})
    state["resumed_from"] = str(ckpt_path)
    return cfg, state


def write_split(run_dir: Path, source: str, total: int, train_names: list[str], held_names: list[str],
                fraction: float) -> None:
    """heldout.txt (the held-out names) and data.json (source and counts), so evaluation can rebuild the split."""
    from progan.checkpoint import atomic_write

    src = source if source == "digits" and not Path(source).exists() else str(Path(source).resolve())
    text = "".join(f"{n}\n" for n in held_names)
    atomic_write(run_dir / "heldout.txt", lambda f: f.write(text.encode()))
    info = {"source": src, "holdout": fraction, "images": total, "train": len(train_names),
            "heldout": len(held_names)}
    atomic_write(run_dir / "data.json", lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))


def read_split(run_dir: Path) -> tuple[dict, list[str]] | None:
    """(data.json, held-out names) of a run folder, or None for runs made before held-out splits."""
    try:
        info = json.loads((run_dir / "data.json").read_text())
        names = (run_dir / "heldout.txt").read_text().splitlines()
    except (OSError, ValueError):
        return None
    return info, [n for n in names if n]


def archive_run(run_dir: Path) -> Path | None:
    """--fresh never deletes work: an existing run folder is renamed aside."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    dest = run_dir.with_name(f"{run_dir.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
    run_dir.rename(dest)
    return dest


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a request to stop after the current step; a second signal stops at once."""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def video_cell(size: int) -> int:
    """Grid cell size in training.mkv: at least 64 px so early 4 px images are visible, at most 128 px."""
    return min(128, size * max(1, 64 // size))


def train(source: str, run_dir: str | Path, requested: dict[str, Any], explicit: set[str] | None = None,
          fresh: bool = False, device: str = "auto", cache_dir: str | None = None, allow_upscale: bool = False,
          progress: bool = True, max_steps: int | None = None, precision: str | None = None,
          compile: bool = False, dist: Dist | None = None, channels_last: bool = True) -> RunResult:
    """Train (or resume) the run in run_dir on the images in source until cfg.epochs epochs are done.

    `explicit` names the options the user actually gave (they may override a resumed run's safe options).
    `max_steps` stops early after that many steps in this session (for tests and benchmarks), with a checkpoint.
    `channels_last`: the networks' memory layout (Trainer); it changes rounding only, so a run may resume in either.
    `dist` (from progan.distributed.init under torchrun): this is one of several processes; rank 0 resolves the
    run and checkpoint for all and alone writes the run folder, cfg.batch is the global batch.
    """
    from progan.facedata import ImageBank, split_holdout
    from progan.gantrain import Trainer

    run_dir = Path(run_dir)
    main = dist is None or dist.main
    if fresh and main:
        moved = archive_run(run_dir)
        if moved:
            print(f"--fresh: moved the existing run to {moved}", file=sys.stderr)
    if dist is None:
        cfg, state = resolve_config(run_dir, requested, explicit or set(), fresh=False)
    else:
        cfg, state = resolve_on_main(dist, run_dir, requested, explicit or set())
        local_batch(cfg.batch, dist.world)  # refuse an uneven split before decoding any images
    dev = pick_device(device) if dist is None else dist.device
    chosen = precision is None
    precision = precision or default_precision(dev)
    setup_backend(dev, precision)
    if not main:
        dist.barrier()  # rank 0 decodes and caches the images first; the others then read its cache
    data = load_dataset(source, cfg.size, cache_dir=cache_dir, allow_upscale=allow_upscale, progress=progress and main)
    if main and dist is not None:
        dist.barrier()
    # The held-out images are never trained on: they are the real reference for evaluation (FID, memorisation).
    data, held = split_holdout(data, cfg.holdout)
    n_total = len(data) + len(held)
    if main:
        print(f"held out {len(held):,} of {n_total:,} images (--holdout {cfg.holdout:g}) for "
              f"evaluation; training on {len(data):,}", file=sys.stderr)
    if len(data) < cfg.batch:
        raise ProganError(f"only {len(data)} usable training images in {source}, fewer than one batch "
                          f"(--batch {cfg.batch})")
    if cfg.eval_every > 0 and len(held) < 2:
        raise ProganError(f"--eval-every needs held-out images, but --holdout {cfg.holdout:g} keeps {len(held)} of "
                          f"{len(data) + len(held)}; raise --holdout")
    label_values = None
    if cfg.condition:
        from progan.labels import prepare

        # Drops images without the labels asked for; completes the config with the label space (classes, ages).
        data, cfg, label_values = prepare(data, cfg, source)
        if len(data) < cfg.batch:
            raise ProganError(f"only {len(data)} usable labelled training images in {source}, fewer than one batch "
                              f"(--batch {cfg.batch})")
    if main:   # after the data, so that bad input stays a one-line error
        why = " (this CPU computes bf16 natively; --precision fp32 for full precision)" if (
            chosen and dev.type == "cpu" and precision == "bf16") else ""
        print(f"training on {dev} in {precision}{why}", file=sys.stderr)
    bank = ImageBank(data.images, dev, labels=label_values)
    trainer = Trainer(cfg, bank, dev, precision=precision, compile=compile, dist=dist, channels_last=channels_last)
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            # it loaded safely but does not hold a whole training state matching its config
            what = f"missing {e}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ProganError(f"cannot resume from {state['resumed_from']}: it is not a complete training checkpoint "
                              f"({what[:120]}); move it aside to resume from an earlier one, or start over with "
                              f"--fresh") from None
        if main:
            print(f"resuming {run_dir} from {Path(state['resumed_from']).name}: epoch {trainer.epoch}, "
                  f"{trainer.nimg:,} images shown", file=sys.stderr)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        write_split(run_dir, source, n_total, data.names, held.names, cfg.holdout)

    ipe = trainer.images_per_epoch
    total = cfg.epochs * ipe
    if trainer.nimg >= total:
        if main:
            print(f"{run_dir} already has {trainer.epoch} epochs; pass a larger --epochs to train on", file=sys.stderr)
        return RunResult(run_dir, trainer.epoch, trainer.nimg, None, checkpoint.latest(run_dir))

    evaluator = None
    if cfg.eval_every > 0 and main:  # evaluation runs on rank 0 only; the others wait in their next collective
        from progan.monitor import TrainingEval

        evaluator = TrainingEval(run_dir, cfg, held.images, dev, cache_dir=cache_dir, progress=progress)
    del data, held
    session = Session(trainer, run_dir, progress, evaluator, dist)
    with stop_signals() as stop:
        session.run(total, stop, max_steps)
    return RunResult(run_dir, trainer.epoch, trainer.nimg, stop[0] if stop else None,
                     session.last_ckpt or checkpoint.latest(run_dir))


def resolve_on_main(dist: Dist, run_dir: Path, requested: dict[str, Any], explicit: set[str]
                    ) -> tuple[TrainConfig, dict | None]:
    """resolve_config on rank 0, broadcast to all ranks, so every rank starts from the same config and checkpoint
    (the run folder need only be on rank 0's disk). A refusal on rank 0 is the same one-line error on every rank."""
    result: Any = None
    if dist.main:
        try:
            result = resolve_config(run_dir, requested, explicit, fresh=False)
        except ProganError as e:
            result = str(e)
    result = dist.broadcast(result)
    if isinstance(result, str):
        raise ProganError(result)
    return result


class NoVideo:
    """The training video on ranks other than 0: they write no files."""

    def add(self, frame) -> None:
        pass

    def close(self) -> None:
        pass


class Session:
    """One sitting of training: the step loop with its log lines, video frames, checkpoints and NaN rollback."""

    MAX_FAILURES = 3  # divergences in a row before giving up

    def __init__(self, trainer, run_dir: Path, progress: bool, evaluator=None, dist: Dist | None = None):
        self.trainer, self.run_dir, self.progress = trainer, run_dir, progress
        self.evaluator = evaluator  # monitor.TrainingEval with --eval-every (rank 0 only), else None
        # Under torchrun every rank runs this loop (same steps, same decisions); only rank 0 writes the run folder.
        self.dist = dist
        self.main = dist is None or dist.main
        self.stopped = False
        self.cfg = trainer.cfg
        self.ipe = trainer.images_per_epoch
        self.cell = video_cell(self.cfg.size)
        self.last_stats = None
        self.last_ckpt: Path | None = None
        self.ips = 0.0
        self.failures = 0
        # In-memory copy of the last good state (start of session or last checkpoint), for NaN rollback.
        self.good = copy.deepcopy(trainer.state_dict())

    def run(self, total: int, stop: list[int], max_steps: int | None) -> None:
        from tqdm import tqdm

        from progan import visualization

        from progan.monitor import CellColours

        t, cfg = self.trainer, self.cfg
        self.t_last, self.n_last = time.perf_counter(), t.nimg
        # Training wall-clock: carried over from the checkpoint, evaluation time left out.
        self.t0, self.wall0, self.paused = time.perf_counter(), t.train_seconds, 0.0
        eval_every = round(cfg.eval_every * self.ipe) if self.evaluator is not None else 0
        eval_every = max(eval_every, cfg.batch) if eval_every else 0
        colours = CellColours(self.run_dir)  # opens its file at the first frame (rank 0 only)
        bar = tqdm(total=total, initial=t.nimg, unit="img", unit_scale=True, dynamic_ncols=True,
                   disable=not (self.progress and self.main), desc=self.run_dir.name, smoothing=0.05)
        video = visualization.TrainingVideo(self.run_dir) if self.main else NoVideo()
        steps = 0
        try:
            with open(self.run_dir / "log.jsonl", "a") if self.main else nullcontext() as log:
                while t.nimg < total and not self.stop_requested(stop):
                    t.set_progress(t.nimg / total)   # --lr-rampdown: the run is --epochs long
                    t.step()
                    steps += 1
                    bar.update(cfg.batch)
                    if t.steps % cfg.log_every == 0 and not self.log(log, bar):
                        bar.n = t.nimg
                        continue  # rolled back: no frame or checkpoint from a diverged state
                    if t.steps % cfg.video_every == 0 and self.main:
                        video.add(self.frame(colours))
                    if eval_every and t.nimg // eval_every != (t.nimg - cfg.batch) // eval_every:
                        self.evaluate(log)
                    if t.nimg % self.ipe == 0:
                        if not self.checkpoint(mid_epoch=False):
                            bar.n = t.nimg
                            continue
                        # A new video segment per epoch: training.mkv is rejoined now, so it can be watched mid-run.
                        video.close()
                        video = visualization.TrainingVideo(self.run_dir) if self.main else NoVideo()
                    if max_steps is not None and steps >= max_steps:
                        break
                bar.close()
                if t.nimg % self.ipe and (self.stopped or max_steps is not None) and self.checkpoint(mid_epoch=True):
                    if self.main:
                        print(f"saved {self.last_ckpt}", file=sys.stderr)
            dump = os.environ.get("PROGAN_RANK_DUMP")
            if dump:  # test/debug hook: every rank's final training state, to compare replicas
                torch.save(t.state_dict(), Path(dump) / f"rank-{self.dist.rank if self.dist else 0}.pt")
        finally:
            video.close()
            colours.close()

    def wall(self) -> float:
        """Training seconds so far, over all sessions, without evaluation time."""
        return self.wall0 + time.perf_counter() - self.t0 - self.paused

    def evaluate(self, log) -> None:
        """FID/SWD of the EMA generator against the held-out images; a log line and metrics.png. Not timed as
        training: the clock pauses (after the device has finished the queued training work)."""
        t = self.trainer
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        start = time.perf_counter()
        wall = self.wall()
        level, alpha = t.phase()
        rec = {"kind": "eval", "step": t.steps, "nimg": t.nimg, "epoch": t.nimg / self.ipe,
               "wall_s": round(wall, 2), "level": level, "res": self.cfg.resolution(level), "alpha": round(alpha, 4),
               **self.evaluator.measure(t.G_ema, level, alpha), "time": round(time.time(), 2)}
        rec["eval_s"] = round(time.perf_counter() - start, 2)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        self.evaluator.plot()
        self.paused += time.perf_counter() - start
        # the progress bar's speed must not count the evaluation either
        self.t_last += time.perf_counter() - start

    def stop_requested(self, stop: list[int]) -> bool:
        """Whether to stop after this step. One process stops as soon as a signal came; several processes must
        agree to stop at the same step, so they vote at log steps (already a sync point), where any rank's signal
        stops all."""
        if self.dist is None:
            self.stopped = bool(stop)
        elif self.trainer.steps % self.cfg.log_every == 0:
            self.stopped = self.dist.any(bool(stop))
        return self.stopped

    def log(self, log, bar) -> bool:
        """Read the step statistics (the loop's one host sync) and write a log line; False if it rolled back."""
        t, cfg = self.trainer, self.cfg
        stats = t.read_stats()
        if not all(math.isfinite(v) for v in vars(stats).values()):
            self.rollback("non-finite loss")
            return False
        now = time.perf_counter()
        self.ips = (t.nimg - self.n_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.n_last = now, t.nimg
        self.last_stats = stats
        level, alpha = t.phase()
        rec = {"step": t.steps, "nimg": t.nimg, "epoch": t.nimg / self.ipe, "level": level,
               "res": cfg.resolution(level), "alpha": round(alpha, 4),
               **{k: round(v, 5) for k, v in vars(stats).items()}, "img_per_s": round(self.ips, 2),
               "time": round(time.time(), 2)}
        if log is None:
            return True  # not rank 0: nothing to write
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.set_postfix_str(f"{cfg.resolution(level)}px a={alpha:.2f} eps={stats.eps:.3f} "
                            f"D {stats.real_rating:.2f}/{stats.fake_rating:.2f}", refresh=False)
        return True

    def frame(self, colours=None):
        """The training-video frame: the fixed latents through the EMA generator, with a status line. With
        `colours` (monitor.CellColours), also record each cell's mean colour under the EMA and the raw generator."""
        from progan import visualization

        t, s = self.trainer, self.last_stats
        level, alpha = t.phase()
        images = visualization.to_uint8(t.render_fixed())
        if colours is not None:
            colours.add(t.steps, t.nimg, t.nimg / self.ipe, images, visualization.to_uint8(t.render_fixed(ema=False)))
        text = (f"ep {t.nimg / self.ipe:6.2f}  {self.cfg.resolution(level)}px  a={alpha:.2f}  "
                + (f"eps={s.eps:.3f}  D(real) {s.real_rating:.0%} vs D(fake) {s.fake_rating:.0%}  " if s else "")
                + f"{t.nimg:,} img  {self.ips:.0f} img/s")
        return visualization.training_frame(images, self.cell, text)

    def checkpoint(self, mid_epoch: bool) -> bool:
        """Save a checkpoint unless the weights went non-finite (then roll back instead); True when saved."""
        t = self.trainer
        if not (t.finite() if self.dist is None else not self.dist.any(not t.finite())):
            self.rollback("non-finite weights")
            return False
        t.train_seconds = self.wall()
        if self.dist is not None:
            self.dist.check_same(t.G, t.D, t.G_ema)
        state = t.state_dict()
        name = checkpoint.checkpoint_name(t.epoch, t.nimg if mid_epoch else None)
        if self.main:
            self.last_ckpt = checkpoint.save(state, self.run_dir / "checkpoints", name, keep=self.cfg.keep)
        self.good = copy.deepcopy(state)
        self.failures = 0
        return True

    def rollback(self, why: str) -> None:
        """Back to the last good state with halved learning rates; give up after MAX_FAILURES in a row."""
        self.failures += 1
        t = self.trainer
        if self.failures >= self.MAX_FAILURES:
            where = self.last_ckpt or checkpoint.latest(self.run_dir) or "none yet"
            raise ProganError(f"training diverged {self.failures} times in a row ({why} at {t.nimg:,} images); "
                              f"the last good checkpoint is kept ({where}); try lower --lr-g/--lr-d")
        bad_at = t.nimg
        # A copy: on the same device the optimiser adopts the state's tensors as its own and updates them in place,
        # which would turn the kept good state into the diverged one before the next rollback.
        t.load_state_dict(copy.deepcopy(self.good))
        for opt in (t.opt_g, t.opt_d):
            for group in opt.param_groups:
                group["lr"] *= 0.5 ** self.failures  # relative to the good state's rates
        t.read_stats()  # drop the statistics of the diverged steps
        warnings.warn(f"{why} at {bad_at:,} images: rolled back to {t.nimg:,} images and halved the learning rates "
                      f"(failure {self.failures} of {self.MAX_FAILURES})")
