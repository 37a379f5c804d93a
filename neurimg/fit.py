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
from neurimg import engine, guard, parallel, sampler, train
from neurimg.config import Config, TrainConfig, auto_lr
from neurimg.data import list_image_files, unique_names
from neurimg.errors import NeurimgError, count, summarised
from neurimg.imageset import ImageSet, load_image_set
from neurimg.metrics import batch_metrics
from neurimg.render import GridEvaluator, siren_field
from neurimg.runfolder import SNAPSHOT_MAX_IMAGES, RunFolder, log_sums

# Steps of host-drawn batches sent to the devices per call when the batch changes every step.
STREAM_STEPS = 32

# Failures (not finite, collapse, not learning, no better than flat colours) follow the one
# policy of `neurimg.guard`: fit supplies its warm-up and its trivial answer, each image's
# mean colour.
TrainingFailed = guard.TrainingFailed
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
    restarts: int = 0  # fresh starts after a failed attempt (`neurimg.guard`)
    rollbacks: int = 0  # windows redone with a lower lr (`neurimg.guard`)
    lr: float = 0.0  # the peak lr of the shared weights the run trained with

    @property
    def worst(self) -> dict[str, Any]:
        """The image with the lowest PSNR."""
        return min(self.per_image, key=lambda p: p["psnr"]) if self.per_image else {"name": "", "psnr": float("nan")}

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
            "min_psnr": round(self.worst["psnr"], 4),
            "min_psnr_image": self.worst["name"],
            "rollbacks": self.rollbacks,
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
    done = train_field(paths, cfg, folder=folder, replace=overwrite, reporter=reporter, images=images, devices=devices, workers=workers,
                       load_progress=load_progress)
    prep, per_image, stats, tally = done.prep, done.per_image, done.stats, done.tally
    mean = {k: float(np.mean([p[k] for p in per_image])) for k in ("psnr", "ssim", "mse")}
    worst = min(per_image, key=lambda p: p["psnr"])
    folder.write_metrics({"step": stats.steps, "images": per_image, "mean_psnr": mean["psnr"], "mean_ssim": mean["ssim"], "mean_mse": mean["mse"],
                          "min_psnr": worst["psnr"], "min_psnr_image": worst["name"], **tally.summary()})
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
        restarts=tally.restarts,
        rollbacks=tally.rollbacks,
        lr=done.cfg.train.lr,
        devices=prep.layout.num_devices,
        processes=parallel.processes()[1],
    )


@dataclass
class Trained:
    """A field trained by `train_field`: its config (automatic settings resolved), the final
    state on the devices, the loop's figures and each image's metrics."""

    prep: Prepared
    cfg: Config
    state: Any
    stats: engine.LoopStats
    per_image: list[dict[str, Any]]
    tally: guard.Tally

    def params(self) -> dict:
        """The model's parameters on the host, latents (N, latent_dim) without padding rows."""
        return self.prep.host({"params": self.state["params"]})["params"]


def train_field(
    paths: list[str],
    cfg: Config,
    *,
    folder: RunFolder | None = None,
    replace: bool = False,
    reporter=None,
    images: ImageSet | None = None,
    devices: str | int = "auto",
    workers: int | None = None,
    load_progress=None,
    what: str = "fit",
) -> Trained:
    """The field trainer: fit `cfg.model` to the images (`paths`, or `images` in memory) under
    the one failure policy, fresh starts included (`neurimg.guard.attempts`).

    With a `folder` the run is kept there (config, loss.csv, snapshots, checkpoints, Ctrl-C's
    checkpoint; resumed if it holds one); without, nothing is written and Ctrl-C raises
    `engine.Interrupted` with nothing saved. `what` names the training in messages. `cfg` must be validated (and for a folder, `resumed_config`'d)."""
    prep = prepare(paths, folder, cfg, images=images, devices=devices, workers=workers, load_progress=load_progress)
    cfg = prep.cfg  # automatic settings resolved for the images
    for line in summarised(prep.images.notes):
        (reporter or engine.NullReporter()).message(line)
    first = cfg.train
    tally = guard.Tally()

    def attempt(k: int, factor: float):
        nonlocal prep, cfg
        if k:  # a fresh start (`guard.attempts`): new seed, lower rates, the failed files replaced
            lr = guard.restart_rate(first.lr, auto_lr(prep.plan.drawn), factor)
            latent_lr = guard.restart_rate(first.latent_lr, TrainConfig().latent_lr, factor)
            train_cfg = dataclasses.replace(first, lr=lr, latent_lr=latent_lr, seed=first.seed + k)
            cfg = dataclasses.replace(cfg, train=train_cfg)
            prep = prepare(paths, folder, cfg, images=prep.images, devices=devices, workers=workers)
        if folder is not None and prep.start_step < cfg.train.steps:
            folder.create(cfg, replace=replace or k > 0)
        try:
            state, stats = run_training(prep, folder, cfg, reporter, tally, what)
            per_image = evaluate(prep, state)
        except TrainingFailed as e:
            if folder is None:
                raise
            raise TrainingFailed(e.reason, f"the last good checkpoint (step {prep.last_good}) is kept in {folder.checkpoint}; {e.hint}",
                                 e.restartable) from None
        return state, stats, per_image

    # A resumed run keeps its checkpoint and reports (its schedule is not ours to change).
    restartable = prep.start_step == 0 and parallel.processes()[1] == 1
    state, stats, per_image = guard.attempts(attempt, reporter, what, guard.MAX_RESTARTS if restartable else 0, tally)
    return Trained(prep, cfg, state, stats, per_image, tally)


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
    flat: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) each image's MSE to its mean colour
    last_good: int = 0  # the step of the last checkpoint written

    def host(self, tree) -> Any:
        """(Part of) the state on the host without the padding rows; collective."""
        return _pad_tables(self.layout.to_host(tree), len(self.infos))


def prepare(paths, folder: RunFolder | None, cfg: Config, *, images=None, devices="auto", workers=None, load_progress=None) -> Prepared:
    """Everything a training needs (`Prepared`): the images, and a fresh state or the one
    `folder` holds to resume from."""
    pidx, nproc = parallel.processes()
    stored = folder.stored if folder is not None else None
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
    bounds = [len(infos) * p // nproc for p in range(nproc + 1)]
    local_counts = [b - a for a, b in zip(bounds, bounds[1:])]
    whs = [(i.width, i.height) for i in infos]
    observed = cfg.train.for_input(whs)  # areas or centres (`config.auto_supersample`), then the model's sizes for it
    cfg = dataclasses.replace(cfg, model=cfg.model.for_input(whs, observed.supersample > 1), train=observed)  # stored with the run
    detail = cfg.train.supersample > 1 and cfg.train.area_pixels == "detail"
    if stored is not None:
        _check_resume(stored, cfg, infos, folder.path)

    # Batch shape and mesh (the mesh depends on the image slots; the points are then padded to it).
    n_images = len(infos)
    sizes = np.array([(i.width, i.height) for i in infos], np.int64)
    counts = sizes[:, 0] * sizes[:, 1]
    t = cfg.train.batched(int(counts.sum()), n_images)
    plan = sampler.plan_batches(sizes, t.batch_pixels, t.batch_images, nproc, local_counts)
    layout = parallel.make_layout(devs, plan.images // nproc)
    plan = sampler.plan_batches(sizes, t.batch_pixels, t.batch_images, nproc, local_counts, layout.shape[1])
    plan = dataclasses.replace(plan, redrawn=detail)
    draw = sampler.Sampler(images, plan, n_images, t.seed, (pidx, nproc), t.edge_share, t.supersample, boundary=t.tv_weight > 0, detail=detail)
    details = parallel.gather_rows(draw.detail_counts(), local_counts) if detail else None  # every process's images
    per_image = plan.drawn * (t.supersample**2 if detail else 1)  # field evaluations of each image a step (the lr's rule)
    t = t.resolved(int(counts.sum()), n_images, per_image, _pixels_per_step(plan, t, details) if cfg.model.grid else 0)
    cfg = dataclasses.replace(cfg, train=t).validate()

    start_colour = parallel.gather_rows(_mean_colours(images), local_counts).mean(0) if t.mean_start else None  # every process the same
    graphdef, state = train.init_state(cfg, n_images, start=start_colour)
    state = jax.device_get(state)
    start, seconds, carried = 0, 0.0, ()
    if stored is not None:
        scale = stored.tensors.get("lr_scale", np.float32(1.0))  # absent before the guard kept it
        state = {**stored.fill({k: v for k, v in state.items() if k != "lr_scale"}), "lr_scale": np.float32(scale)}
        start, seconds, carried = stored.step, stored.seconds, log_sums(stored, 2)
    state = _pad_tables(state, layout.pad_rows(n_images))  # per-image tables split evenly over the devices
    state_sharding = layout.state_sharding(state)
    state = layout.put(state, state_sharding)
    evaluator = GridEvaluator(siren_field(graphdef), device=jax.local_devices()[0], supersample=t.supersample)
    flat = parallel.gather_rows(_flat_mse(images), local_counts)
    return Prepared(cfg, images, infos, local_counts, plan, layout, draw, graphdef, state, state_sharding, evaluator, start, seconds, carried,
                    flat, start)


def _pixels_per_step(plan: sampler.Plan, t, details: np.ndarray | None) -> float:
    """The pixels a step observes (the grid's steps rule, `config.auto_steps`): its entries, or
    with area entries on detail pixels only, what `sampler.detail_split` gives the images on
    average (a full batch: every pixel of every image)."""
    if plan.full:
        return float(plan.images * plan.points)
    if t.supersample == 1 or t.area_pixels != "detail" or details is None:
        return float(plan.drawn * plan.images)
    s = t.supersample**2 + (2 * t.supersample if t.tv_weight > 0 else 0)
    seen = [pd + s * pf for pd, pf in (sampler.detail_split(plan.drawn, s, int(nd), int(nf)) for nd, nf in details)]
    return float(np.mean(seen)) * plan.images


def _mean_colours(images: ImageSet) -> np.ndarray:
    """(N, 3) float64: each image's mean colour."""
    return np.array([images.image(k).reshape(-1, 3).mean(0, dtype=np.float64) for k in range(len(images))]).reshape(-1, 3)


def _flat_mse(images: ImageSet) -> np.ndarray:
    """(N,) each image's MSE to its own mean colour: what a flat image scores (the trivial answer)."""
    out = np.empty(len(images), np.float64)
    for k in range(len(images)):
        img = images.image(k).reshape(-1, 3).astype(np.float64)
        out[k] = np.mean(np.square(img - img.mean(0)))
    return out


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
        raise NeurimgError(f"cannot resume {path}: {images_differ(a, b)}")


def images_differ(stored: list[tuple[str, int, int]], given: list[tuple[str, int, int]]) -> str:
    """What differs between the checkpoint's images and the given ones, (name, width, height)
    each: the count, then the first image whose name or size differs."""
    if len(stored) != len(given):
        return f"the images differ from the checkpoint's: it holds {count(len(stored), 'image')}, {len(given)} given"
    for (n0, w0, h0), (n1, w1, h1) in zip(stored, given):
        if n0 != n1:
            return f"the images differ from the checkpoint's: {n1} given where it holds {n0}"
        if (w0, h0) != (w1, h1):
            return f"{n1} is {w1}x{h1}, but the checkpoint's is {w0}x{h0}"
    return "the images differ from the checkpoint's"  # pragma: no cover - the lists are equal


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


def run_training(prep: Prepared, folder: RunFolder | None, cfg: Config, reporter=None, tally: guard.Tally | None = None,
                 what: str = "training") -> tuple[Any, engine.LoopStats]:
    """Train from `prep.start_step` to `cfg.train.steps` through the engine, judged by the one
    guard (`neurimg.guard`; its rollbacks are added to `tally`); returns the state and the
    loop's figures. With a `folder`, loss.csv, snapshots and checkpoints are kept there."""
    t, plan, layout = cfg.train, prep.plan, prep.layout
    rep = reporter or engine.NullReporter()
    state = prep.state
    if prep.start_step >= t.steps:
        rep.message(f"{folder.path} is already trained to step {prep.start_step} (--steps {t.steps}); nothing to train")
        return state, engine.LoopStats(prep.start_step, 0, 0.0, 0.0)

    nproc = parallel.processes()[1]
    where = f"{layout.num_devices} {layout.mesh.devices.flat[0].platform} devices" + (f" in {nproc} processes" if nproc > 1 else "")
    rep.message(
        f"compiling ({count(len(prep.infos), 'image')}, {plan.images} per step x {plan.points} points, width {cfg.model.width}"
        + (f", {where}, mesh {layout.shape[0]}x{layout.shape[1]}" if layout.num_devices > 1 else "")
        + ")"
    )
    runner = train.make_runner(cfg, prep.graphdef, layout, prep.images.scale, state_sharding=prep.state_sharding)
    static = layout.put_batch(prep.draw.batches(0, 1, 1)) if plan.static else None

    def batches(first: int, n: int):
        return static if plan.static else layout.put_batch(prep.draw.batches(first, n, STREAM_STEPS))

    trivial = guard.Policy(warmup=t.warmup_steps, trivial=float(np.mean(prep.flat)), trivial_name="flat images of each one's mean colour")
    watch = guard.Guard(trivial, what)
    kept = _RunKeeping(prep, folder, cfg) if folder is not None else None
    loop = engine.Loop(
        runner,
        total=t.steps,
        start=prep.start_step,
        batches=batches,
        max_steps=engine.MAX_CHUNK if plan.static else STREAM_STEPS,
        hooks=kept.hooks() if kept else [],
        observe=kept.observe if kept else None,
        guard=watch,
        on_interrupt=kept.checkpoint if kept else None,
        reporter=rep,
        sync=parallel.max_over_processes,
        to_host=layout.to_host,
        what=what,
    )
    if kept:
        kept.loop = loop
        kept.start()
    try:
        state, stats = loop.run(state)
    except engine.Interrupted as e:
        if kept:
            raise engine.Interrupted(e.step, f"checkpoint saved to {folder.checkpoint}", e.signum) from None
        raise
    except TrainingFailed:
        if kept:
            kept.log.flush()
        raise
    finally:
        if tally is not None:
            tally.rollbacks += watch.rollbacks
    if kept:
        kept.finish(state)
    return state, stats


class _RunKeeping:
    """What a training keeps in its run folder: loss.csv rows, snapshots, periodic checkpoints
    (and Ctrl-C's), each an engine hook; the final checkpoint, plot and snapshot."""

    def __init__(self, prep: Prepared, folder: RunFolder, cfg: Config):
        self.prep, self.folder, self.cfg = prep, folder, cfg
        self.log = folder.loss_log(prep.start_step, prep.log_carried)
        self.lr_net = train.lr_schedule(cfg, cfg.train.lr)
        self.loop: engine.Loop | None = None

    def elapsed(self) -> float:
        """Training time of the run so far, compile excluded."""
        stats = self.loop.stats if self.loop is not None else None
        return self.prep.prior_seconds + (stats.train_seconds if stats else 0.0)

    def hooks(self) -> list[engine.Every]:
        t = self.cfg.train
        snaps = tuple(s for s in t.snapshots if self.prep.start_step < s < t.steps)
        return [
            engine.Every(self.log_row, steps=t.log_every, at=(1,), at_end=True),
            engine.Every(self.snapshot, at=snaps),
            engine.Every(self.checkpoint, seconds=t.checkpoint_seconds),
        ]

    def observe(self, start: int, metrics) -> None:
        self.log.observe(metrics)

    def save(self, st, seconds: float) -> None:
        on_host = self.prep.host(st)  # collective: every process
        self.folder.save_checkpoint(self.cfg, self.prep.infos, on_host, seconds, extra={"log": json.dumps(list(self.log.pending))})

    def snapshot(self, step: int, st) -> None:
        prep = self.prep
        params = prep.host({"params": st["params"]})["params"]
        if self.folder.lead:
            k = min(SNAPSHOT_MAX_IMAGES, len(prep.images))
            recons = list(prep.evaluator.images(params, np.arange(k) + prep.images.first_id, prep.images.sizes[:k]))
            self.folder.write_snapshot(step, [[r, prep.images.image(i)] for i, r in enumerate(recons)])

    def log_row(self, step: int, st) -> None:
        self.log.row(step, self.elapsed(), float(self.lr_net(step - 1)))

    def checkpoint(self, step: int, st) -> None:
        self.log.flush()
        self.save(st, self.elapsed())
        self.prep.last_good = step

    def start(self) -> None:
        if self.prep.start_step == 0:
            self.save(self.prep.state, 0.0)  # a checkpoint exists from the start: "the last good" is never missing

    def finish(self, state) -> None:
        self.save(state, self.elapsed())
        self.prep.last_good = self.cfg.train.steps
        self.log.flush()
        self.log.plot(self.folder.path / "loss.png")
        self.snapshot(self.cfg.train.steps, state)


# --------------------------------------------------------------------------------------------
# 4. evaluation


def evaluate(prep: Prepared, state) -> list[dict[str, Any]]:
    """PSNR, SSIM and MSE of every image of the run at its own resolution: each process its
    own images, gathered; a result no better than flat colours fails (`check_not_flat`)."""
    params = prep.host({"params": state["params"]})["params"]
    imgs = prep.images
    recons = prep.evaluator.images(params, np.arange(len(imgs)) + imgs.first_id, imgs.sizes)
    values = parallel.gather_rows(np.array(_metrics(recons, imgs), np.float64).reshape(-1, 3), prep.local_counts)
    if not np.all(np.isfinite(values)):
        raise NeurimgError("the fitted model gives non-finite images; nothing was written", exit_code=1)
    check_not_flat(values[:, 2], prep.flat)
    return [
        {"name": i.name, "width": i.width, "height": i.height, "psnr": round(float(v[0]), 6), "ssim": round(float(v[1]), 6), "mse": float(f"{float(v[2]):.6g}")}
        for i, v in zip(prep.infos, values)
    ]


def check_not_flat(mse: np.ndarray, flat: np.ndarray) -> None:
    """A fit whose images end on average no closer to their targets than flat images of their
    mean colours (the trivial answer) failed, whether or not it learned first: exit code 1
    (after `guard.attempts`' fresh starts) rather than metrics that look like a result."""
    flat_mean, mse_mean = float(np.mean(flat)), float(np.mean(mse))
    if flat_mean > 0 and not mse_mean < flat_mean:
        raise TrainingFailed(
            f"the fit is no better than flat colours (mean MSE {mse_mean:.4g}, each image's mean colour "
            f"gives {flat_mean:.4g}); metrics were not written"
        )


def _metrics(recons, images: ImageSet, group: int = 256) -> np.ndarray:
    """(N, 3) PSNR, SSIM, MSE of each reconstruction against its image, computed for runs of up
    to `group` consecutive same-sized images at once."""
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
