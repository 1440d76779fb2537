"""Multi-process training under torchrun: process group set-up, rank helpers, all-reduce and DDP wrapping.

Nothing here runs unless the process was launched by torchrun with WORLD_SIZE > 1 (or a tool builds a Dist
itself); single-process training never touches torch.distributed. A Dist is passed around explicitly.

How the GAN maps onto DistributedDataParallel (see Trainer.step):
- Every rank holds the same RNG state and draws the *global* batch of latents and noise, then keeps its shard, so
  the sample stream is independent of the number of processes (a run resumes with any process count).
- Only the modules active at the current (level, fading) phase are wrapped: DDP without find_unused_parameters
  needs every wrapped parameter to receive a gradient, and a progressive network leaves the higher levels and the
  other RGB conversions idle. The wrapper is rebuilt when the phase changes (about 2 x levels times per run).
  find_unused_parameters would instead walk the autograd graph after every forward and still all-reduce zero
  gradients for the idle levels. On one CPU process both cost within noise of each other (1-5% below unwrapped,
  tools/ddp_bench.py, which measures both on any device); the active wrapping sends only what trains.
- The G step runs D unwrapped (its parameters have requires_grad off), so it triggers no D gradient sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.nn as nn

from progan.errors import ProganError


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when not launched by torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ProganError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class Dist:
    """This process's place in the process group."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    find_unused: bool = False   # wrap whole networks with find_unused_parameters (for the benchmark only)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            torch.distributed.barrier(device_ids=[self.device.index])
        else:
            torch.distributed.barrier()

    def all_reduce_mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In place mean over ranks (on the device: no host sync on NCCL)."""
        torch.distributed.all_reduce(t)
        return t.div_(self.world)

    def any(self, flag: bool) -> bool:
        """True on every rank when flag is true on any rank (a host sync: use at log steps only)."""
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        """rank 0's obj on every rank (pickled; for the resolved config and checkpoint at start-up)."""
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def check_same(self, *nets: nn.Module) -> None:
        """Raise when the ranks' weights differ: a cheap fingerprint (per-tensor sums) compared across ranks.

        DDP keeps replicas equal only for parameters it wraps; this catches a module the wrapping missed.
        """
        with torch.no_grad():
            ps = [p for net in nets for p in net.parameters()]
            fp = torch.stack([torch.stack([p.double().sum(), (p.double() * p.double()).sum()]) for p in ps])
            ref = fp.clone()
            torch.distributed.broadcast(ref, src=0)
            bad = [i for i in range(len(ps)) if not torch.equal(fp[i], ref[i])]
            n_bad = torch.tensor([float(len(bad))], device=self.device)
            torch.distributed.all_reduce(n_bad, op=torch.distributed.ReduceOp.MAX)
        if n_bad.item():
            raise RuntimeError(f"rank {self.rank}: weights differ from rank 0 in {len(bad)} tensors "
                               f"(a module outside the DDP wrapping?)")


def local_batch(batch: int, world: int) -> int:
    """This process's share of the global --batch; a one-line error when it does not split evenly."""
    if batch % world:
        raise ProganError(f"--batch {batch} (the global batch) does not split evenly across {world} processes")
    if batch // world < 2:
        raise ProganError(f"--batch {batch} gives {batch // world} image per process; each of the {world} "
                          f"processes needs at least 2 (diversity learning pairs samples within a process)")
    return batch // world


def init(device_name: str) -> Dist | None:
    """Join the process group torchrun describes (None when WORLD_SIZE <= 1): NCCL on CUDA, gloo on CPU.

    Under torchrun a CUDA rank uses GPU LOCAL_RANK, whatever index --device names.
    """
    world = world_size_from_env()
    if world <= 1:
        return None
    import torch.distributed as tdist

    rank, local = rank_from_env(), int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device_name).type
    except RuntimeError:
        raise ProganError(f"unknown device '{device_name}' (use auto, cpu, cuda or cuda:N)") from None
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ProganError(f"rank {rank} wants GPU {local} but this node has {torch.cuda.device_count()}; "
                              f"use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif kind == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        raise ProganError(f"multi-process training supports cpu and cuda devices, not {device_name}")
    if not tdist.is_available():
        raise ProganError("this PyTorch build has no torch.distributed")
    tdist.init_process_group(backend, timeout=timedelta(minutes=30), device_id=device if kind == "cuda" else None)
    return Dist(rank, world, local, device)


def shutdown(dist: Dist | None) -> None:
    if dist is not None and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Active(nn.Module):
    """A view of `net` that owns only the given parameters, for DDP to hook and all-reduce; forward calls the whole
    net. The net itself is kept outside the module tree so its idle parameters stay invisible to DDP."""

    def __init__(self, net: nn.Module, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)   # the same Parameter objects, not copies
        object.__setattr__(self, "net", net)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def active_parameters(net: nn.Module, level: int, fading: bool) -> list[nn.Parameter]:
    """The parameters of a Generator or Discriminator that get a gradient at (level, fading).

    Defined by exclusion, so modules other than the per-level lists (latent image, inject, head, and anything added
    later) are always included: blocks above `level` and RGB conversions other than `level` (and `level - 1` while
    fading) are idle.
    """
    idle: set[int] = set()
    for name in ("blocks", "to_rgb", "from_rgb"):
        lst = getattr(net, name, None)
        if lst is None:
            continue
        for k, m in enumerate(lst):
            used = k <= level if name == "blocks" else (k == level or (fading and k == level - 1))
            if not used:
                idle.update(id(p) for p in m.parameters())
    return [p for p in net.parameters() if p.requires_grad and id(p) not in idle]


def wrap(net: nn.Module, dist: Dist, level: int, fading: bool) -> nn.Module:
    """DDP over the phase's active parameters (or, with dist.find_unused, over the whole net)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    if dist.find_unused:
        return DDP(net, device_ids=ids, find_unused_parameters=True)
    return DDP(Active(net, active_parameters(net, level, fading)), device_ids=ids)
