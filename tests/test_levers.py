"""Training levers (issue #11): R1, minibatch-stddev, equalised LR, DiffAugment, hinge loss, diversity on every
layer, presets, and the config / checkpoint / resume contract of every new option."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from progan import augment, checkpoint, gantrain
from progan.config import PRESETS, TrainConfig
from progan.errors import ProganError
from progan.facedata import ImageBank
from progan.gantrain import Trainer
from progan.networks import Discriminator, EqConv2d, EqLinear, MinibatchStd

ROOT = Path(__file__).resolve().parents[1]
NEW_OPTIONS = {"augment": "color,translation,cutout", "loss": "hinge", "diversity_layers": "all", "lr_rampdown": 0.25}


def _cfg(**kw) -> TrainConfig:
    base = dict(size=16, batch=8, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4, latent_dim=16,
                fade_images=16, stable_images=16, r1_every=2)
    return TrainConfig(**{**base, **kw})


def _bank(n: int = 32, size: int = 16) -> ImageBank:
    return ImageBank(np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


# ================================================================================================ R1


def test_r1_penalty_is_the_squared_gradient_norm():
    """gantrain.r1_penalty against per-image gradients computed one image at a time (no mbstd, so images do not
    interact): mean over images of |dD(x_i)/dx_i|^2."""
    cfg = _cfg(mbstd=False)
    torch.manual_seed(0)
    D = Discriminator(cfg)
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    got = gantrain.r1_penalty(D(x, 2, 1.0), x)
    direct = []
    for i in range(6):
        xi = x[i:i + 1].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(D(xi, 2, 1.0).sum(), xi)
        direct.append(g.square().sum())
    assert got.item() == pytest.approx(torch.stack(direct).mean().item(), rel=1e-5)
    assert got.item() > 0
    # kept in the graph: D's weights get a gradient from the penalty alone
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in D.parameters())


@pytest.mark.parametrize("policy", ["", "translation,color"])
def test_trainer_applies_r1_on_its_schedule(monkeypatch, policy):
    """The trainer adds gamma / 2 * r1_every * r1_penalty on every r1_every-th step, at the reals it gives D
    (with DiffAugment: at the un-augmented reals, through the augmentation, as the reference does)."""
    calls = []
    real_fn = gantrain.r1_penalty

    def spy(d_real, real):
        value = real_fn(d_real, real)
        calls.append((real.shape, real.requires_grad, value.item()))
        return value

    monkeypatch.setattr(gantrain, "r1_penalty", spy)
    t = Trainer(_cfg(r1_gamma=2.0, r1_every=2, augment=policy), _bank())
    for _ in range(4):
        t.step()
    assert len(calls) == 2  # steps 0 and 2
    assert [tuple(shape) for shape, _, _ in calls] == [(8, 3, 4, 4), (8, 3, 8, 8)]   # 4 px, then the 8 px fade
    assert all(req and math.isfinite(v) and v > 0 for _, req, v in calls)


# ================================================================================================ mbstd / eq-lr


def test_minibatch_stddev_channel():
    torch.manual_seed(1)
    x = torch.randn(8, 5, 3, 3)
    y = MinibatchStd(group=4)(x)
    assert y.shape == (8, 6, 3, 3)
    assert torch.equal(y[:, :5], x)
    for g in range(2):  # groups of 4 consecutive samples
        grp = x[4 * g:4 * g + 4]
        expected = grp.std(dim=0, unbiased=False).mean()   # per-feature std over the group, averaged
        assert torch.allclose(y[4 * g:4 * g + 4, 5], expected.expand(4, 3, 3), atol=1e-5)
    assert not torch.allclose(y[0, 5], y[4, 5])


def test_equalised_lr_scales_at_run_time():
    torch.manual_seed(2)
    conv = EqConv2d(64, 64, 3, padding=1, bias=False)
    fan_in = 64 * 9
    assert conv.scale == pytest.approx(math.sqrt(2 / fan_in))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.02)      # stored unit-variance
    x = torch.randn(16, 64, 16, 16)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * conv.scale, padding=1), atol=1e-5)
    # He gain: pre-activation variance 2, so after LeakyReLU(0.2) the second moment is ~1 (1.04); measured away
    # from the zero-padded border, where fewer inputs contribute
    y = conv(x)
    inner = y[:, :, 1:-1, 1:-1]
    assert inner.var().item() == pytest.approx(2.0, rel=0.1)
    assert F.leaky_relu(inner, 0.2).square().mean().item() == pytest.approx(1.04, rel=0.1)
    lin = EqLinear(256, 128, gain=1.0, bias=False)
    assert lin(torch.randn(512, 256)).var().item() == pytest.approx(1.0, rel=0.1)
    # the scale is applied in forward, not baked into the weights: doubling the stored weights doubles the output
    with torch.no_grad():
        conv.weight.mul_(2)
    assert torch.allclose(conv(x), 2 * y, atol=1e-4)


# ================================================================================================ DiffAugment


def test_diffaugment_shapes_and_gradients():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    for policy in ("color", "translation", "cutout", "color,translation,cutout"):
        y = augment.diff_augment(x, policy, g)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert not torch.equal(y, x)
        (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert augment.diff_augment(x, "") is x
    with pytest.raises(ProganError, match="blur"):
        augment.sample_params("color,blur", 4, 16)


def test_diffaugment_same_transform_for_a_pair():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    p = augment.sample_params("color,translation,cutout", 6, 16, torch.Generator().manual_seed(3))
    assert torch.equal(augment.apply(x, p), augment.apply(x.clone(), p))
    # translation and cutout are linear in the image, so the same spatial transform of 2x is exactly 2x the result
    sp = augment.sample_params("translation,cutout", 6, 16, torch.Generator().manual_seed(4))
    assert torch.equal(augment.apply(2 * x, sp), 2 * augment.apply(x, sp))
    # the same seed gives the same parameters; another seed other ones (per sample)
    q = augment.sample_params("color,translation,cutout", 6, 16, torch.Generator().manual_seed(3))
    r = augment.sample_params("color,translation,cutout", 6, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(p[k], q[k]) for k in p)
    assert not torch.equal(augment.apply(x, p), augment.apply(x, r))
    assert len(set(p["brightness"].flatten().tolist())) == 6


def test_translation_and_cutout_geometry():
    x = torch.arange(1.0, 1 + 2 * 8 * 8).view(2, 1, 8, 8)
    y = augment.translate(x, torch.tensor([[1, 0], [0, -2]]))
    assert torch.equal(y[0, 0, :, 1:], x[0, 0, :, :-1]) and (y[0, 0, :, 0] == 0).all()   # right by one
    assert torch.equal(y[1, 0, :-2], x[1, 0, 2:]) and (y[1, 0, -2:] == 0).all()          # up by two
    c = augment.cutout(torch.ones(1, 3, 8, 8), torch.tensor([[4, 4]]))
    assert (c == 0).sum().item() == 3 * 4 * 4 and (c[0, :, 2:6, 2:6] == 0).all()


# ================================================================================================ config contract


def test_new_options_round_trip_json_and_checkpoint(tmp_path):
    cfg = _cfg(**NEW_OPTIONS)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg
    t = Trainer(cfg, _bank())
    t.step()
    path = checkpoint.save(t.state_dict(), tmp_path / "ck", "x.pt")
    loaded = TrainConfig.from_dict(checkpoint.load(path)["config"])
    assert loaded == cfg and loaded.augment == "color,translation,cutout"
    # a config saved before the levers existed loads with them off
    old = {k: v for k, v in cfg.to_dict().items() if k not in NEW_OPTIONS}
    assert {k: getattr(TrainConfig.from_dict(old), k) for k in NEW_OPTIONS} == \
        {"augment": "", "loss": "ns", "diversity_layers": "last", "lr_rampdown": 0.0}


def test_bad_option_values_are_one_line_errors():
    for kw, word in ((dict(augment="flip"), "flip"), (dict(loss="wgan"), "wgan"),
                     (dict(diversity_layers="some"), "some"), (dict(r1_gamma=-1.0), "r1"),
                     (dict(lr_rampdown=1.5), "lr-rampdown")):
        with pytest.raises(ProganError, match=word) as e:
            _cfg(**kw)
        assert "\n" not in str(e.value)
    assert _cfg(augment=" Cutout, translation ").augment == "translation,cutout"   # normalised, ordered


def test_lr_rampdown_follows_a_half_cosine_over_the_end_of_the_run():
    assert [gantrain.lr_factor(p, 0.25) for p in (0.0, 0.75, 1.0)] == [1.0, 1.0, 0.0]
    assert gantrain.lr_factor(0.875, 0.25) == pytest.approx(0.5)
    assert gantrain.lr_factor(0.9, 0.0) == 1.0 and gantrain.lr_factor(1.3, 0.25) == 0.0   # off; past the end
    t = Trainer(_cfg(lr_rampdown=0.5, lr_g=2e-3, lr_d=4e-3), _bank())
    lrs = lambda: (t.opt_g.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"])  # noqa: E731
    t.set_progress(0.3)
    assert lrs() == (2e-3, 4e-3)
    t.set_progress(0.75)
    assert lrs() == pytest.approx((1e-3, 2e-3))
    before = [p.detach().clone() for p in t.G.parameters()]
    t.set_progress(1.0)
    t.step()   # at rate 0 Adam leaves G where it was
    assert lrs() == (0.0, 0.0) and all(torch.equal(a, b) for a, b in zip(before, t.G.parameters()))
    off = Trainer(_cfg(lr_g=2e-3), _bank())
    off.set_progress(1.0)
    assert off.opt_g.param_groups[0]["lr"] == 2e-3


def test_resume_with_changed_option_is_refused(tmp_path):
    from progan.run import resolve_config

    cfg = _cfg()
    t = Trainer(cfg, _bank())
    t.step()
    checkpoint.save(t.state_dict(), tmp_path / "checkpoints", "epoch-0001.pt")
    for key, value in NEW_OPTIONS.items():
        with pytest.raises(ProganError) as e:
            resolve_config(tmp_path, {**cfg.to_dict(), key: value}, {key}, fresh=False)
        assert key in str(e.value) and "--fresh" in str(e.value)
    same, state = resolve_config(tmp_path, cfg.to_dict(), set(NEW_OPTIONS), fresh=False)
    assert state is not None and same == cfg


def test_presets_are_valid_configs():
    for name in ("cpu64", "gpu64", "gpu128", "small"):
        cfg = TrainConfig(**PRESETS[name])
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(**PRESETS["small"]).augment == "color,translation,cutout"
    assert TrainConfig(**PRESETS["gpu128"]).size == 128
    gpu64 = TrainConfig(**PRESETS["gpu64"])
    assert (gpu64.size, gpu64.batch, gpu64.levels) == (64, 128, 5) and gpu64.g_channels > TrainConfig().g_channels
    assert TrainConfig(**PRESETS["cpu64"]).g_channels < TrainConfig().g_channels


def test_train_help_lists_levers_and_presets():
    proc = subprocess.run([sys.executable, "-m", "progan", "train", "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    for word in ("--augment", "--loss", "--diversity-layers", "--r1-gamma", "--no-mbstd", "--no-eq-lr",
                 "--no-pixel-norm", "--ema-rampup", "cpu64", "gpu64", "gpu128", "small"):
        assert word in proc.stdout, word


# ================================================================================================ training paths


def test_default_path_draws_no_augmentation():
    """With no policy the trainer's RNG advances exactly as without the lever: same state after steps as a
    trainer whose augment was never consulted (guards the bit-identical default)."""
    a, b = Trainer(_cfg(), _bank()), Trainer(_cfg(augment="color"), _bank())
    a.step()
    b.step()
    assert not torch.equal(a.rng.get_state(), b.rng.get_state())   # augmentation draws from the trainer RNG
    c = Trainer(_cfg(), _bank())
    c.step()
    assert torch.equal(a.rng.get_state(), c.rng.get_state())
    assert all(torch.equal(p, q) for p, q in zip(a.G.parameters(), c.G.parameters()))


@pytest.mark.parametrize("kw", [dict(loss="hinge"), dict(diversity_layers="all"),
                                dict(augment="color,translation,cutout"), dict(NEW_OPTIONS)])
def test_levers_train_with_finite_losses(kw):
    t = Trainer(_cfg(**kw), _bank())
    for _ in range(6):   # crosses the 4 px -> 8 px fade
        t.step()
    s = t.read_stats()
    assert all(math.isfinite(v) for v in vars(s).values())
    assert t.finite()


def test_hinge_losses():
    """Hinge: D minimises relu(1 - D(real)) + relu(1 + D(fake)), G minimises -D(fake); the logged losses match."""
    t = Trainer(_cfg(loss="hinge", r1_gamma=0.0, diversity=0.0), _bank())
    level, alpha = t.phase()
    d_before = {k: v.clone() for k, v in t.D.state_dict().items()}
    rng_before = t.rng.get_state()
    z = __import__("progan").latent.random(8, 16, generator=t.rng)
    with torch.no_grad():
        fake = t.G(z, level, alpha)
        expected_g = -t.D(fake, level, alpha).mean().item()
    t.rng.set_state(rng_before)
    t.step()
    s = t.read_stats()
    assert s.g_loss == pytest.approx(expected_g, rel=1e-5)
    assert 0.0 <= s.d_loss   # a sum of relus
    assert any(not torch.equal(d_before[k], v) for k, v in t.D.state_dict().items())


def test_diversity_on_all_layers_changes_the_generator_update():
    a, b = Trainer(_cfg(diversity=1.0), _bank()), Trainer(_cfg(diversity=1.0, diversity_layers="all"), _bank())
    for t in (a, b):
        t.nimg = 48   # 16 px, all three blocks active
        t.step()
    differ = [not torch.equal(p, q) for p, q in zip(a.G.blocks.parameters(), b.G.blocks.parameters())]
    assert any(differ)
    # hooks are removed after the G step: rendering adds none
    assert all(not blk._forward_hooks for blk in b.G.blocks)
    # diversity 0 turns the per-layer push off too
    c, d = Trainer(_cfg(diversity=0.0), _bank()), Trainer(_cfg(diversity=0.0, diversity_layers="all"), _bank())
    for t in (c, d):
        t.step()
    assert all(torch.equal(p, q) for p, q in zip(c.G.parameters(), d.G.parameters()))


def _train_one_step(data, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """`progan train DATA --out TMP/run --batch 4 --max-steps 1 FLAGS` in a subprocess, on one thread."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PROGAN_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "progan", "train", str(data), "--out", str(tmp_path / "run"),
                           "--batch", "4", "--max-steps", "1", "--no-progress", *flags],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_cli_flags_reach_the_run_and_resume_checks_them(tmp_path):
    """`progan train` with the new flags writes them to config.json; the same command resumes (even with the
    augmentation ops in another order); a changed lever is refused in one line naming --fresh."""
    from blobs import write_blob_images

    data = write_blob_images(tmp_path / "faces", 12, 16)

    def train(*flags: str) -> subprocess.CompletedProcess:
        return _train_one_step(data, tmp_path, "--size", "16", *flags)

    proc = train("--g-channels", "8,8,4,4")      # 16 px has three levels (4, 8, 16 px)
    assert proc.returncode == 1 and "g_channels needs 3 entries" in proc.stderr and "Traceback" not in proc.stderr
    proc = train("--d-channels", "8,x,4")
    assert proc.returncode == 2 and "not a comma list of integers" in proc.stderr
    proc = train("--noise-low", "0.9", "--noise-high", "0.5")
    assert proc.returncode != 0 and "--noise-low" in proc.stderr.strip().splitlines()[-1]
    proc = train("--phase-images", "4,8")
    assert proc.returncode == 1 and "--phase-images needs 3 entries" in proc.stderr and "Traceback" not in proc.stderr
    proc = train("--augment", "translation,color", "--loss", "hinge", "--diversity-layers", "all", "--no-mbstd",
                 "--r1-gamma", "3", "--g-channels", "12,8,4", "--d-channels", "8,8,6", "--noise-step", "0",
                 "--noise-high", "0.9", "--noise-low", "0.4", "--noise-max", "0.25", "--phase-images", "4,0,8")
    assert proc.returncode == 0, proc.stderr
    cfg = TrainConfig.load(tmp_path / "run" / "config.json")
    assert (cfg.augment, cfg.loss, cfg.diversity_layers, cfg.mbstd, cfg.r1_gamma) == \
        ("color,translation", "hinge", "all", False, 3.0)
    assert (cfg.g_channels, cfg.d_channels) == ((12, 8, 4), (8, 8, 6))
    assert (cfg.noise_step, cfg.noise_high, cfg.noise_low, cfg.noise_max) == (0.0, 0.9, 0.4, 0.25)
    assert cfg.phase_images == (4, 0, 8)
    proc = train("--g-channels", "16,8,4")
    assert proc.returncode == 1 and "g_channels" in proc.stderr and "--fresh" in proc.stderr
    proc = train("--augment", "color, translation", "--loss", "hinge")
    assert proc.returncode == 0, proc.stderr
    proc = train("--loss", "ns")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("progan: error:") and "loss" in proc.stderr \
        and "--fresh" in proc.stderr and "Traceback" not in proc.stderr


def test_auto_preset_follows_the_machine(tmp_path):
    """Without --preset, `progan train` takes the preset measured best for the device and size; its values count
    as defaults (a resume keeps the saved config), while a named preset's values are explicit and checked."""
    from blobs import write_blob_images
    from progan.config import auto_preset

    assert [auto_preset("cpu", s) for s in (None, 64, 32, 128)] == ["cpu64", "cpu64", "default", "default"]
    assert [auto_preset("cuda", s) for s in (None, 64, 128, 160)] == ["gpu64", "gpu64", "gpu128", "default"]
    data = write_blob_images(tmp_path / "faces", 8, 64)

    def train(*flags: str) -> subprocess.CompletedProcess:
        return _train_one_step(data, tmp_path, "--device", "cpu", *flags)

    proc = train()
    assert proc.returncode == 0, proc.stderr
    assert "preset cpu64" in proc.stderr
    cfg = TrainConfig.load(tmp_path / "run" / "config.json")
    assert cfg.g_channels == TrainConfig(**PRESETS["cpu64"]).g_channels and cfg.batch == 4
    assert train("--size", "64").returncode == 0                       # the same command resumes
    proc = train("--preset", "gpu64")
    assert proc.returncode == 1 and "--fresh" in proc.stderr


def test_compiled_training_runs_lazy_r1_eagerly(monkeypatch):
    """--compile with lazy R1 (on by default): R1 differentiates D's input gradient (a double backward), which
    compiled graphs refuse, so its steps run D eagerly; training then matches eager training step for step.
    aot_eager compiles through the same AOTAutograd as inductor, without the C++ build time."""
    cfg = TrainConfig(size=8, g_channels=(8, 8), d_channels=(8, 8), batch=4, r1_every=2, fade_images=8,
                      stable_images=8)
    bank = ImageBank(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), "cpu")
    eager, compiled = Trainer(cfg, bank), Trainer(cfg, bank, compile="aot_eager")
    assert compiled.compiled and not eager.compiled
    for _ in range(5):   # steps 0, 2, 4 carry R1; the level grows from 4 to 8 px on the way
        eager.step()
        compiled.step()
    assert compiled.nimg == eager.nimg == 20
    for a, b in zip(eager.G.state_dict().values(), compiled.G.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.D.state_dict().values(), compiled.D.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # without the eager R1 pass the compiled D cannot take the double backward
    monkeypatch.setattr(gantrain, "r1_eager", lambda on: gantrain.nullcontext())
    broken = Trainer(cfg, bank, compile="aot_eager")
    with pytest.raises(RuntimeError, match="double backward|donated buffers"):
        broken.step()

    # a torch without set_stance cannot run them uncompiled: refused up front, in one line
    monkeypatch.delattr(torch.compiler, "set_stance")
    with pytest.raises(ProganError, match="torch >= 2.6"):
        Trainer(cfg, bank, compile="aot_eager")
    Trainer(dataclasses.replace(cfg, r1_gamma=0.0), bank, compile="aot_eager")   # no R1: nothing to refuse
