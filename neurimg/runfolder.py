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
from neurimg.config import Config, GanConfig
from neurimg.data import encode_png, to_uint8, write_output
from neurimg.errors import NeurimgError

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
    def open(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, lead: bool = True, kind: str = "fit") -> "RunFolder":
        """The policy: a new run needs an empty place (or `overwrite`, which clears the old
        run's files first); `resume` needs a checkpoint of this `kind` (`checkpoint.KINDS`),
        read here once."""
        run = Path(run_dir)
        if run.exists() and not run.is_dir():
            raise NeurimgError(f"{run}: exists and is not a folder")
        ck = ckpt.checkpoint_path(run)
        if resume:
            if not ck.exists():
                raise NeurimgError(f"cannot resume: {ck} does not exist")
            return RunFolder(run, lead, ckpt.load(ck, kind=kind))
        if ck.exists() and not overwrite:
            raise NeurimgError(f"{run} already holds a run; use --resume to continue it or --overwrite to replace it")
        return RunFolder(run, lead)

    # -- writes (lead process only) ---------------------------------------------------------
    def create(self, cfg: Config | GanConfig, replace: bool) -> None:
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
            write_output(self.path / name, text.encode())

    def save_checkpoint(self, cfg: Config | GanConfig, images: list[ckpt.ImageInfo], state: dict, seconds: float, extra=None) -> None:
        if self.lead:
            ckpt.save(self.checkpoint, cfg, images, state, seconds, extra=extra)

    def write_snapshot(self, step: int, groups: list[list[np.ndarray]]) -> None:
        """snapshots/step_NNNNNN.png: `snapshot_grid(groups)`."""
        if self.lead:
            grid = snapshot_grid(groups)
            write_output(self.path / "snapshots" / f"step_{step:06d}.png", encode_png(grid))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        self.write_text("metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")

    def loss_log(self, resume_step: int, carried: tuple[float, ...] = (), **kw) -> "LossLog":
        """loss.csv (`metrics` and `title` as LossLog's)."""
        return LossLog(self.path / "loss.csv", resume_step, carried, self.lead, **kw)


@dataclass
class LossLog:
    """loss.csv: step, the mean of each of `metrics` over the steps since the previous row,
    seconds, lr. On resume it is cut back to the checkpoint's step (so no step appears twice),
    and `carried` (the sums since the last row and their count, stored in the checkpoint)
    continues the row in progress, so the rows are those of an uninterrupted run."""

    path: Path
    resume_step: int = 0
    carried: tuple[float, ...] = ()
    write: bool = True
    metrics: tuple[str, ...] = ("loss", "psnr")
    title: str = "neurimg fit"
    panels: tuple[tuple[str, ...], ...] = ()  # metrics besides loss and psnr, drawn together per panel
    rows: list[list[str]] = field(default_factory=list)

    def __post_init__(self):
        self.rows = _loss_rows(self.path, self.resume_step) if self.resume_step > 0 else []
        carried = tuple(self.carried) or (0.0,) * (len(self.metrics) + 1)
        if len(carried) != len(self.metrics) + 1:
            raise NeurimgError("damaged checkpoint (its loss-log sums do not match the log's columns)")
        self.sums, self.acc_n = [float(v) for v in carried[:-1]], int(carried[-1])
        self.flush()

    @property
    def header(self) -> list[str]:
        return ["step", *self.metrics, "seconds", "lr"]

    def observe(self, values: dict[str, np.ndarray]) -> None:
        """Add one chunk's per-step values of every metric."""
        for k, name in enumerate(self.metrics):
            self.sums[k] += float(np.sum(values[name]))
        self.acc_n += len(values[self.metrics[0]])

    def row(self, step: int, seconds: float, lr: float) -> None:
        """Close the row in progress at `step`."""
        if self.acc_n:
            means = [f"{v / self.acc_n:.6g}" for v in self.sums]
            self.rows.append([str(step), *means, f"{seconds:.3f}", f"{lr:.6g}"])
        self.sums, self.acc_n = [0.0] * len(self.metrics), 0

    @property
    def pending(self) -> tuple[float, ...]:
        """The sums of the row in progress and their count (stored with a checkpoint)."""
        return (*self.sums, self.acc_n)

    def flush(self) -> None:
        if not self.write:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.header)
        w.writerows(self.rows)
        write_output(self.path, buf.getvalue().encode())

    def series(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The steps of the rows and each metric's column."""
        if not self.rows:
            return np.zeros(0), {m: np.zeros(0) for m in self.metrics}
        a = np.array([[float(v) for v in r[: len(self.metrics) + 1]] for r in self.rows])
        return a[:, 0], {m: a[:, k + 1] for k, m in enumerate(self.metrics)}

    def plot(self, path: Path) -> None:
        """loss.png: "loss" (log scale) with "psnr" on a second axis; further metrics below, in
        the `panels` given (by default one each)."""
        if not self.write:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, cols = self.series()
        rest = self.panels or tuple((m,) for m in self.metrics if m not in ("loss", "psnr"))
        fig, axes = plt.subplots(1 + len(rest), 1, figsize=(7, 4 + 1.8 * len(rest)), dpi=100, squeeze=False, sharex=True)
        ax = axes[0, 0]
        ax.plot(steps, cols["loss"], color="tab:blue", lw=1.2)
        ax.set_yscale("log")
        ax.set_ylabel("loss", color="tab:blue")
        if "psnr" in cols:
            ax2 = ax.twinx()
            ax2.plot(steps, cols["psnr"], color="tab:red", lw=1.2)
            ax2.set_ylabel("PSNR (dB, training batches)", color="tab:red")
        ax.grid(alpha=0.3)
        ax.set_title(self.title)
        for k, names in enumerate(rest):
            axk = axes[k + 1, 0]
            for m, colour in zip(names, ("tab:green", "tab:purple", "tab:orange")):
                axk.plot(steps, cols[m], color=colour, lw=1.2, label=m)
            axk.set_ylabel(", ".join(names))
            if len(names) > 1:
                axk.legend(loc="best", fontsize=8)
            axk.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        write_output(path, buf.getvalue())


def log_sums(stored: ckpt.Checkpoint, n_metrics: int) -> tuple[float, ...]:
    """The loss.csv row in progress when `stored` was saved (its extra "log": the sums of
    `n_metrics` metrics and their count, see `LossLog`)."""
    try:
        vals = json.loads(stored.extra.get("log", "[]")) or [0.0] * (n_metrics + 1)
        if not isinstance(vals, list) or len(vals) != n_metrics + 1:
            raise ValueError
        out = tuple(float(v) for v in vals[:-1]) + (int(vals[-1]),)
        if not all(math.isfinite(v) for v in out) or out[-1] < 0:
            raise ValueError
        return out
    except (ValueError, TypeError):
        raise NeurimgError("damaged checkpoint (its loss-log sums are not numbers)") from None


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


def snapshot_grid(groups: list[list[np.ndarray]], cols: int | None = None) -> np.ndarray:
    """Groups of images side by side (e.g. [reconstruction, original], or A | B | target |
    generated), 2 pixel gaps within a group and 6 between groups, laid out `cols` groups per
    row (default: up to 4 pairs, 2 of anything longer): uint8 (H, W, 3) on grey."""
    n, k = len(groups), max(len(g) for g in groups)
    cw = max(im.shape[1] for g in groups for im in g)
    ch = max(im.shape[0] for g in groups for im in g)
    gap = 2
    cols = min(cols or (4 if k <= 2 else 2), n)
    rows = math.ceil(n / cols)
    pw = k * cw + (k - 1) * gap
    grid_w = cols * pw + (cols - 1) * 3 * gap
    grid_h = rows * ch + (rows - 1) * gap
    out = np.empty((grid_h, grid_w, 3), np.uint8)
    out[:] = to_uint8(np.array([0.5, 0.5, 0.5]))
    for i, group in enumerate(groups):
        r, c = divmod(i, cols)
        y, x = r * (ch + gap), c * (pw + 3 * gap)
        for j, img in enumerate(group):
            h, w = img.shape[:2]
            out[y : y + h, x + j * (cw + gap) : x + j * (cw + gap) + w] = to_uint8(img)
    return out
