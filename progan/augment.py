"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training") in plain torch.

The discriminator only ever sees augmented images, real and fake alike, with the same policy; since every op is
differentiable, the generator learns through the augmentation. The ops and their ranges follow the reference
implementation (mit-han-lab/data-efficient-gans, DiffAugment_pytorch.py), for images in [-1, 1]:
  color:       brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5) (in that order)
  translation: integer shift of up to 1/8 of the size in x and y, zero padding
  cutout:      one zeroed square of half the size at a random position (may be cut by the border)
Every sample gets its own random parameters. sample_params() draws them from a torch.Generator and apply() uses
them, so the same transform can be applied to several tensors (the reference draws them inside each call).
"""

from __future__ import annotations

import torch

from progan.config import parse_augment
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def sample_params(policy: str, batch: int, size: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random parameters of `policy` for `batch` images of size x size, one set per sample."""
    ops = parse_augment(policy)   # unknown ops: ProganError
    dev = torch.device(device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=dev)

    p: dict[str, torch.Tensor] = {}
    if "color" in ops:
        p["brightness"] = rand(batch, 1, 1, 1) - 0.5
        p["saturation"] = rand(batch, 1, 1, 1) * 2.0
        p["contrast"] = rand(batch, 1, 1, 1) + 0.5
    if "translation" in ops:
        shift = int(size * TRANSLATION_RATIO + 0.5)
        p["shift"] = torch.randint(-shift, shift + 1, (batch, 2), generator=generator, device=dev)
    if "cutout" in ops:
        cut = int(size * CUTOUT_RATIO + 0.5)
        p["cutout"] = torch.randint(0, size + (1 - cut % 2), (batch, 2), generator=generator, device=dev)
    return p


def apply(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Augment B x C x H x W images with parameters from sample_params (same B and size)."""
    if "brightness" in params:
        x = x + params["brightness"].to(x.dtype)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * params["saturation"].to(x.dtype) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * params["contrast"].to(x.dtype) + mean
    if "shift" in params:
        x = translate(x, params["shift"])
    if "cutout" in params:
        x = cutout(x, params["cutout"])
    return x


def translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift each image by shift[i] = (dx, dy) whole pixels, filling with zeros (a gather: differentiable in x)."""
    b, c, h, w = x.shape
    dev = x.device
    ys = torch.arange(h, device=dev).view(1, h, 1) - shift[:, 1].view(b, 1, 1)   # source row of each output row
    xs = torch.arange(w, device=dev).view(1, 1, w) - shift[:, 0].view(b, 1, 1)
    # Index into a zero-padded copy: sources outside the image land on the padding.
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1))
    ys = (ys + 1).clamp(0, h + 1).expand(b, h, w)
    xs = (xs + 1).clamp(0, w + 1).expand(b, h, w)
    flat = (ys * (w + 2) + xs).view(b, 1, h * w).expand(b, c, h * w)
    return pad.view(b, c, -1).gather(2, flat).view(b, c, h, w)


def cutout(x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Zero a square of CUTOUT_RATIO * size per image, centred at offset[i] - size // 2 (as the reference)."""
    b, _, h, w = x.shape
    cut = int(h * CUTOUT_RATIO + 0.5)
    dev = x.device
    y0 = (offset[:, 1] - cut // 2).view(b, 1, 1)
    x0 = (offset[:, 0] - cut // 2).view(b, 1, 1)
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    inside = (yy >= y0) & (yy < y0 + cut) & (xx >= x0) & (xx < x0 + cut)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """x augmented with fresh per-sample parameters (identity for an empty policy)."""
    if not policy:
        return x
    return apply(x, sample_params(policy, x.shape[0], x.shape[2], generator, x.device))
