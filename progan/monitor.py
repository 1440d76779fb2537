"""Watching a run while it trains: FID/SWD against the held-out images every --eval-every epochs (log lines and
metrics.png), and the per-cell mean colours of the fixed-latent grid that the colour-flicker measure reads.

Evaluation images are generated at the current training resolution and upsampled bilinearly (the generator's own
upsampling) to the final size, so every point of a run's curves is measured against the same real images at the
same size. Their latents come from a private generator (the same latents at every evaluation, which keeps the
curve free of sampling noise between points), so the training RNG is never touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from progan.config import TrainConfig

EVAL_SEED_OFFSET = 104_729   # eval latents: their own stream, apart from training (seed) and video (seed + 7919)
EVAL_BATCH = 64
COLOURS_FILE = "cellcolours.jsonl"
PLOT_FILE = "metrics.png"


class TrainingEval:
    """FID and SWD of a generator against a fixed subset of the held-out images (at most cfg.eval_n of them)."""

    def __init__(self, run_dir: Path, cfg: "TrainConfig", heldout: np.ndarray, device: "torch.device",
                 cache_dir: str | None = None, progress: bool = False):
        import torch

        from progan import latent, metrics

        metrics.fid_weights_path()   # a missing Inception file fails now, not after the first epochs
        self.run_dir, self.cfg, self.device, self.progress = Path(run_dir), cfg, device, progress
        self.cache_dir = cache_dir
        n_real = min(cfg.eval_n, len(heldout))
        idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(heldout))[:n_real])
        self.reals = np.asarray(heldout[idx])
        self.z = latent.random(cfg.eval_n, cfg.latent_dim,
                               generator=torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET))
        # conditional runs: labels uniform over the label space, the same at every evaluation
        self.labels = None
        if cfg.condition:
            from progan.labels import random_labels

            self.labels = random_labels(cfg, cfg.eval_n, cfg.seed + EVAL_SEED_OFFSET)
        self._net = None
        self._real_feats: np.ndarray | None = None

    def _inception(self):
        from progan import metrics

        if self._net is None:
            self._net = metrics.load_inception(self.device)
            # cached on disk per pixel content: later sessions and `progan evaluate` reuse it
            stats = metrics.real_statistics(self.reals, self.device, EVAL_BATCH, self.cache_dir, self.progress,
                                            self._net, "inception (held-out)")
            self._real_feats = stats.features
        return self._net

    def generate(self, G: "torch.nn.Module", level: int, alpha: float) -> np.ndarray:
        """cfg.eval_n images of G at (level, alpha), upsampled to the final size: uint8 N x S x S x 3."""
        import torch

        from progan.networks import upsample2
        from progan.visualization import to_uint8

        parts = []
        with torch.no_grad():
            for i in range(0, len(self.z), EVAL_BATCH):
                y = None if self.labels is None else self.labels[i:i + EVAL_BATCH].to(self.device)
                x = G(self.z[i:i + EVAL_BATCH].to(self.device), level, alpha, labels=y).float()
                while x.shape[-1] < self.cfg.size:
                    x = upsample2(x)
                parts.append(to_uint8(x))
        return np.concatenate(parts)

    def measure(self, G: "torch.nn.Module", level: int, alpha: float) -> dict:
        from progan import metrics

        net = self._inception()
        fakes = self.generate(G, level, alpha)
        feats = metrics.inception_features(fakes, self.device, EVAL_BATCH, False, net)
        m = min(len(fakes), len(self.reals))   # SWD compares equally many images
        s = metrics.swd(self.reals[:m], fakes[:m], seed=self.cfg.seed, device=self.device)
        return {"fid": round(metrics.fid_from_features(feats, self._real_feats), 4), "swd": round(s["avg"], 4),
                "swd_levels": {str(k): round(v, 4) for k, v in s["levels"].items()},
                "n_fake": len(fakes), "n_real": len(self.reals)}

    def plot(self) -> Path | None:
        return plot_metrics(self.run_dir)


def jsonl_records(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file ([] when it does not exist); a line cut short by a killed process is
    skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def eval_records(run_dir: Path) -> list[dict]:
    """The {"kind": "eval"} lines of a run's log.jsonl, one per images-shown count (the latest wins: a run
    resumed from an earlier checkpoint measures those points again), in order of images shown."""
    by_nimg: dict[int, dict] = {}
    for rec in jsonl_records(Path(run_dir) / "log.jsonl"):
        if rec.get("kind") == "eval":
            by_nimg[int(rec["nimg"])] = rec
    return [by_nimg[k] for k in sorted(by_nimg)]


def plot_metrics(run_dir: Path) -> Path | None:
    """metrics.png: FID and SWD against training wall-clock and against images shown (None without eval lines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure   # no pyplot: no process-wide backend or figure state

    from progan.checkpoint import atomic_write

    recs = eval_records(run_dir)
    if not recs:
        return None
    hours = [r["wall_s"] / 3600 for r in recs]
    nimg = [r["nimg"] / 1000 for r in recs]
    fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    for row, (key, label) in enumerate((("fid", "FID"), ("swd", "SWD x1e3 (avg)"))):
        for col, (x, xlabel) in enumerate(((hours, "training wall-clock (hours)"), (nimg, "images shown (thousands)"))):
            ax = axes[row, col]
            ax.plot(x, [r[key] for r in recs], marker="o", markersize=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    last = recs[-1]
    fig.suptitle(f"{Path(run_dir).resolve().name}: {last['n_fake']} generated vs {last['n_real']} held-out images, "
                 f"upsampled to the final size")
    path = Path(run_dir) / PLOT_FILE
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def cell_means(images: np.ndarray) -> np.ndarray:
    """Mean colour of each image: uint8 N x H x W x 3 -> float64 N x 3 (0..255)."""
    return np.asarray(images, np.float64).mean(axis=(1, 2))


class CellColours:
    """cellcolours.jsonl: at every video frame, the mean colour of each fixed-latent cell under the EMA and the raw
    generator (what the video's cells show, without the codec), so colour flicker can be measured for both."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / COLOURS_FILE
        self._file = None

    def add(self, step: int, nimg: int, epoch: float, ema: np.ndarray, raw: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        rec = {"step": step, "nimg": nimg, "epoch": epoch,
               "ema": np.round(cell_means(ema), 2).tolist(), "raw": np.round(cell_means(raw), 2).tolist()}
        self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_cell_colours(run_dir: Path) -> list[dict]:
    """cellcolours.jsonl records, one per step (the latest wins after a resume from an earlier checkpoint), in
    step order; [] when the run has none."""
    by_step: dict[int, dict] = {}
    for rec in jsonl_records(Path(run_dir) / COLOURS_FILE):
        by_step[int(rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step)]
