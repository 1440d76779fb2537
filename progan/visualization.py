"""Images and videos of training progress: sample grids, status bars, and the training video.

Video goes through the ffmpeg binary bundled with imageio-ffmpeg (no system ffmpeg is assumed).
The training video is written as one Matroska segment per session and re-joined on close, so a
run that is stopped and resumed many times still ends up with one training.mkv covering all of it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from progan.errors import ProganError


def _iio():
    """imageio-ffmpeg, imported on use: without it (or its binary) training still runs and writes PNG frames."""
    import imageio_ffmpeg

    return imageio_ffmpeg

if TYPE_CHECKING:
    import torch

# x264 settings shared by every encoder here: veryfast so training never waits on the encoder,
# CRF 20 is visually clean for small sample grids.
X264_PRESET = "veryfast"
X264_CRF = 20
STATUS_BAR_HEIGHT = 16
VIDEO_FORMATS = (".mp4", ".mkv", ".gif")


# ----------------------------------------------------------------------------- images


def to_uint8(x: "torch.Tensor") -> np.ndarray:
    """N x 3 x H x W float in [-1, 1] (any device/dtype) -> N x H x W x 3 uint8."""
    import torch  # lazily: the video helpers (CLI inspect) need no torch

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an N x 3 x H x W tensor, got shape {tuple(x.shape)}")
    # Math stays on the tensor's device (only uint8 crosses to the host), in float32 so half/bfloat16
    # inputs round the same way, and in place because temporaries dominate the cost for small grids.
    y = x.detach().to(dtype=torch.float32, copy=True)
    # A diverged generator can emit NaN; show it as black rather than undefined bytes.
    y.nan_to_num_(nan=-1.0).add_(1.0).mul_(127.5).round_().clamp_(0.0, 255.0)
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected N x H x W x 3 images, got shape {images.shape}")


def image_grid(images: np.ndarray, cols: int, pad: int = 0) -> np.ndarray:
    """Tile N x H x W x 3 images row by row into one image with `cols` columns.

    rows = ceil(N / cols); `pad` black pixels go between cells (not around the border), and cells
    past the last image stay black.
    """
    _check_images(images)
    if cols < 1 or pad < 0:
        raise ValueError(f"need cols >= 1 and pad >= 0, got cols={cols}, pad={pad}")
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (h + pad), c * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def upscale_nearest(images: np.ndarray, cell: int) -> np.ndarray:
    """N x h x w x 3 -> N x cell x cell x 3 with nearest-neighbour sampling (blocky on purpose)."""
    _check_images(images)
    if cell < 1:
        raise ValueError(f"cell must be >= 1, got {cell}")
    n, h, w, _ = images.shape
    if h == cell and w == cell:
        return images
    if cell % h == 0 and cell % w == 0:
        # Exact integer repeat: every source pixel becomes an equal square block.
        return images.repeat(cell // h, axis=1).repeat(cell // w, axis=2)
    out = np.empty((n, cell, cell, 3), dtype=images.dtype)
    for i in range(n):
        img = Image.fromarray(np.ascontiguousarray(images[i]))
        out[i] = np.asarray(img.resize((cell, cell), Image.Resampling.NEAREST))
    return out


def status_bar(width: int, text: str, height: int = STATUS_BAR_HEIGHT) -> np.ndarray:
    """height x width x 3 uint8: one line of light text on a dark background (clipped if too long)."""
    if width < 1 or height < 2 or height % 2:
        raise ValueError(f"status bar needs width >= 1 and an even height >= 2, got {width}x{height}")
    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    line = " ".join(str(text).split())  # one line: newlines/tabs would break the layout
    top = draw.textbbox((0, 0), "Ag", font=font)
    y = (height - (top[3] - top[1])) // 2 - top[1]
    try:
        draw.text((4, y), line, fill=(235, 235, 235), font=font)
    except UnicodeEncodeError:
        # Pillow's bitmap fallback font (no FreeType) only knows Latin-1.
        draw.text((4, y), line.encode("latin-1", "replace").decode("latin-1"), fill=(235, 235, 235), font=font)
    return np.asarray(img)


def training_frame(images: np.ndarray, cell: int, text: str, cols: int = 8) -> np.ndarray:
    """One training-video frame: images upscaled to `cell`, a grid of `cols` columns, status bar below.

    The size depends only on (N, cell, cols), never on the image resolution, so the frame size stays
    fixed while the network grows; both dimensions are even because x264's yuv420p needs it.
    """
    _check_images(images)
    grid = image_grid(upscale_nearest(images, cell), cols)
    width = grid.shape[1] + grid.shape[1] % 2
    height = grid.shape[0] + grid.shape[0] % 2 + STATUS_BAR_HEIGHT
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[: grid.shape[0], : grid.shape[1]] = grid
    frame[height - STATUS_BAR_HEIGHT :] = status_bar(width, text, STATUS_BAR_HEIGHT)
    return frame


# ----------------------------------------------------------------------------- ffmpeg helpers


def _fps_arg(fps: float) -> str:
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    # A rational keeps rates such as 30000/1001 exact.
    return str(Fraction(fps).limit_denominator(100000))


def _check_frame(frame: np.ndarray, height: int, width: int) -> None:
    if frame.dtype != np.uint8 or frame.shape != (height, width, 3):
        raise ValueError(f"expected a {height} x {width} x 3 uint8 frame, got {frame.shape} {frame.dtype}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


def _probe_video(ffmpeg_exe: str, path: Path) -> tuple[str, int, int] | None:
    """(codec, width, height) if ffmpeg can demux at least one video packet from `path`, else None.

    Stream copy to the null muxer reads every packet without decoding, so this is cheap even for
    long segments.
    """
    try:
        proc = subprocess.run(
            [ffmpeg_exe, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    err = proc.stderr.decode("utf-8", "replace")
    stream = re.search(r"Stream #0:\d+.*?: Video: (\w+).*?, (\d+)x(\d+)", err)
    counts = re.findall(r"frame=\s*(\d+)", err)
    if proc.returncode != 0 or not stream or not counts or int(counts[-1]) == 0:
        return None
    return stream.group(1), int(stream.group(2)), int(stream.group(3))


# ----------------------------------------------------------------------------- video files


class VideoWriter:
    """Streams frames into a video file through imageio-ffmpeg's bundled ffmpeg.

    .mp4/.mkv are H.264 (libx264, yuv420p; .mp4 gets +faststart so browsers can play it while it
    loads); .gif is written by Pillow on close (frames are kept in memory: small videos only).
    quality uses imageio-ffmpeg's 1-10 scale (10 best); None means CRF 20. ffmpeg starts on the
    first frame, so a writer that gets no frames leaves no file.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float = 30, quality: int | None = None):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in VIDEO_FORMATS:
            raise ProganError(f"unsupported video format '{self.path.suffix}' (use .mp4, .mkv or .gif)")
        if width < 1 or height < 1:
            raise ValueError(f"video size must be positive, got {width}x{height}")
        if self.suffix != ".gif" and (width % 2 or height % 2):
            raise ValueError(f"H.264 (yuv420p) needs even width and height, got {width}x{height}")
        if quality is not None and not 1 <= quality <= 10:
            raise ValueError(f"quality must be in 1..10, got {quality}")
        _fps_arg(fps)  # validate now rather than on the first frame
        self.width, self.height, self.fps, self.quality = width, height, fps, quality
        self.frames = 0
        self._gen: Any = None
        self._gif_frames: list[Image.Image] = []
        self._closed = False

    def _start(self) -> None:
        output_params = ["-preset", X264_PRESET]
        if self.quality is None:
            output_params += ["-crf", str(X264_CRF)]
        if self.suffix == ".mp4":
            output_params += ["-movflags", "+faststart"]
        self._gen = _iio().write_frames(
            str(self.path),
            (self.width, self.height),
            fps=self.fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=self.quality,
            macro_block_size=1,  # sizes are already even; never let imageio rescale
            ffmpeg_log_level="error",
            output_params=output_params,
        )
        self._gen.send(None)  # runs up to the first `yield`: ffmpeg is started

    def write(self, frame: np.ndarray) -> None:
        if self._closed:
            raise ValueError(f"write to closed VideoWriter ({self.path})")
        _check_frame(frame, self.height, self.width)
        if self.suffix == ".gif":
            self._gif_frames.append(Image.fromarray(frame))
        else:
            if self._gen is None:
                self._start()
            self._gen.send(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gif_frames:
            first, *rest = self._gif_frames
            self._gif_frames = []
            first.save(
                self.path, save_all=True, append_images=rest, duration=max(1, round(1000 / self.fps)), loop=0
            )
        elif self._gen is not None:
            self._gen.close()  # closes ffmpeg's stdin and waits for it to finish the file
            self._gen = None
            if not self.path.is_file():
                raise RuntimeError(f"ffmpeg did not write {self.path}")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ProganError(f"no such video file: {path}")
    # passthrough: one output frame per decoded frame (no duplicates/drops from a rate conversion).
    return _iio().read_frames(str(path), output_params=["-fps_mode", "passthrough"])


def _read(path: str | Path, keep: bool) -> tuple[dict, list[bytes], int]:
    gen = _decode(path)
    frames: list[bytes] = []
    n = 0
    try:
        meta = next(gen)
        for buf in gen:
            n += 1
            if keep:
                frames.append(buf)
    except (OSError, RuntimeError) as e:
        raise ProganError(f"cannot decode video {path}: {_last_line(str(e))}") from e
    finally:
        gen.close()
    return meta, frames, n


def read_video(path: str | Path) -> tuple[int, int, int]:
    """(n_frames, width, height), with frames counted by decoding the whole file."""
    meta, _, n = _read(path, keep=False)
    width, height = meta["size"]
    return n, width, height


def read_frames(path: str | Path) -> np.ndarray:
    """All frames decoded: F x H x W x 3 uint8."""
    meta, frames, _ = _read(path, keep=True)
    width, height = meta["size"]
    if not frames:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(height, width, 3) for b in frames])


def concat_videos(segments: list[Path], out: Path, ffmpeg_exe: str | None = None) -> None:
    """Join segments of identical format into `out` without re-encoding (ffmpeg concat demuxer).

    `out` is replaced atomically, so a failed join never leaves a broken file behind.
    """
    segments = [Path(s).resolve() for s in segments]
    out = Path(out)
    if not segments:
        raise ValueError("concat_videos needs at least one segment")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=out.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if len(segments) == 1:
            shutil.copyfile(segments[0], tmp)
        else:
            exe = ffmpeg_exe or _iio().get_ffmpeg_exe()
            with tempfile.TemporaryDirectory() as list_dir:
                list_file = Path(list_dir) / "segments.txt"
                # ffconcat quoting: inside '...' everything is literal, a quote is written '\''.
                list_file.write_text(
                    "".join("file '" + str(s).replace("'", "'\\''") + "'\n" for s in segments), encoding="utf-8"
                )
                # -xerror: without it a segment that cannot be opened only ends the input early, exit code 0.
                cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-xerror", "-y"]
                cmd += ["-f", "concat", "-safe", "0", "-i", str(list_file), "-map", "0", "-c", "copy"]
                if out.suffix.lower() == ".mp4":
                    cmd += ["-movflags", "+faststart"]
                cmd.append(str(tmp))
                try:
                    proc = subprocess.run(
                        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                    )
                except OSError as e:
                    raise RuntimeError(f"cannot run ffmpeg ({exe}): {e}") from e
            if proc.returncode != 0:
                raise RuntimeError(f"ffmpeg concat failed: {_last_line(proc.stderr.decode('utf-8', 'replace'))}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


class TrainingVideo:
    """training.mkv for a run that may be stopped and resumed many times.

    Each session writes its own segment run_dir/video/segment-NNNN.mkv (NNNN = next free number); close()
    joins all readable segments (in order) into run_dir/training.mkv, so after a resume the final file
    covers the whole run. A segment left by a killed process is joined if ffmpeg can read it and skipped
    with a warning otherwise. If ffmpeg is missing or the encoder dies, training goes on: one warning, then
    every further frame is written as run_dir/video/frames-NNNN/frame-XXXXXX.png (XXXXXX = the frame's
    index in this session).
    """

    def __init__(self, run_dir: str | Path, fps: float = 30, ffmpeg_exe: str | None = None):
        self.run_dir = Path(run_dir)
        self.video_dir = self.run_dir / "video"
        self.output = self.run_dir / "training.mkv"
        self.fps = fps
        self._fps_arg = _fps_arg(fps)
        self._ffmpeg_exe = ffmpeg_exe
        self.frames = 0
        self._size: tuple[int, int] | None = None  # (height, width) fixed by the first frame
        self._index: int | None = None
        self._segment: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._png_dir: Path | None = None  # set once we fell back to PNG frames
        self._spawn_failed = False  # no usable ffmpeg at all: close() then skips the join (already warned)
        self._closed = False
        self._result: Path | None = None

    # -- numbering

    def _next_index(self) -> int:
        used = [0]
        for p in self.video_dir.glob("*-[0-9][0-9][0-9][0-9]*"):
            m = re.fullmatch(r"(?:segment|frames)-(\d+)(?:\.mkv)?", p.name)
            if m:
                used.append(int(m.group(1)))
        return max(used) + 1

    def _segments(self) -> list[Path]:
        found = []
        for p in self.video_dir.glob("segment-*.mkv"):
            m = re.fullmatch(r"segment-(\d+)\.mkv", p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    # -- encoder

    def _exe(self) -> str:
        return self._ffmpeg_exe or _iio().get_ffmpeg_exe()

    def _start(self, height: int, width: int) -> None:
        self.video_dir.mkdir(parents=True, exist_ok=True)
        self._index = self._next_index()
        self._segment = self.video_dir / f"segment-{self._index:04d}.mkv"
        try:
            exe = self._exe()
        except Exception:
            self._spawn_failed = True
            raise
        cmd = [exe, "-hide_banner", "-loglevel", "error", "-y"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", self._fps_arg, "-i", "-"]
        cmd += ["-an", "-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(X264_CRF), "-pix_fmt", "yuv420p"]
        # Small clusters: if the process is killed, at most ~1 s of video is lost from the segment.
        cmd += ["-cluster_time_limit", "1000", "-flush_packets", "1", str(self._segment)]
        # stderr to a file: a pipe nobody reads could fill up and stall ffmpeg.
        self._stderr = tempfile.TemporaryFile()
        try:
            # Own session: a Ctrl-C meant for training must not kill the encoder before close() finishes the file.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True
            )
        except OSError:
            self._spawn_failed = True
            raise

    def _ffmpeg_error(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0)
            return _last_line(self._stderr.read().decode("utf-8", "replace"))
        except OSError:
            return ""

    def _write_video(self, frame: np.ndarray) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"ffmpeg exited with code {self._proc.returncode}: {self._ffmpeg_error()}")
        self._proc.stdin.write(np.ascontiguousarray(frame).data)

    def _stop_encoder(self, kill: bool) -> int | None:
        """Finish (or kill) ffmpeg; returns its exit code, None if there was no process."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if kill:
            proc.kill()
        if proc.stdin is not None:
            try:
                proc.stdin.close()  # EOF: ffmpeg flushes the encoder and finishes the file
            except OSError:
                pass
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _fall_back(self, err: BaseException) -> None:
        detail = self._ffmpeg_error()
        reason = f"{type(err).__name__}: {err}" + (f"; {detail}" if detail and detail not in str(err) else "")
        self._stop_encoder(kill=True)
        if self._index is None:
            self.video_dir.mkdir(parents=True, exist_ok=True)
            self._index = self._next_index()
        self._png_dir = self.video_dir / f"frames-{self._index:04d}"
        self._png_dir.mkdir(parents=True, exist_ok=True)
        warnings.warn(f"ffmpeg failed ({reason}); writing training frames as PNG to {self._png_dir}", stacklevel=3)

    # -- public

    def add(self, frame: np.ndarray) -> None:
        """Append one H x W x 3 uint8 frame (every frame of a run has the same, even, size)."""
        if self._closed:
            raise ValueError("add() on a closed TrainingVideo")
        if self._size is None:
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] % 2 or frame.shape[1] % 2:
                raise ValueError(f"training frames must be H x W x 3 with even H and W, got {frame.shape}")
            self._size = (frame.shape[0], frame.shape[1])
        _check_frame(frame, *self._size)
        if self._png_dir is None:
            try:
                if self._proc is None:
                    self._start(*self._size)
                self._write_video(frame)
                self.frames += 1
                return
            except Exception as e:  # whatever breaks in ffmpeg, training must go on
                self._fall_back(e)
        assert self._png_dir is not None
        Image.fromarray(frame).save(self._png_dir / f"frame-{self.frames:06d}.png", compress_level=1)
        self.frames += 1

    def close(self) -> Path | None:
        """Finish this session's segment and join all segments into training.mkv (None if no video)."""
        if self._closed:
            return self._result
        self._closed = True
        if self._proc is not None:
            try:
                rc = self._stop_encoder(kill=False)
                if rc:
                    detail = self._ffmpeg_error()
                    warnings.warn(f"ffmpeg exited with code {rc} ({detail}) while finishing {self._segment}")
            except Exception as e:
                warnings.warn(f"ffmpeg failed while finishing {self._segment} ({e})")
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._spawn_failed:
            return None  # no ffmpeg to join with; already warned
        self._result = self._join()
        return self._result

    def _join(self) -> Path | None:
        segments = self._segments()
        if not segments:
            return None
        try:
            exe = self._exe()
        except Exception as e:
            warnings.warn(f"cannot join training video segments: no ffmpeg ({e})")
            return None
        probed = [(seg, _probe_video(exe, seg)) for seg in segments]
        readable = [(seg, info) for seg, info in probed if info is not None]
        for seg, info in probed:
            if info is None:
                warnings.warn(f"skipping unreadable training video segment {seg}")
        if not readable:
            return None
        # Stream copy needs one format throughout; the newest segment's format wins (e.g. frame size changed).
        target = readable[-1][1]
        keep = []
        for seg, info in readable:
            if info == target:
                keep.append(seg)
            else:
                warnings.warn(f"skipping training video segment {seg}: format {info} differs from {target}")
        try:
            concat_videos(keep, self.output, ffmpeg_exe=exe)
        except Exception as e:
            warnings.warn(f"could not join training video segments into {self.output} ({e})")
            return None
        return self.output

    def __enter__(self) -> TrainingVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timelapse(src: str | Path, out: str | Path, seconds: float = 30.0, width: int | None = None,
              fps: float = 30.0) -> tuple[int, float]:
    """Re-encode a (long) training video into a short, browser-playable H.264 .mp4 of about `seconds`, optionally
    downscaled to `width`. Keeps evenly spaced frames, so the whole run is shown. Returns (frames, seconds)."""
    src, out = Path(src), Path(out)
    n, w, h = read_video(src)
    if n == 0:
        raise ProganError(f"{src} has no frames")
    keep = max(1, math.ceil(n / max(1.0, seconds * fps)))  # every keep-th frame
    scale = f",scale={width}:-2:flags=area" if width and width < w else ""
    exe = _iio().get_ffmpeg_exe()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), "-an",
           "-vf", f"select='not(mod(n\\,{keep}))',setpts=N/({fps}*TB){scale}", "-r", _fps_arg(fps),
           "-c:v", "libx264", "-preset", "medium", "-crf", "23", "-pix_fmt", "yuv420p",  # small files to share
           "-movflags", "+faststart", str(tmp)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ProganError(f"ffmpeg could not make the timelapse: {_last_line(proc.stderr.decode('utf-8', 'replace'))}")
    os.replace(tmp, out)
    frames = math.ceil(n / keep)
    return frames, frames / fps
