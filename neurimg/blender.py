"""The conditional GAN blender as a tool: `neurimg blend-train` and `neurimg blend --method gan`.

Training (`train`) runs `neurimg.blendgan`'s step through the engine (`neurimg.engine.Loop`:
progress, hooks, the finiteness check, Ctrl-C) and keeps a run folder
(`neurimg.runfolder.RunFolder`, the same policy as `fit`: `--resume`, `--overwrite`):

BLENDER/
    config.json              every setting of the GAN (`neurimg.config.GanConfig`)
    checkpoint.safetensors   kind "blendgan": G and D, both Adam states, ADA's p, the RNG key,
                             the step and the training images themselves (S x S), so `--resume`
                             needs no folder; metadata: the images' names, sources and sizes
    loss.csv                 step, loss (G's), d_loss, g_adv, l1, p (ADA), r_t (E sign D(real)),
                             psnr (generated vs target on the batches), seconds, lr
    loss.png                 the same curves
    snapshots/step_NNNNNN.png  rows A | B | target | generated for 8 fixed training pairs
    metrics.json             at the end: PSNR and SSIM of the generated blends against the
                             exact targets (float64 solves) on up to 64 fixed training pairs,
                             and the naive average's PSNR on them

Images of another size than the GAN's (`size`, square) are padded to a square with the
background colour (centred) and resized to it (area averaging down, PIL's bicubic up); blends
of such images are resized back and cropped (`to_square`, `from_square`). A and B must have
one size: the mixed blend is defined over one canvas.

A run whose generated blends end further from the targets than the naive average it starts
from (it starts exactly there: the residual layer is zero; with the naive target, than the
inputs alone) failed: exit code 1, no metrics.json; the checkpoint stays for inspection or
`--resume` (`check_result`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neurimg import blendgan as bg
from neurimg import checkpoint as ckpt
from neurimg import engine, guard, resample
from neurimg.config import GanConfig
from neurimg.data import load_images
from neurimg.errors import NeurimgError
from neurimg.metrics import batch_metrics
from neurimg.runfolder import RunFolder, log_sums

KIND = "blendgan"
LOG_METRICS = ("loss", "d_loss", "g_adv", "l1", "p", "r_t", "psnr")
SNAPSHOT_PAIRS = 8
EVAL_PAIRS = 64
EVAL_BATCH = 16
# A finished run must beat the naive average (its starting point) on its own pairs by this much.
MIN_GAIN_DB = 0.0
# ... once it has trained this many steps (a few steps of a tiny test model may not).
MIN_STEPS_CHECKED = 200


# --------------------------------------------------------------------------------------------
# images in and out of the GAN's square


def to_square(img: np.ndarray, size: int, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3): padded to a square of side max(H, W) with `background`
    (centred), then resized (area averaging down, bicubic up)."""
    img = np.asarray(img, np.float32)
    h, w = img.shape[:2]
    side = max(h, w)
    if h != w:
        sq = np.empty((side, side, 3), np.float32)
        sq[:] = np.asarray(background, np.float32)
        y, x = (side - h) // 2, (side - w) // 2
        sq[y : y + h, x : x + w] = img
        img = sq
    if side == size:
        return img
    op = resample.area if side > size else resample.cubic
    return np.clip(op(img, (size, size)), 0.0, 1.0)


def from_square(out: np.ndarray, height: int, width: int) -> np.ndarray:
    """The inverse of `to_square` for a blend (size, size, 3) -> (height, width, 3)."""
    side = max(height, width)
    if out.shape[0] != side:
        op = resample.area if out.shape[0] > side else resample.cubic
        out = np.clip(op(np.asarray(out, np.float32), (side, side)), 0.0, 1.0)
    y, x = (side - height) // 2, (side - width) // 2
    return out[y : y + height, x : x + width]


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainResult:
    run: str
    images: int
    steps: int
    psnr: float  # generated vs the exact targets, fixed training pairs
    ssim: float
    naive_psnr: float  # the naive average on the same pairs
    baseline_psnr: float  # what the generator must beat: see `check_result`
    p: float  # ADA's probability at the end
    seconds: float
    compile_seconds: float
    steps_per_second: float
    resumed_from: int = 0
    target: str = "mixed"
    rollbacks: int = 0  # windows redone with lower rates (`neurimg.guard`)
    restarts: int = 0  # a GAN run is not started again: its checkpoint is kept instead

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


def train(
    paths: Sequence[str],
    run_dir: str | os.PathLike,
    cfg: GanConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    reporter=None,
    background=(1.0, 1.0, 1.0),
    steps: int | None = None,
) -> TrainResult:
    """Train a GAN blender on the images at `paths` (folders or files) into `run_dir`, or
    continue the one there (`resume`: its config and images; `steps` a new total). Ctrl-C
    raises `engine.Interrupted` after saving a checkpoint."""
    t_start = time.perf_counter()
    folder = RunFolder.open(run_dir, resume=resume, overwrite=overwrite, kind=KIND)
    stored = folder.stored
    if stored is not None:
        if paths:
            raise NeurimgError("--resume continues with the images stored in the checkpoint; give no images")
        cfg = dataclasses.replace(stored.config, steps=steps or stored.config.steps).validate()
        infos = stored.images
        images = stored.tensors.get("images")
        if images is None or images.shape != (len(infos), cfg.size, cfg.size, 3):
            raise NeurimgError(f"{folder.checkpoint}: damaged checkpoint (its training images do not match its list)")
    else:
        cfg = (cfg or GanConfig()).validate()
        if steps is not None:
            cfg = dataclasses.replace(cfg, steps=steps).validate()
        loaded = load_images(list(paths), background)
        if len(loaded) < 2:
            raise NeurimgError(f"a GAN blender needs at least two images, got {len(loaded)}")
        images = np.stack([to_square(im.pixels, cfg.size, background) for im in loaded])
        infos = [ckpt.ImageInfo(im.name, os.path.abspath(im.source) if im.source != "-" else "-", im.width, im.height) for im in loaded]

    (gdef, ddef), state = bg.init_state(cfg, images)
    start, prior, carried = 0, 0.0, ()
    if stored is not None:
        fresh = jax.device_get(state)
        scale = np.float32(stored.tensors.get("lr_scale", np.float32(1.0)))  # absent before the guard kept it
        state = {**stored.fill({k: v for k, v in fresh.items() if k != "lr_scale"}), "lr_scale": scale}
        state = jax.device_put(state)  # placed as a fresh state: one compiled step
        start, prior, carried = stored.step, stored.seconds, log_sums(stored, len(LOG_METRICS))
    rep = reporter or engine.NullReporter()
    if start < cfg.steps:
        folder.create(cfg, replace=overwrite)
    else:
        rep.message(f"{folder.path} is already trained to step {start} (--steps {cfg.steps}); nothing to train")

    snap_pairs = _fixed_pairs(len(images), SNAPSHOT_PAIRS, cfg.seed)
    snap_set = bg.PairSet.build(images, cfg.target, snap_pairs)
    gen = generator(gdef)
    log = folder.loss_log(start, carried, metrics=LOG_METRICS, title=f"neurimg blend-train (target {cfg.target})",
                          panels=(("d_loss", "g_adv"), ("l1",), ("p", "r_t")))
    stats = engine.LoopStats(start, 0, 0.0, 0.0)
    loop: engine.Loop | None = None

    def elapsed() -> float:  # training time of the run so far, compile excluded
        return prior + (loop.stats.train_seconds if loop is not None and loop.stats else 0.0)

    def save(st) -> None:
        folder.save_checkpoint(cfg, infos, st, elapsed(), extra={"log": json.dumps(list(log.pending))})

    def snapshot(step: int, st) -> None:
        out = _generate(gen, st["g"], snap_set.images, snap_set.pairs)
        rows = [[snap_set.images[i], snap_set.images[j], t, o] for (i, j), t, o in zip(snap_set.pairs, snap_set.targets, out)]
        folder.write_snapshot(step, rows)

    def checkpoint(step: int, st) -> None:
        log.flush()
        save(st)

    # The one failure policy (`neurimg.guard`) on G's L1 to the targets, the trivial answer
    # being the naive average it starts from (for the naive target, the inputs alone).
    watch = guard.Guard(guard.Policy(warmup=0, metric="l1", trivial="trivial_l1", trivial_name=_baseline_name(cfg),
                                      regress_factor=math.inf),  # the regression rule was measured on field fits only
                        "GAN training")
    rollbacks = 0
    if start < cfg.steps:
        rep.message(f"blend-train: {len(images)} images ({len(images) * (len(images) - 1)} ordered pairs) at {cfg.size}x{cfg.size}, "
                    f"target {cfg.target}, {cfg.steps - start} steps of {cfg.batch} pairs; compiling")
        if start == 0:
            save(state)
        loop = engine.Loop(
            bg.runner(cfg, gdef, ddef),
            total=cfg.steps,
            start=start,
            hooks=[
                engine.Every(lambda s, st: log.row(s, elapsed(), cfg.lr_g), steps=cfg.log_every, at=(1,), at_end=True),
                engine.Every(snapshot, at=tuple(s for s in cfg.snapshots if start < s < cfg.steps)),
                engine.Every(checkpoint, seconds=cfg.checkpoint_seconds),
            ],
            observe=lambda first, m: log.observe(m),
            describe=lambda m: f"D {float(m['d_loss'][-1]):.3f} adv {float(m['g_adv'][-1]):.3f} ADA p {float(m['p'][-1]):.3f}",
            on_interrupt=checkpoint,
            guard=watch,
            reporter=rep,
            what="GAN training",
        )
        try:
            state, stats = loop.run(state)
        except engine.Interrupted as e:
            raise engine.Interrupted(e.step, f"checkpoint saved to {folder.checkpoint}", e.signum) from None
        except guard.TrainingFailed as e:
            log.flush()
            raise guard.TrainingFailed(e.reason, f"the last checkpoint is kept in {folder.checkpoint}; try lower --lr-g/--lr-d",
                                       restartable=False) from None
        finally:
            rollbacks = watch.rollbacks
        save(state)
        log.flush()
        log.plot(folder.path / "loss.png")
        snapshot(cfg.steps, state)

    eval_set = bg.PairSet.build(images, cfg.target, _fixed_pairs(len(images), EVAL_PAIRS, cfg.seed + 1))
    out = _generate(gen, state["g"], eval_set.images, eval_set.pairs)
    ours = batch_metrics(out, eval_set.targets)
    naive = batch_metrics((eval_set.images[eval_set.pairs[:, 0]] + eval_set.images[eval_set.pairs[:, 1]]) / 2, eval_set.targets)
    psnr, ssim, naive_psnr = float(ours[:, 0].mean()), float(ours[:, 1].mean()), float(naive[:, 0].mean())
    # the inputs alone: the better of A and B against each target
    alone = np.maximum(*(batch_metrics(eval_set.images[eval_set.pairs[:, k]], eval_set.targets)[:, 0] for k in (0, 1)))
    baseline = naive_psnr if cfg.target == "mixed" else float(alone.mean())
    check_result(out, psnr, baseline, int(state["step"]), _baseline_name(cfg))
    folder.write_metrics({"step": int(state["step"]), "target": cfg.target, "pairs": len(eval_set.pairs), "psnr": psnr,
                          "ssim": ssim, "naive_psnr": naive_psnr, "baseline_psnr": baseline})
    return TrainResult(str(folder.path), len(images), int(state["step"]), psnr, ssim, naive_psnr, baseline, float(state["p"]),
                       time.perf_counter() - t_start, stats.compile_seconds, stats.steps_per_second, start, cfg.target, rollbacks)


def _baseline_name(cfg: GanConfig) -> str:
    return "the naive average it starts from" if cfg.target == "mixed" else "the inputs alone"


def check_result(blends: np.ndarray, psnr: float, baseline_psnr: float, steps: int, baseline: str) -> None:
    """Exit code 1, not metrics, for a generator whose blends are not finite, or (after
    MIN_STEPS_CHECKED steps) no closer to the targets than `baseline`: for the mixed target the
    naive average the generator starts from; for the naive target (where it starts exactly at
    the target) the better of the two inputs alone."""
    if not np.all(np.isfinite(blends)) or not np.isfinite(psnr):
        raise guard.TrainingFailed("the trained generator gives non-finite blends; metrics were not written", "try lower --lr-g/--lr-d", False)
    if steps >= MIN_STEPS_CHECKED and psnr < baseline_psnr + MIN_GAIN_DB:
        raise guard.TrainingFailed(
            f"the GAN's blends are no closer to the targets than {baseline} ({psnr:.2f} vs "
            f"{baseline_psnr:.2f} dB): training failed; metrics were not written", "try lower --lr-g/--lr-d", False)


def _fixed_pairs(n: int, k: int, seed: int) -> np.ndarray:
    """k ordered pairs (i != j) of n images, the same for a seed: all of them if there are
    at most k."""
    if n * (n - 1) <= k:
        return np.array([(i, j) for i in range(n) for j in range(n) if i != j], np.int32)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, k)
    j = (i + rng.integers(1, n, k)) % n
    return np.stack([i, j], 1).astype(np.int32)


def _generate(gen, gparams, images, pairs, levels=None, noise_seed: int = 0) -> np.ndarray:
    """Clipped blends of `pairs` of `images`, EVAL_BATCH at a time (one compiled shape)."""
    out = []
    for s in range(0, len(pairs), EVAL_BATCH):
        pr = pairs[s : s + EVAL_BATCH]
        pad = EVAL_BATCH - len(pr)
        idx = np.concatenate([pr, np.repeat(pr[-1:], pad, 0)]) if pad else pr
        f = gen(gparams, images[idx[:, 0]], images[idx[:, 1]], jax.random.PRNGKey(noise_seed), _levels(levels))
        out.append(np.clip(np.asarray(f), 0, 1)[: len(pr)])
    return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def generator(gdef):
    """The generator, jitted: (params, a, b, key, levels) -> blends (one per process and
    network shape, so each shape of input compiles once)."""
    return jax.jit(lambda g, a, b, key, levels: bg.generate(gdef, g, a, b, key, levels))


def _levels(levels):
    return None if levels is None else jnp.asarray(levels, jnp.float32)


# --------------------------------------------------------------------------------------------
# use


def compile_cache_dir(env=os.environ) -> str | None:
    """Where `blend --method gan` keeps JAX's compiled programs between runs:
    $NEURIMG_CACHE_DIR ('off' for none), else $XDG_CACHE_HOME/neurimg/jax, else
    ~/.cache/neurimg/jax."""
    v = env.get("NEURIMG_CACHE_DIR")
    if v is not None:
        return None if v.strip().lower() in ("", "0", "off", "none") else os.path.join(v, "jax")
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "neurimg", "jax")


def use_compile_cache() -> None:
    """JAX's persistent compilation cache in `compile_cache_dir()`: a command-line blend then
    loads the generator's compiled forward pass instead of compiling it (2.3 s -> 0.7 s on
    the 2-core CPU). Call before anything compiles; a cache that cannot be made is skipped."""
    path = compile_cache_dir()
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@dataclass
class Blender:
    """A trained GAN blender: `blend(a, b)` is one forward pass of its generator."""

    cfg: GanConfig
    gdef: Any
    params: Any
    images: list[ckpt.ImageInfo]  # what it was trained on
    step: int

    @staticmethod
    def load(path: str | os.PathLike) -> "Blender":
        stored = ckpt.load(path, only="g[", kind=KIND)
        cfg = stored.config
        gdef, _, shapes = bg.abstract(cfg)
        params = jax.device_put(stored.fill({"g": shapes["g"]})["g"])
        return Blender(cfg, gdef, params, stored.images, stored.step)

    @property
    def _gen(self):
        return generator(self.gdef)

    def blend(self, a: np.ndarray, b: np.ndarray, levels: Sequence[float] | None = None, noise_seed: int = 0,
              background=(1.0, 1.0, 1.0)) -> np.ndarray:
        """The blend of two images of one size (H, W, 3) in [0, 1], at their size (through the
        GAN's square, see the module docstring). `levels`: A's share at the coarse, middle and
        fine levels (`blendgan.target_of`; None: 0.5 each, the blend itself)."""
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.shape != b.shape:
            raise NeurimgError(f"A is {a.shape[1]}x{a.shape[0]} and B {b.shape[1]}x{b.shape[0]}: the GAN blends two images of one size")
        s = self.cfg.size
        sa, sb = to_square(a, s, background), to_square(b, s, background)
        f = self._gen(self.params, sa[None], sb[None], jax.random.PRNGKey(noise_seed), _levels(levels))
        return from_square(np.clip(np.asarray(f[0]), 0.0, 1.0), a.shape[0], a.shape[1])
