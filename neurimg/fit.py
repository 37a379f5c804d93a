"""`neurimg fit`: train one modulated SIREN on a set of images and keep a run folder.

`fit` is four parts, each with one job:

1. the run folder (`neurimg.runfolder.RunFolder`): resume/overwrite policy, lead-only writes,
   the checkpoint read once;
2. `prepare`: the images (each process its share), the batch plan, the device layout and the
   training state (fresh or from the checkpoint);
3. `train`: the engine (`neurimg.engine`) running `neurimg.train`'s step, with hooks for
   loss.csv rows, snapshots and periodic checkpoints, and a checkpoint on Ctrl-C;
4. `evaluate`: PSNR, SSIM and MSE of every image at full resolution, into metrics.json.

Progress goes to a reporter (see `neurimg.progress`); this module never prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from neurimg import checkpoint as ckpt
from neurimg import engine, parallel, sampler, train
from neurimg.config import Config
from neurimg.data import list_image_files, unique_names
from neurimg.errors import NeurimgError
from neurimg.imageset import ImageSet, load_image_set
from neurimg.metrics import batch_metrics
from neurimg.render import GridEvaluator, siren_field
from neurimg.runfolder import SNAPSHOT_MAX_IMAGES, RunFolder, log_sums

# Steps of host-drawn batches sent to the devices per call when the batch changes every step.
STREAM_STEPS = 32

# A chunk whose mean loss is this many times the best chunk mean so far (a 10 dB fall in PSNR),
# after the warm-up, is a collapsed fit (a SIREN trained too fast can fall back to a flat
# image within a few steps): the run stops with exit code 1 and keeps its last good checkpoint.
COLLAPSE_FACTOR = 10.0
# A fresh run that diverges or collapses starts again this many times at most, with its
# learning rates divided by this each time (the 12 bundled logos collapse at 1.5e-3 near step
# 240 and train well at 7.5e-4; bench/RESULTS.md).
MAX_RESTARTS = 2
RESTART_LR_DIVISOR = 2.0


class TrainingFailed(NeurimgError):
    """Training diverged (not finite) or collapsed (`CollapseWatch`, `check_not_flat`): exit
    code 1 unless `fit` starts again (see MAX_RESTARTS). `reason` is the short cause."""

    def __init__(self, message: str, reason: str):
        super().__init__(message, exit_code=1)
        self.reason = reason

Interrupted = engine.Interrupted


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
    restarts: int = 0  # fresh starts after a collapse, each with the learning rates halved
    lr: float = 0.0  # the peak lr of the shared weights the run trained with

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
            "restarts": self.restarts,
            "lr": self.lr,
        }


def fit(
    paths: list[str],
    run_dir: str | os.PathLike | RunFolder,
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter=None,
    images: ImageSet | None = None,
    devices: str | int = "auto",
    workers: int | None = None,
    load_progress=None,
) -> FitResult:
    """Fit `cfg.model` to the images at `paths` (folders or files), keeping RUN up to date.

    `run_dir` is a path or an opened `RunFolder` (resuming if it holds a stored checkpoint).
    `devices` ('auto', 'all' or a count) are this process's devices; in a multi-process run
    (`neurimg.parallel.cluster`) each process reads its share of the images and process 0
    writes the run folder. Ctrl-C raises `engine.Interrupted` after saving a checkpoint."""
    t_start = time.perf_counter()
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder.open(run_dir, resume=resume, overwrite=overwrite, lead=parallel.is_lead())
    cfg = resumed_config(cfg.validate(), folder.stored)
    prep = prepare(paths, folder, cfg, images=images, devices=devices, workers=workers, load_progress=load_progress)
    cfg = prep.cfg  # automatic settings resolved for the images
    restarts = 0
    while True:
        if prep.start_step < cfg.train.steps:
            folder.create(cfg, replace=overwrite or restarts > 0)  # a restart discards the failed attempt's files
        try:
            state, stats = run_training(prep, folder, cfg, reporter)
            per_image = evaluate(prep, state, prep.best_loss)
            break
        except TrainingFailed as e:
            # A fresh single-process run starts again with its learning rates halved; a
            # resumed run keeps its checkpoint and reports (its schedule is not ours to change).
            if prep.start_step > 0 or restarts >= MAX_RESTARTS or parallel.processes()[1] > 1:
                raise NeurimgError(e.message + (f" (after {restarts} restarts, each with the learning rates halved)" if restarts else ""), exit_code=1) from None
            restarts += 1
            t = cfg.train
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, lr=t.lr / RESTART_LR_DIVISOR, latent_lr=t.latent_lr / RESTART_LR_DIVISOR))
            if reporter is not None:
                reporter.message(f"fit: {e.reason}; starting again with --lr {cfg.train.lr:.3g} --latent-lr {cfg.train.latent_lr:.3g}")
            prep = prepare(paths, folder, cfg, images=prep.images, devices=devices, workers=workers)
    mean = {k: float(np.mean([p[k] for p in per_image])) for k in ("psnr", "ssim", "mse")}
    folder.write_metrics({"step": stats.steps, "images": per_image, "mean_psnr": mean["psnr"], "mean_ssim": mean["ssim"], "mean_mse": mean["mse"]})
    return FitResult(
        run=str(folder.path),
        images=len(prep.infos),
        steps=stats.steps,
        mean_psnr=mean["psnr"],
        mean_ssim=mean["ssim"],
        seconds=time.perf_counter() - t_start,
        compile_seconds=stats.compile_seconds,
        steps_per_second=stats.steps_per_second,
        resumed_from=prep.start_step,
        per_image=per_image,
        restarts=restarts,
        lr=cfg.train.lr,
        devices=prep.layout.num_devices,
        processes=parallel.processes()[1],
    )


def resumed_config(cfg: Config, stored: ckpt.Checkpoint | None) -> Config:
    """The config to continue a stored run with: `cfg` with the stored schedule, extended by a
    decay segment when the total number of steps changes (`TrainConfig.extended`)."""
    if stored is None:
        return cfg
    old = stored.config.train
    if cfg.train.steps is None:  # no new total: the stored one
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=old.steps))
    if stored.step >= cfg.train.steps:  # nothing to train: the run stays as it was
        return dataclasses.replace(cfg, train=old)
    train_cfg = dataclasses.replace(cfg.train, steps=old.steps, segments=old.segments)
    return dataclasses.replace(cfg, train=train_cfg.extended(stored.step, cfg.train.steps)).validate()


# --------------------------------------------------------------------------------------------
# 2. preparation


@dataclass
class Prepared:
    """Everything training and evaluation need, on this process."""

    cfg: Config  # the run's config, automatic settings resolved for its images
    images: ImageSet  # this process's share
    infos: list[ckpt.ImageInfo]  # every image of the run (all processes)
    local_counts: list[int]  # images per process
    plan: sampler.Plan
    layout: parallel.Layout
    draw: sampler.Sampler
    graphdef: Any
    state: Any  # on the devices, per-image tables padded to `layout.pad_rows`
    state_sharding: Any
    evaluator: GridEvaluator  # renders the run's images: snapshots and final metrics
    start_step: int = 0
    prior_seconds: float = 0.0
    log_carried: tuple[float, ...] = ()
    best_loss: float = float("inf")  # the lowest chunk mean loss training reached (`CollapseWatch`)

    def host(self, tree) -> Any:
        """(Part of) the state on the host without the padding rows; collective."""
        return _pad_tables(self.layout.to_host(tree), len(self.infos))


def prepare(paths, folder: RunFolder, cfg: Config, *, images=None, devices="auto", workers=None, load_progress=None) -> Prepared:
    pidx, nproc = parallel.processes()
    stored = folder.stored
    if stored is not None and not paths and images is None:
        paths = _stored_sources(stored)
    if images is not None and nproc > 1:
        raise NeurimgError("images given in memory cannot be shared out to several processes")
    if nproc > 1 and "-" in paths:
        raise NeurimgError("stdin ('-') cannot be shared out to several processes; give files or folders")
    devs = parallel.select_devices(devices)
    files = list_image_files(paths) if images is None else None  # listed once: a folder may hold 100k files
    if nproc > 1:
        text = json.dumps([cfg.to_dict(), [os.path.abspath(f) for f in files], stored is not None])
        parallel.check_processes_agree(text, len(devs))
    if images is None:
        images = parallel.all_succeed(
            lambda: load_image_set(paths, cfg.train.background, workers=workers, progress=load_progress, share=(pidx, nproc), files=files),
            "reading its images",
        )
    infos = _run_images(files, images)
    if stored is not None:
        _check_resume(stored, cfg, infos, folder.path)

    # Batch shape and mesh (the mesh depends on the image slots; the points are then padded to it).
    n_images = len(infos)
    sizes = np.array([(i.width, i.height) for i in infos], np.int64)
    counts = sizes[:, 0] * sizes[:, 1]
    bounds = [n_images * p // nproc for p in range(nproc + 1)]
    local_counts = [b - a for a, b in zip(bounds, bounds[1:])]
    t = cfg.train
    plan = sampler.plan_batches(sizes, t.batch_pixels, t.batch_images, nproc, local_counts)
    layout = parallel.make_layout(devs, plan.images // nproc)
    plan = sampler.plan_batches(sizes, t.batch_pixels, t.batch_images, nproc, local_counts, layout.shape[1])
    t = t.resolved(int(counts.sum()), n_images, plan.drawn)
    cfg = dataclasses.replace(cfg, train=t).validate()
    draw = sampler.Sampler(images, plan, n_images, t.seed, (pidx, nproc), t.edge_share)

    graphdef, state = train.init_state(cfg, n_images)
    state = jax.device_get(state)
    start, seconds, carried = 0, 0.0, ()
    if stored is not None:
        state = stored.fill(state)
        start, seconds, carried = stored.step, stored.seconds, log_sums(stored, 2)
    state = _pad_tables(state, layout.pad_rows(n_images))  # per-image tables split evenly over the devices
    state_sharding = layout.state_sharding(state)
    state = layout.put(state, state_sharding)
    evaluator = GridEvaluator(siren_field(graphdef), device=jax.local_devices()[0])
    return Prepared(cfg, images, infos, local_counts, plan, layout, draw, graphdef, state, state_sharding, evaluator, start, seconds, carried)


def _stored_sources(stored: ckpt.Checkpoint) -> list[str]:
    """Sources stored in a checkpoint, for `fit --resume` given no paths."""
    srcs = [i.source for i in stored.images]
    if "-" in srcs:
        raise NeurimgError("this run was fitted from stdin; give the image again to resume")
    return srcs


def _check_resume(stored: ckpt.Checkpoint, cfg: Config, infos: list[ckpt.ImageInfo], path) -> None:
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


def _run_images(files: list[str] | None, local: ImageSet) -> list[ckpt.ImageInfo]:
    """Name, source and size of every image of the run, over all processes."""

    def src(f):
        return os.path.abspath(f) if f != "-" else "-"

    pidx, nproc = parallel.processes()
    if nproc == 1:
        return [ckpt.ImageInfo(n, src(f), int(w), int(h)) for n, f, (w, h) in zip(local.names, local.sources, local.sizes)]
    names = unique_names(files)
    bounds = [len(files) * p // nproc for p in range(nproc + 1)]
    sizes = parallel.gather_rows(np.asarray(local.sizes, np.int64), [b - a for a, b in zip(bounds, bounds[1:])])
    return [ckpt.ImageInfo(n, src(f), int(w), int(h)) for n, f, (w, h) in zip(names, files, sizes)]


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


# --------------------------------------------------------------------------------------------
# 3. training


class Collapsed(engine.Diverged):
    """A finite loss that rose COLLAPSE_FACTOR x above its best (see `CollapseWatch`)."""

    def __init__(self, step: int, loss: float, factor: float):
        super().__init__(step, loss)
        self.factor = factor


class CollapseWatch:
    """Sees each chunk's per-step losses (`engine.Loop`'s `observe`) and raises
    `engine.Diverged` when, past `warmup` steps, a chunk's mean loss exceeds COLLAPSE_FACTOR x
    the best chunk mean seen so far."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.best = float("inf")

    def __call__(self, start: int, loss: np.ndarray) -> None:
        loss = np.asarray(loss, np.float64)
        loss = loss[np.isfinite(loss)]
        if loss.size == 0:
            return
        mean = float(loss.mean())
        if start >= self.warmup and mean > COLLAPSE_FACTOR * self.best:
            raise Collapsed(start + loss.size, mean, mean / self.best)
        self.best = min(self.best, mean)


def run_training(prep: Prepared, folder: RunFolder, cfg: Config, reporter=None) -> tuple[Any, engine.LoopStats]:
    """Train from `prep.start_step` to `cfg.train.steps` through the engine; returns the
    state and the loop's figures."""
    t, plan, layout = cfg.train, prep.plan, prep.layout
    rep = reporter or engine.NullReporter()
    state = prep.state
    if prep.start_step >= t.steps:
        rep.message(f"{folder.path} is already trained to step {prep.start_step} (--steps {t.steps}); nothing to train")
        return state, engine.LoopStats(prep.start_step, 0, 0.0, 0.0)

    nproc = parallel.processes()[1]
    where = f"{layout.num_devices} {layout.mesh.devices.flat[0].platform} devices" + (f" in {nproc} processes" if nproc > 1 else "")
    rep.message(
        f"compiling ({len(prep.infos)} images, {plan.images} per step x {plan.points} points, width {cfg.model.width}"
        + (f", {where}, mesh {layout.shape[0]}x{layout.shape[1]}" if layout.num_devices > 1 else "")
        + ")"
    )
    runner = train.make_runner(cfg, prep.graphdef, layout, prep.images.scale, state_sharding=prep.state_sharding)
    static = layout.put_batch(prep.draw.batches(0, 1, 1)) if plan.static else None

    def batches(first: int, n: int):
        return static if plan.static else layout.put_batch(prep.draw.batches(first, n, STREAM_STEPS))

    log = folder.loss_log(prep.start_step, prep.log_carried)
    lr_net = train.lr_schedule(cfg, t.lr)
    last_good = prep.start_step

    def elapsed() -> float:  # training time of the run so far, compile excluded
        return prep.prior_seconds + (loop.stats.train_seconds if loop.stats else 0.0)

    def save(st, seconds: float) -> None:
        on_host = prep.host(st)  # collective: every process
        folder.save_checkpoint(cfg, prep.infos, on_host, seconds, extra={"log": json.dumps(list(log.pending))})

    def snapshot(step: int, st) -> None:
        params = prep.host({"params": st["params"]})["params"]
        if folder.lead:
            k = min(SNAPSHOT_MAX_IMAGES, len(prep.images))
            recons = list(prep.evaluator.images(params, np.arange(k) + prep.images.first_id, prep.images.sizes[:k]))
            folder.write_snapshot(step, [[r, prep.images.image(i)] for i, r in enumerate(recons)])

    def log_row(step: int, st) -> None:
        log.row(step, elapsed(), float(lr_net(step - 1)))

    def checkpoint(step: int, st) -> None:
        nonlocal last_good
        log.flush()
        save(st, elapsed())
        last_good = step

    watch = CollapseWatch(t.warmup_steps)
    if prep.start_step == 0:
        save(state, 0.0)  # a checkpoint exists from the start: "the last good" is never missing
    snaps = tuple(s for s in t.snapshots if prep.start_step < s < t.steps)
    loop = engine.Loop(
        runner,
        total=t.steps,
        start=prep.start_step,
        batches=batches,
        max_steps=engine.MAX_CHUNK if plan.static else STREAM_STEPS,
        hooks=[
            engine.Every(log_row, steps=t.log_every, at=(1,), at_end=True),
            engine.Every(snapshot, at=snaps),
            engine.Every(checkpoint, seconds=t.checkpoint_seconds),
        ],
        observe=lambda start, m: (log.observe(m), watch(start, m["loss"])),
        on_interrupt=checkpoint,
        reporter=rep,
        sync=parallel.max_over_processes,
        to_host=layout.to_host,
    )
    try:
        state, stats = loop.run(state)
        prep.best_loss = watch.best
    except engine.Interrupted as e:
        raise engine.Interrupted(e.step, f"checkpoint saved to {folder.checkpoint}") from None
    except engine.Diverged as e:
        log.flush()
        how = f"collapsed by step {e.step} (loss {e.factor:.0f}x its best, {e.loss:.4g})" if isinstance(e, Collapsed) else f"diverged at step {e.step} (loss {e.loss:.4g})"
        raise TrainingFailed(
            f"training {how}; the last good checkpoint "
            f"(step {last_good}) is kept in {folder.checkpoint}; try a lower --lr",
            f"training {how}",
        ) from None
    save(state, elapsed())
    log.flush()
    log.plot(folder.path / "loss.png")
    snapshot(t.steps, state)
    return state, stats


# --------------------------------------------------------------------------------------------
# 4. evaluation


def evaluate(prep: Prepared, state, best_loss: float = float("inf")) -> list[dict[str, Any]]:
    """PSNR, SSIM and MSE of every image of the run at its own resolution: each process its
    own images, gathered. `best_loss`: see `check_not_flat`."""
    params = prep.host({"params": state["params"]})["params"]
    imgs = prep.images
    recons = prep.evaluator.images(params, np.arange(len(imgs)) + imgs.first_id, imgs.sizes)
    values = parallel.gather_rows(np.array(_metrics(recons, imgs), np.float64).reshape(-1, 4), prep.local_counts)
    if not np.all(np.isfinite(values)):
        raise NeurimgError("the fitted model gives non-finite images; nothing was written", exit_code=1)
    check_not_flat(values[:, 2], values[:, 3], best_loss)
    return [
        {"name": i.name, "width": i.width, "height": i.height, "psnr": round(float(v[0]), 6), "ssim": round(float(v[1]), 6), "mse": round(float(v[2]), 6)}
        for i, v in zip(prep.infos, values)
    ]


def check_not_flat(mse: np.ndarray, flat: np.ndarray, best_loss: float) -> None:
    """A fit whose images end on average no closer to their targets than flat images of their
    mean colours, after training had reached half that error (`best_loss`, the lowest chunk
    mean of the per-image MSE), collapsed in a way the training watch did not see (a slow fall
    over many chunks): exit code 1 rather than metrics that look like a result. A run too short
    to learn anything is not an error."""
    flat_mean, mse_mean = float(np.mean(flat)), float(np.mean(mse))
    if flat_mean > 0 and mse_mean >= flat_mean and best_loss <= 0.5 * flat_mean:
        raise TrainingFailed(
            f"the fit is no better than flat colours (mean MSE {mse_mean:.4g}, each image's mean colour "
            f"gives {flat_mean:.4g}, training had reached {best_loss:.4g}): it collapsed; metrics were not written; try a lower --lr",
            "the final images are no better than flat colours",
        )


def _metrics(recons, images: ImageSet, group: int = 256) -> np.ndarray:
    """(N, 4) PSNR, SSIM, MSE of each reconstruction against its image, and the MSE of the
    image against its own mean colour (what a flat image would score, for `check_not_flat`),
    computed for runs of up to `group` consecutive same-sized images at once."""
    rows: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    targets: list[np.ndarray] = []

    def flush():
        if preds:
            t = np.stack(targets)
            flat = np.square(t - t.mean((1, 2), keepdims=True)).reshape(len(t), -1).mean(1)
            rows.append(np.concatenate([batch_metrics(np.stack(preds), t), flat[:, None]], 1))
            preds.clear()
            targets.clear()

    for k, rec in enumerate(recons):
        if preds and (rec.shape != preds[0].shape or len(preds) == group):
            flush()
        preds.append(rec)
        targets.append(images.image(k))
    flush()
    return np.concatenate(rows) if rows else np.zeros((0, 4))
