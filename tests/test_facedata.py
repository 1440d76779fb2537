"""Tests for progan.facedata: folder scanning, robust decoding, the on-disk cache, digits, epoch order, ImageBank."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan import facedata
from progan.errors import ProganError
from progan.facedata import (
    FaceData,
    ImageBank,
    TooSmallError,
    epoch_order,
    load_folder,
    load_image,
    parse_utkface_name,
    scan,
    stacked_digits,
)

SIZE = 16

UTK_OK = "sub/26_1_2_20170116174525125.jpg.chip.jpg"
UTK_OK2 = "sub/deeper/100_0_4_20170112213500903.jpg.chip.jpg"
UTK_BAD = "sub/39_1_20170116174525125.jpg.chip.jpg"  # misnamed like a few real UTKFace files


def _noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _thirds(w: int = 60, h: int = 30) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 3, 0] = 255  # red
    a[:, w // 3 : 2 * w // 3, 1] = 255  # green
    a[:, 2 * w // 3 :, 2] = 255  # blue
    return a


def _top_red_bottom_blue(s: int = 32) -> np.ndarray:
    a = np.zeros((s, s, 3), np.uint8)
    a[: s // 2, :, 0] = 255
    a[s // 2 :, :, 2] = 255
    return a


def _make_folder(root: Path) -> dict[str, str]:
    """A folder with every kind of file the loader must handle; returns {relative name: kind}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hiddendir").mkdir()

    Image.fromarray(_noise(32, 32, 1)).save(root / "rgb.jpg", quality=95)
    Image.fromarray(np.full((32, 32), 200, np.uint8), mode="L").save(root / "grey.png")

    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    pal.paste(0, (0, 0, 16, 32))
    pal.save(root / "palette_transparent.png", transparency=0)
    pal.save(root / "palette_alpha_table.png", transparency=bytes([0, 128]))  # per-entry alpha (tRNS table)

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 250
    rgba[..., 3] = 100
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")

    g16 = Image.new("I;16", (32, 32))
    g16.putdata([32768] * (32 * 32))
    g16.save(root / "grey16.png")

    Image.fromarray(_thirds()).save(root / "wide.png")

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(_top_red_bottom_blue()).save(root / "exif_rot.jpg", quality=95, exif=exif)

    data = _jpeg_bytes(_noise(48, 48, 2))
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "garbage.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("ignored")
    Image.fromarray(_noise(32, 32, 3)).save(root / ".hidden.jpg")
    Image.fromarray(_noise(32, 32, 4)).save(root / ".hiddendir" / "x.jpg")
    Image.fromarray(_noise(32, 32, 5)).save(root / "UPPER.PNG")

    Image.fromarray(_noise(40, 40, 6)).save(root / UTK_OK, quality=90)
    Image.fromarray(_noise(40, 40, 7)).save(root / UTK_OK2, quality=90)
    Image.fromarray(_noise(40, 40, 8)).save(root / UTK_BAD, quality=90)
    return {
        "UPPER.PNG": "ok",
        "exif_rot.jpg": "ok",
        "garbage.jpg": "bad",
        "grey.png": "ok",
        "grey16.png": "ok",
        "palette_alpha_table.png": "ok",
        "palette_transparent.png": "ok",
        "rgb.jpg": "ok",
        "rgba.png": "ok",
        UTK_BAD: "ok",
        UTK_OK: "ok",
        UTK_OK2: "ok",
        "truncated.jpg": "bad",
        "wide.png": "ok",
    }


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "faces"
    return root, _make_folder(root)


# --------------------------------------------------------------------------- scan / names


def test_scan_sorted_filtered(folder):
    root, kinds = folder
    rels = [p.relative_to(root).as_posix() for p in scan(root)]
    assert rels == sorted(kinds)  # hidden files/dirs and .txt excluded, .PNG included, sorted
    assert all(isinstance(p, Path) for p in scan(str(root)))


def test_scan_errors(tmp_path: Path):
    with pytest.raises(ProganError, match="image folder not found: .*nope"):
        scan(tmp_path / "nope")
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(ProganError, match="not a folder"):
        scan(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProganError, match=r"no images \(jpg/jpeg/png/webp/bmp\) found in .*empty"):
        scan(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    (other / ".b.jpg").write_bytes(b"x")
    with pytest.raises(ProganError, match="no images"):
        scan(other)


def test_parse_utkface_name():
    assert parse_utkface_name("26_1_2_20170116174525125.jpg.chip.jpg") == (26, 1, 2)
    assert parse_utkface_name("some/dir/100_0_4_20170112213500903.jpg.chip.jpg") == (100, 0, 4)
    assert parse_utkface_name("1_0_0_x.png") == (1, 0, 0)
    assert parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg") is None  # race missing
    assert parse_utkface_name("26_2_2_2017.jpg") is None  # gender out of range
    assert parse_utkface_name("26_1_5_2017.jpg") is None  # race out of range
    assert parse_utkface_name("131_1_1_2017.jpg") is None  # age out of range
    assert parse_utkface_name("rgb.jpg") is None
    assert parse_utkface_name("26_1_2.jpg") is None


# --------------------------------------------------------------------------- load_image


def test_load_image_modes(folder):
    root, _ = folder
    names = ["rgb.jpg", "grey.png", "palette_transparent.png", "palette_alpha_table.png", "rgba.png", "grey16.png"]
    for name in names + ["UPPER.PNG"]:
        a = load_image(root / name, SIZE)
        assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8, name

    grey = load_image(root / "grey.png", SIZE)
    assert np.all(np.abs(grey.astype(int) - 200) <= 1)

    g16 = load_image(root / "grey16.png", SIZE)
    assert np.all(np.abs(g16.astype(int) - 128) <= 1)  # scaled 32768/257, not clipped to 255

    rgba = load_image(root / "rgba.png", SIZE)
    assert np.all(rgba[..., 0] >= 245) and np.all(rgba[..., 1:] <= 5)

    pal = load_image(root / "palette_transparent.png", SIZE)
    assert np.all(pal[:, -4:] == [10, 200, 30])  # opaque half keeps its palette colour
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when such palettes go straight to RGB
        pal2 = load_image(root / "palette_alpha_table.png", SIZE)
    assert np.all(pal2[:, -4:] == [10, 200, 30])


def test_load_image_centre_crop(folder):
    root, _ = folder
    a = load_image(root / "wide.png", SIZE).astype(int)
    r, g, b = (a[..., c].mean() for c in range(3))
    assert g > 150 and g > 2 * r and g > 2 * b
    assert np.all(a[:, SIZE // 2, 1] > 240)  # centre column is pure green


def test_load_image_exif_transpose(folder):
    root, _ = folder
    a = load_image(root / "exif_rot.jpg", SIZE).astype(int)
    # stored top=red/bottom=blue; rotated 90 degrees clockwise the red half is on the right
    left, right = a[:, :4], a[:, -4:]
    assert left[..., 2].mean() > 200 and left[..., 0].mean() < 50
    assert right[..., 0].mean() > 200 and right[..., 2].mean() < 50


def test_load_image_too_small_and_upscale(tmp_path: Path):
    p = tmp_path / "tiny.png"
    Image.fromarray(_noise(12, 10)).save(p)
    with pytest.raises(TooSmallError) as info:
        load_image(p, SIZE)
    assert isinstance(info.value, ProganError)
    assert (info.value.width, info.value.height) == (12, 10)
    assert load_image(p, SIZE, allow_upscale=True).shape == (SIZE, SIZE, 3)


def test_load_image_exact_size_is_lossless(tmp_path: Path):
    p = tmp_path / "exact.png"
    a = _noise(SIZE, SIZE, 9)
    Image.fromarray(a).save(p)
    assert np.array_equal(load_image(p, SIZE), a)


def test_load_image_bad_files_raise(folder):
    root, _ = folder
    with pytest.raises(OSError, match="truncated"):
        load_image(root / "truncated.jpg", SIZE)
    with pytest.raises(Exception):
        load_image(root / "garbage.jpg", SIZE)


# --------------------------------------------------------------------------- load_folder + cache


def test_load_folder(folder, tmp_path: Path, capsys):
    root, kinds = folder
    data = load_folder(root, SIZE, cache_dir=tmp_path / "cache", workers=1, progress=False)
    ok = sorted(k for k, v in kinds.items() if v == "ok")
    assert isinstance(data, FaceData)
    assert len(data) == len(ok) == data.images.shape[0]
    assert data.images.shape == (len(ok), SIZE, SIZE, 3) and data.images.dtype == np.uint8
    assert data.names == ok
    assert sorted(data.skipped) == [("garbage.jpg", "not an image"), ("truncated.jpg", "truncated")]
    assert data.root == str(root.resolve())
    err = capsys.readouterr().err
    assert "skipped 2 unreadable files (first: garbage.jpg: not an image)" in err

    for key in ("age", "gender", "race"):
        assert data.labels[key].dtype == np.int64 and data.labels[key].shape == (len(ok),)
    lab = {n: (int(data.labels["age"][i]), int(data.labels["gender"][i]), int(data.labels["race"][i]))
           for i, n in enumerate(data.names)}
    assert lab[UTK_OK] == (26, 1, 2)
    assert lab[UTK_OK2] == (100, 0, 4)
    assert lab[UTK_BAD] == (-1, -1, -1)
    assert lab["rgb.jpg"] == (-1, -1, -1)

    # rows line up with names: each row equals decoding that file alone
    for i, n in enumerate(data.names):
        assert np.array_equal(data.images[i], load_image(root / n, SIZE)), n


def test_load_folder_parallel_matches_serial(folder, tmp_path: Path):
    root, _ = folder
    serial = load_folder(root, SIZE, cache_dir=tmp_path / "c1", workers=1, progress=False)
    par = load_folder(root, SIZE, cache_dir=tmp_path / "c2", workers=2, progress=False)
    assert par.names == serial.names and par.skipped == serial.skipped
    assert np.array_equal(np.asarray(par.images), np.asarray(serial.images))


def test_broken_pool_falls_back_to_serial(folder, tmp_path: Path, monkeypatch, capsys):
    from concurrent.futures.process import BrokenProcessPool

    root, _ = folder
    serial = load_folder(root, SIZE, cache_dir=tmp_path / "c1", workers=1, progress=False)

    class HalfBrokenPool:  # yields two results, then dies like an OOM-killed worker
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, jobs, chunksize=1):
            jobs = iter(jobs)
            yield fn(next(jobs))
            yield fn(next(jobs))
            raise BrokenProcessPool("worker died")

    monkeypatch.setattr(facedata, "ProcessPoolExecutor", HalfBrokenPool)
    capsys.readouterr()
    data = load_folder(root, SIZE, cache_dir=tmp_path / "c2", workers=2, progress=False)
    assert "continuing in one process" in capsys.readouterr().err
    assert data.names == serial.names and data.skipped == serial.skipped
    assert np.array_equal(data.images, serial.images)


def test_cache_reused_and_rebuilt(folder, tmp_path: Path, monkeypatch, capsys):
    root, _ = folder
    cache = tmp_path / "cache"
    first = load_folder(root, SIZE, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npy"))) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob("*.tmp"))  # temp files were renamed into place
    capsys.readouterr()

    # a hit must decode nothing: any decode or pool start would raise
    def boom(*a, **k):
        raise AssertionError("decoded on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(facedata, "load_image", boom)
        m.setattr(facedata, "_decode_one", boom)
        m.setattr(facedata, "ProcessPoolExecutor", boom)
        second = load_folder(root, SIZE, cache_dir=cache, workers=2, progress=False)
    assert capsys.readouterr().err == ""  # silent hit with progress off
    assert second.names == first.names and second.skipped == first.skipped and second.root == first.root
    assert np.array_equal(np.asarray(second.images), first.images)
    assert isinstance(second.images, np.memmap)
    for k in first.labels:
        assert np.array_equal(second.labels[k], first.labels[k])

    # progress on: at most one short line
    load_folder(root, SIZE, cache_dir=cache, workers=1, progress=True)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    # adding a file changes the key -> rebuilt
    Image.fromarray(_noise(32, 32, 11)).save(root / "zz_new.png")
    third = load_folder(root, SIZE, cache_dir=cache, workers=1, progress=False)
    assert len(third) == len(first) + 1 and third.names[-1] == "zz_new.png"
    assert len(list(cache.glob("*.npy"))) == 2

    # touching a file (new mtime) also rebuilds; a different size uses its own entry
    st = (root / "rgb.jpg").stat()
    os.utime(root / "rgb.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_folder(root, SIZE, cache_dir=cache, workers=1, progress=False)
    assert len(list(cache.glob("*.npy"))) == 3
    assert load_folder(root, 8, cache_dir=cache, workers=1, progress=False).images.shape[1:] == (8, 8, 3)
    assert len(list(cache.glob("*.npy"))) == 4


def test_cache_dir_from_env(folder, tmp_path: Path, monkeypatch):
    root, _ = folder
    monkeypatch.setenv("PROGAN_CACHE", str(tmp_path / "envcache"))
    load_folder(root, SIZE, workers=1, progress=False)
    assert len(list((tmp_path / "envcache").glob("*.npy"))) == 1
    monkeypatch.delenv("PROGAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_folder(root, SIZE, workers=1, progress=False)
    assert len(list((tmp_path / "xdg" / "progan").glob("*.npy"))) == 1


def test_half_written_cache_is_rebuilt(folder, tmp_path: Path):
    root, _ = folder
    cache = tmp_path / "cache"
    first = load_folder(root, SIZE, cache_dir=cache, workers=1, progress=False)
    (meta,) = cache.glob("*.json")
    meta.write_text("{not json")  # simulate a damaged cache
    again = load_folder(root, SIZE, cache_dir=cache, workers=1, progress=False)
    assert again.names == first.names and not isinstance(again.images, np.memmap)


def test_load_folder_errors(tmp_path: Path):
    cache = tmp_path / "cache"
    with pytest.raises(ProganError, match="image folder not found"):
        load_folder(tmp_path / "missing", SIZE, cache_dir=cache, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProganError, match="no images"):
        load_folder(tmp_path / "empty", SIZE, cache_dir=cache, progress=False)
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "readme.txt").write_text("x")
    with pytest.raises(ProganError, match="no images"):
        load_folder(txt, SIZE, cache_dir=cache, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("nope")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ProganError, match=r"no readable images in .*bad \(2 files skipped\)"):
        load_folder(bad, SIZE, cache_dir=cache, workers=1, progress=False)
    assert not list(cache.glob("*.npy")) if cache.exists() else True


def test_load_folder_too_small(tmp_path: Path):
    root = tmp_path / "small"
    root.mkdir()
    Image.fromarray(_noise(32, 32)).save(root / "a_big.png")
    Image.fromarray(_noise(12, 10)).save(root / "b_tiny.png")
    Image.fromarray(_noise(8, 8)).save(root / "c_tiny.png")
    with pytest.raises(ProganError) as info:
        load_folder(root, SIZE, cache_dir=tmp_path / "cache", workers=1, progress=False)
    msg = str(info.value)
    assert "2 images are smaller than 16x16 (first: b_tiny.png, 12x10)" in msg
    assert "--allow-upscale" in msg and "\n" not in msg
    data = load_folder(root, SIZE, cache_dir=tmp_path / "cache", workers=1, progress=False, allow_upscale=True)
    assert data.images.shape == (3, SIZE, SIZE, 3)


# --------------------------------------------------------------------------- digits


def test_stacked_digits_basic():
    d = stacked_digits(n=50, size=32, seed=0)
    assert d.images.shape == (50, 32, 32, 3) and d.images.dtype == np.uint8
    assert len(d) == 50 and d.root == "digits" and d.skipped == []
    assert d.names[0] == "digits/000000" and d.names[-1] == "digits/000049"
    assert d.labels["digits"].dtype == np.int64
    assert d.labels["digits"].min() >= 0 and d.labels["digits"].max() <= 999
    for k in ("age", "gender", "race"):
        assert d.labels[k].dtype == np.int64 and np.all(d.labels[k] == -1)
    assert d.images.max() > 200  # scaled to 0..255, not left at 0..16

    again = stacked_digits(n=50, size=32, seed=0)
    other = stacked_digits(n=50, size=32, seed=1)
    assert np.array_equal(d.images, again.images) and np.array_equal(d.labels["digits"], again.labels["digits"])
    assert not np.array_equal(d.images, other.images)


def test_stacked_digits_channels_match_labels():
    from sklearn.datasets import load_digits

    src = load_digits()
    ref = np.rint(src.images * (255.0 / 16.0)).astype(np.uint8)
    d = stacked_digits(n=30, size=8, seed=3)  # size 8: channels are the raw digits, comparable exactly
    for i in range(30):
        code = int(d.labels["digits"][i])
        for c, digit in enumerate((code // 100, code // 10 % 10, code % 10)):
            matches = np.all(ref == d.images[i, :, :, c], axis=(1, 2))
            assert digit in set(src.target[matches].tolist())


def test_stacked_digits_covers_all_classes():
    d = stacked_digits(n=20000, size=8, seed=0)
    assert len(np.unique(d.labels["digits"])) == 1000


# --------------------------------------------------------------------------- epoch order


def test_epoch_order():
    a = epoch_order(100, 3, 7)
    assert a.dtype == torch.int64 and a.device.type == "cpu"
    assert torch.equal(torch.sort(a).values, torch.arange(100))
    assert torch.equal(a, epoch_order(100, 3, 7))
    assert not torch.equal(a, epoch_order(100, 4, 7))
    assert not torch.equal(a, epoch_order(100, 3, 8))
    torch.manual_seed(123)  # global RNG state must not matter
    assert torch.equal(a, epoch_order(100, 3, 7))


# --------------------------------------------------------------------------- ImageBank


def test_image_bank():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    bank = ImageBank(imgs)
    assert len(bank) == 5 and bank.size == 8

    idx = torch.tensor([4, 0, 2])
    full = bank.batch(idx, 8)
    assert full.shape == (3, 3, 8, 8) and full.dtype == torch.float32
    assert full.min() >= -1 and full.max() <= 1
    want = torch.from_numpy(imgs[[4, 0, 2]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(full, want)

    half = bank.batch(idx, 4)
    assert half.shape == (3, 3, 4, 4)
    manual = imgs[[4, 0, 2]].astype(np.float64).reshape(3, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    manual = torch.from_numpy(manual).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(half, manual, atol=1e-5)

    assert bank.batch(idx, 1).shape == (3, 3, 1, 1)
    for bad in (3, 6, 16, 0):
        with pytest.raises(ValueError):
            bank.batch(idx, bad)


def test_image_bank_from_memmap(tmp_path: Path):
    imgs = np.random.default_rng(1).integers(0, 256, (4, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", imgs)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    bank = ImageBank(mm, device="cpu")
    assert torch.equal(bank.data, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    with pytest.raises(ValueError):
        ImageBank(imgs[..., :2])


def test_holdout_split_is_stable_and_disjoint():
    from progan.facedata import holdout_mask, split_holdout, stacked_digits

    names = [f"img{i:05d}.jpg" for i in range(4000)]
    mask = holdout_mask(names, 0.05)
    assert 0.03 < mask.mean() < 0.07
    # a file keeps its side when other files are added or removed
    assert np.array_equal(holdout_mask(names[::2], 0.05), mask[::2])
    assert np.array_equal(holdout_mask(list(reversed(names)), 0.05), mask[::-1])
    assert not holdout_mask(names, 0.0).any()
    data = stacked_digits(n=500, size=8)
    train, held = split_holdout(data, 0.1)
    assert len(train) + len(held) == 500 and 20 < len(held) < 80
    assert not set(train.names) & set(held.names)
    i = data.names.index(held.names[0])
    assert np.array_equal(held.images[0], data.images[i])
    assert held.labels["digits"][0] == data.labels["digits"][i]
    with pytest.raises(ProganError):
        holdout_mask(names, 1.0)
