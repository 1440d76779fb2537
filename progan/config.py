"""TrainConfig: the one place where training defaults live, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from progan.errors import ProganError

# Options that may change when a run is resumed: they steer the loop, not the networks or the data order.
RESUMABLE_CHANGES = frozenset({"epochs", "video_every", "log_every", "keep", "eval_every", "eval_n"})

LOSSES = ("ns", "hinge")
DIVERSITY_LAYERS = ("last", "all")
AUGMENT_OPS = ("color", "translation", "cutout")   # DiffAugment ops (progan/augment.py), in the order applied


def parse_augment(policy: str) -> tuple[str, ...]:
    """'translation, color' -> ('color', 'translation'): known ops only, no duplicates, in application order."""
    names = [t.strip().lower() for t in policy.split(",") if t.strip()]
    for name in names:
        if name not in AUGMENT_OPS:
            raise ProganError(f"unknown --augment op '{name}' (choose from {', '.join(AUGMENT_OPS)})")
    return tuple(op for op in AUGMENT_OPS if op in names)


def split_size(size: int, base: int | None = None) -> tuple[int, int]:
    """Return (base, levels) with size == base * 2**(levels-1).

    Without an explicit base, halve while the result stays >= 4, so 64 -> 4, 160 -> 5, 48 -> 6.
    """
    if size < 4:
        raise ProganError(f"--size {size} is too small (at least 4 px)")
    if base is None:
        base = size
        while base % 2 == 0 and base // 2 >= 4:
            base //= 2
        if base > 8:
            raise ProganError(
                f"--size {size} is not base*2^k with a small base (<= 8); try 32, 64, 128, 160 or 256"
            )
    if base < 2 or base > size:
        raise ProganError(f"base resolution {base} must be between 2 and --size {size}")
    levels = 1
    while base * 2 ** (levels - 1) < size:
        levels += 1
    if base * 2 ** (levels - 1) != size:
        raise ProganError(f"--size {size} is not {base}*2^k")
    return base, levels


def default_channels(levels: int, top: int, floor: int) -> tuple[int, ...]:
    """Channels per level: `top` at the two smallest resolutions, then halved per level, never below floor.

    Shrinking with resolution keeps the cost per level roughly flat, which is what makes CPU training practical.
    """
    return tuple(max(floor, top >> max(0, k - 1)) for k in range(levels))


@dataclass(frozen=True)
class TrainConfig:
    # data and architecture
    size: int = 64                      # final resolution
    base: int = 0                       # smallest resolution; 0 = derived from size
    latent_dim: int = 100               # the seed's latent dimension
    g_channels: tuple[int, ...] = ()    # per level; () = default schedule
    d_channels: tuple[int, ...] = ()
    inject_channels: int = 16           # latent features repeated at every pixel (plus 2 xy channels)
    pixel_norm: bool = True             # ProGAN pixel norm after generator convolutions
    eq_lr: bool = True                  # ProGAN equalised learning rate (weights scaled at run time)
    mbstd: bool = True                  # minibatch standard deviation channel in D's last block

    # conditional training (progan/labels.py): () = unconditional; any of age, gender, race; or ("folders",)
    condition: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()       # folder class names, sorted (filled from the data for "folders")
    age_range: tuple[int, ...] = ()     # (youngest, oldest) training age (filled from the data for "age")
    label_dim: int = 16                 # label embedding channels joined to the injected block

    # progressive schedule, in images shown
    fade_images: int = 24_000
    stable_images: int = 24_000
    phase_images: tuple[int, ...] = ()  # per level, images of its fade-in and of its stable phase; 0 or () = the two above

    # optimisation
    batch: int = 32
    lr_g: float = 1e-3
    lr_d: float = 1e-3
    beta1: float = 0.0
    beta2: float = 0.99
    ema_half_life: int = 10_000         # images; EMA generator for videos and sampling
    ema_rampup: float = 0.05            # half-life is at most this fraction of images shown (early EMA follows G)
    lr_rampdown: float = 0.0            # last fraction of the run over which both rates fall to 0 (cosine); 0 = constant

    # the seed's training tricks
    diversity: float = 1.0              # diversity-gradient strength; 0 turns it off
    noise_high: float = 0.95            # raise epsilon when D(real) - D(fake) rating gap is above this
    noise_low: float = 0.5              # lower it when the gap is below this
    noise_step: float = 0.001           # per step, as in the seed
    noise_max: float = 0.5              # ceiling for epsilon (not in the seed)
    r1_gamma: float = 1.0               # lazy R1 gradient penalty on reals; 0 = off (not in the seed)
    r1_every: int = 16

    # levers (issue #11), all off by default: the default configuration trains exactly as before
    augment: str = ""                   # DiffAugment policy for D's inputs: comma list of color, translation, cutout
    loss: str = "ns"                    # "ns" (non-saturating logistic) or "hinge"
    diversity_layers: str = "last"      # "last": final image only (the seed); "all": also every UpConv output

    # run control
    epochs: int = 20
    seed: int = 0
    video_every: int = 20               # steps between training-video frames
    log_every: int = 25                 # steps between log.jsonl lines (the only host syncs in the loop)
    keep: int = 0                       # checkpoints kept; 0 = all

    # held-out data and evaluation during training
    holdout: float = 0.03               # fraction of images never trained on (split by file-name hash)
    eval_every: float = 0.0             # epochs between FID/SWD evaluations against the held-out images; 0 = off
    eval_n: int = 5000                  # generated images per evaluation (real: min(eval_n, held-out images))

    def __post_init__(self) -> None:
        base, levels = split_size(self.size, self.base or None)
        object.__setattr__(self, "base", base)
        if not self.g_channels:
            object.__setattr__(self, "g_channels", default_channels(levels, 128, 16))
        if not self.d_channels:
            object.__setattr__(self, "d_channels", default_channels(levels, 128, 16))
        object.__setattr__(self, "g_channels", tuple(int(c) for c in self.g_channels))
        object.__setattr__(self, "d_channels", tuple(int(c) for c in self.d_channels))
        for name in ("g_channels", "d_channels"):
            if len(getattr(self, name)) != levels:
                raise ProganError(f"{name} needs {levels} entries for --size {self.size}")
        object.__setattr__(self, "phase_images", tuple(int(p) for p in self.phase_images))
        if self.phase_images and (len(self.phase_images) != levels or min(self.phase_images) < 0):
            raise ProganError(f"--phase-images needs {levels} entries >= 0 for --size {self.size} (0 = --fade-images/"
                              f"--stable-images), got {','.join(map(str, self.phase_images))}")
        if self.batch < 2:
            raise ProganError("--batch must be at least 2 (diversity learning pairs samples)")
        if self.diversity < 0:
            raise ProganError("--diversity must be >= 0")
        if self.epochs < 1 or self.video_every < 1 or self.log_every < 1:
            raise ProganError("--epochs, --video-every and --log-every must be positive")
        if not 0.0 <= self.holdout < 1.0:
            raise ProganError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.eval_every < 0:
            raise ProganError(f"--eval-every must be >= 0 (0 = off), got {self.eval_every}")
        if self.eval_n < 2:
            raise ProganError(f"--eval-n must be at least 2, got {self.eval_n}")
        object.__setattr__(self, "condition", tuple(str(c) for c in self.condition))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "age_range", tuple(int(a) for a in self.age_range))
        if self.condition or self.classes or self.age_range:
            from progan.labels import check_config

            check_config(self)
        object.__setattr__(self, "augment", ",".join(parse_augment(self.augment)))
        if self.loss not in LOSSES:
            raise ProganError(f"unknown --loss '{self.loss}' (choose from {', '.join(LOSSES)})")
        if self.diversity_layers not in DIVERSITY_LAYERS:
            raise ProganError(f"unknown --diversity-layers '{self.diversity_layers}' "
                              f"(choose from {', '.join(DIVERSITY_LAYERS)})")
        if self.noise_step < 0 or self.noise_max < 0:
            raise ProganError("--noise-step and --noise-max must be >= 0 (--noise-step 0 turns noise control off)")
        if self.noise_low > self.noise_high:
            raise ProganError(f"--noise-low ({self.noise_low}) must not be above --noise-high ({self.noise_high})")
        if self.r1_gamma < 0 or self.r1_every < 1:
            raise ProganError("--r1-gamma must be >= 0 and r1_every >= 1")
        if not 0 <= self.lr_rampdown <= 1:
            raise ProganError(f"--lr-rampdown must be in [0, 1] (a fraction of the run), got {self.lr_rampdown}")

    @property
    def levels(self) -> int:
        return len(self.g_channels)

    def resolution(self, level: int) -> int:
        return self.base * 2 ** level

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ProganError(f"unknown config keys {sorted(unknown)} (saved by a newer progan?)")
        if "holdout" not in d:
            # saved before held-out splits existed: that run trained on every image
            d = {**d, "holdout": 0.0}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ProganError(f"cannot read config {path}: {e}") from None

    def differences(self, other: "TrainConfig") -> list[str]:
        """Names of fields whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]


# Every option a user can set on the command line maps to a field above; presets are named partial configs.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The built-in stacked-digits set: 32 px, short phases, so a first run shows digits within minutes on a CPU.
    "digits": dict(size=32, fade_images=4_000, stable_images=4_000, epochs=4, video_every=10),
    # The seed report's own settings: G 128 channels at every level, D 32, batch 16, 20 -> 40 -> 80 -> 160 px
    # (its code builds a 20 px base and first shows 40 px),
    # no pixel norm or minibatch-stddev, Adam as in its gantrain.py.
    "seed2019": dict(
        size=160, base=20, g_channels=(128,) * 4, d_channels=(32,) * 4, batch=16,
        pixel_norm=False, mbstd=False, eq_lr=False, r1_gamma=0.0, noise_max=1e9,
        lr_g=1e-4, lr_d=1e-3, beta1=0.5, beta2=0.999, diversity=1.0,
    ),
    # A 2-core laptop at 64 px. Half the default channels: measured on one thread (tiny random data, stable phase,
    # img/s per resolution 4/8/16/32/64 px) default 647/158/64/28/17 vs this 1383/429/181/87/30, i.e. 2-3x faster
    # at 8-32 px; batch 16 was no faster overall (995/387/176/91/36). Phases of 16k images instead of 24k: 64 px is
    # reached after ~19 min of training at those rates instead of ~70 min. 4 and 8 px pass in 4k and 8k-image
    # phases: a face at 8 px is a few blobs of colour (8 px snapshots scored FID 438-455 against the 64 px held-out
    # faces, more than DCGAN after one minute), so 16 px starts after ~30 s instead of ~75 s (README, "The first 10
    # minutes"). No equalised learning rate (as the seed): Adam's steps are then ~40x larger relative to the
    # weights, which at these short CPU budgets gave a far lower FID (32 px ablation: 153 vs 240 at 60k images;
    # 64 px: 164 vs 252 after 10 minutes; with the short 4/8 px phases, 45-minute race: 113 vs 146) at the cost of
    # about twice the EMA video's colour flicker (README, "Choosing the defaults"). R1 gamma 0.1 instead of 1 (closer
    # to StyleGAN2-ADA's heuristic 0.0002 * res^2 / batch = 0.026 at 64 px, batch 32) with 8k-image phases at 16 px
    # (32 px fades in from 36k images instead of 52k): 50-80 lower FID at 32 px on one seed, lower at two of three
    # counts on another; lower FID than DCGAN at every minute of a same-run 10-minute race and at all 21 minutes
    # scored of a same-run hour, 75.7 vs 112.7 at 60 minutes (README, "A weaker R1 penalty"). Hinge loss since
    # session 22: in a bf16 hour (seed 1) lower FID than the ns-loss hour at 56 of 60 minutes with 0.93x the images
    # (50.2 vs 57.3 at 60 minutes; mean over minutes 31-60 58.3 vs 66.8), the same SWD on average (23.4 vs 23.0), and
    # below DCGAN's FID at every minute (README, "Hinge loss for a full hour").
    "cpu64": dict(size=64, g_channels=(64, 64, 32, 16, 16), d_channels=(64, 64, 32, 16, 16),
                  fade_images=16_000, stable_images=16_000, phase_images=(4_000, 8_000, 8_000, 0, 0), eq_lr=False,
                  r1_gamma=0.1, loss="hinge"),
    # One GPU at 128 px (train with --precision bf16, the CUDA default): batch 64 keeps the GPU busy where the
    # small default nets are launch-bound; Adam's rates scaled by sqrt(2) for the doubled batch; twice the channels
    # with a floor of 32 (a GPU can afford them; the default's 16 at 64-128 px exists for CPU speed).
    "gpu128": dict(size=128, batch=64, lr_g=1.4e-3, lr_d=1.4e-3, g_channels=(256, 256, 128, 64, 32, 32),
                   d_channels=(256, 256, 128, 64, 32, 32)),
    # One GPU at 64 px, e.g. the 3-minute GPU race against DCGAN-64 (tools/race.py --preset gpu64): batch 128 as
    # DCGAN's, so a launch-bound step carries 4x the images; Adam's rates scaled by sqrt(4) = 2 from the default's 1e-3
    # at batch 32; gpu128's channel schedule cut to 64 px; phases of 50k images (64 px from 350k images, under a
    # minute on an H100); EMA half-life 20k images (StyleGAN2-ADA's 10 kimg per 32 of batch, halved for short runs).
    "gpu64": dict(size=64, batch=128, lr_g=2e-3, lr_d=2e-3, g_channels=(256, 256, 128, 64, 32),
                  d_channels=(256, 256, 128, 64, 32), fade_images=50_000, stable_images=50_000,
                  ema_half_life=20_000, epochs=100),
    # A few hundred to a few thousand images: DiffAugment with all three ops (the setting Zhao et al. use for
    # 100-shot and 1k-image sets), R1 gamma 4 instead of 1 (a D that sees few images overfits them), and 500 epochs
    # (1,000 images x 500 = 500k images shown, enough for the whole 64 px schedule; give fewer images more epochs).
    "small": dict(augment="color,translation,cutout", r1_gamma=4.0, epochs=500),
}


def auto_preset(device_type: str, size: int | None) -> str:
    """The preset `progan train` uses when none is named: the configuration measured best for the machine (README,
    "Choosing the defaults"): cpu64 on a CPU at 64 px, gpu64 / gpu128 on a GPU at 64 / 128 px, else the plain default.
    size None means the default size (64)."""
    size = size or TrainConfig.__dataclass_fields__["size"].default
    if device_type == "cuda":
        return {64: "gpu64", 128: "gpu128"}.get(size, "default")
    return "cpu64" if size == 64 else "default"
