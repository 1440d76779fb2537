"""Latent vectors on a hollow sphere, slerp, and great-circle paths through key latents.

The seed normalises latents to the sphere because its generator is almost entirely unbiased: zero input would give
zero output, so a shell of fixed radius is a better distribution than a filled Gaussian. We use radius sqrt(dim),
where a standard Gaussian of that dimension concentrates, so the scale matches a plain N(0, I) latent.
"""

from __future__ import annotations

import math

import torch


def to_sphere(z: torch.Tensor) -> torch.Tensor:
    """Project vectors (..., dim) onto the sphere of radius sqrt(dim)."""
    return z * (math.sqrt(z.shape[-1]) / z.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def random(n: int, dim: int = 100, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """n latents uniformly distributed on the hollow sphere (normalised Gaussians)."""
    z = torch.randn(n, dim, generator=generator, device=device)
    return to_sphere(z)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the great circle from a to b (both (..., dim), same radius), t in [0, 1].

    Works on the directions and interpolates the radius linearly, so points stay on the sphere when a and b do.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.dim() == 1 and a.dim() > 1:
        t = t[:, None]
    ra, rb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / ra, b / rb
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    # Nearly parallel vectors: sin(omega) -> 0, where lerp of the directions is exact to first order.
    small = so.abs() < 1e-6
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / torch.where(small, torch.ones_like(so), so))
    wb = torch.where(small, t, torch.sin(t * omega) / torch.where(small, torch.ones_like(so), so))
    u = wa * ua + wb * ub
    return u * (ra + (rb - ra) * t)


def ease(t: torch.Tensor) -> torch.Tensor:
    """Smoothstep ease in/out: the walk slows down near every key latent."""
    return t * t * (3 - 2 * t)


def loop_path(keys: torch.Tensor, frames_per_key: int, smooth: bool = False) -> torch.Tensor:
    """Latents for a closed walk through keys (K, dim): great-circle arcs key[i] -> key[i+1], last arc back to key[0].

    Returns (K * frames_per_key, dim); frame i*frames_per_key is exactly key i, and the frame after the last is the
    first, so a looping video has no jump.
    """
    k = keys.shape[0]
    t = torch.arange(frames_per_key, dtype=keys.dtype, device=keys.device) / frames_per_key
    if smooth:
        t = ease(t)
    arcs = []
    for i in range(k):
        a, b = keys[i], keys[(i + 1) % k]
        arcs.append(slerp(a.expand(frames_per_key, -1), b.expand(frames_per_key, -1), t))
    return torch.cat(arcs)
