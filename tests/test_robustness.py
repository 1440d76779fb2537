"""Robustness: one-line errors for bad input, clean stops on SIGINT/SIGTERM that resume exactly, checkpoints that
survive kill -9 and a full disk, NaN rollback, untrusted and newer checkpoints, and a missing or dying ffmpeg.

Everything runs on tiny data (16 px images, --size 8, batch 4) so the module stays fast on a busy 2-core CPU.
Subprocesses get OMP_NUM_THREADS=1 (run.setup_backend honours it), which also makes their results reproducible.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blobs import write_blob_images
from progan import checkpoint
from progan.config import TrainConfig
from progan.errors import ProganError

N_IMAGES, IMG_PX, SIZE, BATCH = 64, 16, 8, 4
STEPS_PER_EPOCH = N_IMAGES // BATCH           # 16
LOG_EVERY = VIDEO_EVERY = 2
# level 0 stable for 16 images (4 steps), then a 64-image fade-in to 8 px (steps 5..20): interrupts land in the fade.
# --holdout 0: these tests count steps per epoch over the whole folder (the split is tested in test_train_cli.py).
OPTS = ["--size", str(SIZE), "--batch", str(BATCH), "--latent-dim", "16", "--fade-images", "64",
        "--stable-images", "16", "--log-every", str(LOG_EVERY), "--video-every", str(VIDEO_EVERY), "--holdout", "0",
        "--no-progress"]
TIMEOUT = 180
MID_EPOCH = re.compile(r"^epoch-(\d{4})-img-(\d{9})\.pt$")


# ===================================================================================================== helpers


def _write_images(folder: Path, n: int, px: int = IMG_PX, seed: int = 0) -> Path:
    return write_blob_images(folder, n, px, seed, ext="png")


def _command_argv(command: str, run_dir: Path, tmp_path: Path, env, inspect_target: Path | None = None) -> list[str]:
    """Arguments of the command that reads RUN's checkpoint: inspect, generate or train (resume)."""
    if command == "inspect":
        return ["inspect", str(inspect_target or run_dir)]
    if command == "generate":
        return ["generate", str(run_dir), "--out", str(tmp_path / "faces.png"), "--n", "4", "--no-progress"]
    return env.train_args(run_dir, "--epochs", "1")


class Env:
    """A scratch folder with the training images, an image cache, and the environment for subprocesses."""

    def __init__(self, root: Path):
        self.root = root
        self.images = _write_images(root / "images", N_IMAGES)
        self.cache = root / "cache"
        self.env = {**os.environ, "PROGAN_CACHE": str(root / "env-cache"), "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1"}
        for k in ("PROGAN_DEBUG", "IMAGEIO_FFMPEG_EXE"):
            self.env.pop(k, None)

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "progan", *args]

    def train_args(self, run_dir: Path, *extra: str, images: Path | None = None) -> list[str]:
        return ["train", str(images or self.images), "--out", str(run_dir), *OPTS, "--cache-dir", str(self.cache),
                *extra]

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, cwd=self.root,
                              env={**self.env, **(env or {})}, timeout=TIMEOUT)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=self.root, env=self.env)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("robust"))


@pytest.fixture
def one_thread(monkeypatch, tmp_path):
    """In-process training: one CPU thread (as OMP_NUM_THREADS=1 gives subprocesses), a private image cache."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PROGAN_CACHE", str(tmp_path / "env-cache"))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _main(capsys, *argv: str) -> tuple[int, str]:
    """progan.cli.main in this process: (exit code, stderr)."""
    from progan.cli import main

    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def _error_line(stderr: str) -> str:
    """The single 'progan: error: ...' line, which must be the last thing printed; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("progan: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def _tree(run_dir: Path) -> list[tuple[str, int, int]]:
    return sorted((p.relative_to(run_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in run_dir.rglob("*") if p.is_file())


def _log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_same(a, b, path="") -> None:
    """Recursive bit-identity of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for k in ("G", "D", "G_ema") for t in state[k].values()
               if t.is_floating_point())


# ===================================================================================================== reference run


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory):
    """An uninterrupted 2-epoch run, started in the background at once (it runs while other tests do)."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    proc = env.popen(*env.train_args(run_dir, "--epochs", "2"))
    yield run_dir, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_start_baseline(baseline):
    """Only starts the reference run early (tests run in file order); test_sigint_then_exact_resume uses it."""
    assert baseline[1].poll() in (None, 0)



# ===================================================================================================== bad inputs


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory) -> Path:
    """A run folder with one mid-epoch checkpoint (2 steps), trained by the CLI in a subprocess."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = env.run(*env.train_args(run_dir, "--epochs", "1", "--max-steps", "2"))
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.latest(run_dir) is not None
    return run_dir


def _bad_folders(root: Path, env: Env) -> dict[str, Path]:
    empty = root / "empty"
    empty.mkdir()
    text_only = root / "text-only"
    text_only.mkdir()
    (text_only / "notes.txt").write_text("not a picture")
    fake = root / "fake-images"
    fake.mkdir()
    (fake / "a.jpg").write_bytes(b"this is not a jpeg")
    (fake / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    few = _write_images(root / "few", BATCH - 1, seed=3)
    small = _write_images(root / "small", 2 * BATCH, px=SIZE // 2, seed=4)
    return {"missing": root / "no-such-folder", "empty": empty, "text-only": text_only, "fake": fake, "few": few,
            "small": small}


# (case, folder, extra options, exit code, patterns the one-line message must contain)
DATA_CASES = [
    ("missing folder", "missing", [], 1, ["image folder not found", "no-such-folder"]),
    ("empty folder", "empty", [], 1, ["no images", "empty"]),
    ("only non-image files", "text-only", [], 1, ["no images", "text-only"]),
    ("only broken images", "fake", [], 1, ["no readable images", "fake-images", "2 files skipped"]),
    ("fewer images than a batch", "few", [], 1, [f"only {BATCH - 1} usable training images", "fewer than one batch",
                                                 f"--batch {BATCH}"]),
    ("images smaller than --size", "small", [], 1, [f"smaller than {SIZE}x{SIZE}", "--allow-upscale",
                                                    f"{SIZE // 2}x{SIZE // 2}"]),
    ("--size 100", None, ["--size", "100"], 1, ["--size 100", "base*2^k"]),
    ("--size 3", None, ["--size", "3"], 1, ["--size 3 is too small"]),
    ("--size abc", None, ["--size", "abc"], 2, ["--size", "'abc' is not a valid integer"]),
    ("--preset nope", None, ["--preset", "nope"], 2, ["--preset", "'nope'"]),
    ("--device tpu", None, ["--device", "tpu"], 1, ["unknown device 'tpu'"]),
    ("--batch 1", None, ["--batch", "1"], 1, ["--batch must be at least 2"]),
]


@pytest.mark.parametrize("case,folder,extra,code,patterns", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_input_is_one_line(env, tmp_path, capsys, one_thread, case, folder, extra, code, patterns):
    folders = _bad_folders(tmp_path, env)
    run_dir = tmp_path / "run"
    images = folders[folder] if folder else env.images
    rc, err = _main(capsys, *env.train_args(run_dir, "--epochs", "1", *extra, images=images))
    assert rc == code, err
    msg = _error_line(err)
    for p in patterns:
        assert p in msg, (p, msg)
    assert not run_dir.exists()                        # nothing written for a run that never started
    print(f"| {case} | `{msg}` ({rc}) |")


def test_too_small_images_train_with_allow_upscale(env, tmp_path, capsys, one_thread):
    small = _write_images(tmp_path / "small", 2 * BATCH, px=SIZE // 2, seed=4)
    run_dir = tmp_path / "run"
    rc, err = _main(capsys, *env.train_args(run_dir, "--epochs", "1", "--allow-upscale", "--max-steps", "1",
                                            images=small))
    assert rc == 0, err
    assert "Traceback" not in err and "done:" in err
    state = checkpoint.load(checkpoint.latest(run_dir))
    assert state["nimg"] == BATCH and _finite(state)


def test_debug_shows_traceback(env, tmp_path):
    proc = env.run("--debug", *env.train_args(tmp_path / "run", images=tmp_path / "no-such-folder"))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ProganError: image folder not found" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,extra", [
    ("other --size", ["--size", "16"]),
    ("other architecture (--latent-dim)", ["--latent-dim", "32"]),
    ("other preset", ["--preset", "seed2019"]),
])
def test_run_trained_differently_is_refused(env, trained, tmp_path, capsys, one_thread, case, extra):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = _tree(run_dir)
    rc, err = _main(capsys, *env.train_args(run_dir, "--epochs", "1", *extra))
    assert rc == 1, err
    msg = _error_line(err)
    assert "was trained with" in msg and "--fresh" in msg
    assert _tree(run_dir) == before                   # refused before anything was touched
    print(f"| {case} | `{msg}` ({rc}) |")


def _break_checkpoint(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "schema 999":
        state = torch.load(path, weights_only=True)
        state["schema"] = 999
        torch.save(state, path)
    elif how == "not a dict":
        torch.save([1, 2, 3], path)
    elif how in ("no G weights", "no optimiser state"):
        state = torch.load(path, weights_only=True)
        del state["G" if how == "no G weights" else "opt_g"]
        torch.save(state, path)
    else:
        raise AssertionError(how)


BROKEN = [("truncated", "not a progan checkpoint (corrupt or truncated"),
          ("garbage", "not a progan checkpoint (corrupt or truncated"),
          ("empty", "not a progan checkpoint (corrupt or truncated"),
          ("not a dict", "not a progan checkpoint (no schema/config)"),
          ("schema 999", "checkpoint schema 999, newer than this progan understands (1); upgrade progan")]


@pytest.mark.parametrize("how,pattern", BROKEN, ids=[b[0] for b in BROKEN])
@pytest.mark.parametrize("command", ["inspect", "generate", "train"])
def test_broken_checkpoint_is_one_line(env, trained, tmp_path, capsys, one_thread, how, pattern, command):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = checkpoint.latest(run_dir)
    _break_checkpoint(ckpt, how)
    before = _tree(run_dir)
    argv = _command_argv(command, run_dir, tmp_path, env)
    rc, err = _main(capsys, *argv)
    assert rc == 1, err
    msg = _error_line(err)
    assert pattern in msg and ckpt.name in msg, msg
    detail = msg.split(ckpt.name, 1)[1]
    assert len(detail) < 160 and ". " not in detail, msg          # one short sentence, not cut off mid-word
    assert _tree(run_dir) == before and not (tmp_path / "faces.png").exists()
    print(f"| {how} checkpoint, `progan {command}` | `{msg}` ({rc}) |")


@pytest.mark.parametrize("how", ["no G weights", "no optimiser state"])
def test_incomplete_checkpoint_cannot_resume(env, trained, tmp_path, capsys, one_thread, how):
    """A checkpoint that loads but lacks parts of the training state: `train` refuses in one line (no KeyError)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = checkpoint.latest(run_dir)
    _break_checkpoint(ckpt, how)
    before = _tree(run_dir)
    rc, err = _main(capsys, *env.train_args(run_dir, "--epochs", "1"))
    assert rc == 1, err
    msg = _error_line(err)
    assert ckpt.name in msg and "cannot resume" in msg and "--fresh" in msg, msg
    assert _tree(run_dir) == before
    print(f"| {how} checkpoint, `progan train` | `{msg}` ({rc}) |")


# ===================================================================================================== untrusted


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("command", ["inspect", "generate", "train"])
def test_code_in_checkpoint_is_not_run(env, tmp_path, capsys, one_thread, command):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    evil = run_dir / "checkpoints" / "epoch-0001.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"schema": 1, "config": {}, "G": _Evil(marker)}, evil)
    assert not marker.exists()
    argv = _command_argv(command, run_dir, tmp_path, env, inspect_target=evil)
    rc, err = _main(capsys, *argv)
    assert rc == 1, err
    msg = _error_line(err)
    assert "refusing to load" in msg and ("posix.mkdir" in msg or "os.mkdir" in msg), msg
    assert not marker.exists()
    print(f"| code in a checkpoint, `progan {command}` | `{msg}` ({rc}) |")


def test_code_in_checkpoint_is_not_run_subprocess(env, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"schema": 1, "config": {}, "G": _Evil(marker)}, evil)
    proc = env.run("inspect", str(evil))
    assert proc.returncode == 1
    assert "refusing to load" in _error_line(proc.stderr)
    assert not marker.exists()


# ===================================================================================================== versions


def test_schema_versions(trained, tmp_path):
    state = checkpoint.load(checkpoint.latest(trained))
    assert state["schema"] == checkpoint.SCHEMA == 1
    for schema, pattern in ((999, "newer than this progan understands"), (0, "not supported"),
                            ("1", "invalid checkpoint schema")):
        path = tmp_path / f"schema-{schema}.pt"
        torch.save({**state, "schema": schema}, path)
        with pytest.raises(ProganError, match=pattern):
            checkpoint.load(path)


def test_config_without_newer_fields_loads_with_defaults(env, trained, tmp_path, capsys, one_thread):
    """A checkpoint written before noise_max / r1_gamma / r1_every existed: the defaults fill in, and it can be
    inspected, sampled and resumed."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    ckpt = checkpoint.latest(run_dir)
    state = torch.load(ckpt, weights_only=True)
    dropped = ("noise_max", "r1_gamma", "r1_every")
    for k in dropped:
        del state["config"][k]
    torch.save(state, ckpt)
    cfg = TrainConfig.from_dict(checkpoint.load(ckpt)["config"])
    defaults = TrainConfig()
    assert all(getattr(cfg, k) == getattr(defaults, k) for k in dropped)
    rc, err = _main(capsys, "inspect", str(run_dir), "--json")
    assert rc == 0, err
    rc, err = _main(capsys, "generate", str(run_dir), "--out", str(tmp_path / "f.png"), "--n", "2", "--no-progress")
    assert rc == 0, err
    rc, err = _main(capsys, *env.train_args(run_dir, "--epochs", "1", "--max-steps", "1"))
    assert rc == 0, err
    assert "resuming" in err
    assert checkpoint.load(checkpoint.latest(run_dir))["nimg"] == state["nimg"] + BATCH


def test_config_with_unknown_field_is_refused(trained, tmp_path):
    state = checkpoint.load(checkpoint.latest(trained))
    state["config"]["warp_drive"] = 9
    with pytest.raises(ProganError, match=r"unknown config keys \['warp_drive'\]"):
        TrainConfig.from_dict(state["config"])


# ===================================================================================================== signals


def _interrupt(env: Env, run_dir: Path, sig: int, after_step: int = 6) -> subprocess.CompletedProcess:
    """Start a long `python -m progan train`, wait until log.jsonl shows step >= after_step, send `sig`.

    The epoch ends at step 16, so the signal lands mid-epoch unless this process stalls for ~10 steps."""
    proc = env.popen(*env.train_args(run_dir, "--epochs", "50"))
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"training ended before the signal (rc {proc.returncode}): {err}")
            text = log.read_text() if log.exists() else ""
            complete = text.split("\n")[:-1]          # a line still being written does not count
            if complete and json.loads(complete[-1])["step"] >= after_step:
                break
            assert time.monotonic() < deadline, "no log lines in time"
            time.sleep(0.01)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check_interrupted(run_dir: Path, proc: subprocess.CompletedProcess, sig: int, after_step: int) -> dict:
    assert proc.returncode == 128 + sig, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "stopped by signal" in proc.stderr and "resume with the same command" in proc.stderr
    ckpts = run_dir / "checkpoints"
    name = (ckpts / "latest").read_text().strip()
    m = MID_EPOCH.match(name)
    assert m, f"latest -> {name}, not a mid-epoch checkpoint"
    assert checkpoint.latest(run_dir) == ckpts / name
    assert f"saved {ckpts / name}" in proc.stderr
    state = checkpoint.load(ckpts / name)
    nimg = state["nimg"]
    assert nimg == int(m.group(2)) and state["epoch"] == int(m.group(1)) == nimg // N_IMAGES
    assert nimg % N_IMAGES and nimg >= after_step * BATCH and state["steps"] * BATCH == nimg
    assert _finite(state)
    assert not list(ckpts.glob(".*.tmp"))
    # the log stops at the checkpoint, training.mkv covers every frame so far and decodes
    steps = _log_steps(run_dir)
    assert steps == list(range(LOG_EVERY, state["steps"] + 1, LOG_EVERY))
    from progan.visualization import read_video

    n_frames, width, height = read_video(run_dir / "training.mkv")
    assert n_frames == state["steps"] // VIDEO_EVERY and width > 0 and height > 0
    return state


def test_sigterm_stops_with_checkpoint_and_resumes(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = _interrupt(env, run_dir, signal.SIGTERM)
    state = _check_interrupted(run_dir, proc, signal.SIGTERM, 6)
    name = checkpoint.latest(run_dir).name
    # the same command resumes from exactly there
    again = env.run(*env.train_args(run_dir, "--epochs", "50", "--max-steps", "1"))
    assert again.returncode == 0, again.stderr
    assert f"resuming {run_dir} from {name}" in again.stderr and f"{state['nimg']:,} images shown" in again.stderr
    after = checkpoint.load(checkpoint.latest(run_dir))
    assert (after["nimg"], after["steps"]) == (state["nimg"] + BATCH, state["steps"] + 1)


def test_sigint_then_exact_resume(env, baseline, tmp_path):
    """SIGINT mid-epoch -> 130 with a mid-epoch checkpoint; the resumed run ends bit-identical to an uninterrupted
    run with the same seed and epochs."""
    run_dir = tmp_path / "run"
    proc = _interrupt(env, run_dir, signal.SIGINT)
    state = _check_interrupted(run_dir, proc, signal.SIGINT, 6)
    name = checkpoint.latest(run_dir).name

    resumed = env.run(*env.train_args(run_dir, "--epochs", "2"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run_dir} from {name}" in resumed.stderr
    assert f"{state['nimg']:,} images shown" in resumed.stderr and "done: 2 epochs" in resumed.stderr

    base_dir, base_proc = baseline
    out, err = base_proc.communicate(timeout=TIMEOUT)
    assert base_proc.returncode == 0, err
    for epoch in (1, 2):
        a = checkpoint.load(run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt")
        b = checkpoint.load(base_dir / "checkpoints" / f"epoch-{epoch:04d}.pt")
        for key in ("G", "D", "G_ema"):
            _assert_same(a[key], b[key], key)
        # training wall-clock is the one value that may differ (measured time, not training state)
        assert a.pop("train_seconds") > 0 and b.pop("train_seconds") > 0
        _assert_same(a, b)                            # optimisers, epsilon, RNG, counters and config too
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "epoch-0002.pt"
    # one log line per LOG_EVERY steps over the whole run, none twice, and a video of the whole run
    assert _log_steps(run_dir) == _log_steps(base_dir) == list(range(LOG_EVERY, 2 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    from progan.visualization import read_video

    assert read_video(run_dir / "training.mkv")[0] == read_video(base_dir / "training.mkv")[0] \
        == 2 * STEPS_PER_EPOCH // VIDEO_EVERY


# ===================================================================================================== crash safety

_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch
    from progan import checkpoint

    run, marker, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    ckpts = run / "checkpoints"
    state = {"config": {"size": 8}, "w": torch.arange(100000, dtype=torch.float32)}
    checkpoint.save(state, ckpts, "epoch-0001.pt")

    def hang():
        marker.write_text("now")
        time.sleep(600)

    if where == "data":
        real_save = torch.save
        def save(obj, f):
            f.write(b"PK\\x03\\x04" + b"\\0" * 50000)   # a first part of a zip, then the process hangs
            f.flush()
            hang()
        torch.save = save
    else:  # while the `latest` pointer is written, after the new checkpoint file is in place
        real_fsync = os.fsync
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(".latest.tmp"):
                hang()
            real_fsync(fd)
        os.fsync = fsync
    checkpoint.save({**state, "w": -state["w"]}, ckpts, "epoch-0002.pt")
    print("not killed")
""")


@pytest.mark.parametrize("where", ["data", "pointer"])
def test_kill_9_during_checkpoint_write(env, tmp_path, where):
    run_dir = tmp_path / "run"
    marker = tmp_path / "writing"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(marker), where], env=env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL and "not killed" not in out
    ckpts = run_dir / "checkpoints"
    first = ckpts / "epoch-0001.pt"
    assert checkpoint.latest(run_dir) == first
    assert (ckpts / "latest").read_text().strip() == "epoch-0001.pt"
    state = checkpoint.load(first)
    assert torch.equal(state["w"], torch.arange(100000, dtype=torch.float32))
    names = sorted(p.name for p in ckpts.iterdir())
    if where == "data":
        # no half-written file under the final name; the leftover temp file is never taken for a checkpoint
        assert names == [".epoch-0002.pt.tmp", "epoch-0001.pt", "latest"]
        assert checkpoint.list_checkpoints(ckpts) == [first]
    else:
        # the new checkpoint is complete; `latest` still names the old one, which is whole
        assert names == [".latest.tmp", "epoch-0001.pt", "epoch-0002.pt", "latest"]
        assert torch.equal(checkpoint.load(ckpts / "epoch-0002.pt")["w"], -state["w"])
    assert checkpoint.resolve(run_dir) == first
    # the next save reuses the names cleanly
    checkpoint.save({"config": {"size": 8}, "w": torch.ones(3)}, ckpts, "epoch-0002.pt")
    assert checkpoint.latest(run_dir) == ckpts / "epoch-0002.pt"
    assert not list(ckpts.glob(".*.tmp"))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["torch.save", "fsync", "pointer"])
def test_disk_full_during_checkpoint(tmp_path, monkeypatch, where):
    ckpts = tmp_path / "run" / "checkpoints"
    first = checkpoint.save({"config": {"size": 8}, "w": torch.zeros(1000)}, ckpts, "epoch-0001.pt")
    pointer = (ckpts / "latest").read_bytes()
    if where == "torch.save":
        def full_save(obj, f):
            f.write(b"\0" * 4096)
            _enospc()
        monkeypatch.setattr(checkpoint.torch, "save", full_save)
    elif where == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", _enospc)
    else:
        real_replace = os.replace

        def replace(src, dst):   # the checkpoint lands, then the pointer cannot be written
            if Path(dst).name == "latest":
                _enospc()
            real_replace(src, dst)
        monkeypatch.setattr(checkpoint.os, "replace", replace)
    target = ckpts / "epoch-0002.pt"
    with pytest.raises(ProganError) as e:
        checkpoint.save({"config": {"size": 8}, "w": torch.ones(1000)}, ckpts, "epoch-0002.pt")
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "No space left on device" in msg
    assert "previous checkpoint is intact" in msg
    print(f"| disk full ({where}) | `progan: error: {msg}` (1) |")
    assert (ckpts / "latest").read_bytes() == pointer
    assert checkpoint.latest(tmp_path / "run") == first
    assert torch.equal(checkpoint.load(first)["w"], torch.zeros(1000))
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    if where == "pointer":
        assert checkpoint.list_checkpoints(ckpts) == [first, target]   # complete, just not pointed at
    else:
        assert not target.exists()


# ===================================================================================================== NaN rollback


LR = 1e-3


def _nan_train(env: Env, run_dir: Path, monkeypatch, inject_at) -> tuple:
    """progan.run.train in this process, with NaN written into a generator weight after the real step on the
    calls for which inject_at(call) is true. 8 steps per epoch (batch 8), 2 epochs, a log line every step."""
    from progan import run
    from progan.gantrain import Trainer

    real_step = Trainer.step
    calls = []

    def step(self):
        real_step(self)
        calls.append(self.steps)
        if inject_at(len(calls)):
            with torch.no_grad():
                next(self.G.parameters()).fill_(float("nan"))

    monkeypatch.setattr(Trainer, "step", step)
    requested = dict(size=SIZE, batch=8, latent_dim=16, fade_images=32, stable_images=16, log_every=1,
                     video_every=1000, epochs=2, lr_g=LR, lr_d=LR, holdout=0.0)
    result = run.train(str(env.images), run_dir, requested, set(requested), cache_dir=str(env.cache),
                       progress=False, device="cpu")
    return result, calls


def test_nan_once_rolls_back_and_finishes(env, tmp_path, monkeypatch, one_thread):
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"non-finite loss at 88 images: rolled back to 64 images and halved the "
                                         r"learning rates \(failure 1 of 3\)") as rec:
        result, calls = _nan_train(env, run_dir, monkeypatch, lambda call: call == 10)
    assert len([w for w in rec if "rolled back" in str(w.message)]) == 1
    # steps 9, 10 (NaN injected), 11 (NaN loss -> back to step 8), then 9..16 again
    assert calls == list(range(1, 12)) + list(range(9, 17))
    assert (result.epochs_done, result.nimg, result.signal) == (2, 2 * N_IMAGES, None)
    final = checkpoint.load(run_dir / "checkpoints" / "epoch-0002.pt")
    assert _finite(final)
    assert [g["lr"] for g in final["opt_g"]["param_groups"]] == [LR * 0.5]
    assert [g["lr"] for g in final["opt_d"]["param_groups"]] == [LR * 0.5]
    before = checkpoint.load(run_dir / "checkpoints" / "epoch-0001.pt")
    assert [g["lr"] for g in before["opt_g"]["param_groups"]] == [LR]


def test_two_nans_in_one_epoch_still_recover(env, tmp_path, monkeypatch, one_thread):
    """Two separate divergences before the next checkpoint: the second rollback must go back to the same clean
    state as the first (not to optimiser moments the diverged steps wrote into it)."""
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="rolled back") as rec:
        result, calls = _nan_train(env, run_dir, monkeypatch, lambda call: call in (10, 12))
    assert [str(w.message).split("(")[-1] for w in rec if "rolled back" in str(w.message)] == [
        "failure 1 of 3)", "failure 2 of 3)"]
    assert calls == list(range(1, 12)) + [9, 10] + list(range(9, 17))
    assert result.epochs_done == 2
    final = checkpoint.load(run_dir / "checkpoints" / "epoch-0002.pt")
    assert _finite(final)
    assert [g["lr"] for g in final["opt_g"]["param_groups"]] == [LR * 0.25]


def test_persistent_nan_gives_up_and_keeps_last_good(env, tmp_path, monkeypatch, one_thread):
    run_dir = tmp_path / "run"
    good = run_dir / "checkpoints" / "epoch-0001.pt"
    with pytest.warns(UserWarning, match="rolled back") as rec, pytest.raises(ProganError) as e:
        _nan_train(env, run_dir, monkeypatch, lambda call: call >= 10)
    assert len([w for w in rec if "rolled back" in str(w.message)]) == 2
    msg = str(e.value)
    assert "diverged 3 times in a row" in msg and str(good) in msg and "--lr-g" in msg
    print(f"| persistent NaN | `progan: error: {msg}` (1) |")
    assert checkpoint.latest(run_dir) == good
    assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == ["epoch-0001.pt"]
    state = checkpoint.load(good)
    assert state["nimg"] == N_IMAGES and _finite(state)


# ===================================================================================================== ffmpeg


@pytest.mark.parametrize("exe", ["/nonexistent/ffmpeg", "/bin/false"], ids=["missing", "dies"])
def test_training_survives_without_ffmpeg(env, tmp_path, exe):
    run_dir = tmp_path / "run"
    proc = env.run(*env.train_args(run_dir, "--epochs", "1", "--max-steps", "6"), env={"IMAGEIO_FFMPEG_EXE": exe})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"ffmpeg failed .*PNG", proc.stderr), proc.stderr
    pngs = sorted(run_dir.glob("video/frames-*/frame-*.png"))
    # every frame after the failure is a PNG (a dying ffmpeg may have swallowed the one written before it died)
    frames = 6 // VIDEO_EVERY
    assert len(pngs) == frames if exe.startswith("/nonexistent") else frames - 1 <= len(pngs) <= frames
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[0] > 0 and im.mode == "RGB"
    state = checkpoint.load(checkpoint.latest(run_dir))
    assert state["steps"] == 6
