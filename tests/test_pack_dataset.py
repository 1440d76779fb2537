"""tools/pack_dataset.py: a folder packed (JPEG or WebP) and unpacked again keeps every file name, so UTKFace labels
and the held-out split (a hash of each name) survive, and the pixels come back close to what training decodes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blobs import write_blob_images

ROOT = Path(__file__).resolve().parents[1]


def _pack(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROGAN_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "pack_dataset.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("fmt, magic", [("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_pack_unpack_keeps_names_labels_split_and_pixels(tmp_path, fmt, magic):
    from progan.facedata import load_folder, split_holdout

    src = write_blob_images(tmp_path / "src", 40, 48, ext="jpg")
    for i, p in enumerate(sorted(src.iterdir())):   # UTKFace-style names: age_gender_race_date.jpg.chip.jpg
        p.rename(src / f"{20 + i}_{i % 2}_{i % 5}_2017{i:04d}.jpg.chip.jpg")
    pack = tmp_path / f"pack-{fmt}.npz"
    proc = _pack("pack", str(src), str(pack), "--size", "32", "--format", fmt, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert f"packed 40 images at 32px ({fmt}" in proc.stdout
    out = tmp_path / "unpacked"
    proc = _pack("unpack", str(pack), str(out), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr

    files = sorted(out.iterdir())
    assert [f.name for f in files] == sorted(f.name for f in src.iterdir())
    assert all(f.read_bytes().startswith(magic) for f in files)   # the format inside, whatever the name says
    assert Image.open(files[0]).size == (32, 32)

    orig = load_folder(src, 32, cache_dir=tmp_path / "c1", progress=False)
    back = load_folder(out, 32, cache_dir=tmp_path / "c2", progress=False)
    assert back.names == orig.names
    for key in orig.labels:
        assert np.array_equal(back.labels[key], orig.labels[key])
    assert (orig.labels["age"] >= 20).all()
    assert [d.names for d in split_holdout(back, 0.2)] == [d.names for d in split_holdout(orig, 0.2)]
    err = np.abs(np.asarray(back.images, np.float64) - np.asarray(orig.images, np.float64)).mean()
    assert err < 4.0, err   # lossy, but close: smooth blobs at quality 80-92


def test_webp_pack_is_smaller_than_jpeg_at_its_default_quality(tmp_path):
    src = write_blob_images(tmp_path / "src", 30, 64, ext="png")
    sizes = {}
    for fmt in ("jpeg", "webp"):
        pack = tmp_path / f"{fmt}.npz"
        proc = _pack("pack", str(src), str(pack), "--size", "64", "--format", fmt, cache=tmp_path / "cache")
        assert proc.returncode == 0, proc.stderr
        sizes[fmt] = pack.stat().st_size
    assert sizes["webp"] < sizes["jpeg"], sizes
