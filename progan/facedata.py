"""Face image folders -> one uint8 array, cached on disk, plus the in-training image bank.

Decoding a folder of JPEGs is the slow part of starting a run, so it happens once: every image is
centre-cropped and resized to S x S, the result is stored as an .npy next to a small .json with names and
labels, and later runs on the same (unchanged) folder just memory-map it. During training the whole set
lives on the device (`ImageBank`), so the training loop never touches Pillow or the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from progan.errors import ProganError

if TYPE_CHECKING:  # torch is imported lazily so decoding workers start fast
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Bump when decoding changes, so old caches are not reused with different pixels.
_CACHE_FORMAT = "progan-facedata-v1"

_UTK_RE = re.compile(r"^(\d{1,3})_(\d+)_(\d+)_")


class TooSmallError(ProganError):
    """The image's largest centred square is smaller than the requested size (and upscaling is off)."""

    def __init__(self, path: str | Path, width: int, height: int, size: int) -> None:
        super().__init__(f"{path}: {width}x{height} is smaller than {size}x{size}")
        self.width = width
        self.height = height
        self.size = size


@dataclass
class FaceData:
    images: np.ndarray  # uint8 N x S x S x 3 (possibly memory-mapped, read-only)
    names: list[str]  # relative posix paths, sorted
    labels: dict[str, np.ndarray]  # int64 arrays of length N, -1 where unknown
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    root: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------- scanning / names


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan(root: str | Path) -> list[Path]:
    """All image files under `root` (recursive), sorted by relative posix path; hidden files/dirs skipped."""
    root = Path(root).expanduser()
    if not root.exists():
        raise ProganError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ProganError(f"not a folder: {root}")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place so os.walk never descends into .git, .cache, ...
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for name in filenames:
            if _is_image_name(name):
                path = base / name
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise ProganError(f"no images (jpg/jpeg/png/webp/bmp) found in {root}")
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """(age, gender, race) from a UTKFace file name like '26_1_2_2017...jpg.chip.jpg', else None."""
    base = re.split(r"[\\/]", name)[-1]
    m = _UTK_RE.match(base)
    if m is None:
        return None
    age, gender, race = (int(g) for g in m.groups())
    if not (0 <= age <= 130 and gender in (0, 1) and 0 <= race <= 4):
        return None
    return age, gender, race


# --------------------------------------------------------------------------- decoding one image


def _to_rgb(img):  # PIL.Image.Image -> RGB PIL.Image.Image
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: Pillow's convert("RGB") would clip at 255, so rescale 0..65535 -> 0..255 ourselves.
        a = np.asarray(img).astype(np.float64)
        a = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "F":
        a = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 255)).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode == "PA":
        # going through RGBA avoids Pillow's palette-transparency warning/mishandling
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: Path, size: int, allow_upscale: bool = False) -> np.ndarray:
    """Decode one image file to uint8 size x size x 3: EXIF-rotate, centre-crop the largest square, Lanczos-resize.

    Raises TooSmallError if the square is smaller than `size` and not `allow_upscale`; Pillow's
    exceptions (unidentified, truncated, ...) propagate.
    """
    from PIL import Image, ImageOps

    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    with Image.open(path) as img:
        w, h = img.size
        if min(w, h) < size and not allow_upscale:
            # checked on the header alone, so too-small files cost no decode
            raise TooSmallError(path, w, h, size)
        # JPEG only: let libjpeg decode at 1/2, 1/4, 1/8 scale while staying >= 3x the target
        # (the same trick as Image.thumbnail); a big speedup on large photos, no visible loss.
        img.draft(None, (size * 3, size * 3))
        img.load()  # full decode now, so truncated files raise here
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost us the picture
            pass
        img = _to_rgb(img)
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        box = (left, top, left + s, top + s)
        if s == size:
            out = img.crop(box)
        else:
            out = img.resize((size, size), Image.LANCZOS, box=box, reducing_gap=3.0 if s > size else None)
        arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # defensive: never let a malformed array into the stack
        raise ValueError(f"decoded to unexpected shape {arr.shape}")
    return arr


def _short_reason(exc: BaseException) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels"
    msg = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, OSError) and "truncated" in msg:
        return "truncated"
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return f"unreadable ({type(exc).__name__})"
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:100]


def _decode_one(job: tuple[str, int, bool]) -> tuple[str, object]:
    """Worker: ('ok', array) | ('small', (w, h)) | ('bad', reason). Never raises, so one bad file can't stop a run."""
    path, size, allow_upscale = job
    try:
        return "ok", load_image(Path(path), size, allow_upscale)
    except TooSmallError as e:
        return "small", (e.width, e.height)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return "bad", _short_reason(e)


# --------------------------------------------------------------------------- cache


def _default_cache_dir() -> Path:
    env = os.environ.get("PROGAN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "progan"
    return Path.home() / ".cache" / "progan"


def _cache_key(root: Path, size: int, allow_upscale: bool, rels: list[str], files: list[Path]) -> str:
    h = hashlib.sha1()
    h.update(f"{_CACHE_FORMAT}\0{root}\0{size}\0{int(allow_upscale)}\0".encode())
    for rel, path in zip(rels, files):
        try:
            st = path.stat()
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{rel}\0{stamp}\n".encode())
    return h.hexdigest()


def _read_cache(npy: Path, meta: Path, size: int) -> FaceData | None:
    """The cached FaceData, or None when absent/incomplete/corrupt (then the caller rebuilds it)."""
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        images = np.load(npy, mmap_mode="r")
        names = [str(n) for n in info["names"]]
        n = len(names)
        if images.dtype != np.uint8 or images.shape != (n, size, size, 3):
            return None
        labels = {k: np.asarray(v, dtype=np.int64) for k, v in info["labels"].items()}
        if any(v.shape != (n,) for v in labels.values()):
            return None
        skipped = [(str(a), str(b)) for a, b in info["skipped"]]
        return FaceData(images=images, names=names, labels=labels, skipped=skipped, root=str(info["root"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _atomic_write(target: Path, write) -> None:
    # temp file in the same directory + os.replace: readers see either nothing or the complete file
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_cache(npy: Path, meta: Path, data: FaceData, size: int) -> None:
    npy.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "format": _CACHE_FORMAT,
        "size": size,
        "root": data.root,
        "names": data.names,
        "labels": {k: v.tolist() for k, v in data.labels.items()},
        "skipped": [list(s) for s in data.skipped],
    }
    # .npy first, .json last: the .json is the "complete" marker checked on read
    _atomic_write(npy, lambda f: np.save(f, data.images, allow_pickle=False))
    _atomic_write(meta, lambda f: f.write(json.dumps(info).encode()))


# --------------------------------------------------------------------------- folder loading


def _decode_all(jobs: list[tuple[str, int, bool]], workers: int, progress: bool) -> Iterator[tuple[str, object]]:
    """Yield _decode_one(job) for every job, in order; in a process pool unless tiny or workers == 1."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="decoding", unit="img", disable=not progress, file=sys.stderr)
    done = 0
    try:
        if workers > 1 and len(jobs) >= 2 * workers:
            chunksize = max(1, min(64, len(jobs) // (workers * 8)))
            try:
                # the platform's default start method: it is what users' environments are set up for
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for result in pool.map(_decode_one, jobs, chunksize=chunksize):
                        yield result
                        done += 1
                        bar.update(1)
            except BrokenProcessPool as e:
                # e.g. a worker was OOM-killed or could not start: finish in this process rather than fail
                print(f"warning: decoding workers failed ({e}); continuing in one process", file=sys.stderr)
        for job in jobs[done:]:
            yield _decode_one(job)
            bar.update(1)
    finally:
        bar.close()


def _labels_for(names: list[str]) -> dict[str, np.ndarray]:
    parsed = [parse_utkface_name(n) or (-1, -1, -1) for n in names]
    arr = np.asarray(parsed, dtype=np.int64).reshape(len(names), 3)
    return {"age": arr[:, 0].copy(), "gender": arr[:, 1].copy(), "race": arr[:, 2].copy()}


def load_folder(
    root: str | Path,
    size: int,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    allow_upscale: bool = False,
) -> FaceData:
    """Every image under `root` as uint8 N x size x size x 3, decoded in parallel once and cached on disk."""
    if size < 1:
        raise ProganError(f"image size must be a positive number of pixels, got {size}")
    root_path = Path(root).expanduser().resolve()
    files = scan(root_path)
    rels = [p.relative_to(root_path).as_posix() for p in files]

    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    key = _cache_key(root_path, size, allow_upscale, rels, files)
    npy, meta = cache / f"{key}.npy", cache / f"{key}.json"
    cached = _read_cache(npy, meta, size)
    if cached is not None:
        if progress:
            print(f"using cached images: {len(cached)} at {size}x{size} ({npy})", file=sys.stderr)
        return cached

    n = len(files)
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    small: list[tuple[str, tuple[int, int]]] = []
    jobs = [(str(p), size, allow_upscale) for p in files]
    for rel, (status, payload) in zip(rels, _decode_all(jobs, workers, progress)):
        if status == "ok":
            images[len(names)] = payload  # compact in place: skipped files leave no gap
            names.append(rel)
        elif status == "small":
            small.append((rel, payload))  # type: ignore[arg-type]
        else:
            skipped.append((rel, str(payload)))

    if skipped:
        first, why = skipped[0]
        noun = "file" if len(skipped) == 1 else "files"
        print(f"skipped {len(skipped)} unreadable {noun} (first: {first}: {why})", file=sys.stderr)
    if small:
        first, (w, h) = small[0]
        what = "1 image is" if len(small) == 1 else f"{len(small)} images are"
        raise ProganError(
            f"{what} smaller than {size}x{size} (first: {first}, {w}x{h}); "
            "use a smaller --size or pass --allow-upscale"
        )
    if not names:
        raise ProganError(f"no readable images in {root_path} ({len(skipped)} files skipped)")

    data = FaceData(
        images=images[: len(names)],
        names=names,
        labels=_labels_for(names),
        skipped=skipped,
        root=str(root_path),
    )
    try:
        _write_cache(npy, meta, data, size)
    except OSError as e:  # an unwritable cache only costs speed next time; don't fail the run
        print(f"warning: could not write image cache in {cache}: {e}", file=sys.stderr)
    return data


# --------------------------------------------------------------------------- built-in digits set


def stacked_digits(n: int = 10000, size: int = 32, seed: int = 0) -> FaceData:
    """Offline toy set: three random 8x8 sklearn digits in the R, G, B channels (1000 classes), size x size."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if n < 1 or size < 1:
        raise ValueError(f"n and size must be positive, got n={n}, size={size}")
    digits = load_digits()
    src = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # 1797 x 8 x 8, 0..16 -> 0..255
    target = digits.target.astype(np.int64)
    # upsample each source digit once, then just gather
    if size == 8:
        up = src
    else:
        up = np.stack([np.asarray(Image.fromarray(d, mode="L").resize((size, size), Image.BICUBIC)) for d in src])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(src), size=(n, 3))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for c in range(3):
        images[..., c] = up[pick[:, c]]
    d = target[pick]
    code = d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]
    width = max(6, len(str(n - 1)))
    unknown = np.full(n, -1, dtype=np.int64)
    return FaceData(
        images=images,
        names=[f"digits/{i:0{width}d}" for i in range(n)],
        labels={
            "digits": code.astype(np.int64),
            "age": unknown.copy(),
            "gender": unknown.copy(),
            "race": unknown.copy(),
        },
        skipped=[],
        root="digits",
    )


# --------------------------------------------------------------------------- held-out split


def holdout_mask(names: list[str], fraction: float) -> np.ndarray:
    """True for the images kept out of training: a pure function of each file's name (a hash), so the split is
    the same in every run and a file keeps its side when others are added to or removed from the folder."""
    if not 0.0 <= fraction < 1.0:
        raise ProganError(f"held-out fraction must be in [0, 1), got {fraction}")
    keys = [int.from_bytes(hashlib.sha1(n.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64 for n in names]
    return np.asarray(keys, dtype=np.float64) < fraction


def split_holdout(data: FaceData, fraction: float) -> tuple[FaceData, FaceData]:
    """(training part, held-out part) of `data`, by holdout_mask on the names."""
    mask = holdout_mask(data.names, fraction)

    def part(keep: np.ndarray) -> FaceData:
        idx = np.flatnonzero(keep)
        return FaceData(
            images=data.images[idx] if len(idx) < len(data) else data.images,
            names=[data.names[i] for i in idx],
            labels={k: v[idx] for k, v in data.labels.items()},
            skipped=list(data.skipped),
            root=data.root,
        )

    return part(~mask), part(mask)


# --------------------------------------------------------------------------- training-time helpers


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The sample order for one epoch: a pure function of (n, epoch, seed), so a resumed run repeats it exactly."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen, dtype=torch.int64)


class ImageBank:
    """The training images resident on the training device as uint8 N x 3 x S x S (NCHW), so no decoding or host
    copies happen in the training loop."""

    def __init__(self, images: np.ndarray, device: torch.device | str = "cpu",
                 labels: np.ndarray | None = None) -> None:
        import torch

        if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"expected N x S x S x 3 images, got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        n, s = int(images.shape[0]), int(images.shape[1])
        self.device = torch.device(device)
        self.size = s
        self.data = torch.empty((n, 3, s, s), dtype=torch.uint8, device=self.device)
        # copy in ~64 MB chunks: bounded host memory even when `images` is a memmap of a big cache
        step = max(1, (64 << 20) // (s * s * 3))
        for i in range(0, n, step):
            chunk = torch.from_numpy(np.array(images[i : i + step]))  # np.array: writable copy
            self.data[i : i + step] = chunk.to(self.device).permute(0, 3, 1, 2)
        # Conditional runs: float32 N x K labels beside the images (see progan/labels.py), else None.
        self.labels = None
        if labels is not None:
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} images")
            self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32)).reshape(n, -1).to(self.device)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def batch(self, idx: torch.Tensor, res: int) -> torch.Tensor:
        """Images `idx` as float32 B x 3 x res x res in [-1, 1]; res < S is area-downsampled on the device."""
        import torch
        import torch.nn.functional as F

        s = self.size
        if res < 1 or res > s or s % res or (s // res) & (s // res - 1):
            raise ValueError(f"resolution {res} must be the image size {s} divided by a power of two")
        idx = torch.as_tensor(idx, dtype=torch.int64).to(self.device)
        x = self.data.index_select(0, idx).float()
        if res < s:
            k = s // res
            x = F.avg_pool2d(x, kernel_size=k, stride=k)
        return x / 127.5 - 1.0
