"""Tests for progan.visualization: image helpers, video writing/reading, and the resumable training video."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan.errors import ProganError
from progan.visualization import (
    TrainingVideo,
    VideoWriter,
    concat_videos,
    image_grid,
    read_frames,
    read_video,
    status_bar,
    to_uint8,
    training_frame,
    upscale_nearest,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]


def solid(colour: tuple[int, int, int], h: int = 48, w: int = 64) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3)).copy()


def moving_square(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    frame = solid((30, 60, 90), h, w)
    frame[8:24, 4 * i : 4 * i + 16] = 255
    return frame


# ----------------------------------------------------------------------------- images


def test_to_uint8_range_rounding_and_layout() -> None:
    vals = torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0, 0.5, -0.5, float("nan")])
    x = torch.zeros(1, 3, 1, 8)
    x[0, 0, 0] = vals
    x[0, 1] = 1.0  # green channel full, to check channel order after the permute
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 8, 3)
    # 0.5 -> 191.25 -> 191, -0.5 -> 63.75 -> 64, NaN -> black
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 191, 64, 0]
    assert (out[..., 1] == 255).all() and (out[..., 2] == 128).all()


def test_to_uint8_low_precision_input_and_bad_shape() -> None:
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert np.array_equal(to_uint8(x.to(torch.float16)), to_uint8(x.to(torch.float16).float()))
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))


def test_image_grid_layout_padding_and_empty_cells() -> None:
    images = np.stack([solid(c, 2, 3) for c in COLOURS[:5]])
    grid = image_grid(images, cols=3, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 2 + 1, 3 * 3 + 2, 3)
    for i, colour in enumerate(COLOURS[:5]):
        r, c = divmod(i, 3)
        y, x = r * 3, c * 4
        assert (grid[y : y + 2, x : x + 3] == colour).all(), i
    assert (grid[2] == 0).all() and (grid[:, 3] == 0).all()  # padding rows/columns are black
    assert (grid[3:5, 8:11] == 0).all()  # the sixth cell has no image
    assert image_grid(images, cols=5).shape == (2, 15, 3)


def test_upscale_nearest_blocks_and_fallback() -> None:
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    up = upscale_nearest(img, 16)
    assert up.shape == (1, 16, 16, 3)
    for y in range(4):
        for x in range(4):
            assert (up[0, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] == img[0, y, x]).all()
    odd = upscale_nearest(img, 10)  # 10 % 4 != 0: Pillow NEAREST
    assert odd.shape == (1, 10, 10, 3)
    assert set(map(tuple, odd.reshape(-1, 3))) <= set(map(tuple, img.reshape(-1, 3)))
    assert upscale_nearest(img, 4) is img


def test_training_frame_size_independent_of_resolution() -> None:
    shapes = set()
    for h in (4, 8, 32):
        images = np.random.default_rng(h).integers(0, 256, (32, h, h, 3), dtype=np.uint8)
        frame = training_frame(images, cell=64, text=f"step 1200 | {h}x{h}")
        shapes.add(frame.shape)
        assert frame.dtype == np.uint8
    assert shapes == {(4 * 64 + 16, 8 * 64, 3)}
    odd = training_frame(np.zeros((5, 4, 4, 3), np.uint8), cell=13, text="x", cols=3)
    assert odd.shape[0] % 2 == 0 and odd.shape[1] % 2 == 0


def test_status_bar_draws_text() -> None:
    bar = status_bar(200, "step 100 | 8x8 | D 0.12")
    assert bar.shape == (16, 200, 3) and bar.dtype == np.uint8
    assert len(np.unique(bar.reshape(-1, 3), axis=0)) > 2  # text pixels on the background
    assert bar.max() > 150 and bar[:, -20:].max() < 60  # light text, dark background after it
    assert status_bar(30, "far too long to fit " * 20).shape == (16, 30, 3)  # clipped, no error
    assert (status_bar(40, "") == status_bar(40, "")[0, 0]).all()  # nothing but background
    with pytest.raises(ValueError):
        status_bar(100, "x", height=15)


# ----------------------------------------------------------------------------- video files


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_video_writer_h264_roundtrip(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"out{ext}"
    with VideoWriter(path, 64, 48, fps=10) as writer:
        for colour in COLOURS:
            writer.write(solid(colour))
        assert writer.frames == len(COLOURS)
    assert read_video(path) == (len(COLOURS), 64, 48)
    frames = read_frames(path)
    assert frames.shape == (len(COLOURS), 48, 64, 3) and frames.dtype == np.uint8
    for frame, colour in zip(frames, COLOURS):
        assert np.abs(frame.reshape(-1, 3).mean(0) - colour).max() < 12
    if ext == ".mp4":
        data = path.read_bytes()
        assert data.index(b"moov") < data.index(b"mdat")  # +faststart: index before the media data


def test_video_writer_gif(tmp_path: Path) -> None:
    path = tmp_path / "out.gif"
    writer = VideoWriter(path, 64, 48, fps=5)
    for colour in COLOURS[:3]:
        writer.write(solid(colour))
    writer.close()
    writer.close()  # idempotent
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.size == (64, 48)
        assert gif.info["loop"] == 0 and gif.info["duration"] == 200


def test_video_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ProganError, match=r"unsupported video format '\.xyz' \(use \.mp4, \.mkv or \.gif\)"):
        VideoWriter(tmp_path / "out.xyz", 64, 48)
    with pytest.raises(ValueError):
        VideoWriter(tmp_path / "out.mp4", 63, 48)
    writer = VideoWriter(tmp_path / "out.mkv", 64, 48)
    with pytest.raises(ValueError):
        writer.write(solid((1, 2, 3), 48, 32))
    writer.close()
    assert not (tmp_path / "out.mkv").exists()  # no frames, no file


def test_read_video_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProganError, match="no such video"):
        read_video(tmp_path / "nope.mkv")


def write_mkv(path: Path, n: int) -> Path:
    with VideoWriter(path, 64, 48) as writer:
        for i in range(n):
            writer.write(moving_square(i))
    return path


def test_concat_videos(tmp_path: Path) -> None:
    a, b = write_mkv(tmp_path / "a.mkv", 4), write_mkv(tmp_path / "b.mkv", 3)
    concat_videos([a, b], tmp_path / "ab.mkv")
    assert read_video(tmp_path / "ab.mkv") == (7, 64, 48)
    concat_videos([b], tmp_path / "b2.mkv")  # single segment: plain copy
    assert (tmp_path / "b2.mkv").read_bytes() == b.read_bytes()


def test_concat_videos_failure_keeps_existing_output(tmp_path: Path) -> None:
    a = write_mkv(tmp_path / "a.mkv", 2)
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"not a video at all")
    out = tmp_path / "out.mkv"
    out.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="ffmpeg"):
        concat_videos([a, bad], out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mkv", "bad.mkv", "out.mkv"]  # no temp left


# ----------------------------------------------------------------------------- training video


def session(run: Path, frames: list[np.ndarray]) -> Path | None:
    with TrainingVideo(run, fps=10) as video:
        for frame in frames:
            video.add(frame)
        assert video.frames == len(frames)
    return video.close()  # idempotent: returns the same result again


def test_training_video_resumed_sessions_join(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = session(run, [moving_square(i) for i in range(5)])
    assert first == run / "training.mkv" and read_video(first) == (5, 64, 48)
    second = session(run, [moving_square(i) for i in range(3)])
    assert second == run / "training.mkv"
    assert read_video(second) == (8, 64, 48)
    assert sorted(p.name for p in (run / "video").iterdir()) == ["segment-0001.mkv", "segment-0002.mkv"]


def test_training_video_survives_killed_and_corrupt_segments(tmp_path: Path) -> None:
    run = tmp_path / "run"
    session(run, [moving_square(i) for i in range(5)])
    # A session whose encoder is SIGKILLed (machine crash): the segment is never finalised.
    killed = TrainingVideo(run, fps=10)
    for i in range(40):
        killed.add(moving_square(i % 12))
    segment = run / "video" / "segment-0002.mkv"
    deadline = time.monotonic() + 5
    while segment.stat().st_size < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)  # let ffmpeg get some clusters onto disk, so there is something to salvage
    killed._proc.kill()  # type: ignore[union-attr]
    killed._proc.wait()  # type: ignore[union-attr]
    killed._stderr.close()
    # And a segment cut off after its first bytes.
    (run / "video" / "segment-0003.mkv").write_bytes((run / "video" / "segment-0001.mkv").read_bytes()[:300])
    with pytest.warns(UserWarning) as caught:
        out = session(run, [moving_square(i) for i in range(3)])
    skipped = [str(w.message) for w in caught]
    assert len(skipped) == 1 and "segment-0003.mkv" in skipped[0]  # the killed one is salvaged, not skipped
    assert out == run / "training.mkv"
    n, width, height = read_video(out)
    assert (width, height) == (64, 48)
    assert 8 < n < 48  # 5 + 3 plus the part of the killed session that reached the disk


def test_training_video_without_ffmpeg_writes_pngs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    frames = [moving_square(i) for i in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        video = TrainingVideo(run, ffmpeg_exe="/nonexistent/ffmpeg")
        for frame in frames:
            video.add(frame)
        assert video.close() is None
    messages = [str(w.message) for w in caught if "ffmpeg" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("ffmpeg failed (")
    png_dir = run / "video" / "frames-0001"
    assert str(png_dir) in messages[0]
    pngs = sorted(png_dir.iterdir())
    assert [p.name for p in pngs] == [f"frame-{i:06d}.png" for i in range(4)]
    assert np.array_equal(np.asarray(Image.open(pngs[2])), frames[2])
    assert video.frames == 4


def test_training_video_encoder_dies_mid_session(tmp_path: Path) -> None:
    run = tmp_path / "run"
    session(run, [moving_square(i) for i in range(5)])
    video = TrainingVideo(run, fps=10)
    video.add(moving_square(0))
    video.add(moving_square(1))
    video._proc.kill()  # type: ignore[union-attr]
    video._proc.wait()  # type: ignore[union-attr]
    with pytest.warns(UserWarning, match="ffmpeg failed .*frames-0002"):
        video.add(moving_square(2))
        video.add(moving_square(3))
    assert sorted(p.name for p in (run / "video" / "frames-0002").iterdir()) == ["frame-000002.png", "frame-000003.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dead segment may be unreadable and skipped
        out = video.close()
    assert out == run / "training.mkv" and read_video(out)[0] >= 5
    with pytest.raises(ValueError):
        video.add(moving_square(4))


def test_timelapse_keeps_evenly_spaced_frames_and_downscales(tmp_path):
    from progan.visualization import VideoWriter, read_frames, timelapse

    src = tmp_path / "long.mkv"
    with VideoWriter(src, 64, 32, fps=30) as w:
        for i in range(40):
            frame = np.zeros((32, 64, 3), np.uint8)
            frame[:, : (i + 1) * 64 // 40] = 255   # a bar that grows: frame order is visible
            w.write(frame)
    out = tmp_path / "short.mp4"
    frames, seconds = timelapse(src, out, seconds=1.0, width=32, fps=10)
    got = read_frames(out)
    assert frames == 10 and abs(seconds - 1.0) < 1e-9
    assert got.shape == (10, 16, 32, 3)                 # every 4th frame, downscaled by 2
    bar = (got.mean(axis=(1, 3)) > 127).sum(axis=1)     # bar width per frame grows
    assert np.all(np.diff(bar) >= 0) and bar[-1] > bar[0]
