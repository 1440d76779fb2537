"""Training end to end: exact resume equivalence of the Trainer (in process), and the `progan train` command line
(run as a subprocess on a folder of tiny JPEGs): outputs, resume, --fresh, help texts and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blobs import n_training, write_blob_images
from progan import checkpoint
from progan.config import TrainConfig
from progan.facedata import ImageBank
from progan.gantrain import Trainer, level_start, schedule

# ===================================================================================================== resume


def _bank(n: int = 24, size: int = 16) -> ImageBank:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        c = rng.uniform(0, 255, (3, 3))
        img = c[:, 0, None, None] * 0.5 + c[:, 1, None, None] * 0.5 * xx + c[:, 2, None, None] * 0.5 * yy
        imgs[i] = np.clip(img.transpose(1, 2, 0), 0, 255).astype(np.uint8)
    return ImageBank(imgs)


def _resume_cfg() -> TrainConfig:
    # noise_high < 0: the rating gap is always "too large", so epsilon grows every step and the noise draws from
    # the trainer's RNG matter for the result (a resume that loses the RNG or epsilon cannot match).
    return TrainConfig(size=16, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4, latent_dim=16,
                       batch=8, fade_images=32, stable_images=16, ema_half_life=64, noise_high=-1.0,
                       noise_low=-2.0, noise_step=0.01, diversity=0.5)


def _assert_same(a, b, path="") -> None:
    """Recursive bit-identity of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _assert_trainers_identical(b: Trainer, c: Trainer) -> None:
    for name in ("G", "D", "G_ema"):
        _assert_same(getattr(b, name).state_dict(), getattr(c, name).state_dict(), name)
    _assert_same(b.opt_g.state_dict(), c.opt_g.state_dict(), "opt_g")
    _assert_same(b.opt_d.state_dict(), c.opt_d.state_dict(), "opt_d")
    assert torch.equal(b.noise.eps, c.noise.eps)
    assert torch.equal(b.rng.get_state(), c.rng.get_state())
    assert (b.nimg, b.steps, b.epoch) == (c.nimg, c.steps, c.epoch)
    assert torch.equal(b.render_fixed(), c.render_fixed())


@pytest.mark.parametrize("n", [3, 5])
def test_resume_is_bit_identical(tmp_path, n):
    """A: n steps, checkpoint; B: resumed from it, n more; C: 2n straight. B and C must be bit-identical.

    With 24 images and batch 8 an epoch is 3 steps. n=5 splits mid-epoch in the middle of the 8 px fade-in and
    runs on into the 16 px fade-in; n=3 splits exactly at an epoch boundary, one step into the fade.
    """
    cfg = _resume_cfg()
    bank = _bank()
    a = Trainer(cfg, bank)
    for _ in range(n):
        a.step()
    ck = checkpoint.save(a.state_dict(), tmp_path / "checkpoints", checkpoint.checkpoint_name(a.epoch, a.nimg))
    state = checkpoint.load(ck)      # torch.load(weights_only=True) inside
    del a

    b = Trainer(cfg, bank)
    b.load_state_dict(state)
    assert b.nimg == 8 * n and b.steps == n
    split = b.phase()
    for _ in range(n):
        b.step()

    c = Trainer(cfg, bank)
    for _ in range(2 * n):
        c.step()

    # the run really crosses what resume has to get right
    ipe = c.images_per_epoch
    assert ipe == 24
    assert c.nimg // ipe > (8 * n) // ipe >= 1                          # an epoch boundary after the split
    assert c.phase()[0] > 0 and level_start(1, 32, 16) < 16 * n       # a level change
    assert split[0] == 1 and 0.0 < split[1] < 1.0                      # the split is inside a fade
    if n == 5:
        assert (8 * n) % ipe != 0                                      # ... and mid-epoch
        assert c.phase() == schedule(80, 3, 32, 16) == (2, 0.5)
    assert c.noise.eps.item() > 0

    _assert_trainers_identical(b, c)


def test_resume_without_rng_diverges(tmp_path):
    """The identity check above can fail: a resume that forgets the RNG state ends somewhere else."""
    cfg = _resume_cfg()
    bank = _bank()
    a = Trainer(cfg, bank)
    for _ in range(3):
        a.step()
    state = a.state_dict()
    b = Trainer(cfg, bank)
    b.load_state_dict(state)
    b.rng.manual_seed(12345)
    c = Trainer(cfg, bank)
    for _ in range(3):
        b.step()
    for _ in range(6):
        c.step()
    assert not all(torch.equal(v, c.G.state_dict()[k]) for k, v in b.G.state_dict().items())


# ===================================================================================================== CLI

N_IMAGES, SIZE, BATCH, EPOCHS, VIDEO_EVERY, LOG_EVERY = 64, 16, 8, 2, 2, 4
N_TRAIN = n_training(N_IMAGES, "jpg")   # the default --holdout keeps a few images out of training (61 of 64)
IPE = N_TRAIN // BATCH * BATCH          # images per epoch: whole batches of the training part
STEPS_PER_EPOCH = IPE // BATCH
TRAIN_OPTS = ["--size", str(SIZE), "--batch", str(BATCH), "--video-every", str(VIDEO_EVERY),
              "--log-every", str(LOG_EVERY), "--fade-images", "32", "--stable-images", "32", "--no-progress"]
LOG_KEYS = {"step", "nimg", "epoch", "level", "res", "alpha", "g_loss", "d_loss", "real_rating", "fake_rating",
            "eps", "img_per_s", "time"}
TIMEOUT = 240


def _write_images(folder: Path, n: int, size: int = SIZE, seed: int = 0) -> None:
    write_blob_images(folder, n, size, seed, ext="jpg")


class Cli:
    def __init__(self, root: Path):
        self.root = root
        self.images = root / "images"
        self.cache = root / "cache"
        self.env = {**os.environ, "PROGAN_CACHE": str(root / "env-cache"), "PYTHONUNBUFFERED": "1"}
        self.env.pop("PROGAN_DEBUG", None)

    def run(self, *args: str, module: bool = True, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
        if module:
            cmd = [sys.executable, "-m", "progan", *args]
        else:
            cmd = [str(Path(sys.executable).parent / "progan"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, env=self.env, timeout=timeout)

    def train(self, run_dir: Path, *extra: str, images: Path | None = None) -> subprocess.CompletedProcess:
        return self.run("train", str(images or self.images), "--out", str(run_dir), *TRAIN_OPTS,
                        "--cache-dir", str(self.cache), *extra)


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Cli:
    c = Cli(tmp_path_factory.mktemp("cli"))
    _write_images(c.images, N_IMAGES)
    return c


@pytest.fixture(scope="module")
def first_run(cli) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-epoch run shared by the tests below (tests that change a run work on a copy)."""
    run_dir = cli.root / "run"
    proc = cli.train(run_dir, "--epochs", str(EPOCHS))
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def _log(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _expected_frame_size() -> tuple[int, int]:
    from progan import run, visualization

    frame = visualization.training_frame(np.zeros((32, SIZE, SIZE, 3), np.uint8), run.video_cell(SIZE), "x")
    return frame.shape[1], frame.shape[0]


def _video(run_dir: Path) -> tuple[int, int, int]:
    from progan.visualization import read_video

    return read_video(run_dir / "training.mkv")


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "no error message"
    errors = [line for line in lines if line.startswith("progan: error:")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr   # the message is the last thing printed, on one line
    return errors[0]


def test_first_run_outputs(first_run):
    run_dir, proc = first_run
    steps = EPOCHS * STEPS_PER_EPOCH
    assert "Traceback" not in proc.stderr
    assert f"done: {EPOCHS} epochs" in proc.stderr
    from progan.run import default_precision

    # no --precision: the run says which arithmetic this machine's default picked
    assert f"training on cpu in {default_precision(torch.device('cpu'))}" in proc.stderr

    cfg = TrainConfig.load(run_dir / "config.json")
    assert (cfg.size, cfg.batch, cfg.epochs, cfg.video_every, cfg.log_every) == (SIZE, BATCH, EPOCHS, VIDEO_EVERY,
                                                                                LOG_EVERY)
    assert (cfg.fade_images, cfg.stable_images, cfg.levels) == (32, 32, 3)

    log = _log(run_dir)
    assert [r["step"] for r in log] == list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    for r in log:
        assert set(r) == LOG_KEYS
        assert r["nimg"] == r["step"] * BATCH
        assert r["epoch"] == pytest.approx(r["nimg"] / IPE)
        level, alpha = schedule(r["nimg"], cfg.levels, 32, 32)
        assert r["level"] == level and r["res"] == 4 * 2 ** level and r["alpha"] == pytest.approx(alpha, abs=1e-4)
        for k in ("g_loss", "d_loss", "real_rating", "fake_rating", "eps"):
            assert isinstance(r[k], float) and np.isfinite(r[k]), k
        assert 0 <= r["real_rating"] <= 1 and 0 <= r["fake_rating"] <= 1 and r["eps"] >= 0

    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("epoch-*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert (ckpts / "latest").read_text().strip() == "epoch-0002.pt"
    assert checkpoint.latest(run_dir) == ckpts / "epoch-0002.pt"
    for epoch in (1, 2):
        state = checkpoint.load(ckpts / f"epoch-{epoch:04d}.pt")
        assert state["nimg"] == epoch * IPE and state["steps"] == epoch * STEPS_PER_EPOCH
        assert state["epoch"] == epoch
        assert TrainConfig.from_dict(state["config"]) == cfg

    n_frames, width, height = _video(run_dir)
    assert n_frames == steps // VIDEO_EVERY
    assert (width, height) == _expected_frame_size()


def test_no_progress_means_no_progress_bar(first_run):
    _, proc = first_run
    assert "decoding" not in proc.stderr
    assert "\r" not in proc.stderr


def test_resume_with_more_epochs(cli, first_run, tmp_path):
    src, _ = first_run
    run_dir = _copy_run(src, tmp_path / "run")
    ckpt1 = (run_dir / "checkpoints" / "epoch-0001.pt").read_bytes()
    proc = cli.train(run_dir, "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "epoch-0002.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "epoch-0003.pt").is_file()
    assert (ckpts / "latest").read_text().strip() == "epoch-0003.pt"
    assert (ckpts / "epoch-0001.pt").read_bytes() == ckpt1        # old checkpoints untouched
    state = checkpoint.load(ckpts / "epoch-0003.pt")
    assert state["nimg"] == 3 * IPE and state["steps"] == 3 * STEPS_PER_EPOCH
    assert TrainConfig.load(run_dir / "config.json").epochs == 3
    # the log goes on where it stopped, no step twice
    steps = [r["step"] for r in _log(run_dir)]
    assert steps == list(range(LOG_EVERY, 3 * STEPS_PER_EPOCH + 1, LOG_EVERY))
    # training.mkv covers the whole run now
    n_frames, width, height = _video(run_dir)
    assert n_frames == 3 * STEPS_PER_EPOCH // VIDEO_EVERY > _video(src)[0]
    assert (width, height) == _expected_frame_size()

    # nothing left to do: says so, exits 0, changes nothing
    again = cli.train(run_dir, "--epochs", "3")
    assert again.returncode == 0, again.stderr
    assert "already has 3 epochs" in again.stderr
    assert _video(run_dir)[0] == n_frames
    assert not (ckpts / "epoch-0004.pt").exists()


def test_lr_rampdown_runs_over_the_epochs_asked_for(cli, tmp_path):
    """--lr-rampdown 0.5: full rates through the first half of --epochs 2, then a cosine to 0 at the last image."""
    from progan.gantrain import lr_factor

    run_dir = tmp_path / "run"
    proc = cli.train(run_dir, "--epochs", "2", "--lr-rampdown", "0.5")
    assert proc.returncode == 0, proc.stderr
    cfg = TrainConfig.load(run_dir / "config.json")
    assert cfg.lr_rampdown == 0.5
    rates = {}
    for epoch in (1, 2):
        state = checkpoint.load(run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt")
        rates[epoch] = (state["opt_g"]["param_groups"][0]["lr"], state["opt_d"]["param_groups"][0]["lr"])
    assert rates[1] == (cfg.lr_g, cfg.lr_d)           # the last step of epoch 1 is still before the ramp
    f = lr_factor((2 * IPE - cfg.batch) / (2 * IPE), 0.5)   # the rate of the run's last step
    assert 0 < f < 0.1 and rates[2] == pytest.approx((cfg.lr_g * f, cfg.lr_d * f))


def test_resume_with_other_size_is_refused(cli, first_run, tmp_path):
    src, _ = first_run
    run_dir = _copy_run(src, tmp_path / "run")
    before = sorted((p.relative_to(run_dir).as_posix(), p.stat().st_size) for p in run_dir.rglob("*"))
    proc = cli.train(run_dir, "--epochs", "3", "--size", "32")
    assert proc.returncode == 1
    msg = _error_line(proc)
    assert "size" in msg
    after = sorted((p.relative_to(run_dir).as_posix(), p.stat().st_size) for p in run_dir.rglob("*"))
    assert after == before
    assert TrainConfig.load(run_dir / "config.json").size == SIZE


def _requested(**kw) -> dict:
    base = dict(size=SIZE, batch=BATCH, video_every=VIDEO_EVERY, log_every=LOG_EVERY, fade_images=32,
                stable_images=32, epochs=EPOCHS)
    base.update(kw)
    return base


def test_resolve_config_on_resume(first_run):
    """run.resolve_config: the saved config wins; safe options may change; anything else is refused."""
    from progan.errors import ProganError
    from progan.run import resolve_config

    run_dir, _ = first_run
    cfg, state = resolve_config(run_dir, _requested(epochs=5, keep=3), {"epochs", "keep"}, fresh=False)
    assert state is not None and state["resumed_from"].endswith("epoch-0002.pt")
    assert (cfg.epochs, cfg.keep, cfg.size) == (5, 3, SIZE)
    # a changed seed or batch would change the data order and the networks: refused, with the way out named
    for key, value in (("seed", 5), ("batch", 4), ("diversity", 0.0)):
        with pytest.raises(ProganError) as e:
            resolve_config(run_dir, _requested(**{key: value}), {key}, fresh=False)
        assert "--fresh" in str(e.value) and key in str(e.value)
    # options that were not given explicitly do not count as changes
    cfg, state = resolve_config(run_dir, _requested(seed=5), set(), fresh=False)
    assert state is not None and cfg.seed == 0
    # fresh: no checkpoint, the requested config as it is
    cfg, state = resolve_config(run_dir, _requested(seed=5), {"seed"}, fresh=True)
    assert state is None and cfg.seed == 5


def test_resume_with_other_size_message_names_fresh(first_run):
    from progan.errors import ProganError
    from progan.run import resolve_config

    run_dir, _ = first_run
    with pytest.raises(ProganError) as e:
        resolve_config(run_dir, _requested(size=32), {"size"}, fresh=False)
    assert "--fresh" in str(e.value)


def test_fresh_moves_old_run_aside(cli, first_run, tmp_path):
    src, _ = first_run
    run_dir = _copy_run(src, tmp_path / "run")
    # --max-steps (hidden, for tests) keeps this short: 2 steps, then a mid-epoch checkpoint
    proc = cli.train(run_dir, "--epochs", "1", "--fresh", "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "moved the existing run" in proc.stderr
    assert "resuming" not in proc.stderr
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1, list(tmp_path.iterdir())
    assert (old[0] / "checkpoints" / "epoch-0002.pt").is_file()
    assert _video(old[0])[0] == EPOCHS * STEPS_PER_EPOCH // VIDEO_EVERY
    # the new run started at epoch 0
    name = checkpoint.checkpoint_name(0, 2 * BATCH)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*.pt")) == [name]
    state = checkpoint.load(run_dir / "checkpoints" / name)
    assert (state["steps"], state["nimg"], state["epoch"]) == (2, 2 * BATCH, 0)
    assert _log(run_dir) == []                      # fewer steps than --log-every: a new, empty log
    assert _video(run_dir)[0] == 2 // VIDEO_EVERY
    assert TrainConfig.load(run_dir / "config.json").epochs == 1


def test_help(cli):
    top = cli.run("--help", module=False)
    assert top.returncode == 0, top.stderr
    assert "train" in top.stdout and "Usage: progan" in top.stdout
    top_m = cli.run("--help")
    assert top_m.returncode == 0 and top_m.stdout == top.stdout     # python -m progan == the progan script

    tr = cli.run("train", "--help", module=False)
    assert tr.returncode == 0, tr.stderr
    for opt in ("DIR", "--out", "--size", "--epochs", "--batch", "--diversity", "--fresh", "--video-every",
                "--fade-images", "--stable-images", "--cache-dir", "--no-progress", "--seed"):
        assert opt in tr.stdout, opt
    assert "--max-steps" not in tr.stdout        # hidden, for tests only
    assert "[default: 64]" in " ".join(tr.stdout.split())   # --size default comes from TrainConfig
    tr_m = cli.run("train", "--help")
    assert tr_m.returncode == 0 and tr_m.stdout == tr.stdout


def test_missing_dir(cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli.train(run_dir, "--epochs", "1", images=tmp_path / "no-such-folder")
    assert proc.returncode == 1
    msg = _error_line(proc)
    assert "no-such-folder" in msg
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_too_few_images(cli, tmp_path):
    few = tmp_path / "few"
    _write_images(few, BATCH // 2, seed=3)
    run_dir = tmp_path / "run"
    proc = cli.train(run_dir, "--epochs", "1", images=few)
    assert proc.returncode == 1
    msg = _error_line(proc)
    assert "batch" in msg and str(BATCH // 2) in msg
    assert not (run_dir / "checkpoints").exists()


def test_bad_size(cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli.train(run_dir, "--epochs", "1", "--size", "100")
    assert proc.returncode == 1
    msg = _error_line(proc)
    assert "100" in msg
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_usage_errors(cli):
    proc = cli.run("train")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Missing argument" in proc.stderr
    proc = cli.run("train", str(cli.images), "--epochs", "many")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--epochs" in proc.stderr


# ===================================================================================================== held-out split, evaluation


from inception import needs_inception  # noqa: E402


def test_holdout_split_recorded(first_run):
    """The default --holdout keeps the hash-chosen images out of training, says so, and lists them."""
    from progan.facedata import holdout_mask

    run_dir, proc = first_run
    names = [f"face{i:03d}.jpg" for i in range(N_IMAGES)]
    held = [n for n, h in zip(names, holdout_mask(names, TrainConfig().holdout)) if h]
    assert 0 < len(held) == N_IMAGES - N_TRAIN
    assert f"held out {len(held)} of {N_IMAGES} images" in proc.stderr and f"training on {N_TRAIN}" in proc.stderr
    assert (run_dir / "heldout.txt").read_text().splitlines() == held
    info = json.loads((run_dir / "data.json").read_text())
    assert info == {"source": str((run_dir.parent / "images").resolve()), "holdout": 0.03, "images": N_IMAGES,
                    "train": N_TRAIN, "heldout": len(held)}
    # the cell colours behind the flicker measure: one record per video frame, 32 cells of EMA and raw G
    recs = [json.loads(line) for line in (run_dir / "cellcolours.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(VIDEO_EVERY, EPOCHS * STEPS_PER_EPOCH + 1, VIDEO_EVERY))
    for r in recs:
        assert np.array(r["ema"]).shape == np.array(r["raw"]).shape == (32, 3)
    assert recs[-1]["ema"] != recs[-1]["raw"]


def test_resume_with_other_holdout_is_refused(cli, first_run, tmp_path):
    run_dir = _copy_run(first_run[0], tmp_path / "run")
    proc = cli.train(run_dir, "--epochs", "3", "--holdout", "0.2")
    assert proc.returncode == 1
    assert "holdout=0.03 but holdout=0.2" in _error_line(proc)


def test_evaluate_defaults_to_heldout(cli, first_run, tmp_path):
    """Without --real, evaluate compares against the run's held-out images; flicker reads the cell colours."""
    run_dir = _copy_run(first_run[0], tmp_path / "run")
    proc = cli.run("evaluate", str(run_dir), "--n", "4", "--metrics", "swd,flicker", "--device", "cpu",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run_dir / "eval.json").read_text())
    n_held = N_IMAGES - N_TRAIN
    assert result["reference"] == "heldout" and result["n_real"] == n_held and result["real_images"] == N_IMAGES
    assert result["metrics"]["swd"]["avg"] > 0
    f = result["metrics"]["flicker"]
    # the last epoch: records with epoch in (last - 1, last]
    recs = [json.loads(line) for line in (run_dir / "cellcolours.jsonl").read_text().splitlines()]
    last = [r for r in recs if r["epoch"] > recs[-1]["epoch"] - 1]
    assert f["source"] == "cellcolours.jsonl" and f["frames"] == len(last) >= 2
    expected = np.abs(np.diff(np.array([r["ema"] for r in last]), axis=0)).mean()
    assert f["ema"] == pytest.approx(expected) and f["raw"] > 0
    assert "colour flicker, EMA G" in proc.stdout and "colour flicker, raw G" in proc.stdout
    # --real naming another folder: the old behaviour (a subset of that folder)
    other = tmp_path / "other"
    _write_images(other, 12, seed=3)
    proc = cli.run("evaluate", str(run_dir), "--real", str(other), "--n", "4", "--metrics", "swd", "--device", "cpu",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["reference"] == "folder" and result["n_real"] == 4


@needs_inception
def test_eval_every_curves(cli, first_run, tmp_path):
    """--eval-every 1: an eval line per epoch with FID and SWD against the held-out images, metrics.png, training
    wall-clock carried across a resume; and the training itself is bit-identical to a run without evaluation."""
    from PIL import Image

    run_dir = tmp_path / "run"
    proc = cli.train(run_dir, "--epochs", str(EPOCHS), "--eval-every", "1", "--eval-n", "4")
    assert proc.returncode == 0, proc.stderr
    evals = [r for r in _log(run_dir) if r.get("kind") == "eval"]
    assert [r["nimg"] for r in evals] == [IPE, 2 * IPE] and [r["epoch"] for r in evals] == [1.0, 2.0]
    for r in evals:
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and r["swd"] > 0
        assert (r["n_fake"], r["n_real"]) == (4, N_IMAGES - N_TRAIN) and r["eval_s"] > 0
    assert 0 < evals[0]["wall_s"] < evals[1]["wall_s"]
    assert Image.open(run_dir / "metrics.png").size[0] > 0
    # the training log lines are unchanged in number and kind
    assert len([r for r in _log(run_dir) if "kind" not in r]) == len(_log(first_run[0]))
    a = checkpoint.load(first_run[0] / "checkpoints" / "epoch-0002.pt")
    b = checkpoint.load(run_dir / "checkpoints" / "epoch-0002.pt")
    for key in ("G", "D", "G_ema", "opt_g", "opt_d", "eps", "rng"):
        _assert_same(a[key], b[key], key)
    # evaluation time is not training time: the checkpoint's clock is below the process's whole run time
    # (wall_s is logged rounded to 0.01 s, so allow that much)
    assert 0 < b["train_seconds"] and b["train_seconds"] >= evals[1]["wall_s"] - 0.005
    # resume with one more epoch (and a changed --eval-n, which is allowed): the clock goes on
    proc = cli.train(run_dir, "--epochs", "3", "--eval-n", "5")
    assert proc.returncode == 0, proc.stderr
    evals = [r for r in _log(run_dir) if r.get("kind") == "eval"]
    assert [r["nimg"] for r in evals] == [IPE, 2 * IPE, 3 * IPE] and evals[2]["n_fake"] == 5
    assert evals[2]["wall_s"] > b["train_seconds"]
    # memorisation with the held-out default: nearest neighbours among training images only
    proc = cli.run("evaluate", str(run_dir), "--n", "4", "--metrics", "fid,memorisation", "--device", "cpu",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    mem = json.loads((run_dir / "eval.json").read_text())["metrics"]["memorisation"]
    assert (mem["n_generated"], mem["n_train"], mem["n_heldout"]) == (4, 4, N_IMAGES - N_TRAIN)
    assert f"vs {N_IMAGES - N_TRAIN} held-out" in proc.stdout
