"""Progressive GAN training as the seed describes it: schedule, noise-controlled D, diversity learning, EMA.

Trainer.step() does one round: a G step on fresh latents, then a D step on the same (detached) fakes and a real
batch, both with the controller's noise. Nothing in a step reads a value back to the host, so on a GPU the loop runs
ahead of the device; scalars are accumulated on the device and read every `log_every` steps.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from progan import latent
from progan import augment
from progan.config import TrainConfig
from progan.distributed import Dist, local_batch
from progan.errors import ProganError
from progan.networks import Discriminator, DownBlock, FromRGB, Generator, ToRGB, UpConv, upsample2

N_FIXED = 32  # the training video's grid of fixed latents (8 x 4)


def phase_lengths(level: int, fade_images: int, stable_images: int, phase_images: tuple[int, ...] = ()
                  ) -> tuple[int, int]:
    """(fade, stable) images of one level: phase_images[level] for both where it is set (> 0), else the defaults."""
    p = phase_images[level] if level < len(phase_images) else 0
    return (p, p) if p > 0 else (fade_images, stable_images)


def schedule(nimg: int, levels: int, fade_images: int, stable_images: int,
             phase_images: tuple[int, ...] = ()) -> tuple[int, float]:
    """(level, alpha) after `nimg` images shown: level 0 stable, then per level a fade-in and a stable phase
    (per-level lengths from phase_images where set, as StyleGAN's lod_training_kimg_dict).

    A pure function of the image counter, so a resumed run needs nothing but the counter.
    """
    n = nimg - phase_lengths(0, fade_images, stable_images, phase_images)[1]
    if n < 0:
        return 0, 1.0
    for level in range(1, levels):
        fade, stable = phase_lengths(level, fade_images, stable_images, phase_images)
        if n < fade:
            return level, n / fade
        n -= fade
        if level == levels - 1 or n < stable:
            return level, 1.0
        n -= stable
    return levels - 1, 1.0


def level_start(level: int, fade_images: int, stable_images: int, phase_images: tuple[int, ...] = ()) -> int:
    """Images shown when `level` starts fading in (inverse of schedule, for README tables and tests)."""
    if level == 0:
        return 0
    start = phase_lengths(0, fade_images, stable_images, phase_images)[1]
    for k in range(1, level):
        start += sum(phase_lengths(k, fade_images, stable_images, phase_images))
    return start


def diversity_gradient(x: torch.Tensor, all_pairs: bool | None = None) -> torch.Tensor:
    """The seed's diversity gradient: for every pair (i, j) in the batch and every element,
    sign(dx) * 0.05 * (1.05 / (dx^2 + 0.05) - 1) with dx = x_i - x_j, averaged over the partners j of i.

    It is the direction in which x_i should move: away from x_j while |dx| < 1, towards it beyond (tanh data can
    differ by at most 2, the seed considers a unit difference ideal). 1.05 / (d^2 + 0.05) - 1 is computed as
    (1 - d^2) / (d^2 + 0.05), the same value (up to rounding) in fewer passes.

    all_pairs: build the whole B x B x ... difference tensor at once (few kernel launches, which is what limits
    small models on a GPU) instead of looping over the B - 1 offsets. None picks: all pairs on a GPU while the
    tensor stays under 2^24 elements, the loop otherwise. On a CPU the loop is always faster (measured at batch 32:
    0.8 / 2.7 / 8.9 ms against 1.8 / 4.8 / 162 ms at 16 / 32 / 64 px, where the all-pairs tensor outgrows the cache),
    and it visits each unordered pair once: the term is odd in dx, so the pair's two terms are F and -F.
    """
    b = x.shape[0]
    if all_pairs is None:
        all_pairs = x.device.type != "cpu" and b * x.numel() <= 2 ** 24
    if all_pairs:
        d = x.unsqueeze(1) - x.unsqueeze(0)   # the i == j terms are 0 because sign(0) = 0
        d2 = d * d
        return (torch.sign(d) * ((1.0 - d2) / (d2 + 0.05))).sum(1) * (0.05 / max(b - 1, 1))
    acc = torch.zeros_like(x)
    for k in range(1, b):
        d = x[k:] - x[:b - k]                 # pairs (i + k, i): each unordered pair once over all k
        d2 = d * d
        term = torch.sign(d).mul_((1.0 - d2).div_(d2.add_(0.05)))
        acc[k:] += term
        acc[:b - k] -= term
    return acc.mul_(0.05 / max(b - 1, 1))


def add_diversity(fake: torch.Tensor, strength: float) -> None:
    """Add the diversity direction to fake's gradient during backward (descent subtracts it from the gradient).

    Scaled by 1 / (batch * elements per image), as the gradient of a loss averaged over the batch and the pixels
    would be, so the strength means the same at every batch size and resolution. At strength 1 the push is about a
    tenth of the adversarial gradient at initialisation (measured at 16 px); unscaled, it was ~40x larger and drove
    the generator to garish saturated colours.
    """
    if strength <= 0 or not fake.requires_grad:
        return
    push = diversity_gradient(fake.detach()) * (strength / fake.numel())
    fake.register_hook(lambda g: g - push)


@contextmanager
def diversity_on_blocks(G: Generator, strength: float) -> Iterator[None]:
    """diversity_layers = "all" (the seed's open question): while active, every UpConv output of G also gets the
    diversity push, scaled like the final image's by strength / (elements of that tensor), so each layer's push
    is the gradient of a per-element mean. The features are pixel-normed (RMS ~1 per pixel), so the seed's
    "unit difference is ideal" scale carries over roughly. A no-op for strength 0."""
    if strength <= 0:
        yield
        return
    handles = [blk.register_forward_hook(lambda m, inp, out: add_diversity(out, strength)) for blk in G.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class NoiseController:
    """The seed's noise-controlled discriminator: epsilon rises by `step` while D rates reals much higher than fakes
    (gap > high), falls by `step` while the gap is small (< low), never below 0 nor above `maximum` (the seed had
    no ceiling; without one a runaway D drove epsilon past 2, drowning images in [-1, 1]). Kept on the device."""

    def __init__(self, high: float, low: float, step: float, device: torch.device | str = "cpu",
                 maximum: float = float("inf")):
        self.high, self.low, self.step, self.maximum = high, low, step, maximum
        self.eps = torch.zeros((), device=device)

    def update(self, real_rating: torch.Tensor, fake_rating: torch.Tensor) -> None:
        gap = real_rating - fake_rating
        up = (gap > self.high).to(self.eps.dtype)
        down = (gap < self.low).to(self.eps.dtype)
        self.eps = (self.eps + self.step * (up - down)).clamp(0.0, self.maximum)


def r1_penalty(d_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018) before its gamma / 2: the batch mean of |grad_x D(x)|^2 at the reals, kept in the
    graph so D is trained on it."""
    (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    return grad.float().square().sum((1, 2, 3)).mean()


def ema_beta(batch: int, nimg: int, half_life: int, rampup: float) -> float:
    """Per-step decay for an EMA with the given half-life in images; early on the half-life is at most
    rampup * nimg, so the EMA is not stuck near the random initial weights."""
    hl = half_life if rampup <= 0 else min(half_life, rampup * nimg)
    return 0.5 ** (batch / max(hl, 1e-8))


def lr_factor(progress: float, rampdown: float) -> float:
    """Learning-rate multiplier at `progress` (0..1) of the run: 1 until the last `rampdown` of it, then down to 0
    along a half cosine (rampdown 0: always 1). The run's length is the driver's to know: images for `progan
    train` (--epochs), wall-clock for the race."""
    if rampdown <= 0:
        return 1.0
    t = min(max((progress - (1.0 - rampdown)) / rampdown, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class StepStats:
    """Means over the steps since the last read."""
    g_loss: float
    d_loss: float
    real_rating: float
    fake_rating: float
    eps: float


def compile_blocks(*nets: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each resolution block in place (level and alpha stay eager, so changing them recompiles
    nothing). Where compilation is unsupported, dynamo falls back to eager code with a warning."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for net in nets:
        for m in list(net.modules()):
            if isinstance(m, (UpConv, DownBlock, ToRGB, FromRGB)):
                m.compile(backend=backend)


def r1_eager(on: bool):
    """Run compiled blocks eagerly inside this context when `on`: R1 differentiates D's gradient (a double
    backward), which compiled graphs do not support (AOTAutograd refuses a create_graph backward through them), so
    the one R1 step in r1_every runs D uncompiled and the other steps keep the compiled D."""
    return torch.compiler.set_stance("force_eager") if on else nullcontext()


class Trainer:
    """Networks, optimisers, noise controller, EMA and RNG of one training run; state_dict() is the checkpoint."""

    def __init__(self, cfg: TrainConfig, bank, device: torch.device | str = "cpu", precision: str = "fp32",
                 compile: bool | str = False, dist: Dist | None = None, channels_last: bool = True):
        from progan.facedata import epoch_order  # local: facedata pulls in Pillow and friends

        self.cfg, self.bank, self.device = cfg, bank, torch.device(device)
        # Multi-process (progan.distributed): cfg.batch is the global batch, this rank trains on its shard.
        self.dist = dist
        world, rank = (dist.world, dist.rank) if dist else (1, 0)
        self.local_batch = local_batch(cfg.batch, world) if dist else cfg.batch
        self._shard = slice(rank * self.local_batch, (rank + 1) * self.local_batch)
        self._ddp: tuple[tuple[int, bool], torch.nn.Module, torch.nn.Module] | None = None
        self._epoch_order = epoch_order
        if precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}")
        # bf16 autocast for the forward passes; weights, optimiser state, losses and EMA stay fp32.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        # Weight init from the run's seed without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.G = Generator(cfg).to(self.device)
            self.D = Discriminator(cfg).to(self.device)
        # channels_last (NHWC) weights make every convolution run NHWC: faster on a GPU's tensor cores and on a CPU's
        # oneDNN alike (cpu64 on 2 cores: +15-30 % img/s at 16-64 px, README "Speed"). NHWC convolutions on a CPU
        # round differently at different batch sizes, so splitting a batch over processes then changes the result
        # beyond the order of the gradient sums; channels_last=False (NCHW) keeps it to that (tests/test_distributed.py).
        if channels_last:
            self.G.to(memory_format=torch.channels_last)
            self.D.to(memory_format=torch.channels_last)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        # compile: True = torch.compile's default backend (inductor), or a backend's name (e.g. "aot_eager")
        self.compiled = bool(compile)
        if compile and cfg.r1_gamma > 0 and not hasattr(torch.compiler, "set_stance"):
            raise ProganError(f"--compile with lazy R1 needs torch >= 2.6 to run the R1 steps uncompiled (this is "
                              f"{torch.__version__}); upgrade torch, or train without --compile or with --r1-gamma 0")
        if compile:
            compile_blocks(self.G, self.D, backend="inductor" if compile is True else str(compile))
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=betas)
        self.noise = NoiseController(cfg.noise_high, cfg.noise_low, cfg.noise_step, self.device, cfg.noise_max)
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.seed)
        # The video's latents come from their own stream and are never trained on.
        fixed_rng = torch.Generator().manual_seed(cfg.seed + 7919)
        self.fixed_z = latent.random(N_FIXED, cfg.latent_dim, generator=fixed_rng).to(self.device)
        # A conditional run's video shows fixed labels spread over the label space (no random draws).
        self.fixed_labels: torch.Tensor | None = None
        if cfg.condition:
            from progan.labels import fixed_labels

            if getattr(bank, "labels", None) is None:
                raise ValueError("a conditional run needs an ImageBank with labels")
            self.fixed_labels = fixed_labels(cfg, N_FIXED).to(self.device)
        self.nimg = 0
        self.steps = 0
        self.train_seconds = 0.0  # training wall-clock over all sessions (evaluation excluded); set by run.Session
        self._order: tuple[int, torch.Tensor] | None = None
        self._acc = torch.zeros(5, device=self.device)
        self._acc_n = 0

    # --- schedule and data ---------------------------------------------------------------------------------------
    @property
    def images_per_epoch(self) -> int:
        return (len(self.bank) // self.cfg.batch) * self.cfg.batch

    @property
    def epoch(self) -> int:
        """Completed passes over the training data."""
        return self.nimg // self.images_per_epoch

    def phase(self) -> tuple[int, float]:
        return schedule(self.nimg, self.cfg.levels, self.cfg.fade_images, self.cfg.stable_images,
                        self.cfg.phase_images)

    def _batch_indices(self) -> torch.Tensor:
        epoch, pos = divmod(self.nimg, self.images_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._epoch_order(len(self.bank), epoch, self.cfg.seed))
        return self._order[1][pos:pos + self.cfg.batch][self._shard]

    def real_batch(self, level: int, alpha: float) -> torch.Tensor:
        real = self.bank.batch(self._batch_indices(), self.cfg.resolution(level))
        if level > 0 and alpha < 1.0:
            # Fade reals the same way as fakes, so D never sees detail the generator cannot make yet.
            real = torch.lerp(upsample2(F.avg_pool2d(real, 2)), real, alpha)
        return real

    def real_labels(self) -> torch.Tensor:
        """Labels of the current real batch (the same indices as real_batch)."""
        return self.bank.labels.index_select(0, self._batch_indices().to(self.bank.labels.device))

    def _randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise for this rank's shard of the global batch: every rank draws the whole global batch from the shared
        RNG and keeps its rows, so the stream does not depend on the process count."""
        if self.dist is None:
            return torch.randn(x.shape, generator=self.rng, device=self.device)
        return torch.randn((self.cfg.batch, *x.shape[1:]), generator=self.rng, device=self.device)[self._shard]

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """DiffAugment with per-sample parameters from the trainer's RNG (so resume repeats them), drawn for the
        whole global batch with this rank keeping its rows, as for the noise: ranks do not share parameters. With
        no policy nothing is drawn, so the default path consumes exactly the random numbers it always did."""
        if not self.cfg.augment:
            return x
        p = augment.sample_params(self.cfg.augment, self.cfg.batch, x.shape[2], self.rng, x.device)
        return augment.apply(x, {k: v[self._shard] for k, v in p.items()})

    def _wrapped(self, level: int, alpha: float) -> tuple[torch.nn.Module, torch.nn.Module]:
        """G and D for the training forwards: the plain networks in one process, else DDP over the parameters
        active in this phase, rebuilt when the phase changes (see progan.distributed)."""
        if self.dist is None:
            return self.G, self.D
        key = (level, level > 0 and alpha < 1.0)
        if self._ddp is None or self._ddp[0] != key:
            from progan.distributed import wrap

            self._ddp = None  # free the old reducers first
            self._ddp = (key, wrap(self.G, self.dist, *key), wrap(self.D, self.dist, *key))
        return self._ddp[1], self._ddp[2]

    # --- one round -----------------------------------------------------------------------------------------------
    def set_progress(self, progress: float) -> None:
        """Tell the trainer how far through its run it is (0..1), for cfg.lr_rampdown; a no-op without it. Not part
        of the checkpoint: the driver recomputes it from images shown or time, so a resumed run continues the ramp."""
        if self.cfg.lr_rampdown <= 0:
            return
        f = lr_factor(progress, self.cfg.lr_rampdown)
        for opt, lr in ((self.opt_g, self.cfg.lr_g), (self.opt_d, self.cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * f

    def step(self) -> None:
        cfg = self.cfg
        level, alpha = self.phase()
        real = self.real_batch(level, alpha)
        # Conditional: fakes get the real batch's labels, so G's labels follow the data's label distribution.
        y = self.real_labels() if cfg.condition else None
        z = latent.random(cfg.batch, cfg.latent_dim, generator=self.rng, device=self.device)
        G, D = self._wrapped(level, alpha)
        if self.dist is not None:
            z = z[self._shard]

        # Generator step: no noise, so G gets clean gradients (the seed's choice). D runs unwrapped here (self.D): its
        # weights take no gradient, so under DDP this backward must not start a D gradient sync.
        self.D.requires_grad_(False)
        with self.autocast, diversity_on_blocks(self.G, cfg.diversity if cfg.diversity_layers == "all" else 0.0):
            fake = G(z, level, alpha, labels=y).float()
        add_diversity(fake, cfg.diversity)
        with self.autocast:
            g_out = self.D(self.augment(fake), level, alpha, labels=y).float()
            g_loss = -g_out.mean() if cfg.loss == "hinge" else F.softplus(-g_out).mean()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        self.D.requires_grad_(True)

        # Discriminator step on the same fakes, with epsilon noise on reals and fakes alike.
        fake = fake.detach()
        eps = self.noise.eps
        real_n = real + eps * self._randn_like(real)
        fake_n = fake + eps * self._randn_like(fake)
        # Lazy R1 (StyleGAN2): every r1_every steps, penalise D's gradient at the reals it sees, scaled up by
        # r1_every so the average strength is gamma. It keeps D from overpowering G at higher resolutions.
        r1_step = cfg.r1_gamma > 0 and self.steps % cfg.r1_every == 0
        real_n.requires_grad_(r1_step)
        with self.autocast, r1_eager(self.compiled and r1_step):
            # DiffAugment acts on what D is shown, the noisy images. R1 is the gradient at the un-augmented reals
            # through the (differentiable) augmentation, as in the reference DiffAugment-stylegan2.
            d_real = D(self.augment(real_n), level, alpha, labels=y).float()
            d_fake = D(self.augment(fake_n), level, alpha, labels=y).float()
        if cfg.loss == "hinge":
            d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        else:
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        if r1_step:
            d_loss = d_loss + r1_penalty(d_real, real_n) * (cfg.r1_gamma / 2 * cfg.r1_every)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        with torch.no_grad():
            rr, rf = torch.sigmoid(d_real).mean(), torch.sigmoid(d_fake).mean()
            if self.dist is not None:
                # The ratings of the whole global batch, so every rank's noise controller picks the same epsilon.
                rr, rf = self.dist.all_reduce_mean_(torch.stack([rr, rf])).unbind()
            self._acc += torch.stack([g_loss.detach(), d_loss.detach(), rr, rf, eps])
            self._acc_n += 1
            self.noise.update(rr, rf)
            self.nimg += cfg.batch
            self.steps += 1
            beta = ema_beta(cfg.batch, self.nimg, cfg.ema_half_life, cfg.ema_rampup)
            torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1.0 - beta)

    def read_stats(self) -> StepStats | None:
        """Means since the last call; the one host sync of the loop."""
        if not self._acc_n:
            return None
        if self.dist is not None:
            self.dist.all_reduce_mean_(self._acc)  # losses averaged over ranks (ratings and epsilon already agree)
        v = (self._acc / self._acc_n).tolist()
        self._acc.zero_()
        self._acc_n = 0
        return StepStats(*v)

    def finite(self) -> bool:
        """True when all weights are finite (checked at checkpoints, not every step)."""
        return all(bool(torch.isfinite(p).all()) for m in (self.G, self.D) for p in m.parameters())

    @torch.no_grad()
    def render_fixed(self, ema: bool = True) -> torch.Tensor:
        """The fixed latents through the (EMA) generator at the current level and alpha, in [-1, 1]."""
        level, alpha = self.phase()
        g = self.G_ema if ema else self.G
        return g(self.fixed_z, level, alpha, labels=self.fixed_labels)

    # --- checkpoint state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        labels = {} if self.fixed_labels is None else {"fixed_labels": self.fixed_labels.cpu()}
        return {
            "config": self.cfg.to_dict(),
            "nimg": self.nimg,
            "steps": self.steps,
            "epoch": self.epoch,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "eps": self.noise.eps.detach().cpu(),
            "rng": self.rng.get_state(),
            "fixed_z": self.fixed_z.cpu(),
            "train_seconds": float(self.train_seconds),
            **labels,
        }

    def load_state_dict(self, s: dict) -> None:
        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        self.G_ema.load_state_dict(s["G_ema"])
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_d.load_state_dict(s["opt_d"])
        self.noise.eps = s["eps"].to(self.device)
        self.rng.set_state(s["rng"])
        self.fixed_z = s["fixed_z"].to(self.device)
        if self.cfg.condition:
            self.fixed_labels = s["fixed_labels"].to(self.device)
        self.nimg, self.steps = int(s["nimg"]), int(s["steps"])
        self.train_seconds = float(s.get("train_seconds", 0.0))  # absent in checkpoints of older versions
        self._order = None
