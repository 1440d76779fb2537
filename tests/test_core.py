"""Tests for the core of progan: networks, latent, gantrain (schedule, diversity, noise, Trainer), config, checkpoint.

Everything runs on tiny configurations (16 px, a handful of channels) so the whole file takes a few seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from progan import checkpoint, latent
from progan.config import PRESETS, TrainConfig, split_size
from progan.errors import ProganError
from progan.facedata import ImageBank
from progan.gantrain import (
    NoiseController,
    Trainer,
    add_diversity,
    diversity_gradient,
    level_start,
    schedule,
)
from progan.networks import Discriminator, Generator, upsample2


def tiny_cfg(**kw) -> TrainConfig:
    """16 px (4 -> 8 -> 16, three levels), a few channels, short phases."""
    base = dict(size=16, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4, latent_dim=16,
                batch=8, fade_images=32, stable_images=16, ema_half_life=64, log_every=1000, video_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def tiny_bank(n: int = 24, size: int = 16, seed: int = 0) -> ImageBank:
    """n smooth random colour images (uint8), resident as an ImageBank."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        a = rng.uniform(0, 255, (3, 3))  # per channel: offset, x gradient, y gradient
        img = a[:, 0, None, None] * 0.5 + a[:, 1, None, None] * 0.5 * xx + a[:, 2, None, None] * 0.5 * yy
        imgs[i] = np.clip(img.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    return ImageBank(imgs)


def nets(cfg: TrainConfig, seed: int = 0) -> tuple[Generator, Discriminator]:
    torch.manual_seed(seed)
    return Generator(cfg).eval(), Discriminator(cfg).eval()


def rand_images(b: int, res: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, res, res, generator=g) * 2 - 1


# ===================================================================================================== networks


@pytest.mark.parametrize("eq_lr", [True, False])
def test_output_shapes_every_level_and_alpha(eq_lr):
    cfg = tiny_cfg(eq_lr=eq_lr)
    G, D = nets(cfg)
    assert G.levels == D.levels == cfg.levels == 3
    z = latent.random(5, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for level in range(cfg.levels):
            res = cfg.resolution(level)
            assert res == 4 * 2 ** level
            for alpha in (0.0, 0.25, 0.5, 1.0):
                img = G(z, level, alpha)
                assert img.shape == (5, 3, res, res)
                assert torch.isfinite(img).all()
                assert img.abs().max() <= 1.0  # tanh, and a lerp of two tanh images
                score = D(img, level, alpha)
                assert score.shape == (5,)
                assert torch.isfinite(score).all()
        # level None = the final resolution
        assert G(z).shape == (5, 3, 16, 16)
        assert torch.equal(G(z), G(z, cfg.levels - 1, 1.0))
        assert D(G(z)).shape == (5,)


@pytest.mark.parametrize("eq_lr", [True, False])
def test_generator_fade_in_is_continuous(eq_lr):
    """alpha=0 at level k is exactly the previous level's image upsampled; alpha blends linearly."""
    cfg = tiny_cfg(eq_lr=eq_lr)
    G, _ = nets(cfg)
    z = latent.random(4, cfg.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for k in range(1, cfg.levels):
            prev_up = upsample2(G(z, k - 1, 1.0))
            new = G(z, k, 1.0)
            assert torch.allclose(G(z, k, 0.0), prev_up, atol=1e-6)
            # the test can fail: the new level alone is a different image
            assert not torch.allclose(new, prev_up, atol=1e-3)
            assert torch.allclose(G(z, k, 0.25), torch.lerp(prev_up, new, 0.25), atol=1e-6)
    # level 0 has nothing to fade from: alpha is ignored
    with torch.no_grad():
        assert torch.allclose(G(z, 0, 0.0), G(z, 0, 1.0))


@pytest.mark.parametrize("mbstd", [True, False])
def test_discriminator_fade_in_is_continuous(mbstd):
    """D at alpha=0 on level k scores an image like D at level k-1 scores its 2x average-pooled version."""
    cfg = tiny_cfg(mbstd=mbstd)
    _, D = nets(cfg)
    with torch.no_grad():
        for k in range(1, cfg.levels):
            img = rand_images(4, cfg.resolution(k), seed=k)
            pooled = F.avg_pool2d(img, 2)
            assert torch.allclose(D(img, k, 0.0), D(pooled, k - 1, 1.0), atol=1e-6)
            assert not torch.allclose(D(img, k, 1.0), D(pooled, k - 1, 1.0), atol=1e-6)


@pytest.mark.parametrize("eq_lr", [True, False])
@pytest.mark.parametrize("pixel_norm", [True, False])
def test_generator_unbiased_except_to_rgb(eq_lr, pixel_norm):
    cfg = tiny_cfg(eq_lr=eq_lr, pixel_norm=pixel_norm)
    G, _ = nets(cfg)
    biased = [name for name, _ in G.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    assert biased, "ToRGB convs must have a bias"
    for name in biased:
        assert name.startswith("to_rgb."), f"unexpected generator bias {name}"
    assert sorted(biased) == sorted(f"to_rgb.{k}.conv.bias" for k in range(cfg.levels))
    for k, m in enumerate(G.to_rgb):
        assert isinstance(m.conv, torch.nn.Conv2d) and m.conv.kernel_size == (1, 1)
        assert m.conv.bias is not None and m.conv.bias.shape == (3,)
    # and no module hides a bias outside named_parameters' "bias" names
    for mod_name, m in G.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not mod_name.startswith("to_rgb."):
            assert m.bias is None, mod_name


@pytest.mark.parametrize("eq_lr", [True, False])
def test_discriminator_from_rgb_biased(eq_lr):
    _, D = nets(tiny_cfg(eq_lr=eq_lr))
    assert len(D.from_rgb) == 3
    for m in D.from_rgb:
        assert m.conv.kernel_size == (1, 1) and m.conv.in_channels == 3
        assert m.conv.bias is not None
        assert m.conv.bias.requires_grad
    names = {n for n, _ in D.named_parameters()}
    assert {f"from_rgb.{k}.conv.bias" for k in range(3)} <= names


def _sensitive_d(cfg: TrainConfig) -> Discriminator:
    """A D whose score leans a little more on the minibatch-stddev channel, so that grouping mistakes show."""
    _, D = nets(cfg)
    if cfg.mbstd:
        with torch.no_grad():
            D.head[1].weight[:, -1] *= 10.0
    return D


def _mixed_contrast(batch: int, res: int, seed: int) -> torch.Tensor:
    """Random images, the first half at a tenth of the contrast (so minibatch groups differ in spread)."""
    x = rand_images(batch, res, seed=seed)
    x[: batch // 2] *= 0.1
    return x


@pytest.mark.parametrize("eq_lr", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 6, 8, 12])
def test_discriminator_mirror_invariant(batch, eq_lr):
    cfg = tiny_cfg(eq_lr=eq_lr)
    D = _sensitive_d(cfg)
    with torch.no_grad():
        for level in range(cfg.levels):
            x = _mixed_contrast(batch, cfg.resolution(level), seed=10 + level)
            for alpha in (0.5, 1.0):
                a, b = D(x, level, alpha), D(x.flip(3), level, alpha)
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
            # not a constant function: an up-down flip is not a mirror and changes the score
            assert not torch.allclose(D(x, level), D(x.flip(2), level), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [3, 6])
def test_discriminator_mirror_invariant_without_mbstd(batch):
    cfg = tiny_cfg(mbstd=False)
    _, D = nets(cfg)
    with torch.no_grad():
        x = _mixed_contrast(batch, 16, seed=4)
        assert torch.allclose(D(x), D(x.flip(3)), rtol=1e-5, atol=1e-6)


# ===================================================================================================== schedule


@pytest.mark.parametrize("levels,fade,stable", [(3, 32, 16), (4, 10, 7), (6, 24_000, 24_000), (2, 5, 3)])
def test_schedule_monotonic_and_complete(levels, fade, stable):
    assert schedule(0, levels, fade, stable) == (0, 1.0)
    end = level_start(levels - 1, fade, stable) + fade
    step = max(1, end // 3000)
    prev = (0, 1.0)
    seen_alphas = set()
    for nimg in range(0, end + 3 * (fade + stable), step):
        lv, a = schedule(nimg, levels, fade, stable)
        assert 0 <= lv < levels and 0.0 <= a <= 1.0
        assert (lv, a) >= prev, (nimg, prev, (lv, a))
        prev = (lv, a)
        if 0 < a < 1:
            seen_alphas.add(lv)
    assert seen_alphas == set(range(1, levels)), "every level above 0 fades in"
    assert schedule(end, levels, fade, stable) == (levels - 1, 1.0)
    assert schedule(end - 1, levels, fade, stable)[1] < 1.0
    assert schedule(10 * end + 12345, levels, fade, stable) == (levels - 1, 1.0)


@pytest.mark.parametrize("levels,fade,stable", [(3, 32, 16), (4, 10, 7), (5, 64, 100)])
def test_schedule_fade_and_level_start(levels, fade, stable):
    assert level_start(0, fade, stable) == 0
    for lv in range(1, levels):
        start = level_start(lv, fade, stable)
        assert start == stable + (lv - 1) * (fade + stable)
        assert schedule(start - 1, levels, fade, stable) == (lv - 1, 1.0)
        assert schedule(start, levels, fade, stable) == (lv, 0.0)
        for n in range(start, start + fade):
            level, alpha = schedule(n, levels, fade, stable)
            assert level == lv
            assert alpha == pytest.approx((n - start) / fade)
        assert schedule(start + fade, levels, fade, stable) == (lv, 1.0)
        if lv < levels - 1:  # a stable phase follows, until the next level starts
            assert schedule(start + fade + stable - 1, levels, fade, stable) == (lv, 1.0)
            assert level_start(lv + 1, fade, stable) == start + fade + stable


def test_schedule_per_level_phases():
    """phase_images[k] > 0 sets both phases of level k (level 0 has only its stable phase); 0 keeps the defaults."""
    phases, fade, stable = (4, 8, 0, 0), 10, 7
    # level 0: 4 stable | level 1: 8 fade + 8 stable | level 2: 10 fade + 7 stable | level 3: 10 fade, then stable
    assert [level_start(lv, fade, stable, phases) for lv in range(4)] == [0, 4, 20, 37]
    expect = {0: (0, 1.0), 3: (0, 1.0), 4: (1, 0.0), 8: (1, 0.5), 12: (1, 1.0), 19: (1, 1.0), 20: (2, 0.0),
              25: (2, 0.5), 30: (2, 1.0), 36: (2, 1.0), 37: (3, 0.0), 42: (3, 0.5), 47: (3, 1.0), 10_000: (3, 1.0)}
    assert {n: schedule(n, 4, fade, stable, phases) for n in expect} == expect
    for n in range(0, 120, 3):   # all zeros, or none given: the uniform schedule
        assert schedule(n, 4, fade, stable, (0, 0, 0, 0)) == schedule(n, 4, fade, stable)
    assert TrainConfig(size=32, phase_images=(4, 8, 0, 0)).phase_images == (4, 8, 0, 0)
    tr = Trainer(tiny_cfg(phase_images=(8, 8, 0)), tiny_bank())   # the trainer follows it: 8 px from 8 images
    tr.step()
    assert tr.nimg == 8 and tr.phase() == (1, 0.0) and Trainer(tiny_cfg(), tiny_bank()).phase() == (0, 1.0)
    for bad in ((4, 8), (4, -1, 0, 0)):
        with pytest.raises(ProganError, match="--phase-images"):
            TrainConfig(size=32, phase_images=bad)


def test_schedule_single_level():
    for n in (0, 1, 100, 10**6):
        assert schedule(n, 1, 10, 10) == (0, 1.0)


# ===================================================================================================== diversity


def _seed_formula(x: list[list[float]]) -> list[list[float]]:
    """The seed's diversity gradient, written out with plain Python loops."""
    b, n = len(x), len(x[0])
    out = [[0.0] * n for _ in range(b)]
    for i in range(b):
        for e in range(n):
            total = 0.0
            for j in range(b):
                if j == i:
                    continue
                d = x[i][e] - x[j][e]
                sign = (d > 0) - (d < 0)
                total += sign * 0.05 * (1.05 / (d * d + 0.05) - 1.0)
            out[i][e] = total / (b - 1)
    return out


def test_diversity_gradient_matches_seed_formula():
    x = [[0.0, 0.2, 1.0, -0.7],
         [0.5, 0.2, -0.5, 0.9],
         [1.5, -1.0, 0.0, 0.95]]
    got = diversity_gradient(torch.tensor(x, dtype=torch.float64))
    assert got.shape == (3, 4)
    assert torch.allclose(got, torch.tensor(_seed_formula(x), dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # one entry by hand: column 0, row 0: partners differ by -0.5 and -1.5
    f = lambda d: math.copysign(1, d) * 0.05 * (1.05 / (d * d + 0.05) - 1.0)  # noqa: E731
    assert got[0, 0].item() == pytest.approx((f(-0.5) + f(-1.5)) / 2, abs=1e-12)
    # column 1, row 0 and 1 are equal (d=0 contributes nothing), row 2 is 1.2 below
    assert got[0, 1].item() == pytest.approx(f(0.2 - -1.0) / 2, abs=1e-12)


def test_diversity_gradient_shapes_and_batch_of_four():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    flat = x.view(4, -1).tolist()
    expected = torch.tensor(_seed_formula(flat), dtype=torch.float64).view(4, 3, 2, 2)
    assert torch.allclose(diversity_gradient(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b", [2, 5, 8])
def test_diversity_gradient_all_pairs_and_loop_agree(b):
    # The two ways of computing it (all pairs at once for a GPU, each unordered pair once in a loop for a CPU)
    g = torch.Generator().manual_seed(b)
    x = (torch.rand(b, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1) * 1.5
    x[1] = x[0]                                    # identical samples: zero terms on either path
    expected = torch.tensor(_seed_formula(x.view(b, -1).tolist()), dtype=torch.float64).view_as(x)
    for all_pairs in (True, False):
        assert torch.allclose(diversity_gradient(x, all_pairs=all_pairs), expected, rtol=1e-12, atol=1e-12)


def test_diversity_gradient_sign_and_zeros():
    def pair(d: float) -> torch.Tensor:
        return diversity_gradient(torch.tensor([[d], [0.0]]))

    assert torch.equal(pair(0.0), torch.zeros(2, 1))          # sign(0) = 0: identical samples are not pushed
    assert torch.allclose(pair(1.0), torch.zeros(2, 1), atol=1e-7)   # unit distance is ideal
    assert torch.allclose(pair(-1.0), torch.zeros(2, 1), atol=1e-7)
    near = pair(0.3)
    assert near[0, 0] > 0 and near[1, 0] < 0                   # |d| < 1: x0 above x1 moves up, x1 moves down
    assert near[0, 0].item() == pytest.approx(0.05 * (1.05 / 0.14 - 1.0), rel=1e-5)   # = 0.325
    assert near[1, 0].item() == pytest.approx(-near[0, 0].item())
    far = pair(1.8)
    assert far[0, 0] < 0 and far[1, 0] > 0                     # |d| > 1: pulled together
    assert far[0, 0].item() == pytest.approx(0.05 * (1.05 / (1.8 ** 2 + 0.05) - 1.0), rel=1e-5)
    # a batch of one has no partners
    assert torch.equal(diversity_gradient(torch.tensor([[0.4, -0.2]])), torch.zeros(1, 2))


def _grads_with_diversity(strength: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A small graph p -> fake = 3 p -> loss; returns (p.grad, fake). strength None: no add_diversity call."""
    p = torch.tensor([[0.1, -0.4, 0.8], [0.0, 0.35, -0.6], [0.2, 0.2, 0.05], [-0.3, 0.9, 0.1]],
                     dtype=torch.float64, requires_grad=True)
    fake = 3.0 * p
    if strength is not None:
        add_diversity(fake, strength)
    w = torch.arange(12, dtype=torch.float64).view(4, 3) / 10
    loss = (fake.tanh() * w).sum()
    loss.backward()
    return p.grad.clone(), fake.detach()


def test_add_diversity_changes_gradient_by_exact_amount():
    g_none, fake = _grads_with_diversity(None)
    g0, _ = _grads_with_diversity(0.0)
    assert torch.equal(g0, g_none)     # strength 0: the gradient is exactly unchanged
    for s in (0.5, 2.0):
        gs, fake_s = _grads_with_diversity(s)
        assert torch.equal(fake_s, fake)   # the forward pass is untouched
        expected = -s / 12 * diversity_gradient(fake) * 3.0   # 4 x 3 elements; d fake / d p = 3
        assert not torch.allclose(gs, g_none)
        assert torch.allclose(gs - g_none, expected, rtol=1e-10, atol=1e-12)


def test_add_diversity_noop_without_grad():
    x = torch.rand(3, 2)
    add_diversity(x, 1.0)   # must not raise on a tensor that does not require grad
    assert not x.requires_grad


# ===================================================================================================== noise control


def test_noise_controller():
    nc = NoiseController(high=0.95, low=0.5, step=0.001)
    assert nc.eps.item() == 0.0
    t = torch.tensor
    # gap below low at eps 0: stays at 0, never negative
    for _ in range(3):
        nc.update(t(0.6), t(0.5))
        assert nc.eps.item() == 0.0
    # gap above high: rises by step each time
    for i in range(1, 4):
        nc.update(t(0.99), t(0.02))
        assert nc.eps.item() == pytest.approx(0.001 * i)
    # gap in between: unchanged
    for gap_fake in (0.3, 0.45, 0.05):   # gaps 0.7, 0.55, 0.95 (boundaries are not "above"/"below")
        before = nc.eps.item()
        nc.update(t(1.0), t(gap_fake))
        assert nc.eps.item() == pytest.approx(before)
    nc.update(t(0.5), t(0.5))   # gap 0 < low: falls by one step
    assert nc.eps.item() == pytest.approx(0.002)
    for _ in range(10):
        nc.update(t(0.4), t(0.6))   # negative gap
    assert nc.eps.item() == 0.0


# ===================================================================================================== latent


def test_random_on_sphere():
    z = latent.random(64, 100, generator=torch.Generator().manual_seed(0))
    assert z.shape == (64, 100)
    assert torch.allclose(z.norm(dim=1), torch.full((64,), 10.0), atol=1e-4)
    z2 = latent.random(64, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, z2)
    z7 = latent.random(5, 7)
    assert torch.allclose(z7.norm(dim=1), torch.full((5,), math.sqrt(7)), atol=1e-5)
    # directions are spread out, not one repeated vector
    assert z.std(dim=0).mean() > 0.5


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two vectors, accurate near 0 too (atan2 of the perpendicular and parallel parts)."""
    ua, ub = a / a.norm(), b / b.norm()
    cos = float(torch.dot(ua, ub))
    sin = float((ub - cos * ua).norm())
    return math.atan2(sin, cos)


def test_slerp_endpoints_sphere_and_midpoint():
    a, b = latent.to_sphere(latent.random(2, 32, generator=torch.Generator().manual_seed(4)).double())
    assert torch.allclose(latent.slerp(a, b, 0.0), a, atol=1e-12)
    assert torch.allclose(latent.slerp(a, b, 1.0), b, atol=1e-12)
    r = math.sqrt(32)
    for t in torch.linspace(0, 1, 11).tolist():
        p = latent.slerp(a, b, t)
        assert p.norm().item() == pytest.approx(r, rel=1e-10)
        # on the great circle: the angles to the endpoints add up to the whole angle
        assert _angle(a, p) + _angle(p, b) == pytest.approx(_angle(a, b), abs=1e-9)
        assert _angle(a, p) == pytest.approx(t * _angle(a, b), abs=1e-9)
    mid = latent.slerp(a, b, 0.5)
    assert _angle(a, mid) == pytest.approx(_angle(a, b) / 2, abs=1e-9)
    assert not torch.allclose(mid, (a + b) / 2)   # not a linear blend (which would leave the sphere)
    # batched t
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    batch = latent.slerp(a.expand(3, -1), b.expand(3, -1), ts)
    assert torch.allclose(batch[0], a) and torch.allclose(batch[1], mid) and torch.allclose(batch[2], b)


def test_slerp_parallel_vectors():
    a = latent.random(1, 16, generator=torch.Generator().manual_seed(1))[0]
    p = latent.slerp(a, a.clone(), 0.3)
    assert torch.isfinite(p).all() and torch.allclose(p, a, atol=1e-5)


@pytest.mark.parametrize("smooth", [False, True])
def test_loop_path_hits_keys_and_is_closed(smooth):
    keys = latent.to_sphere(latent.random(4, 24, generator=torch.Generator().manual_seed(2)).double())
    fpk = 10
    path = latent.loop_path(keys, fpk, smooth=smooth)
    assert path.shape == (4 * fpk, 24)
    assert torch.allclose(path[0], keys[0], atol=1e-12)
    for i in range(4):
        assert torch.allclose(path[i * fpk], keys[i], atol=1e-12)
    assert torch.allclose(path.norm(dim=1), torch.full((4 * fpk,), math.sqrt(24), dtype=torch.float64))
    steps = (path.roll(-1, 0) - path).norm(dim=1)   # steps[-1] is last frame -> frame 0
    wrap = steps[-1].item()
    assert wrap > 0, "frame 0 must not repeat the last frame"
    if not smooth:
        # constant speed along each arc: the wrap step equals the other steps of the last arc
        last_arc = steps[3 * fpk: 4 * fpk - 1]
        assert torch.allclose(last_arc, torch.full_like(last_arc, wrap), rtol=1e-6)
        assert wrap < 2 * steps.median().item()
    else:
        # ease in/out: the wrap step mirrors the first step out of key 0's arc end (symmetric smoothstep)
        assert wrap <= steps.max().item()
        first_step_of_last_arc = steps[3 * fpk].item()
        assert wrap == pytest.approx(first_step_of_last_arc, rel=1e-6)


# ===================================================================================================== config


def test_config_json_round_trip(tmp_path):
    cfg = tiny_cfg(diversity=0.25, seed=7, lr_g=3e-4, pixel_norm=False)
    path = tmp_path / "config.json"
    cfg.save(path)
    raw = json.loads(path.read_text())
    assert raw["size"] == 16 and raw["g_channels"] == [16, 16, 8] and raw["diversity"] == 0.25
    back = TrainConfig.load(path)
    assert back == cfg
    assert back.differences(cfg) == []
    assert isinstance(back.g_channels, tuple)
    # defaults too (channels derived from the size)
    default = TrainConfig()
    default.save(path)
    assert TrainConfig.load(path) == default
    assert default.levels == 5 and default.base == 4


def test_config_differences():
    a = tiny_cfg()
    b = dataclasses.replace(a, epochs=5, seed=3)
    assert sorted(a.differences(b)) == ["epochs", "seed"]


def test_config_holdout_and_eval_fields(tmp_path):
    """holdout / eval_every / eval_n round-trip and are checked; a config saved before held-out splits existed
    means 'trained on every image'; eval settings may change on resume, the held-out fraction may not."""
    from progan.config import RESUMABLE_CHANGES

    cfg = tiny_cfg(holdout=0.1, eval_every=0.5, eval_n=64)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    assert TrainConfig().holdout == 0.03 and TrainConfig().eval_every == 0
    old = {k: v for k, v in tiny_cfg().to_dict().items() if k not in ("holdout", "eval_every", "eval_n")}
    assert TrainConfig.from_dict(old).holdout == 0.0
    for bad in (dict(holdout=1.0), dict(holdout=-0.1), dict(eval_every=-1), dict(eval_n=1)):
        with pytest.raises(ProganError):
            tiny_cfg(**bad)
    assert {"eval_every", "eval_n"} <= RESUMABLE_CHANGES and "holdout" not in RESUMABLE_CHANGES


@pytest.mark.parametrize("size,expected", [(32, (4, 4)), (64, (4, 5)), (128, (4, 6)), (160, (5, 6)),
                                           (256, (4, 7)), (16, (4, 3)), (8, (4, 2)), (4, (4, 1))])
def test_split_size(size, expected):
    assert split_size(size) == expected
    base, levels = expected
    assert base * 2 ** (levels - 1) == size
    cfg = TrainConfig(size=size)
    assert (cfg.base, cfg.levels) == expected
    assert cfg.resolution(cfg.levels - 1) == size


@pytest.mark.parametrize("size", [100, 3, 0, 200])
def test_split_size_errors(size):
    with pytest.raises(ProganError):
        split_size(size)
    with pytest.raises(ProganError):
        TrainConfig(size=size)


def test_split_size_explicit_base_and_preset():
    assert split_size(160, 20) == (20, 4)
    with pytest.raises(ProganError):
        split_size(160, 30)
    cfg = TrainConfig(**PRESETS["seed2019"])
    assert cfg.base == 20 and cfg.levels == 4 and cfg.resolution(3) == 160


def test_config_rejects_bad_values():
    with pytest.raises(ProganError):
        TrainConfig(size=16, g_channels=(8, 8))        # wrong number of levels
    with pytest.raises(ProganError):
        TrainConfig(batch=1)
    with pytest.raises(ProganError):
        TrainConfig(diversity=-0.1)
    with pytest.raises(ProganError):
        TrainConfig(epochs=0)


def test_from_dict_rejects_unknown_keys(tmp_path):
    d = tiny_cfg().to_dict()
    assert TrainConfig.from_dict(dict(d)) == tiny_cfg()
    d["warp_drive"] = True
    with pytest.raises(ProganError, match="warp_drive"):
        TrainConfig.from_dict(d)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProganError):
        TrainConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ProganError):
        TrainConfig.load(path)
    with pytest.raises(ProganError):
        TrainConfig.load(tmp_path / "missing.json")


# ===================================================================================================== checkpoint


def small_state(seed: int = 0, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"config": tiny_cfg().to_dict(), "nimg": 100 + seed, "w": torch.randn(5, 3, generator=g),
            "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1}, **extra}


def test_checkpoint_round_trip(tmp_path):
    state = small_state()
    path = checkpoint.save(state, tmp_path / "checkpoints", "epoch-0001.pt")
    assert path == tmp_path / "checkpoints" / "epoch-0001.pt" and path.is_file()
    # plain weights: torch.load with weights_only=True reads it directly
    raw = torch.load(path, weights_only=True)
    assert raw["schema"] == checkpoint.SCHEMA
    back = checkpoint.load(path)
    assert back["schema"] == checkpoint.SCHEMA
    assert back["config"] == state["config"] and back["nimg"] == 100
    assert torch.equal(back["w"], state["w"])
    assert torch.equal(back["opt"]["state"][0]["step"], torch.tensor(3.0))
    assert TrainConfig.from_dict(back["config"]) == tiny_cfg()
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001.pt", "latest"]


def test_checkpoint_latest_pointer_and_names(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert checkpoint.latest(tmp_path) is None
    for e in (1, 2, 3):
        checkpoint.save(small_state(e), ckpts, checkpoint.checkpoint_name(e))
        assert (ckpts / "latest").read_text().strip() == f"epoch-{e:04d}.pt"
        assert checkpoint.latest(tmp_path) == ckpts / f"epoch-{e:04d}.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path))["nimg"] == 103
    assert checkpoint.resolve(tmp_path) == ckpts / "epoch-0003.pt"
    assert checkpoint.resolve(ckpts / "epoch-0001.pt") == ckpts / "epoch-0001.pt"
    mid = checkpoint.checkpoint_name(3, 123)
    assert mid == "epoch-0003-img-000000123.pt"
    checkpoint.save(small_state(9), ckpts, mid)
    assert checkpoint.latest(tmp_path).name == mid
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == \
        ["epoch-0001.pt", "epoch-0002.pt", "epoch-0003.pt", mid]
    # a dangling pointer falls back to the newest file present
    (ckpts / "latest").write_text("epoch-0042.pt\n")
    assert checkpoint.latest(tmp_path).name == mid


def test_checkpoint_keep_prunes(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for e in range(1, 6):
        checkpoint.save(small_state(e), ckpts, checkpoint.checkpoint_name(e), keep=2)
        present = sorted(p.name for p in ckpts.glob("epoch-*.pt"))
        assert present == [f"epoch-{k:04d}.pt" for k in range(max(1, e - 1), e + 1)]
    assert checkpoint.latest(tmp_path).name == "epoch-0005.pt"
    # keep=0 keeps everything
    for e in range(6, 9):
        checkpoint.save(small_state(e), ckpts, checkpoint.checkpoint_name(e), keep=0)
    assert len(list(ckpts.glob("epoch-*.pt"))) == 5


def test_resolve_errors(tmp_path):
    with pytest.raises(ProganError):
        checkpoint.resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProganError):
        checkpoint.resolve(tmp_path / "empty")
    with pytest.raises(ProganError):
        checkpoint.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("content", [b"", b"hello, this is not a checkpoint\n", b"\x00" * 100 + b"garbage",
                                     bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))])
def test_checkpoint_garbage_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ProganError) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_checkpoint_garbage_is_reported_as_corrupt_not_as_code(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x00" * 100 + b"garbage")
    with pytest.raises(ProganError) as e:
        checkpoint.load(path)
    assert "not a progan checkpoint" in str(e.value)
    assert "refusing" not in str(e.value)


def test_checkpoint_truncated(tmp_path):
    path = checkpoint.save(small_state(), tmp_path, "epoch-0001.pt")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 40):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(ProganError) as e:
            checkpoint.load(bad)
        assert "not a progan checkpoint" in str(e.value) or "corrupt" in str(e.value)
    # the intact file still loads
    assert checkpoint.load(path)["nimg"] == 100


def test_checkpoint_newer_schema(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"schema": 999, "config": tiny_cfg().to_dict(), "w": torch.zeros(2)}, path)
    with pytest.raises(ProganError, match="newer"):
        checkpoint.load(path)
    # a dict without schema/config is not a progan checkpoint
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ProganError, match="not a progan checkpoint"):
        checkpoint.load(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ProganError):
        checkpoint.load(path)


class _RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle", "pickle-proto2"])
def test_checkpoint_refuses_code(tmp_path, how):
    marker = tmp_path / "code-ran"
    payload = {"schema": 1, "config": tiny_cfg().to_dict(), "evil": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2 if how == "pickle-proto2" else pickle.HIGHEST_PROTOCOL)
    # torch names the blocked global for its own format; a raw pickle may already fail on an opcode it refuses.
    expected = "refusing to load .* posix.system" if how == "torch.save" else "refusing to load|not a progan checkpoint"
    with pytest.raises(ProganError, match=expected) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)
    assert not marker.exists(), "loading the checkpoint ran code"
    # sanity: the payload really does run code when unpickled without protection
    if how != "torch.save":
        with open(path, "rb") as f:
            pickle.load(f)
        assert marker.exists()


# ===================================================================================================== Trainer


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_trainer_steps_change_weights_and_stay_finite():
    cfg = tiny_cfg()
    tr = Trainer(cfg, tiny_bank())
    g0, d0, e0 = _params(tr.G), _params(tr.D), _params(tr.G_ema)
    for _ in range(4):   # 32 images: through level 0 into the first fade
        tr.step()
    assert tr.steps == 4 and tr.nimg == 32
    assert tr.phase() == schedule(32, cfg.levels, cfg.fade_images, cfg.stable_images) == (1, 0.5)
    assert tr.finite()
    for before, net in ((g0, tr.G), (d0, tr.D), (e0, tr.G_ema)):
        after = _params(net)
        assert all(torch.isfinite(v).all() for v in after.values())
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, "no weight changed"
    # level-0 and level-1 weights trained; the top level (16 px) not reached yet, so its ToRGB is untouched
    after_g = _params(tr.G)
    assert not torch.equal(g0["to_rgb.0.conv.weight"], after_g["to_rgb.0.conv.weight"])
    assert not torch.equal(g0["to_rgb.1.conv.weight"], after_g["to_rgb.1.conv.weight"])
    assert torch.equal(g0["to_rgb.2.conv.weight"], after_g["to_rgb.2.conv.weight"])
    stats = tr.read_stats()
    assert stats is not None and all(math.isfinite(v) for v in vars(stats).values())
    assert 0 <= stats.real_rating <= 1 and 0 <= stats.fake_rating <= 1
    assert tr.read_stats() is None
    img = tr.render_fixed()
    assert img.shape == (32, 3, 8, 8) and img.abs().max() <= 1


def test_trainer_is_deterministic_and_seeded():
    a, b = Trainer(tiny_cfg(), tiny_bank()), Trainer(tiny_cfg(), tiny_bank())
    c = Trainer(tiny_cfg(seed=1), tiny_bank())
    for t in (a, b, c):
        t.step()
        t.step()
    for k, v in a.G.state_dict().items():
        assert torch.equal(v, b.G.state_dict()[k])
    assert any(not torch.equal(v, c.G.state_dict()[k]) for k, v in a.G.state_dict().items())


def test_trainer_state_dict_loads_weights_only(tmp_path):
    tr = Trainer(tiny_cfg(), tiny_bank())
    tr.step()
    state = tr.state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    back = torch.load(path, weights_only=True)
    assert set(back) >= {"config", "nimg", "steps", "epoch", "G", "D", "G_ema", "opt_g", "opt_d", "eps", "rng",
                         "fixed_z"}
    assert back["nimg"] == 8 and back["steps"] == 1 and back["epoch"] == 0
    assert TrainConfig.from_dict(back["config"]) == tr.cfg
    for k, v in tr.G.state_dict().items():
        assert torch.equal(back["G"][k], v)
    assert torch.equal(back["fixed_z"], tr.fixed_z)
    # and through the checkpoint module
    ck = checkpoint.save(state, tmp_path / "checkpoints", "epoch-0000-img-000000008.pt")
    assert checkpoint.load(ck)["steps"] == 1
