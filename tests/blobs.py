"""Tiny test images shared by the CLI tests: smooth colour blobs, so a GAN has something learnable."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_blob_images(folder: Path, n: int, size: int, seed: int = 0, ext: str = "png") -> Path:
    """n images of a few soft colour blobs on black, face000.<ext> ..."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(3):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 5, size / 2)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"face{i:03d}.{ext}", quality=92)
    return folder


def n_training(n: int, ext: str, fraction: float | None = None) -> int:
    """How many of write_blob_images' n files `progan train` trains on: the rest are held out (by name hash)."""
    from progan.config import TrainConfig
    from progan.facedata import holdout_mask

    fraction = TrainConfig().holdout if fraction is None else fraction
    return int((~holdout_mask([f"face{i:03d}.{ext}" for i in range(n)], fraction)).sum())
