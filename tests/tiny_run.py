"""A tiny randomly initialised run, written with the project's own checkpoint API (no training needed)."""

from pathlib import Path

import torch

from progan import checkpoint
from progan.config import TrainConfig
from progan.generate import FaceGenerator
from progan.networks import Discriminator, Generator


def tiny_config(**kw) -> TrainConfig:
    base = dict(size=16, latent_dim=16, inject_channels=4, g_channels=(16, 16, 8), d_channels=(16, 16, 8))
    return TrainConfig(**{**base, **kw})


def tiny_generator(seed: int = 0, **kw) -> tuple[FaceGenerator, Discriminator]:
    cfg = tiny_config(**kw)
    torch.manual_seed(seed)
    G, D = Generator(cfg), Discriminator(cfg)
    return FaceGenerator(G, cfg, cfg.levels - 1, 1.0, 0, 0), D.eval().requires_grad_(False)


def write_tiny_run(run_dir: Path, seed: int = 0) -> Path:
    """run_dir/checkpoints/epoch-0001.pt holding G, G_ema and D of a tiny config, saved past the last fade-in."""
    gen, D = tiny_generator(seed)
    sd = {k: v.clone() for k, v in gen.G.state_dict().items()}
    state = {"config": gen.config.to_dict(), "G": sd, "G_ema": sd, "D": D.state_dict(), "nimg": 10**9, "epoch": 1}
    return checkpoint.save(state, Path(run_dir) / "checkpoints", checkpoint.checkpoint_name(1))
