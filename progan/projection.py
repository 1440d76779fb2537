"""Projection: find the latent whose generated face best reproduces a given (aligned) face photo.

As StyleGAN2's projector: start from the best of many random latents, then Adam on z with a learning rate that ramps
up briefly and down with a cosine, and with latent noise that decays to zero over the first 3/4 of the steps so the
early steps explore. z stays on the hollow sphere of radius sqrt(latent_dim) that the generator was trained on.

The distance works offline, with nothing but the run itself: pixel L2 at the run's resolution and at half of it,
plus (optionally) the difference of the run's own discriminator's intermediate feature maps, each channel vector
normalised to unit length per pixel (as LPIPS does with VGG features). tools/project_eval.py measures which mix
reconstructs held-out faces best; DEFAULT_DISTANCE is its winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from progan import latent, visualization
from progan.errors import ProganError
from progan.generate import FaceGenerator
from progan.networks import Discriminator


@dataclass(frozen=True)
class ProjectionSettings:
    steps: int = 300
    starts: int = 256          # random latents rendered; the closest one starts the optimisation
    lr: float = 0.2            # Adam's peak learning rate on z (per-coordinate std of z is 1)
    lr_rampup: float = 0.05    # fraction of steps with a linear warm-up
    lr_rampdown: float = 0.25  # fraction of steps with the cosine ramp down to 0
    noise: float = 0.3         # initial latent noise, per coordinate (0.05 in StyleGAN2's W; z needs more)
    noise_ramp: float = 0.75   # fraction of steps over which the noise decays (quadratically) to 0
    pixel: float = 1.0         # weight of the pixel L2 at full resolution (images in [-1, 1])
    half: float = 1.0          # weight of the pixel L2 at half resolution
    l1: bool = False           # use L1 instead of L2 for the pixel terms
    dfeat: float = 0.0         # weight of the discriminator-feature distance
    seed: int = 0


# Named distances compared by tools/project_eval.py.
DISTANCES: dict[str, dict[str, float | bool]] = {
    "pixel": dict(pixel=1.0, half=1.0, dfeat=0.0),
    "l1": dict(pixel=1.0, half=1.0, dfeat=0.0, l1=True),
    "dfeat": dict(pixel=0.0, half=0.0, dfeat=1.0),
    "pixel+dfeat": dict(pixel=1.0, half=1.0, dfeat=0.1),
    "l1+dfeat": dict(pixel=1.0, half=1.0, dfeat=0.1, l1=True),
}
# tools/project_eval.py, 8 held-out UTKFace faces, runs/utk64: l1+dfeat has the lowest pixel error of the L1 (18.7)
# and the lower Inception error (1.06 vs 1.08); see README "Projecting a real face".
DEFAULT_DISTANCE = "l1+dfeat"
FALLBACK_DISTANCE = "l1"   # for exports, which hold no discriminator


def settings_for(distance: str, **overrides) -> ProjectionSettings:
    """ProjectionSettings of a named distance (see DISTANCES), with any field overridden."""
    if distance not in DISTANCES:
        raise ProganError(f"unknown distance '{distance}' (choose from {', '.join(DISTANCES)})")
    return replace(ProjectionSettings(), **DISTANCES[distance], **overrides)


@dataclass
class Projection:
    z: np.ndarray                  # float32 1 x latent_dim, on the sphere
    labels: np.ndarray | None      # float32 1 x K (conditional runs) or None
    condition: tuple[str, ...]
    image: np.ndarray              # uint8 H x W x 3 reconstruction
    target: np.ndarray             # uint8 H x W x 3
    mae: float                     # mean absolute pixel error in [0, 255]
    distance: float                # the optimised distance at the end
    start_mae: float               # the same error for the best random start (before optimisation)
    start_distance: float


# ----------------------------------------------------------------------------- discriminator features


def load_discriminator(gen: FaceGenerator) -> Discriminator | None:
    """The run's discriminator (from its training checkpoint), or None for an export, which holds only G."""
    from progan import checkpoint
    from progan.generate import is_export

    if gen.source is None or is_export(gen.source):
        return None
    state = checkpoint.load(gen.source)
    if not isinstance(state.get("D"), dict):
        return None
    with torch.random.fork_rng(devices=[]):
        D = Discriminator(gen.config)
    try:
        D.load_state_dict(state["D"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise ProganError(f"{gen.source}: discriminator weights do not match its config "
                          f"({str(e).splitlines()[0][:120]})") from None
    return D.to(gen.device).eval().requires_grad_(False)


def d_feature_maps(D: Discriminator, img: torch.Tensor, level: int, alpha: float) -> list[torch.Tensor]:
    """D's activations after fromRGB and after every down block, on the same path as Discriminator.features."""
    maps = []
    x = D.from_rgb[level](img)
    maps.append(x)
    if level > 0:
        x = D.blocks[level](x)
        if alpha < 1.0:
            x = torch.lerp(D.from_rgb[level - 1](F.avg_pool2d(img, 2)), x, alpha)
        maps.append(x)
    for k in range(level - 1, 0, -1):
        x = D.blocks[k](x)
        maps.append(x)
    return maps


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(dim=1, keepdim=True) + 1e-8)


class Distance:
    """Distance of a batch of generated images (B x 3 x H x W in [-1, 1]) to one target: a B-vector."""

    def __init__(self, target: torch.Tensor, settings: ProjectionSettings, D: Discriminator | None = None,
                 level: int = 0, alpha: float = 1.0):
        self.s, self.D, self.level, self.alpha = settings, D, level, alpha
        if settings.dfeat > 0 and D is None:
            raise ProganError("the discriminator-feature distance needs a training checkpoint (exports hold no D)")
        self.target = target
        self.target_half = F.avg_pool2d(target, 2) if target.shape[-1] >= 2 else target
        self.target_maps = ([_unit(m) for m in d_feature_maps(D, target, level, alpha)]
                            if settings.dfeat > 0 else [])

    def _pix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (a - b).abs() if self.s.l1 else (a - b).square()
        return d.flatten(1).mean(1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        total = img.new_zeros(img.shape[0])
        if self.s.pixel:
            total = total + self.s.pixel * self._pix(img, self.target)
        if self.s.half:
            total = total + self.s.half * self._pix(F.avg_pool2d(img, 2) if img.shape[-1] >= 2 else img,
                                                    self.target_half)
        if self.s.dfeat:
            maps = d_feature_maps(self.D, img, self.level, self.alpha)
            for m, t in zip(maps, self.target_maps):
                total = total + self.s.dfeat * (_unit(m) - t).square().sum(1).flatten(1).mean(1)
        return total


# ----------------------------------------------------------------------------- projection


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 H x W x 3 -> 1 x 3 x H x W float in [-1, 1]."""
    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def lr_at(t: float, s: ProjectionSettings) -> float:
    """StyleGAN2's projector schedule: linear warm-up, flat, cosine ramp-down; t in [0, 1)."""
    ramp = min(1.0, (1.0 - t) / s.lr_rampdown) if s.lr_rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    if s.lr_rampup > 0:
        ramp *= min(1.0, t / s.lr_rampup)
    return s.lr * ramp


def _render(gen: FaceGenerator, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    kw = {} if labels is None else {"labels": labels.expand(z.shape[0], -1)}
    return gen.G(z, gen.level, gen.alpha, **kw)


def project(gen: FaceGenerator, target: np.ndarray, settings: ProjectionSettings | None = None,
            D: Discriminator | None = None, labels: Sequence[float] | np.ndarray | None = None,
            progress: Callable[[int, float], None] | None = None) -> Projection:
    """Optimise z so that G(z) (with fixed `labels` on a conditional run) matches `target` (uint8 H x W x 3 at the
    generator's resolution). `progress(step, distance)` is called after every step. Without settings: the
    default distance, or its pixel-only fallback when no discriminator is given."""
    if settings is None:
        settings = settings_for(DEFAULT_DISTANCE if D is not None else FALLBACK_DISTANCE)
    r = gen.resolution
    if target.shape != (r, r, 3) or target.dtype != np.uint8:
        raise ProganError(f"target must be a uint8 {r}x{r}x3 image, got {target.dtype} {tuple(target.shape)}")
    if settings.steps < 0 or settings.starts < 1:
        raise ProganError("--steps must be >= 0 and --starts >= 1")
    condition = tuple(getattr(gen.config, "condition", ()))
    dev = gen.device
    lab_t = None
    lab_np = None
    if labels is not None:
        lab_np = np.asarray(labels, np.float32).reshape(1, -1)
        if lab_np.shape[1] != len(condition):
            raise ProganError(f"the run is conditioned on {list(condition)}, got {lab_np.shape[1]} label values")
        lab_t = torch.from_numpy(lab_np).to(dev)
    elif condition:
        raise ProganError(f"the run is conditioned on {', '.join(condition)}: labels are required")

    tgt = to_tensor(target, dev)
    dist = Distance(tgt, settings, D, gen.level, gen.alpha)
    rng = torch.Generator().manual_seed(settings.seed)
    dim = gen.config.latent_dim

    # Best of `starts` random latents, rendered in small batches.
    best_z, best_d = None, math.inf
    with torch.no_grad():
        for s in range(0, settings.starts, 32):
            z = latent.random(min(32, settings.starts - s), dim, generator=rng).to(dev)
            d = dist(_render(gen, z, lab_t))
            i = int(d.argmin())
            if float(d[i]) < best_d:
                best_d, best_z = float(d[i]), z[i:i + 1].clone()
        start_img = visualization.to_uint8(_render(gen, best_z, lab_t))[0]

    z = best_z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=settings.lr, betas=(0.9, 0.999))
    for step in range(settings.steps):
        t = step / settings.steps
        for g in opt.param_groups:
            g["lr"] = lr_at(t, settings)
        sigma = settings.noise * max(0.0, 1.0 - t / settings.noise_ramp) ** 2 if settings.noise_ramp > 0 else 0.0
        noise = torch.randn(z.shape, generator=rng).to(dev) * sigma
        loss = dist(_render(gen, latent.to_sphere(z + noise), lab_t)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.copy_(latent.to_sphere(z))   # stay on the sphere the generator was trained on
        if progress is not None:
            progress(step + 1, float(loss.detach()))

    with torch.no_grad():
        zf = latent.to_sphere(z.detach())
        out = _render(gen, zf, lab_t)
        final_d = float(dist(out)[0])
        image = visualization.to_uint8(out)[0]
    return Projection(z=zf.cpu().numpy().astype(np.float32), labels=lab_np, condition=condition, image=image,
                      target=target, mae=_mae(image, target), distance=final_d,
                      start_mae=_mae(start_img, target), start_distance=best_d)


# ----------------------------------------------------------------------------- inputs and outputs


def load_target(path: str | Path, size: int, allow_upscale: bool = False) -> np.ndarray:
    """A photo as the run sees its training images (facedata.load_image: centre square, Lanczos to size)."""
    from PIL import UnidentifiedImageError

    from progan.facedata import load_image

    p = Path(path)
    if not p.exists():
        raise ProganError(f"no such photo: {p}")
    if not p.is_file():
        raise ProganError(f"{p} is not a file")
    try:
        return load_image(p, size, allow_upscale=allow_upscale)
    except ProganError as e:
        raise ProganError(f"{e} (the run works at {size} px; --allow-upscale accepts it anyway)") from None
    except UnidentifiedImageError:
        raise ProganError(f"{p} is not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProganError(f"{p} could not be decoded ({msg[:120]})") from None


def _class_value(name: str, text: str, choices: Sequence[str]) -> float:
    t = text.strip().lower()
    lowered = [c.lower() for c in choices]
    if t in lowered:
        return float(lowered.index(t))
    try:
        v = int(t)
    except ValueError:
        v = -1
    if 0 <= v < len(choices):
        return float(v)
    raise ProganError(f"--{name} must be one of {', '.join(choices)} or 0..{len(choices) - 1}, got '{text}'")


def resolve_labels(condition: Sequence[str], photo: str | Path, age: float | None = None, gender: str | None = None,
                   race: str | None = None) -> np.ndarray | None:
    """The label row for a projection: given values first, else parsed from a UTKFace file name.

    None for an unconditional run, where giving any label is an error.
    """
    from progan.facedata import parse_utkface_name
    from progan.label_classifier import GENDER_NAMES, RACE_NAMES

    given = {k: v for k, v in (("age", age), ("gender", gender), ("race", race)) if v is not None}
    if not condition:
        if given:
            raise ProganError(f"--{'/--'.join(given)} needs a conditional run; this run is unconditional")
        return None
    parsed = parse_utkface_name(Path(photo).name)
    from_name = dict(zip(("age", "gender", "race"), parsed)) if parsed else {}
    unknown = set(given) - set(condition)
    if unknown:
        raise ProganError(f"the run is not conditioned on {', '.join(sorted(unknown))} "
                          f"(it is on {', '.join(condition)})")
    row = []
    for name in condition:
        if name in given:
            if name == "age":
                if not 0 <= float(given[name]) <= 130:
                    raise ProganError(f"--age must be between 0 and 130, got {given[name]}")
                row.append(float(given[name]))
            elif name == "gender":
                row.append(_class_value(name, str(given[name]), GENDER_NAMES))
            elif name == "race":
                row.append(_class_value(name, str(given[name]), RACE_NAMES))
            else:
                row.append(float(given[name]))
        elif name in from_name:
            row.append(float(from_name[name]))
        else:
            raise ProganError(f"the run is conditioned on {name}: give --{name} (or use a UTKFace-named photo)")
    return np.asarray([row], np.float32)


def save_latent(result: Projection, path: str | Path, run: str) -> Path:
    """The agreed latent file: z (1 x latent_dim), run, and for conditional runs labels (1 x K) and condition."""
    from progan.checkpoint import atomic_write

    path = Path(path)
    arrays: dict[str, np.ndarray] = {"z": result.z.astype(np.float32), "run": np.asarray(str(run))}
    if result.labels is not None:
        arrays["labels"] = result.labels.astype(np.float32)
        arrays["condition"] = np.asarray(list(result.condition), dtype=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))   # a file object: savez adds no .npz suffix
    except OSError as e:
        raise ProganError(f"could not write {path}: {e.strerror or e}") from None
    return path


def save_pair(result: Projection, path: str | Path) -> Path:
    """Side-by-side PNG: target | reconstruction, nearest-upscaled to at least 128 px per face."""
    from PIL import Image

    from progan.generate import default_cell

    path = Path(path)
    cell = default_cell(result.target.shape[0])
    pair = visualization.upscale_nearest(np.stack([result.target, result.image]), cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(visualization.image_grid(pair, 2, pad=max(1, cell // 32))).save(path)
    except (OSError, ValueError) as e:
        raise ProganError(f"could not write {path}: {e}") from None
    return path
