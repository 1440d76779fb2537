"""Pack an image folder into one small .npz of JPEG bytes (and unpack it again), to carry a dataset to another
machine, e.g. a rented GPU, where copying 23,708 files is slow.

    python tools/pack_dataset.py pack ../shared/UTKFace utk64.npz --size 64
    python tools/pack_dataset.py unpack utk64.npz /tmp/utk64/

Images are decoded and resized exactly as training does (progan.facedata), then stored as JPEG (quality 92) or,
with --format webp, as WebP (quality 80: all of UTKFace at 128 px in 43 MiB instead of ~100 MiB as JPEG q90, so
that it fits a 64 MiB transfer). The original file names are kept, whatever the format inside, so that UTKFace
labels and the held-out split (a hash of each name) survive; Pillow reads a file by its content, not its name.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image


def pack(src: str, out: str, size: int, quality: int, fmt: str = "jpeg") -> None:
    from progan.facedata import load_folder

    data = load_folder(src, size)
    blobs = []
    for img in data.images:
        buf = io.BytesIO()
        if fmt == "webp":
            Image.fromarray(np.asarray(img)).save(buf, "WEBP", quality=quality, method=6)
        else:
            Image.fromarray(np.asarray(img)).save(buf, "JPEG", quality=quality)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    names = np.array([Path(n).name for n in data.names])
    np.savez(out, data=np.concatenate(blobs), offsets=offsets, names=names)
    mib = Path(out).stat().st_size / 2**20
    print(f"packed {len(blobs)} images at {size}px ({fmt}, quality {quality}) into {out} ({mib:.1f} MiB)")


def unpack(src: str, out: str) -> None:
    z = np.load(src)
    data, offsets, names = z["data"], z["offsets"], z["names"]
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (dest / str(name)).write_bytes(data[offsets[i]:offsets[i + 1]].tobytes())
    print(f"unpacked {len(names)} images into {dest}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--size", type=int, default=64)
    a.add_argument("--format", choices=["jpeg", "webp"], default="jpeg")
    a.add_argument("--quality", type=int, default=None, help="[92 for jpeg, 80 for webp]")
    b = sub.add_parser("unpack")
    b.add_argument("src")
    b.add_argument("out")
    args = p.parse_args()
    if args.cmd == "pack":
        quality = args.quality if args.quality is not None else (80 if args.format == "webp" else 92)
        pack(args.src, args.out, args.size, quality, args.format)
    else:
        unpack(args.src, args.out)


if __name__ == "__main__":
    main()
