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

    @torch.inference_mode()
    def _forward(self, z: torch.Tensor, size: int) -> np.ndarray:
        k = z.shape[0]
        if size > k:   # pad with copies of the last latent to the block's fixed size
            z = torch.cat([z, z[-1:].expand(size - k, -1)])
        out = self.G(z.to(self.device, torch.float32), self._level, self._alpha)
        return visualization.to_uint8(out[:k])

    def render_batches(self, z: torch.Tensor, batch: int = 256) -> Iterator[np.ndarray]:
        """uint8 N x H x W x 3 images for latents z (N x latent_dim, any device), at most `batch` at a time."""
        _check_batch(batch)
        if z.ndim != 2 or z.shape[1] != self._config.latent_dim:
            raise ProganError(f"expected latents of shape N x {self._config.latent_dim}, got {tuple(z.shape)}")
        for start, stop, size in blocks(z.shape[0], batch):
            yield self._forward(z[start:stop], size)

    def render(self, z: torch.Tensor, batch: int = 256) -> np.ndarray:
        """All images for latents z at once: uint8 N x H x W x 3."""
        parts = list(self.render_batches(z, batch))
        r = self.resolution
        return np.concatenate(parts) if parts else np.zeros((0, r, r, 3), np.uint8)

    def sample_batches(self, n: int, seed: int = 0, batch: int = 256) -> Iterator[np.ndarray]:
        """sample(n, seed) as a stream of uint8 batches: bounded memory for any n."""
        _check_batch(batch)
        for z, size in self._latent_blocks(n, seed, batch):
            yield self._forward(z, size)

    def sample(self, n: int, seed: int = 0, batch: int = 256, z: torch.Tensor | None = None) -> np.ndarray:
        """n faces for `seed` (or for the given latents z) as uint8 N x H x W x 3.

        Deterministic: face i depends on the seed (and, in the last float bit, on `batch`), never on n.
        """
        if z is not None:
            return self.render(z[:n], batch)
        parts = list(self.sample_batches(n, seed, batch))
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
    return schedule(nimg, cfg.levels, cfg.fade_images, cfg.stable_images)


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
                config=cfg.to_dict())
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
            images = resize_cells(gen.render(z, batch), cell)
            for i in range(t1 - t0):
                frame = np.zeros((height, width, 3), np.uint8)
                frame[:gh, :gw] = visualization.image_grid(images[i * cells:(i + 1) * cells], cols)
                writer.write(frame)
            if progress is not None:
                progress(t1 - t0)
    return total, width, height
