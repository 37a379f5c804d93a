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
from neurimg import parallel, sampler, siren, train
from neurimg.config import Config
from neurimg.coords import image_grid
from neurimg.data import atomic_write_bytes, encode_png, list_image_files, to_uint8, unique_names
from neurimg.errors import NeurimgError
from neurimg.imageset import ImageSet, load_image_set
from neurimg.metrics import batch_metrics

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
    devices: int = 1
    processes: int = 1

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
            "devices": self.devices,
            "processes": self.processes,
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


def _check_resume(stored: ckpt.Checkpoint, cfg: Config, infos: list[ckpt.ImageInfo], path: Path) -> None:
    if stored.version != ckpt.VERSION:
        raise NeurimgError(
            f"cannot resume {path}: its checkpoint (format {stored.version}) was written by an older neurimg; "
            f"it can still be rendered"
        )
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


def _run_images(files: list[str] | None, local: ImageSet) -> list[ckpt.ImageInfo]:
    """Name, source and size of every image of the run, over all processes."""
    def src(f):
        return os.path.abspath(f) if f != "-" else "-"

    if jax.process_count() == 1:
        return [ckpt.ImageInfo(n, src(f), int(w), int(h)) for n, f, (w, h) in zip(local.names, local.sources, local.sizes)]
    from jax.experimental import multihost_utils

    names = unique_names(files)
    nproc = jax.process_count()
    bounds = [len(files) * p // nproc for p in range(nproc + 1)]
    most = max(b - a for a, b in zip(bounds, bounds[1:]))
    mine = np.zeros((most, 2), np.int64)
    mine[: len(local)] = local.sizes
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, most, 2)
    sizes = np.concatenate([every[p, : bounds[p + 1] - bounds[p]] for p in range(nproc)])
    return [ckpt.ImageInfo(n, src(f), int(w), int(h)) for n, f, (w, h) in zip(names, files, sizes)]


def _check_processes_agree(cfg: Config, files: list[str], n_devices: int, resume: bool, overwrite: bool) -> None:
    """Every process of a run must train the same thing on as many devices; a mismatch would
    otherwise hang in a collective. Compares a digest of the settings and the file list."""
    import hashlib

    from jax.experimental import multihost_utils

    text = json.dumps([cfg.to_dict(), [os.path.abspath(f) for f in files], resume, overwrite])
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    mine = np.concatenate([digest, [n_devices]]).astype(np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    if len(set(every[:, 1].tolist())) > 1:
        raise NeurimgError(f"every process must use the same number of devices; they use {every[:, 1].tolist()}")
    if len(set(every[:, 0].tolist())) > 1:
        raise NeurimgError(
            "the processes were started with different options or images; start every process with the same command"
        )


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag or-ed over all processes (all processes must call this together), so that they
    stop or save checkpoints (a collective, see `Layout.to_host`) at the same step."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.array(flags, np.int32)))
    return tuple(bool(v) for v in every.reshape(-1, len(flags)).any(0))


def _pad_tables(state: dict, rows: int) -> dict:
    """The state with its per-image tables (host arrays) cut or zero-padded to `rows` rows."""

    def fit_rows(a):
        a = np.asarray(a)
        if len(a) >= rows:
            return a[:rows]
        return np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)])

    out = dict(state)
    if "params" in out and "latents" in out["params"]:
        out["params"] = {**out["params"], "latents": fit_rows(out["params"]["latents"])}
    if "opt" in out:
        out["opt"] = {**out["opt"], **{k: fit_rows(out["opt"][k]) for k in parallel.PER_IMAGE_OPT}}
    return out


# Steps of host-drawn batches sent to the devices per call when the batch changes every step.
STREAM_STEPS = 32


def fit(
    paths: list[str],
    run_dir: str | os.PathLike,
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    images: ImageSet | None = None,
    devices: str | int = "auto",
    workers: int | None = None,
    load_progress=None,
) -> FitResult:
    """Fit `cfg.model` to the images at `paths` (folders or files), keeping RUN up to date.

    `devices` ('auto', 'all' or a count) are this process's devices; in a multi-process run
    (`neurimg.parallel.initialize` called first) each process reads its share of the images and
    process 0 writes the run folder."""
    t_start = time.perf_counter()
    rep = reporter or NullReporter()
    cfg.validate()
    nproc, pidx = jax.process_count(), jax.process_index()
    lead = pidx == 0
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
    if images is not None and nproc > 1:
        raise NeurimgError("images given in memory cannot be shared out to several processes")
    if nproc > 1 and "-" in paths:
        raise NeurimgError("stdin ('-') cannot be shared out to several processes; give files or folders")
    devs = parallel.select_devices(devices)
    files = list_image_files(paths) if images is None else None  # listed once: a folder may hold 100k files
    if nproc > 1:
        _check_processes_agree(cfg, files, len(devs), resume, overwrite)

    if images is None:
        images = load_image_set(
            paths, cfg.train.background, workers=workers, progress=load_progress, share=(pidx, nproc), files=files
        )
    infos = _run_images(files, images)
    n_images = len(infos)
    if stored is not None:
        _check_resume(stored, cfg, infos, run)

    if lead:
        try:
            (run / "snapshots").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NeurimgError(f"{run}: cannot create run folder ({e.strerror or e})") from e
        _write_text(run / "config.json", cfg.to_json() + "\n")

    # Batch shape and mesh (the mesh depends on the image slots; the points are then padded to it).
    sizes = np.array([(i.width, i.height) for i in infos], np.int64)
    bounds = [n_images * p // nproc for p in range(nproc + 1)]
    local_counts = [b - a for a, b in zip(bounds, bounds[1:])]
    t = cfg.train
    plan = sampler.plan_batches(sizes, t.batch_pixels, t.batch_images, nproc, local_counts)
    layout = parallel.make_layout(devs, plan.images // nproc)
    plan = sampler.plan_batches(sizes, t.batch_pixels, t.batch_images, nproc, local_counts, layout.shape[1])
    draw = sampler.Sampler(images, plan, n_images, t.seed, (pidx, nproc))

    graphdef, state = train.init_state(cfg, n_images)
    state = jax.device_get(state)
    start_step, prior_seconds = 0, 0.0
    if stored is not None:
        state = stored.fill(state)
        start_step, prior_seconds = stored.step, stored.seconds
    rows = layout.pad_rows(n_images)  # per-image tables padded to split evenly over the devices
    state = _pad_tables(state, rows)
    state_sharding = layout.state_sharding(state)
    state = layout.put(state, state_sharding)

    def host(st):
        """The state (or part of it) on the host without the padding rows; collective."""
        return _pad_tables(layout.to_host(st), n_images)
    total = t.steps
    log = LossLog(run / "loss.csv", start_step) if lead else None

    def save(st, seconds):
        on_host = host(st)
        if lead:
            ckpt.save(ck_path, cfg, infos, on_host, seconds)

    evaluate = _make_evaluator(graphdef, images)

    def snapshot(st, step):
        params = host({"params": st["params"]})["params"]
        if lead:
            k = min(SNAPSHOT_MAX_IMAGES, len(images))
            recons = list(evaluate(params, limit=k))
            grid = snapshot_grid(recons, [images.image(i) for i in range(k)])
            atomic_write_bytes(run / "snapshots" / f"step_{step:06d}.png", encode_png(grid))

    compile_seconds = 0.0
    train_seconds = 0.0  # steady-state time in step calls this session
    steps_this_session = 0
    step = start_step
    if step < total:
        t0 = time.perf_counter()
        where = f"{layout.num_devices} {devs[0].platform} devices" + (f" in {nproc} processes" if nproc > 1 else "")
        rep.message(
            f"compiling ({n_images} images, {plan.images} per step x {plan.points} points, width {cfg.model.width}"
            + (f", {where}, mesh {layout.shape[0]}x{layout.shape[1]}" if layout.num_devices > 1 else "")
            + ")"
        )
        size = 1 if plan.static else STREAM_STEPS
        max_n = train.MAX_CHUNK if plan.static else STREAM_STEPS

        def batches_for(first, n):
            return layout.put_batch(draw.batches(first, 1 if plan.static else n, size))

        batches = batches_for(step, 1)
        step_fn = train.make_step_fn(cfg, graphdef, layout, images.scale, state_sharding=state_sharding).lower(
            state, batches, jnp.int32(1)
        ).compile()
        compile_seconds = time.perf_counter() - t0
        snaps = sorted({s for s in t.snapshots if start_step < s <= total} | {total})
        lr_net = train.lr_schedule(cfg, t.lr)
        sps_est = None

        def steps_for(at):
            next_log = (at // t.log_every + 1) * t.log_every
            next_snap = min(s for s in snaps if s > at)
            n = min(total - at, next_snap - at, next_log - at, max_n)
            if sps_est:
                n = min(n, max(1, int(sps_est * CHUNK_SECONDS)))
            return n

        last_ck_time = time.perf_counter()
        last_good_step = start_step
        if stored is None:
            save(state, 0.0)  # a checkpoint exists from the start: "the last good" is never missing
        acc_loss, acc_psnr, acc_n = 0.0, 0.0, 0
        rep.start(total, start_step)
        n = steps_for(step)
        batches = batches_for(step, n)
        with _SigintFlag() as sigint:
            while step < total:
                t_call = time.perf_counter()
                state, m = step_fn(state, batches, jnp.int32(n))  # runs asynchronously ...
                after = step + n
                if after < total and not plan.static:  # ... while the next batches are drawn
                    n_next = steps_for(after)
                    batches = batches_for(after, n_next)
                losses = np.asarray(layout.to_host(m["loss"]))[:n]
                psnrs = np.asarray(layout.to_host(m["psnr"]))[:n]
                dt = time.perf_counter() - t_call
                train_seconds += dt
                steps_this_session += n
                sps_est = steps_this_session / max(train_seconds, 1e-9)
                if not np.all(np.isfinite(losses)):
                    bad = int(np.argmax(~np.isfinite(losses)))
                    if log:
                        log.flush()
                    raise NeurimgError(
                        f"training diverged at step {step + bad + 1} (loss {losses[bad]}); "
                        f"the last good checkpoint (step {last_good_step}) is kept in {ck_path}; "
                        f"try a lower --lr",
                        exit_code=1,
                    )
                step = after
                acc_loss += float(losses.sum())
                acc_psnr += float(psnrs.sum())
                acc_n += n
                elapsed = prior_seconds + train_seconds
                if log and (step % t.log_every == 0 or step == total or step == 1):
                    log.add(step, acc_loss / acc_n, acc_psnr / acc_n, elapsed, float(lr_net(step - 1)))
                    acc_loss, acc_psnr, acc_n = 0.0, 0.0, 0
                rep.update(step, float(losses[-1]), float(psnrs[-1]), sps_est)
                if step in snaps and step != total:
                    snapshot(state, step)
                stop, due = _any_process(sigint.hit, time.perf_counter() - last_ck_time >= t.checkpoint_seconds)
                if stop:
                    if log:
                        log.flush()
                    save(state, elapsed)
                    rep.stop()
                    raise Interrupted(step, ck_path)
                if due:
                    if log:
                        log.flush()
                    save(state, elapsed)
                    last_good_step = step
                    last_ck_time = time.perf_counter()
                if plan.static:
                    n = steps_for(step) if step < total else 0
                else:
                    n = n_next if step < total else 0
        rep.stop()
        save(state, prior_seconds + train_seconds)
        if log:
            log.flush()
            plot_losses(log, run / "loss.png")
        snapshot(state, total)
    else:
        rep.message(f"{run} is already trained to step {step} (--steps {total}); nothing to train")

    # Final evaluation on the full images: each process its own, gathered for metrics.json.
    params = host({"params": state["params"]})["params"]
    local = _evaluate_metrics(evaluate(params), images)
    values = _gather_rows(np.array(local, np.float64).reshape(-1, 3), local_counts)
    per_image = [
        {"name": i.name, "width": i.width, "height": i.height, "psnr": round(float(v[0]), 6), "ssim": round(float(v[1]), 6), "mse": round(float(v[2]), 6)}
        for i, v in zip(infos, values)
    ]
    mean = {k: float(np.mean([p[k] for p in per_image])) for k in ("psnr", "ssim", "mse")}
    metrics = {"step": int(step), "images": per_image, "mean_psnr": mean["psnr"], "mean_ssim": mean["ssim"], "mean_mse": mean["mse"]}
    if lead:
        _write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return FitResult(
        run=str(run),
        images=n_images,
        steps=int(step),
        mean_psnr=mean["psnr"],
        mean_ssim=mean["ssim"],
        seconds=time.perf_counter() - t_start,
        compile_seconds=compile_seconds,
        steps_per_second=(steps_this_session / train_seconds) if train_seconds > 0 else 0.0,
        resumed_from=start_step,
        per_image=per_image,
        devices=layout.num_devices,
        processes=nproc,
    )


def _evaluate_metrics(recons, images: ImageSet, group: int = 256) -> np.ndarray:
    """(N, 3) PSNR, SSIM, MSE of each reconstruction against its image, computed for runs of
    up to `group` consecutive same-sized images at once."""
    rows: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    targets: list[np.ndarray] = []

    def flush():
        if preds:
            rows.append(batch_metrics(np.stack(preds), np.stack(targets)))
            preds.clear()
            targets.clear()

    for k, rec in enumerate(recons):
        if preds and (rec.shape != preds[0].shape or len(preds) == group):
            flush()
        preds.append(rec)
        targets.append(images.image(k))
    flush()
    return np.concatenate(rows) if rows else np.zeros((0, 3))


def _gather_rows(rows: np.ndarray, counts: list[int]) -> np.ndarray:
    """Concatenate every process's rows (process p has counts[p] of them), in process order."""
    if len(counts) == 1:
        return rows
    from jax.experimental import multihost_utils

    most = max(counts)
    mine = np.zeros((most,) + rows.shape[1:], rows.dtype)
    mine[: len(rows)] = rows
    every = np.asarray(multihost_utils.process_allgather(mine))
    return np.concatenate([every[p, : counts[p]] for p in range(len(counts))])


def _make_evaluator(graphdef, images: ImageSet, max_points: int = 1 << 18):
    """evaluate(params, limit=None) yields the first `limit` (all) images of `images`,
    reconstructed at their own resolution as (H, W, 3) float32, rendered in groups of a fixed
    size (one compile); only one group is held at a time."""
    counts = images.counts
    pmax = int(counts.max())
    group = max(1, min(len(images), max_points // pmax))
    device = jax.local_devices()[0]

    @jax.jit
    def ev(params, coords, ids):
        return jnp.clip(siren.apply(graphdef, params, coords, ids), 0.0, 1.0)

    def evaluate(params, limit: int | None = None):
        n = len(images) if limit is None else min(limit, len(images))
        p = jax.device_put(params, device)
        for s in range(0, n, group):
            idx = np.arange(s, s + group) % len(images)  # fixed group size: one compile
            crd = np.zeros((group, pmax, 2), np.float32)
            for j, k in enumerate(idx):
                w, h = (int(v) for v in images.sizes[k])
                crd[j, : w * h] = image_grid(w, h).reshape(-1, 2)
            ids = jnp.asarray(idx + images.first_id, jnp.int32)
            res = np.asarray(ev(p, jax.device_put(crd, device), ids))
            for j in range(min(group, n - s)):
                w, h = (int(v) for v in images.sizes[s + j])
                yield res[j, : w * h].reshape(h, w, 3)

    return evaluate
