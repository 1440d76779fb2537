"""A digit classifier for one channel of the built-in stacked-digits set, and the Stacked-MNIST mode metrics.

The stacked-digits images (facedata.stacked_digits) hold three scikit-learn 8x8 digits, upsampled to S x S, in the
R, G and B channels, so every image is one of 1000 classes d_R*100 + d_G*10 + d_B. Counting how many of the 1000
classes a generator produces, and how far its class histogram is from uniform, is the Stacked-MNIST mode-coverage
protocol (Metz et al. 2017; Srivastava et al. 2017, VEEGAN; Lin et al. 2018, PacGAN): classify each channel of each
generated image, count the distinct 3-digit labels (modes covered, of 1000) and report KL(p_generated || uniform).

The classifier sees exactly what the GAN sees: its training channels are channels of stacked_digits images (the
same upsampling code path), not a re-implementation of it. Each channel is area-reduced to 8x8 (the information the
source digits have; for generated images it also averages away pixel noise) and classified by an RBF support vector
machine trained on the de-duplicated training channels plus shifted / rescaled / noisy copies of them, so that the
imperfect digits a GAN draws are still read as digits.

Held-out accuracy is measured two ways: on fresh stacked_digits images made with another seed (what the benchmark's
"real data" reference row sees) and on source digits the classifier never saw. The source split is decided by a hash
of each source digit's 8x8 pixels (found by drawing the same images at size 8, where channels are the raw digits), so
identical source digits always land on the same side of the split and nothing leaks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

N_MODES = 1000
FEATURE_SIDE = 8


# --------------------------------------------------------------------------- labels


def channel_labels(codes: np.ndarray) -> np.ndarray:
    """3-digit labels d_R*100 + d_G*10 + d_B -> int64 N x 3 per-channel digits (R, G, B)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= N_MODES):
        raise ValueError(f"stacked-digit labels must be in 0..{N_MODES - 1}")
    return np.stack([codes // 100, (codes // 10) % 10, codes % 10], axis=-1)


def codes_from_channels(digits: np.ndarray) -> np.ndarray:
    """int N x 3 per-channel digits -> int64 3-digit labels d_R*100 + d_G*10 + d_B."""
    digits = np.asarray(digits, dtype=np.int64)
    return digits[..., 0] * 100 + digits[..., 1] * 10 + digits[..., 2]


def split_channels(images: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 -> N*3 x H x W single channels, ordered image by image (R, G, B)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected N x H x W x 3 images, got shape {images.shape}")
    n, h, w, _ = images.shape
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n * 3, h, w)


# --------------------------------------------------------------------------- metrics


def mode_stats(codes: np.ndarray, n_modes: int = N_MODES) -> dict[str, Any]:
    """Modes covered (distinct labels) and KL(p || uniform over n_modes) in nats, from predicted labels.

    KL = sum_k p_k log(p_k * n_modes) = log(n_modes) - H(p): 0 when all modes are equally frequent, log(n_modes)
    when every sample has the same label.
    """
    codes = np.asarray(codes, dtype=np.int64).ravel()
    if codes.size == 0:
        raise ValueError("no predictions to count")
    if codes.min() < 0 or codes.max() >= n_modes:
        raise ValueError(f"labels must be in 0..{n_modes - 1}")
    counts = np.bincount(codes, minlength=n_modes)
    p = counts[counts > 0] / codes.size
    kl = float(np.sum(p * np.log(p * n_modes)))
    return {"modes": int((counts > 0).sum()), "kl": max(0.0, kl), "n": int(codes.size)}


# --------------------------------------------------------------------------- features and augmentation


def features(channels: np.ndarray) -> np.ndarray:
    """N x H x W uint8 (or float 0..255) channels -> float32 N x 64 in [0, 1]: area-resized to 8 x 8."""
    import torch
    import torch.nn.functional as F

    x = np.asarray(channels, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected N x H x W channels, got shape {x.shape}")
    n, h, w = x.shape
    if h % FEATURE_SIDE == 0 and w % FEATURE_SIDE == 0:
        kh, kw = h // FEATURE_SIDE, w // FEATURE_SIDE
        out = x.reshape(n, FEATURE_SIDE, kh, FEATURE_SIDE, kw).mean(axis=(2, 4))
    else:  # any other resolution (e.g. a run saved before it reached full size): area pooling / replication
        with torch.no_grad():
            out = F.adaptive_avg_pool2d(torch.from_numpy(x)[:, None], FEATURE_SIDE)[:, 0].numpy()
    return (out.reshape(n, FEATURE_SIDE * FEATURE_SIDE) / 255.0).astype(np.float32)


def augment(channels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Imperfect copies of N x S x S channels, as float32 0..255: a shift of up to S/16 px (half a source pixel),
    contrast x0.7..1.2 and Gaussian pixel noise (sigma 20)."""
    x = np.asarray(channels, dtype=np.float32)
    n, s = x.shape[0], x.shape[1]
    reach = max(1, s // 16)
    out = np.empty_like(x)
    shifts = rng.integers(-reach, reach + 1, size=(n, 2))
    for i in range(n):
        out[i] = np.roll(x[i], (int(shifts[i, 0]), int(shifts[i, 1])), axis=(0, 1))
    out *= rng.uniform(0.7, 1.2, size=(n, 1, 1)).astype(np.float32)
    out += rng.normal(0.0, 20.0, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 255.0)


# --------------------------------------------------------------------------- stacked-digits channels with sources


@dataclass
class Channels:
    """Single channels of stacked_digits images with their digit and a hash of their source 8x8 digit."""

    pixels: np.ndarray  # uint8 M x S x S, M = 3 * n (image by image, R G B)
    digits: np.ndarray  # int64 M
    source: np.ndarray  # uint64 M: hash of the source digit's 8x8 pixels (equal pixels -> equal hash)
    n_images: int


def _hash_u64(block: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(block, digest_size=8).digest(), "little")


def stacked_channels(n: int, size: int, seed: int) -> Channels:
    """Channels of stacked_digits(n, size, seed) with per-channel labels and source hashes.

    The same (n, seed) at size 8 draws the same source digits, and at size 8 a channel is the raw digit, so its bytes
    identify the source digit without touching stacked_digits' internals.
    """
    from progan.facedata import stacked_digits

    data = stacked_digits(n, size, seed)
    raw = stacked_digits(n, 8, seed) if size != 8 else data
    codes = data.labels["digits"]
    if not np.array_equal(codes, raw.labels["digits"]):  # the size-8 twin must be the same draw
        raise RuntimeError("stacked_digits draws different digits at different sizes; cannot identify sources")
    raw_ch = split_channels(raw.images)
    source = np.fromiter((_hash_u64(c.tobytes()) for c in raw_ch), dtype=np.uint64, count=len(raw_ch))
    return Channels(split_channels(data.images), channel_labels(codes).reshape(-1), source, n)


def heldout_mask(source: np.ndarray, fraction: float, split_seed: int = 0) -> np.ndarray:
    """True for channels whose source digit is in the held-out split (about `fraction` of the source digits)."""
    salt = np.uint64(_hash_u64(f"split-{split_seed}".encode()))
    mixed = np.asarray(source, dtype=np.uint64) ^ salt
    # splitmix64 finaliser: a well-spread 64-bit value per source, then its top 53 bits as a fraction
    with np.errstate(over="ignore"):
        z = mixed + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction


# --------------------------------------------------------------------------- the classifier


@dataclass
class DigitClassifier:
    """Reads the digit in one channel of a stacked-digits image (any resolution; it is area-reduced to 8x8)."""

    model: Any  # a fitted scikit-learn classifier on features()
    size: int  # the channel resolution it was trained at
    report: dict[str, Any] = field(default_factory=dict)

    def predict_channels(self, channels: np.ndarray, batch: int = 8192) -> np.ndarray:
        """N x H x W channels -> int64 N digits."""
        channels = np.asarray(channels)
        out = np.empty(len(channels), dtype=np.int64)
        for i in range(0, len(channels), batch):
            out[i:i + batch] = self.model.predict(features(channels[i:i + batch]))
        return out

    def predict_digits(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 images -> int64 N x 3 digits (R, G, B)."""
        images = np.asarray(images)
        return self.predict_channels(split_channels(images)).reshape(len(images), 3)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 images -> int64 N 3-digit labels d_R*100 + d_G*10 + d_B."""
        return codes_from_channels(self.predict_digits(images))


def _accuracy(right: np.ndarray) -> float:
    return float(np.mean(right)) if right.size else float("nan")


def train_classifier(size: int = 32, n_train: int = 3000, train_seed: int = 101, n_eval: int = 10000,
                     eval_seed: int = 202, heldout_fraction: float = 0.2, split_seed: int = 0, augment_copies: int = 2,
                     C: float = 10.0, seed: int = 0) -> DigitClassifier:
    """Fit the channel classifier on channels of stacked_digits(n_train, size, train_seed) whose source digit is not
    held out, and measure it on stacked_digits(n_eval, size, eval_seed). `report` holds the accuracies:

    - fresh_images: all channels of the eval images (single-channel, per R/G/B, and 3-digit = all three right);
    - heldout_sources: eval channels whose source digit was held out of training (single-channel, and 3-digit on
      held-out channels grouped in threes, which is exactly a stacked image of three unseen digits to a per-channel
      classifier), plus the single-channel accuracy on augmented (shifted, rescaled, noisy) copies of them.
    """
    import time

    from sklearn.svm import SVC

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    train = stacked_channels(n_train, size, train_seed)
    keep = ~heldout_mask(train.source, heldout_fraction, split_seed)
    # repeats of a source digit are identical pixels: keep one of each, then add augmented copies
    _, first = np.unique(train.source[keep], return_index=True)
    pix, y = train.pixels[keep][first], train.digits[keep][first]
    if len(np.unique(y)) < 10:
        raise ValueError(f"n_train={n_train} is too small: not every digit is in the training channels")
    xs, ys = [features(pix)], [y]
    for _ in range(augment_copies):
        xs.append(features(augment(pix, rng)))
        ys.append(y)
    model = SVC(C=C, gamma="scale")
    model.fit(np.concatenate(xs), np.concatenate(ys))
    clf = DigitClassifier(model=model, size=size)
    fit_s = time.perf_counter() - t0

    ev = stacked_channels(n_eval, size, eval_seed)
    pred = clf.predict_channels(ev.pixels)
    right = (pred == ev.digits).reshape(n_eval, 3)
    held = heldout_mask(ev.source, heldout_fraction, split_seed)
    held_right = (pred == ev.digits)[held]
    m = (len(held_right) // 3) * 3
    noisy = clf.predict_channels(augment(ev.pixels[held], np.random.default_rng(seed + 1)))
    clf.report = {
        "model": f"RBF SVM (C={C}) on 8x8 area-reduced channels, {augment_copies} augmented copies per source digit",
        "size": size,
        "train": {"n_images": n_train, "seed": train_seed, "unique_source_digits": int(len(y)),
                  "samples": int(sum(len(a) for a in ys)), "fit_seconds": round(fit_s, 2)},
        "heldout_fraction": heldout_fraction,
        "fresh_images": {
            "n_images": n_eval, "seed": eval_seed,
            "channel_acc": _accuracy(right),
            "channel_acc_rgb": [_accuracy(right[:, c]) for c in range(3)],
            "three_digit_acc": _accuracy(right.all(axis=1)),
            # the mode metrics of real data: the predicted labels, and the true ones (finite-sample floor of KL)
            "predicted": mode_stats(codes_from_channels(pred.reshape(n_eval, 3))),
            "true": mode_stats(codes_from_channels(ev.digits.reshape(n_eval, 3))),
        },
        "heldout_sources": {
            "n_channels": int(held.sum()),
            "unique_source_digits": int(len(np.unique(ev.source[held]))),
            "channel_acc": _accuracy(held_right),
            "three_digit_acc": _accuracy(held_right[:m].reshape(-1, 3).all(axis=1)),
            "channel_acc_augmented": _accuracy(noisy == ev.digits[held]),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return clf


def summarise(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1; 0.0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
