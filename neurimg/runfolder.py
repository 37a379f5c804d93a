"""A run folder: what `neurimg fit` keeps on disk, and the policy for creating, replacing and
resuming one. Only the lead process (process 0 of a multi-process run) writes; the others get
a `RunFolder` whose writes do nothing, so callers never test for it.

RUN/
    config.json              every setting, defaults included
    checkpoint.safetensors   weights, latents, optimizer state, step, config, image names/sizes
    loss.csv                 step,loss,psnr,seconds,lr: loss and batch PSNR averaged over the
                             steps since the previous row; seconds = training time so far,
                             compile excluded; lr = the shared weights' rate at that step
    loss.png                 loss and PSNR over steps
    snapshots/step_NNNNNN.png  reconstructions next to the originals (first 16 images)
    metrics.json             per-image PSNR, SSIM, MSE on the full images, and their means

The checkpoint is read once, when the folder is opened for resuming (`stored`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurimg import checkpoint as ckpt
from neurimg.config import Config
from neurimg.data import atomic_write_bytes, encode_png, to_uint8
from neurimg.errors import NeurimgError

LOSS_HEADER = ["step", "loss", "psnr", "seconds", "lr"]
SNAPSHOT_MAX_IMAGES = 16
# What a run folder holds besides the checkpoint; `--overwrite` removes these (and nothing else).
_RUN_FILES = ("config.json", "loss.csv", "loss.png", "metrics.json")


@dataclass
class RunFolder:
    path: Path
    lead: bool = True
    stored: ckpt.Checkpoint | None = None  # the checkpoint to resume from

    @property
    def checkpoint(self) -> Path:
        return ckpt.checkpoint_path(self.path)

    @staticmethod
    def open(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, lead: bool = True) -> "RunFolder":
        """The policy: a new run needs an empty place (or `overwrite`, which clears the old
        run's files first); `resume` needs a checkpoint, read here once."""
        run = Path(run_dir)
        if run.exists() and not run.is_dir():
            raise NeurimgError(f"{run}: exists and is not a folder")
        ck = ckpt.checkpoint_path(run)
        if resume:
            if not ck.exists():
                raise NeurimgError(f"cannot resume: {ck} does not exist")
            return RunFolder(run, lead, ckpt.load(ck))
        if ck.exists() and not overwrite:
            raise NeurimgError(f"{run} already holds a run; use --resume to continue it or --overwrite to replace it")
        return RunFolder(run, lead)

    # -- writes (lead process only) ---------------------------------------------------------
    def create(self, cfg: Config, replace: bool) -> None:
        """Make the folder (clearing an old run's files if `replace`) and write config.json."""
        if not self.lead:
            return
        try:
            if replace:
                self._clear()
            (self.path / "snapshots").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NeurimgError(f"{self.path}: cannot create run folder ({e.strerror or e})") from e
        self.write_text("config.json", cfg.to_json() + "\n")

    def _clear(self) -> None:
        for name in _RUN_FILES + (ckpt.FILENAME,):
            (self.path / name).unlink(missing_ok=True)
        snaps = self.path / "snapshots"
        if snaps.is_dir():
            for p in snaps.glob("step_*.png"):
                p.unlink()

    def write_text(self, name: str, text: str) -> None:
        if self.lead:
            atomic_write_bytes(self.path / name, text.encode())

    def save_checkpoint(self, cfg: Config, images: list[ckpt.ImageInfo], state: dict, seconds: float, extra=None) -> None:
        if self.lead:
            ckpt.save(self.checkpoint, cfg, images, state, seconds, extra=extra)

    def write_snapshot(self, step: int, recons: list[np.ndarray], originals: list[np.ndarray]) -> None:
        if self.lead:
            grid = snapshot_grid(recons, originals)
            atomic_write_bytes(self.path / "snapshots" / f"step_{step:06d}.png", encode_png(grid))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.write_text("metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")

    def loss_log(self, resume_step: int, carried: tuple[float, float, int] = (0.0, 0.0, 0)) -> "LossLog":
        return LossLog(self.path / "loss.csv", resume_step, carried, self.lead)


@dataclass
class LossLog:
    """loss.csv. On resume it is cut back to the checkpoint's step (so no step appears twice),
    and `carried` (the sums since the last row, stored in the checkpoint) continues the row
    in progress, so the rows are those of an uninterrupted run."""

    path: Path
    resume_step: int = 0
    carried: tuple[float, float, int] = (0.0, 0.0, 0)
    write: bool = True
    rows: list[list[str]] = field(default_factory=list)

    def __post_init__(self):
        self.rows = _loss_rows(self.path, self.resume_step) if self.resume_step > 0 else []
        self.acc_loss, self.acc_psnr, self.acc_n = self.carried
        self.flush()

    def observe(self, losses: np.ndarray, psnrs: np.ndarray) -> None:
        self.acc_loss += float(losses.sum())
        self.acc_psnr += float(psnrs.sum())
        self.acc_n += len(losses)

    def row(self, step: int, seconds: float, lr: float) -> None:
        """Close the row in progress at `step`."""
        if self.acc_n:
            self.rows.append([str(step), f"{self.acc_loss / self.acc_n:.6g}", f"{self.acc_psnr / self.acc_n:.4f}", f"{seconds:.3f}", f"{lr:.6g}"])
        self.acc_loss, self.acc_psnr, self.acc_n = 0.0, 0.0, 0

    @property
    def pending(self) -> tuple[float, float, int]:
        """The sums of the row in progress (stored with a checkpoint)."""
        return self.acc_loss, self.acc_psnr, self.acc_n

    def flush(self) -> None:
        if not self.write:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LOSS_HEADER)
        w.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def series(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.rows:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        a = np.array([[float(r[0]), float(r[1]), float(r[2])] for r in self.rows])
        return a[:, 0], a[:, 1], a[:, 2]

    def plot(self, path: Path) -> None:
        """loss.png: loss (log scale) and batch PSNR over steps."""
        if not self.write:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, loss, psnr = self.series()
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, loss, color="tab:blue", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (MSE)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(steps, psnr, color="tab:red", lw=1.2)
        ax2.set_ylabel("PSNR (dB, training batches)", color="tab:red")
        ax.grid(alpha=0.3)
        ax.set_title("neurimg fit")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())


def _loss_rows(path: Path, upto: int) -> list[list[str]]:
    """Rows of an existing loss.csv with step <= upto (header excluded)."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if not r or r[0] == "step":
                continue
            try:
                if int(r[0]) <= upto:
                    rows.append(r)
            except ValueError:
                continue
    return rows


def snapshot_grid(recons: list[np.ndarray], originals: list[np.ndarray]) -> np.ndarray:
    """Pairs [reconstruction | original] laid out in a grid, 2 pixel gaps: uint8 (H, W, 3)."""
    n = len(recons)
    cw = max(r.shape[1] for r in recons)
    ch = max(r.shape[0] for r in recons)
    gap = 2
    cols = min(4, n)
    rows = math.ceil(n / cols)
    pw = 2 * cw + gap
    grid_w = cols * pw + (cols - 1) * 3 * gap
    grid_h = rows * ch + (rows - 1) * gap
    out = np.empty((grid_h, grid_w, 3), np.uint8)
    out[:] = to_uint8(np.array([0.5, 0.5, 0.5]))
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = r * (ch + gap), c * (pw + 3 * gap)
        for j, img in enumerate((recons[k], originals[k])):
            h, w = img.shape[:2]
            out[y : y + h, x + j * (cw + gap) : x + j * (cw + gap) + w] = to_uint8(img)
    return out
