"""The fit loop: train one modulated SIREN on a set of images and keep a run folder.

A run folder RUN holds:
- config.json            every setting, defaults included
- checkpoint.safetensors weights, latents, optimizer state, step, config, image names/sizes
- loss.csv               step,loss,psnr,seconds,lr (loss and batch PSNR averaged since the
                         previous row; seconds = training time so far, compile excluded)
- loss.png               loss and PSNR over steps
- snapshots/step_NNNNNN.png  reconstructions next to the originals (first 16 images)
- metrics.json           per-image PSNR, SSIM, MSE on the full images, and their means

Progress goes to a `Reporter` (see `neurimg.progress`); this module never prints.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from neurimg import checkpoint as ckpt
from neurimg import siren, train
from neurimg.config import Config
from neurimg.data import Image, atomic_write_bytes, load_images, to_uint8, encode_png
from neurimg.errors import NeurimgError
from neurimg.metrics import image_metrics

SNAPSHOT_MAX_IMAGES = 16
CHUNK_SECONDS = 1.0  # aim for this much work per jitted call, so Ctrl-C and progress respond


class Interrupted(Exception):
    """Raised after Ctrl-C once a resumable checkpoint is saved."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}")
        self.step = step
        self.path = path


class Reporter(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def update(self, step: int, loss: float, psnr: float, steps_per_second: float) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class NullReporter:
    def start(self, total, done):
        pass

    def update(self, step, loss, psnr, steps_per_second):
        pass

    def message(self, text):
        pass

    def stop(self):
        pass


@dataclass
class FitResult:
    run: str
    images: int
    steps: int
    mean_psnr: float
    mean_ssim: float
    seconds: float
    compile_seconds: float
    steps_per_second: float
    resumed_from: int = 0
    per_image: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "images": self.images,
            "steps": self.steps,
            "mean_psnr": round(self.mean_psnr, 4),
            "mean_ssim": round(self.mean_ssim, 5),
            "seconds": round(self.seconds, 3),
            "compile_seconds": round(self.compile_seconds, 3),
            "steps_per_second": round(self.steps_per_second, 3),
            "resumed_from": self.resumed_from,
        }


# --------------------------------------------------------------------------------------------
# run-folder helpers


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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


LOSS_HEADER = ["step", "loss", "psnr", "seconds", "lr"]


class LossLog:
    """loss.csv, rewritten up to a step on resume so no step appears twice."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.rows = _loss_rows(path, resume_step) if resume_step > 0 else []
        self._flush()

    def add(self, step: int, loss: float, psnr: float, seconds: float, lr: float) -> None:
        self.rows.append([str(step), f"{loss:.6g}", f"{psnr:.4f}", f"{seconds:.3f}", f"{lr:.6g}"])

    def _flush(self) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(LOSS_HEADER)
        w.writerows(self.rows)
        _write_text(self.path, buf.getvalue())

    flush = _flush

    def series(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.rows:
            return np.zeros(0), np.zeros(0), np.zeros(0)
        a = np.array([[float(r[0]), float(r[1]), float(r[2])] for r in self.rows])
        return a[:, 0], a[:, 1], a[:, 2]


def plot_losses(log: LossLog, path: Path) -> None:
    """loss.png: loss (log scale) and batch PSNR over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, loss, psnr = log.series()
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


def snapshot_grid(recons: list[np.ndarray], originals: list[np.ndarray], background=(1.0, 1.0, 1.0)) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------
# the fit


class _SigintFlag:
    """Turn Ctrl-C into a flag checked between jitted calls (the call itself is not interrupted)."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.hit:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _images_info(images: list[Image]) -> list[ckpt.ImageInfo]:
    return [ckpt.ImageInfo(i.name, os.path.abspath(i.source) if i.source != "-" else "-", i.width, i.height) for i in images]


def _check_resume(stored: ckpt.Checkpoint, cfg: Config, infos: list[ckpt.ImageInfo], path: Path) -> None:
    if stored.config.model != cfg.model:
        diffs = [
            f"{k}={getattr(stored.config.model, k)} (asked {getattr(cfg.model, k)})"
            for k in stored.config.model.__dataclass_fields__
            if getattr(stored.config.model, k) != getattr(cfg.model, k)
        ]
        raise NeurimgError(f"cannot resume {path}: model differs from the checkpoint's: {', '.join(diffs)}")
    a = [(i.name, i.width, i.height) for i in stored.images]
    b = [(i.name, i.width, i.height) for i in infos]
    if a != b:
        raise NeurimgError(
            f"cannot resume {path}: the images differ from the checkpoint's ({len(a)} stored, {len(b)} given)"
        )


def resolve_resume_inputs(run_dir: str | os.PathLike) -> list[str]:
    """Sources stored in RUN's checkpoint, for `fit --resume` given no paths."""
    stored = ckpt.load(run_dir)
    srcs = [i.source for i in stored.images]
    if "-" in srcs:
        raise NeurimgError("this run was fitted from stdin; give the image again to resume")
    return srcs


def fit(
    paths: list[str],
    run_dir: str | os.PathLike,
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    images: list[Image] | None = None,
) -> FitResult:
    """Fit `cfg.model` to the images at `paths` (folders or files), keeping RUN up to date."""
    t_start = time.perf_counter()
    rep = reporter or NullReporter()
    cfg.validate()
    run = Path(run_dir)
    ck_path = ckpt.checkpoint_path(run)
    if run.exists() and not run.is_dir():
        raise NeurimgError(f"{run}: exists and is not a folder")
    stored = None
    if resume:
        if not ck_path.exists():
            raise NeurimgError(f"cannot resume: {ck_path} does not exist")
        stored = ckpt.load(ck_path)
        if not paths and images is None:
            paths = resolve_resume_inputs(run)
    elif ck_path.exists() and not overwrite:
        raise NeurimgError(f"{run} already holds a run; use --resume to continue it or --overwrite to replace it")

    if images is None:
        images = load_images(paths, cfg.train.background)
    infos = _images_info(images)

    if stored is not None:
        _check_resume(stored, cfg, infos, run)

    try:
        (run / "snapshots").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NeurimgError(f"{run}: cannot create run folder ({e.strerror or e})") from e
    _write_text(run / "config.json", cfg.to_json() + "\n")

    data = train.make_dataset([i.pixels for i in images])
    graphdef, state = train.init_state(cfg, data.num_images)
    start_step, prior_seconds = 0, 0.0
    if stored is not None:
        state = jax.tree.map(jnp.asarray, stored.fill(jax.device_get(state)))
        start_step, prior_seconds = stored.step, stored.seconds
    total = cfg.train.steps
    log = LossLog(run / "loss.csv", start_step)

    def save(st, seconds):
        ckpt.save(ck_path, cfg, infos, st, seconds)

    renderer_all = _make_eval_all(graphdef, data)
    originals = [i.pixels for i in images[:SNAPSHOT_MAX_IMAGES]]

    def snapshot(st, step):
        recons = renderer_all(st["params"], limit=SNAPSHOT_MAX_IMAGES)
        grid = snapshot_grid(recons, originals)
        atomic_write_bytes(run / "snapshots" / f"step_{step:06d}.png", encode_png(grid))

    compile_seconds = 0.0
    train_seconds = 0.0  # steady-state time in step calls this session
    steps_this_session = 0
    step = start_step
    if step < total:
        t0 = time.perf_counter()
        rep.message(f"compiling ({data.num_images} images, width {cfg.model.width})")
        step_fn = train.make_step_fn(cfg, graphdef, data).lower(state, jnp.int32(1)).compile()
        compile_seconds = time.perf_counter() - t0
        snaps = sorted({s for s in cfg.train.snapshots if start_step < s <= total} | {total})
        lr_net = train.lr_schedule(cfg, cfg.train.lr)
        sps_est = None
        last_ck_time = time.perf_counter()
        last_good_step = start_step
        if stored is None:
            save(state, 0.0)  # a checkpoint exists from the start: "the last good" is never missing
        acc_loss, acc_psnr, acc_n = 0.0, 0.0, 0
        rep.start(total, start_step)
        with _SigintFlag() as sigint:
            while step < total:
                next_log = (step // cfg.train.log_every + 1) * cfg.train.log_every
                next_snap = min(s for s in snaps if s > step)
                n = min(total - step, next_snap - step, next_log - step, train.MAX_CHUNK)
                if sps_est:
                    n = min(n, max(1, int(sps_est * CHUNK_SECONDS)))
                t_call = time.perf_counter()
                state, m = step_fn(state, jnp.int32(n))
                losses = np.asarray(m["loss"])[:n]
                psnrs = np.asarray(m["psnr"])[:n]
                dt = time.perf_counter() - t_call
                train_seconds += dt
                steps_this_session += n
                sps_est = steps_this_session / max(train_seconds, 1e-9)
                if not np.all(np.isfinite(losses)):
                    bad = int(np.argmax(~np.isfinite(losses)))
                    log.flush()
                    raise NeurimgError(
                        f"training diverged at step {step + bad + 1} (loss {losses[bad]}); "
                        f"the last good checkpoint (step {last_good_step}) is kept in {ck_path}; "
                        f"try a lower --lr",
                        exit_code=1,
                    )
                step += n
                acc_loss += float(losses.sum())
                acc_psnr += float(psnrs.sum())
                acc_n += n
                elapsed = prior_seconds + train_seconds
                if step % cfg.train.log_every == 0 or step == total or step == 1:
                    log.add(step, acc_loss / acc_n, acc_psnr / acc_n, elapsed, float(lr_net(step - 1)))
                    acc_loss, acc_psnr, acc_n = 0.0, 0.0, 0
                rep.update(step, float(losses[-1]), float(psnrs[-1]), sps_est)
                if step in snaps and step != total:
                    snapshot(state, step)
                if sigint.hit:
                    log.flush()
                    save(state, elapsed)
                    rep.stop()
                    raise Interrupted(step, ck_path)
                if time.perf_counter() - last_ck_time >= cfg.train.checkpoint_seconds:
                    log.flush()
                    save(state, elapsed)
                    last_good_step = step
                    last_ck_time = time.perf_counter()
        rep.stop()
        log.flush()
        save(state, prior_seconds + train_seconds)
        snapshot(state, total)
        plot_losses(log, run / "loss.png")
    else:
        rep.message(f"{run} is already trained to step {step} (--steps {total}); nothing to train")

    # Final evaluation on the full images.
    recons = renderer_all(state["params"])
    per_image = []
    for img, rec in zip(images, recons):
        m = image_metrics(rec, img.pixels)
        per_image.append({"name": img.name, "width": img.width, "height": img.height, **{k: round(v, 6) for k, v in m.items()}})
    mean = {k: float(np.mean([p[k] for p in per_image])) for k in ("psnr", "ssim", "mse")}
    metrics = {"step": int(step), "images": per_image, "mean_psnr": mean["psnr"], "mean_ssim": mean["ssim"], "mean_mse": mean["mse"]}
    _write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return FitResult(
        run=str(run),
        images=data.num_images,
        steps=int(step),
        mean_psnr=mean["psnr"],
        mean_ssim=mean["ssim"],
        seconds=time.perf_counter() - t_start,
        compile_seconds=compile_seconds,
        steps_per_second=(steps_this_session / train_seconds) if train_seconds > 0 else 0.0,
        resumed_from=start_step,
        per_image=per_image,
    )


def _make_eval_all(graphdef, data: train.Dataset, max_points: int = 1 << 18):
    """Reconstruct images at their training resolution, in groups of bounded size."""
    pmax = int(data.coords.shape[1])
    group = max(1, min(data.num_images, max_points // pmax))

    @jax.jit
    def ev(params, coords, ids):
        return jnp.clip(siren.apply(graphdef, params, coords, ids), 0.0, 1.0)

    def run(params, limit: int | None = None):
        n = data.num_images if limit is None else min(limit, data.num_images)
        out = []
        for s in range(0, n, group):
            ids = np.arange(s, s + group) % data.num_images  # fixed group size: one compile
            res = np.asarray(ev(params, data.coords[ids], jnp.asarray(ids, jnp.int32)))
            for k in range(min(group, n - s)):
                w, h = data.sizes[s + k]
                out.append(res[k, : w * h].reshape(h, w, 3))
        return out

    return run
