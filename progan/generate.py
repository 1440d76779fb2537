"""Using a trained run: load its generator, sample faces, render latent walks, describe and export checkpoints.

A RUN is a run folder (its latest checkpoint), a checkpoint file (.pt) or an exported .safetensors generator.
Exports hold only the generator's weights plus JSON metadata (config, level, alpha, images shown), so they load
without pickle and are much smaller than a training checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from progan import checkpoint, latent, visualization
from progan import labels as labels_mod
from progan.config import TrainConfig
from progan.errors import ProganError
from progan.gantrain import schedule
from progan.networks import Generator

EXPORT_FORMAT = "progan-generator"
EXPORT_SCHEMA = 1
# Latents are drawn in fixed-size chunks from one seeded stream, so face i of a seed is the same whatever n or
# --batch is (torch.randn(n, ...) itself gives different prefixes for different n).
LATENT_CHUNK = 1024
# Float results of a forward pass depend (in the last bit) on the batch shape: CPU GEMM and convolution kernels pick
# different blockings for different batch sizes. So image i is always rendered in the same block, of the same
# padded size, whatever n is: blocks grow 8, 8, 16, 32, ... up to --batch (at most 2x padding for small n).
FIRST_BLOCK = 8


def blocks(n: int, batch: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, padded size) of the forward passes that render images 0..n-1; independent of n."""
    start = 0
    while start < n:
        size = min(batch, max(FIRST_BLOCK, start))
        yield start, min(n, start + size), size
        start += size


class FaceGenerator:
    """A generator network with the config and the progressive-growing phase (level, alpha) it was saved at."""

    def __init__(self, G: Generator, config: TrainConfig, level: int, alpha: float, nimg: int, epoch: int,
                 source: Path | None = None, ema: bool = True):
        self.G = G.eval().requires_grad_(False)
        self._config, self._level, self._alpha = config, int(level), float(alpha)
        self._nimg, self._epoch = int(nimg), int(epoch)
        self.source, self.ema = source, ema

    @property
    def config(self) -> TrainConfig:
        return self._config

    @property
    def level(self) -> int:
        return self._level

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def resolution(self) -> int:
        """Side of the images made at the saved level (smaller than config.size for a run stopped mid-growth)."""
        return self._config.resolution(self._level)

    @property
    def nimg(self) -> int:
        return self._nimg

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    def latents(self, n: int, seed: int = 0) -> torch.Tensor:
        """The first n latents of `seed` (CPU, float32): the same on every device and for every n."""
        if n < 0:
            raise ProganError(f"number of latents must be >= 0, got {n}")
        rng = torch.Generator().manual_seed(seed)
        chunks = [latent.random(LATENT_CHUNK, self._config.latent_dim, generator=rng)
                  for _ in range(math.ceil(n / LATENT_CHUNK))]
        if not chunks:
            return torch.empty(0, self._config.latent_dim)
        return torch.cat(chunks)[:n]

    def _latent_blocks(self, n: int, seed: int, batch: int) -> Iterator[tuple[torch.Tensor, int]]:
        """latents(n, seed) block by block (see blocks()), holding at most one chunk plus one block in memory."""
        rng = torch.Generator().manual_seed(seed)
        pending = torch.empty(0, self._config.latent_dim)
        for start, stop, size in blocks(n, batch):
            while pending.shape[0] < stop - start:
                pending = torch.cat([pending, latent.random(LATENT_CHUNK, self._config.latent_dim, generator=rng)])
            yield pending[:stop - start], size
            pending = pending[stop - start:]

    # --- labels of conditional runs (see progan/labels.py) ---------------------------------------------------------
    @property
    def condition(self) -> tuple[str, ...]:
        """The labels this generator takes, in the order of a label tensor's columns; () when unconditional."""
        return self._config.condition

    def make_labels(self, values: dict[str, Any] | None = None, n: int = 1, seed: int = 0) -> torch.Tensor:
        """n x K labels from user values such as {"age": 70, "gender": "female"} (names or indices; "class" for
        folder classes), validated with one-line errors; labels not given are random per face from `seed`."""
        return labels_mod.build(self._config, values, n, seed, where=str(self.source or "this run"))

    def _labels_for(self, labels: torch.Tensor | None, n: int, seed: int) -> torch.Tensor | None:
        """Checked N x K labels (1 x K or K broadcast to N); random ones for a conditional run given none."""
        if not self.condition:
            if labels is not None and labels.numel():
                raise ProganError(f"{self.source or 'this run'} was trained without --condition: it takes no labels")
            return None
        if labels is None:
            return labels_mod.random_labels(self._config, n, seed)
        labels = torch.as_tensor(labels, dtype=torch.float32).cpu()
        if labels.ndim == 1:
            labels = labels[None]
        k = len(self.condition)
        if labels.ndim != 2 or labels.shape[1] != k or labels.shape[0] not in (1, n):
            raise ProganError(f"expected labels of shape {n} x {k} ({', '.join(self.condition)}), "
                              f"got {tuple(labels.shape)}")
        return labels.expand(n, k)

    @torch.inference_mode()
    def _forward(self, z: torch.Tensor, size: int, labels: torch.Tensor | None = None) -> np.ndarray:
        k = z.shape[0]
        if size > k:   # pad with copies of the last latent to the block's fixed size
            z = torch.cat([z, z[-1:].expand(size - k, -1)])
            if labels is not None:
                labels = torch.cat([labels, labels[-1:].expand(size - k, -1)])
        if labels is not None:
            labels = labels.to(self.device, torch.float32)
        out = self.G(z.to(self.device, torch.float32), self._level, self._alpha, labels=labels)
        return visualization.to_uint8(out[:k])

    def render_batches(self, z: torch.Tensor, batch: int = 256,
                       labels: torch.Tensor | None = None) -> Iterator[np.ndarray]:
        """uint8 N x H x W x 3 images for latents z (N x latent_dim, any device), at most `batch` at a time.

        A conditional run takes labels N x K (see make_labels); without them each face gets random labels."""
        _check_batch(batch)
        if z.ndim != 2 or z.shape[1] != self._config.latent_dim:
            raise ProganError(f"expected latents of shape N x {self._config.latent_dim}, got {tuple(z.shape)}")
        y = self._labels_for(labels, z.shape[0], 0)
        for start, stop, size in blocks(z.shape[0], batch):
            yield self._forward(z[start:stop], size, None if y is None else y[start:stop])

    def render(self, z: torch.Tensor, batch: int = 256, labels: torch.Tensor | None = None) -> np.ndarray:
        """All images for latents z at once: uint8 N x H x W x 3."""
        parts = list(self.render_batches(z, batch, labels))
        r = self.resolution
        return np.concatenate(parts) if parts else np.zeros((0, r, r, 3), np.uint8)

    def sample_batches(self, n: int, seed: int = 0, batch: int = 256,
                       labels: torch.Tensor | None = None) -> Iterator[np.ndarray]:
        """sample(n, seed) as a stream of uint8 batches: bounded memory for any n."""
        _check_batch(batch)
        y = self._labels_for(labels, n, seed)
        start = 0
        for z, size in self._latent_blocks(n, seed, batch):
            yield self._forward(z, size, None if y is None else y[start:start + z.shape[0]])
            start += z.shape[0]

    def sample(self, n: int, seed: int = 0, batch: int = 256, z: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> np.ndarray:
        """n faces for `seed` (or for the given latents z) as uint8 N x H x W x 3.

        Deterministic: face i depends on the seed (and, in the last float bit, on `batch`), never on n. A
        conditional run takes labels (N x K or 1 x K, see make_labels); without them face i gets random labels
        drawn from the seed, also independent of n.
        """
        if z is not None:
            z = z[:n]
            return self.render(z, batch, self._labels_for(labels, z.shape[0], seed))
        parts = list(self.sample_batches(n, seed, batch, labels))
        r = self.resolution
        return np.concatenate(parts) if parts else np.zeros((0, r, r, 3), np.uint8)


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise ProganError(f"--batch must be at least 1, got {batch}")


# ----------------------------------------------------------------------------- reading runs, checkpoints, exports


def is_export(path: Path) -> bool:
    """True for a safetensors file: by extension, or by content (8-byte header length, then a JSON object)."""
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _config_from(d: Any, path: Path) -> TrainConfig:
    try:
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, dict):
            raise ValueError("config is not a JSON object")
        return TrainConfig.from_dict(d)
    except ProganError as e:
        raise ProganError(f"{path}: bad config: {e}") from None
    except (ValueError, TypeError) as e:
        raise ProganError(f"{path}: bad config ({e})") from None


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an exported generator; one-line errors for foreign or corrupt files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != EXPORT_FORMAT:
                raise ProganError(f"{path} is not a progan generator export (no '{EXPORT_FORMAT}' metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ProganError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProganError(f"{path} is not a progan generator export ({msg[:120]})") from None
    try:
        schema = int(meta.get("schema", ""))
    except ValueError:
        raise ProganError(f"{path} is not a progan generator export (bad schema {meta.get('schema')!r})") from None
    if schema > EXPORT_SCHEMA:
        raise ProganError(f"{path} has export schema {schema}, newer than this progan understands "
                          f"({EXPORT_SCHEMA}); upgrade progan")
    return tensors, meta


def _resolve(run: str | Path) -> Path:
    path = checkpoint.resolve(run)   # missing paths and folders without checkpoints -> ProganError
    if not path.is_file():
        raise ProganError(f"{path} is not a file")
    return path


def _build(cfg: TrainConfig, weights: dict[str, torch.Tensor], path: Path, device: torch.device) -> Generator:
    # The random init is overwritten at once; forking the RNG keeps it from shifting the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        G = Generator(cfg)
    try:
        G.load_state_dict(weights, strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProganError(f"{path}: generator weights do not match its config ({msg[:160]})") from None
    return G.to(device=device, dtype=torch.float32)


def _phase(cfg: TrainConfig, nimg: int) -> tuple[int, float]:
    return schedule(nimg, cfg.levels, cfg.fade_images, cfg.stable_images, cfg.phase_images)


def load_generator(run: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> FaceGenerator:
    """The (EMA) generator of a run folder, checkpoint or export, at the level and alpha it was saved at."""
    from progan.run import pick_device

    dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    path = _resolve(run)
    if is_export(path):
        tensors, meta = read_export(path)
        cfg = _config_from(meta.get("config"), path)
        if not ema and meta.get("ema", "true") == "true":
            raise ProganError(f"{path} holds only the EMA generator; --no-ema needs a training checkpoint")
        try:
            level, alpha = int(meta["level"]), float(meta["alpha"])
            nimg, epoch = int(meta.get("nimg", 0)), int(meta.get("epoch", 0))
        except (KeyError, ValueError) as e:
            raise ProganError(f"{path}: bad export metadata ({e})") from None
        if not 0 <= level < cfg.levels or not 0.0 <= alpha <= 1.0:
            raise ProganError(f"{path}: bad export metadata (level {level}, alpha {alpha})")
        return FaceGenerator(_build(cfg, tensors, path, dev), cfg, level, alpha, nimg, epoch, path, ema)

    state = checkpoint.load(path)
    cfg = _config_from(state["config"], path)
    key = "G_ema" if ema else "G"
    if not isinstance(state.get(key), dict):
        raise ProganError(f"{path} is not a progan checkpoint (no {key} weights)")
    nimg = int(state.get("nimg", 0))
    level, alpha = _phase(cfg, nimg)
    return FaceGenerator(_build(cfg, state[key], path, dev), cfg, level, alpha, nimg, int(state.get("epoch", 0)),
                         path, ema)


def export(run: str | Path, out: str | Path | None = None, ema: bool = True) -> Path:
    """Write the run's (EMA) generator and its config as a safetensors file (no pickle); returns its path."""
    from safetensors.torch import save as st_save

    src = Path(run)
    gen = load_generator(run, "cpu", ema=ema)
    if out is None:
        out = src / "generator.safetensors" if src.is_dir() else src.with_suffix(".safetensors")
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ProganError(f"export file must end in .safetensors, got {out}")
    if gen.source is not None and out.resolve() == gen.source.resolve():
        raise ProganError(f"refusing to overwrite the source {out}")
    meta = {
        "format": EXPORT_FORMAT,
        "schema": str(EXPORT_SCHEMA),
        "config": json.dumps(gen.config.to_dict()),
        "level": str(gen.level),
        "alpha": repr(gen.alpha),   # repr round-trips a float exactly
        "nimg": str(gen.nimg),
        "epoch": str(gen.epoch),
        "ema": "true" if ema else "false",
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in gen.G.state_dict().items()}
    data = st_save(tensors, metadata=meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        checkpoint.atomic_write(out, lambda f: f.write(data))
    except OSError as e:
        raise ProganError(f"could not write {out}: {e.strerror or e}") from None
    return out


def _count(weights: dict[str, Any]) -> int:
    return int(sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor)))


def describe(run: str | Path) -> dict[str, Any]:
    """What a checkpoint or export holds, as plain JSON-able values (None where the file does not say)."""
    path = _resolve(run)
    info: dict[str, Any] = {"path": str(path), "file_size": path.stat().st_size}
    if is_export(path):
        tensors, meta = read_export(path)
        cfg = _config_from(meta.get("config"), path)
        try:
            level, alpha = int(meta["level"]), float(meta["alpha"])
            nimg, epoch = int(meta.get("nimg", 0)), int(meta.get("epoch", 0))
        except (KeyError, ValueError) as e:
            raise ProganError(f"{path}: bad export metadata ({e})") from None
        info.update(kind="export", schema=int(meta["schema"]), ema=meta.get("ema", "true") == "true",
                    epoch=epoch, nimg=nimg, steps=None, eps=None,
                    parameters={"G": _count(tensors), "D": None})
    else:
        state = checkpoint.load(path)
        cfg = _config_from(state["config"], path)
        nimg = int(state.get("nimg", 0))
        level, alpha = _phase(cfg, nimg)
        eps = state.get("eps")
        info.update(kind="checkpoint", schema=int(state["schema"]), ema=None,
                    epoch=int(state.get("epoch", 0)), nimg=nimg, steps=state.get("steps"),
                    eps=float(eps) if eps is not None else None,
                    parameters={k: _count(state[k]) if isinstance(state.get(k), dict) else None
                                for k in ("G", "D")})
    info.update(level=level, levels=cfg.levels, resolution=cfg.resolution(level), alpha=alpha,
                labels=labels_mod.describe(cfg), config=cfg.to_dict())
    return info


# ----------------------------------------------------------------------------- grids and latent walks


def parse_grid(text: str) -> tuple[int, int]:
    """'3x2' -> (3 columns, 2 rows)."""
    try:
        cols, rows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ProganError(f"--grid must look like CxR (e.g. 3x3), got '{text}'") from None
    if cols < 1 or rows < 1:
        raise ProganError(f"--grid needs at least 1x1, got '{text}'")
    return cols, rows


def default_cell(resolution: int, minimum: int = 128) -> int:
    """The smallest integer multiple of the resolution that is at least `minimum` (crisp nearest upscaling)."""
    return resolution * max(1, math.ceil(minimum / resolution))


def resize_cells(images: np.ndarray, cell: int) -> np.ndarray:
    """N x h x h x 3 -> N x cell x cell x 3: blocky nearest for integer factors, Lanczos otherwise."""
    h = images.shape[1]
    if cell % h == 0:
        return visualization.upscale_nearest(images, cell)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((cell, cell),
                                                                                Image.Resampling.LANCZOS))
                     for im in images])


def walk_latents(gen: FaceGenerator, cells: int, keys: int, frames_per_key: int, seed: int = 0,
                 smooth: bool = False) -> torch.Tensor:
    """cells x (keys * frames_per_key) x dim: each cell's own closed great-circle walk through `keys` random keys."""
    if keys < 2:
        raise ProganError(f"--keys must be at least 2, got {keys}")
    if frames_per_key < 1:
        raise ProganError(f"--frames-per-key must be at least 1, got {frames_per_key}")
    z = gen.latents(cells * keys, seed).view(cells, keys, -1)
    return torch.stack([latent.loop_path(z[c], frames_per_key, smooth=smooth) for c in range(cells)])


def interpolate(gen: FaceGenerator, out: str | Path, keys: int = 8, frames_per_key: int = 48,
                grid: tuple[int, int] = (1, 1), seed: int = 0, fps: float = 30, cell: int | None = None,
                smooth: bool = False, batch: int = 256,
                progress: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Render a looping latent-walk video (format from out's extension); returns (frames, width, height).

    Frames are rendered a few at a time and streamed to the encoder, so memory stays bounded for long videos.
    `progress(k)` is called after every k frames written.
    """
    _check_batch(batch)
    cols, rows = grid
    cells = cols * rows
    cell = default_cell(gen.resolution) if cell is None else cell
    if cell < 1:
        raise ProganError(f"--cell must be at least 1, got {cell}")
    path = Path(out)
    if path.suffix.lower() not in visualization.VIDEO_FORMATS:
        raise ProganError(f"unsupported video format '{path.suffix}' (use .mp4, .mkv or .gif)")
    walks = walk_latents(gen, cells, keys, frames_per_key, seed, smooth)     # cells x T x dim
    # A conditional run: each cell keeps one set of random labels for its whole walk.
    cell_labels = gen.make_labels(None, cells, seed) if gen.condition else None
    total = walks.shape[1]
    # H.264 yuv420p needs even sides: a black line is added where the grid is odd.
    gw, gh = cols * cell, rows * cell
    width, height = gw + gw % 2, gh + gh % 2
    per_pass = max(1, batch // cells)   # frames per forward pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with visualization.VideoWriter(path, width, height, fps=fps) as writer:
        for t0 in range(0, total, per_pass):
            t1 = min(total, t0 + per_pass)
            z = walks[:, t0:t1].transpose(0, 1).reshape(-1, walks.shape[2])    # frame-major: cells of frame t together
            y = None if cell_labels is None else cell_labels.repeat(t1 - t0, 1)
            images = resize_cells(gen.render(z, batch, y), cell)
            for i in range(t1 - t0):
                frame = np.zeros((height, width, 3), np.uint8)
                frame[:gh, :gw] = visualization.image_grid(images[i * cells:(i + 1) * cells], cols)
                writer.write(frame)
            if progress is not None:
                progress(t1 - t0)
    return total, width, height


# ----------------------------------------------------------------------------- conditional runs: label tables, aging


def label_grid(gen: FaceGenerator, spec: str, values: dict[str, Any] | None = None, seed: int = 0,
               n: int = 1, batch: int = 256) -> tuple[np.ndarray, int, list[str], list[str]]:
    """A table of labels, e.g. 'age=5:85:8,race': the first axis across (columns), the second down (rows).

    Every cell of a table shows the same face (latent i of the seed, with the labels not on an axis fixed: from
    `values`, else random once per table), so cells differ only by their labels; n > 1 stacks n tables, one per
    latent. Returns (uint8 images row by row, columns, column captions, row captions).
    """
    axes = [a for a in spec.split(",") if a.strip()]
    if not 1 <= len(axes) <= 2:
        raise ProganError(f"--grid needs one or two labels (columns,rows), e.g. age=5:85:8,race; got '{spec}'")
    if not gen.condition:
        raise ProganError(f"--grid needs a conditional run, but {gen.source or 'this run'} was trained without "
                          f"--condition")
    if n < 1:
        raise ProganError(f"--n must be at least 1, got {n}")
    parsed = [labels_mod.split_axis(gen.config, a) for a in axes]
    if len(parsed) == 2 and parsed[0][0] == parsed[1][0]:
        raise ProganError(f"--grid names {parsed[0][0]} twice")
    (cname, cvals, ccap), (rname, rvals, rcap) = parsed[0], parsed[1] if len(parsed) == 2 else (None, [None], [])
    base = gen.make_labels(values, n, seed)            # n x K: one set of labels per table
    z = gen.latents(n, seed)
    cells_z, cells_y = [], []
    for t in range(n):
        for rv in rvals:
            for cv in cvals:
                y = base[t].clone()
                y[gen.condition.index(cname)] = cv
                if rname is not None:
                    y[gen.condition.index(rname)] = rv
                cells_z.append(z[t])
                cells_y.append(y)
    images = gen.render(torch.stack(cells_z), batch, torch.stack(cells_y))
    return images, len(cvals), ccap, rcap


def read_latent(path: str | Path, gen: FaceGenerator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z 1 x latent_dim, labels 1 x K or None) from a projected-latent .npz (keys z; optional labels, condition,
    run); its labels are used only when they were made for the same condition as this run."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ProganError(f"no such latent file: {path}") from None
    except (OSError, ValueError) as e:
        raise ProganError(f"{path} is not a latent file (.npz with 'z'): {str(e).splitlines()[0][:100]}") from None
    if "z" not in data:
        raise ProganError(f"{path} has no 'z' array (expected a file written by progan project)")
    z = torch.as_tensor(np.asarray(data["z"], dtype=np.float32)).reshape(-1, data["z"].shape[-1])
    if z.shape != (1, gen.config.latent_dim):
        raise ProganError(f"{path}: z has shape {tuple(data['z'].shape)}, this run needs 1 x {gen.config.latent_dim}")
    labels = None
    if "labels" in data and gen.condition:
        cond = tuple(str(c) for c in np.asarray(data.get("condition", [])).reshape(-1))
        y = np.asarray(data["labels"], dtype=np.float32).reshape(1, -1)
        if cond == gen.condition and y.shape[1] == len(gen.condition):
            labels = torch.as_tensor(y)
    return z, labels


def age_video(gen: FaceGenerator, out: str | Path, z: torch.Tensor, labels: torch.Tensor, ages: np.ndarray,
              fps: float = 30, cols: int | None = None, cell: int | None = None, batch: int = 256,
              progress: Callable[[int], None] | None = None) -> tuple[int, int, int]:
    """Faces z (N x dim) with labels (N x K) rendered with the age swept through `ages`, one frame per age, as a
    grid video with the age in a caption; identity stays because z and the other labels never change.
    Returns (frames, width, height)."""
    _check_batch(batch)
    if "age" not in gen.condition:
        raise ProganError(f"{gen.source or 'this run'} was not trained with age as a label (--condition "
                          f"{','.join(gen.condition) or 'none'})")
    path = Path(out)
    if path.suffix.lower() not in visualization.VIDEO_FORMATS:
        raise ProganError(f"unsupported video format '{path.suffix}' (use .mp4, .mkv or .gif)")
    n = z.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    cell = default_cell(gen.resolution) if cell is None else cell
    if cols < 1 or cell < 1:
        raise ProganError("--cols and --cell must be at least 1")
    j = gen.condition.index("age")
    labels = gen._labels_for(labels, n, 0)
    per_pass = max(1, batch // n)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    try:
        for t0 in range(0, len(ages), per_pass):
            chunk = ages[t0:t0 + per_pass]
            y = labels.repeat(len(chunk), 1)
            y[:, j] = torch.as_tensor(np.repeat(chunk, n), dtype=torch.float32)
            images = resize_cells(gen.render(z.repeat(len(chunk), 1), batch, y), cell)
            for i, age in enumerate(chunk):
                frame = visualization.training_frame(images[i * n:(i + 1) * n], cell, f"age {age:.0f}", cols)
                if writer is None:
                    writer = visualization.VideoWriter(path, frame.shape[1], frame.shape[0], fps=fps)
                writer.write(frame)
            if progress is not None:
                progress(len(chunk))
    finally:
        if writer is not None:
            writer.close()
    return len(ages), frame.shape[1], frame.shape[0]
