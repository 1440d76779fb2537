"""Multi-process training (torch.distributed, gloo on CPU): DDP wrapping in process, then `progan train` under
torchrun with 2 processes on tiny images: replicas stay identical, rank 0 alone writes the run folder, the result
matches a single-process run with the same global batch, and runs resume with another process count."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blobs import write_blob_images
from progan import checkpoint, distributed
from progan.config import TrainConfig
from progan.errors import ProganError
from progan.facedata import ImageBank
from progan.gantrain import Trainer
from progan.networks import Discriminator, Generator

# ===================================================================================================== in process


def _cfg(**kw) -> TrainConfig:
    # noise_high < 0: epsilon grows every step, so the noise draws and the controller's all-reduced ratings matter.
    base = dict(size=16, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4, latent_dim=16, batch=8,
                fade_images=16, stable_images=16, ema_half_life=64, noise_high=-1.0, noise_low=-2.0, noise_step=0.01,
                diversity=1.0, r1_every=2)
    return TrainConfig(**{**base, **kw})


def _bank(n: int = 32, size: int = 16) -> ImageBank:
    return ImageBank(np.random.default_rng(3).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.fixture
def group_of_one():
    """A gloo process group of one process in this test process (an in-memory store: no ports)."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield distributed.Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_of_one_process_is_bit_identical_to_no_ddp(group_of_one, find_unused):
    """With one process DDP's all-reduce is exact, so the wrapped trainer must reproduce the plain one bit for bit
    through level changes and fades (wrapper rebuilds), lazy R1 (every 2nd step), the diversity hook on the fakes,
    the D forward inside the G step, and the noise controller's all-reduced ratings."""
    cfg, bank = _cfg(), _bank()
    group_of_one.find_unused = find_unused
    plain, ddp = Trainer(cfg, bank), Trainer(cfg, bank, dist=group_of_one)
    phases = set()
    for _ in range(10):
        phases.add(ddp.phase())
        plain.step()
        ddp.step()
    assert {level for level, _ in phases} == {0, 1, 2} and any(0 < a < 1 for _, a in phases)
    assert ddp.noise.eps.item() > 0
    for name in ("G", "D", "G_ema"):
        a, b = getattr(plain, name).state_dict(), getattr(ddp, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"
    assert torch.equal(plain.rng.get_state(), ddp.rng.get_state())
    assert plain.read_stats() == ddp.read_stats()


def test_active_parameters_are_exactly_those_with_gradients():
    """The DDP wrapping's claim: at each (level, fading) phase the listed parameters are the ones a G and a D
    backward reach (DDP without find_unused_parameters fails on a listed parameter without a gradient, and does
    not sync one it was not given)."""
    cfg = _cfg()
    for net in (Generator(cfg), Discriminator(cfg)):
        for level, alpha in [(0, 1.0), (1, 0.5), (1, 1.0), (2, 0.25), (2, 1.0)]:
            net.zero_grad(set_to_none=True)
            x = torch.randn(4, cfg.latent_dim) if isinstance(net, Generator) else torch.randn(4, 3, 4 << level,
                                                                                              4 << level)
            net(x, level, alpha).square().sum().backward()
            with_grad = {id(p) for p in net.parameters() if p.grad is not None}
            listed = {id(p) for p in distributed.active_parameters(net, level, level > 0 and alpha < 1)}
            assert listed == with_grad, (type(net).__name__, level, alpha)


def test_batch_must_split_across_processes():
    cpu = torch.device("cpu")
    assert distributed.local_batch(8, 2) == 4
    with pytest.raises(ProganError, match="does not split evenly across 3 processes"):
        Trainer(_cfg(batch=8), _bank(), dist=distributed.Dist(0, 3, 0, cpu))   # raises before any collective
    with pytest.raises(ProganError, match="at least 2"):
        distributed.local_batch(8, 8)


# ===================================================================================================== torchrun

N_IMAGES, SIZE, BATCH, LOG_EVERY, VIDEO_EVERY = 64, 16, 8, 4, 2
STEPS_PER_EPOCH = N_IMAGES // BATCH
# 16 steps over 2 epochs: 4 px stable, fade to 8 px, 8 px stable, fade to 16 px (wrapper rebuilds, R1 at step 0).
# Learning rates below the default: at 1e-3 these tiny GANs are chaotic enough that Adam doubles a 1e-7 difference
# every step after step 8 (measured), which would hide a real error in the noise; at 3e-4 they are not.
OPTS = ["--size", str(SIZE), "--batch", str(BATCH), "--log-every", str(LOG_EVERY), "--video-every", str(VIDEO_EVERY),
        "--fade-images", "32", "--stable-images", "32", "--lr-g", "3e-4", "--lr-d", "3e-4", "--no-progress",
        "--memory-format", "contiguous", "--precision", "fp32"]
# DDP vs one process, same global batch and seed (so the same images, latents and noise per step): with diversity
# off and 4 images per rank, mbstd groups (4 consecutive images) coincide, so the only difference is the order of
# float additions (gradients all-reduced across ranks instead of summed over one batch). Measured: |w_ddp - w_single|
# is 2e-5 of |w_single - w_init| after 16 steps. That needs NCHW (--memory-format contiguous): NHWC convolutions on a
# CPU round differently at batch 4 and 8 (1e-6 after one step), which these 16 steps grow to 1e-2. Diversity pairs samples within each rank's batch instead of the
# global one, a real difference (G lands ~15% of its travel away), so diversity runs are compared replica to replica.
# fp32 explicitly: on a CPU with native bf16 the default is bf16 autocast, whose rounding differs far more.
REL_TOL = 1e-3
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    def __init__(self, root: Path):
        self.root, self.images = root, root / "images"
        write_blob_images(self.images, N_IMAGES, SIZE, seed=1)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PROGAN_CACHE": str(root / "cache"),
                    "PYTHONUNBUFFERED": "1"}
        self.env.pop("PROGAN_DEBUG", None)
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)

    def train(self, run_dir: Path, nproc: int, *extra: str, dump: Path | None = None) -> subprocess.CompletedProcess:
        if nproc == 1:
            launcher = [sys.executable, "-m", "progan"]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "progan"]
        env = dict(self.env)
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            env["PROGAN_RANK_DUMP"] = str(dump)
        proc = subprocess.run([*launcher, "train", str(self.images), "--out", str(run_dir), "--device", "cpu", *OPTS,
                               *extra], capture_output=True, text=True, cwd=self.root, env=env, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("dist"))


def _dump(d: Path, rank: int = 0) -> dict:
    return torch.load(d / f"rank-{rank}.pt", weights_only=True)


def _assert_replicas_identical(a: dict, b: dict) -> None:
    for name in ("G", "D", "G_ema"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs between ranks"
    for opt in ("opt_g", "opt_d"):
        for i, st in a[opt]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, b[opt]["state"][i][k]), f"{opt} {i} {k}"
    assert torch.equal(a["eps"], b["eps"]) and torch.equal(a["rng"], b["rng"])
    assert (a["nimg"], a["steps"]) == (b["nimg"], b["steps"])


def _init_weights(cfg: TrainConfig) -> dict[str, dict]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return {"G": Generator(cfg).state_dict(), "D": Discriminator(cfg).state_dict()}


def _relative_difference(a: dict, b: dict) -> dict[str, float]:
    """|a - b| / |b - init| per network: the distance between two runs' weights relative to how far training moved
    them (0 = identical, ~1 = unrelated runs)."""
    init = _init_weights(TrainConfig.from_dict(b["config"]))
    out = {}
    for name in ("G", "D"):
        num = sum(((a[name][k] - b[name][k]) ** 2).sum() for k in init[name]).sqrt()
        den = sum(((b[name][k] - init[name][k]) ** 2).sum() for k in init[name]).sqrt()
        out[name] = float(num / den)
    return out


def _roll_back_to_epoch_1(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished 2-epoch run as it was after epoch 1."""
    shutil.copytree(run_dir, dest)
    (dest / "checkpoints" / "epoch-0002.pt").unlink()
    (dest / "checkpoints" / "latest").write_text("epoch-0001.pt\n")
    return dest


@pytest.fixture(scope="module")
def two_proc(runner) -> tuple[Path, dict, dict, subprocess.CompletedProcess]:
    run = runner.root / "ddp"
    proc = runner.train(run, 2, "--epochs", "2", "--diversity", "0", dump=runner.root / "ddp-dump")
    return run, _dump(runner.root / "ddp-dump", 0), _dump(runner.root / "ddp-dump", 1), proc


@pytest.fixture(scope="module")
def one_proc(runner) -> tuple[Path, dict]:
    run = runner.root / "single"
    runner.train(run, 1, "--epochs", "2", "--diversity", "0", dump=runner.root / "single-dump")
    return run, _dump(runner.root / "single-dump")


def test_two_processes_keep_identical_replicas_and_rank_0_writes(two_proc):
    run, r0, r1, proc = two_proc
    _assert_replicas_identical(r0, r1)
    assert r0["nimg"] == 2 * N_IMAGES and r0["steps"] == 2 * STEPS_PER_EPOCH   # --batch is the global batch
    assert proc.stderr.count("done: 2 epochs") == 1                           # rank 0 reports, once
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert not list(ckpts.glob(".*.tmp"))
    final = checkpoint.load(ckpts / "epoch-0002.pt")
    for name in ("G", "D", "G_ema"):
        assert all(torch.equal(v, r0[name][k]) for k, v in final[name].items())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(LOG_EVERY, 2 * STEPS_PER_EPOCH + 1, LOG_EVERY))  # no duplicates
    assert [r["nimg"] for r in log] == [r["step"] * BATCH for r in log]
    from progan.visualization import read_video

    assert read_video(run / "training.mkv")[0] == 2 * STEPS_PER_EPOCH // VIDEO_EVERY


def test_two_processes_match_one_process_with_the_same_global_batch(two_proc, one_proc):
    _, r0, _, _ = two_proc
    _, single = one_proc
    assert torch.equal(r0["rng"], single["rng"])            # the same latents and noise were drawn
    assert torch.equal(r0["fixed_z"], single["fixed_z"])    # the same video latents
    diff = _relative_difference(r0, single)
    assert max(diff.values()) < REL_TOL, diff
    assert not all(torch.equal(r0["G"][k], single["G"][k]) for k in single["G"])  # really two computations


def test_resume_two_processes_with_one(runner, two_proc):
    run, r0, _, _ = two_proc
    resumed = _roll_back_to_epoch_1(run, runner.root / "ddp-then-1")
    proc = runner.train(resumed, 1, "--epochs", "2", "--diversity", "0", dump=runner.root / "ddp-then-1-dump")
    assert "resuming" in proc.stderr and "epoch 1" in proc.stderr
    out = _dump(runner.root / "ddp-then-1-dump")
    assert (out["nimg"], out["steps"]) == (r0["nimg"], r0["steps"])
    assert torch.equal(out["rng"], r0["rng"])
    diff = _relative_difference(out, r0)
    assert max(diff.values()) < REL_TOL, diff


def test_resume_one_process_with_two(runner, one_proc):
    run, single = one_proc
    resumed = _roll_back_to_epoch_1(run, runner.root / "single-then-2")
    dump = runner.root / "single-then-2-dump"
    proc = runner.train(resumed, 2, "--epochs", "2", "--diversity", "0", dump=dump)
    assert proc.stderr.count("resuming") == 1        # rank 0 speaks for both
    r0, r1 = _dump(dump, 0), _dump(dump, 1)
    _assert_replicas_identical(r0, r1)
    assert (r0["nimg"], r0["steps"]) == (single["nimg"], single["steps"])
    diff = _relative_difference(r0, single)
    assert max(diff.values()) < REL_TOL, diff
    assert sorted(p.name for p in (resumed / "checkpoints").glob("*.pt")) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_diversity_under_ddp_keeps_replicas_identical(runner, two_proc):
    """Diversity on (pairs within each rank's batch, via the hook on the DDP generator's output): replicas still
    agree, and the hook did act: the weights are far further from the diversity-off run than DDP's float noise."""
    _, off, _, _ = two_proc
    dump = runner.root / "div-dump"
    runner.train(runner.root / "div", 2, "--epochs", "2", "--diversity", "1", dump=dump)
    r0, r1 = _dump(dump, 0), _dump(dump, 1)
    _assert_replicas_identical(r0, r1)
    assert r0["steps"] == off["steps"]
    assert _relative_difference(r0, off)["G"] > 5 * REL_TOL
