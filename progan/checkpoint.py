"""Checkpoints: atomic writes, a schema version, a small `latest` pointer, and loading with weights_only=True.

A checkpoint is one dict of tensors and plain values, so torch.load(weights_only=True) reads it and a file that
would run code on load is refused. Files are written to a temporary name, fsynced and renamed, so a process killed
at any moment leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from progan.errors import ProganError

SCHEMA = 1
LATEST = "latest"
_NAME = re.compile(r"^epoch-(\d+)(?:-img-(\d+))?\.pt$")


def checkpoint_name(epoch: int, nimg: int | None = None) -> str:
    """epoch-0003.pt after a whole epoch; epoch-0003-img-000123456.pt for a mid-epoch (interrupt) save."""
    return f"epoch-{epoch:04d}.pt" if nimg is None else f"epoch-{epoch:04d}-img-{nimg:09d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside path, fsync, rename over path. On any error the temp file is removed
    and path is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save(state: dict[str, Any], ckpt_dir: str | Path, name: str, keep: int = 0) -> Path:
    """Write state as ckpt_dir/name, then point `latest` at it; prune to `keep` newest (0 keeps all)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / name
    state = {"schema": SCHEMA, **state}
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(ckpt_dir / LATEST, lambda f: f.write((name + "\n").encode()))
    except OSError as e:
        raise ProganError(f"could not write checkpoint {path}: {e.strerror or e}; the previous checkpoint is intact") from None
    if keep > 0:
        prune(ckpt_dir, keep, protect=name)
    return path


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files ordered oldest to newest (by epoch, then images shown)."""
    found = []
    for p in Path(ckpt_dir).glob("epoch-*.pt"):
        m = _NAME.match(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2) or 0), m.group(2) is None), p))
    return [p for _, p in sorted(found)]


def prune(ckpt_dir: Path, keep: int, protect: str) -> None:
    files = list_checkpoints(ckpt_dir)
    for p in files[:-keep]:
        if p.name != protect:
            p.unlink(missing_ok=True)


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points at, else the newest one present, else None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if target.is_file():
            return target
    files = list_checkpoints(ckpt_dir)
    return files[-1] if files else None


def resolve(run: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint file -> the checkpoint path."""
    run = Path(run)
    if not run.exists():
        raise ProganError(f"no such run or checkpoint: {run}")
    if run.is_dir():
        path = latest(run)
        if path is None:
            raise ProganError(f"no checkpoints in {run} (expected {run / 'checkpoints'}/epoch-*.pt)")
        return path
    return run


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True) and check its schema; one-line errors for bad files."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ProganError(f"no such checkpoint: {path}") from None
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch words this differently across versions: "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y".
        m = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
        if m:
            raise ProganError(f"refusing to load {path}: it would import {m.group(1)} (code, not plain weights); "
                              f"only load checkpoints you trust, and never with weights_only=False") from None
        raise ProganError(f"{path} is not a progan checkpoint (corrupt or truncated)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = msg.split(". ", 1)[0].rstrip(".")  # the first sentence: torch appends paragraphs of advice
        raise ProganError(f"{path} is not a progan checkpoint (corrupt or truncated: {msg[:120]})") from None
    if not isinstance(state, dict) or "schema" not in state or "config" not in state:
        raise ProganError(f"{path} is not a progan checkpoint (no schema/config)")
    schema = state["schema"]
    if not isinstance(schema, int):
        raise ProganError(f"{path} has an invalid checkpoint schema {schema!r}")
    if schema > SCHEMA:
        raise ProganError(f"{path} has checkpoint schema {schema}, newer than this progan understands ({SCHEMA}); "
                          f"upgrade progan")
    return migrate(state)


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """Bring older schemas up to SCHEMA (none exist yet: schema 1 is the first)."""
    if state["schema"] < 1:
        raise ProganError(f"checkpoint schema {state['schema']} is not supported")
    return state
