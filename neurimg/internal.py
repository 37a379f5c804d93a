"""Internal learning for upsampling: a small CNN trained on the image itself (zero-shot
super-resolution, Shocher et al. 2018), then back-projected so the result is consistent with
the input.

No external data and no pretrained weights. The image's own smaller versions are the training
set: each "father" (the input, and the input area-downsampled by 0.9 ... 0.5) is area-
downsampled once more by the requested scale s (its "son") and brought back to the father's
size with consistent bicubic (`resample.consistent_bicubic`). A residual CNN learns to map
that back to the father, on random crops with the eight flips/rotations, with an L1 loss.
Natural images resemble themselves across scales (Glasner et al. 2009), so the map learned
from the image's own pairs also sharpens the real upsampling: the same CNN is applied to the
consistent bicubic upsampling of the input (averaged over the eight flips/rotations, a
geometric self-ensemble), and the result is back-projected again so that averaging it over
each input pixel's square gives back the input.

The CNN: `layers` 3x3 convolutions with `width` channels and ReLU in between, the last one
initialised to zero, so training starts at consistent bicubic and moves only as far as the
image's own pairs justify. Its receptive field is `layers` pixels each way: large outputs are
processed in tiles with that much overlap (identical to a whole-image pass, bounded memory).

Shapes: images (H, W, 3) float32 in [0, 1]; sizes are (W, H).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg import engine, guard
from neurimg.config import UpsampleConfig
from neurimg.resample import area, backproject, consistent_bicubic

__all__ = ["InternalResult", "predict", "train", "training_pairs", "upsample"]

FATHER_SCALES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # the input, and these fractions of it
TILE = 256  # output pixels per tile side when an output is processed in tiles
ENSEMBLE = 8  # flips/rotations averaged at inference (1 = none)


@dataclass
class InternalResult:
    image: np.ndarray  # (H', W', 3) float32, clipped to [0, 1]
    steps: int
    pairs: int  # training pairs (fathers) used
    patch: int
    seconds: float
    compile_seconds: float
    tally: guard.Tally = dataclasses.field(default_factory=guard.Tally)


def _dihedral(p, k):
    """One of the 8 flips/rotations of a square (P, P, C) patch, k traced in [0, 8)."""
    fns = [functools.partial(lambda x, r, f: jnp.rot90(x[:, ::-1] if f else x, r), r=r, f=f) for f in (0, 1) for r in range(4)]
    return jax.lax.switch(k, fns, p)


def training_pairs(image: np.ndarray, scale: float, cfg: UpsampleConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(input, target)], each (h_f, w_f, 3): a father (the image or a smaller copy of it) and
    the consistent bicubic upsampling of its son (the father area-downsampled by `scale`).
    Fathers smaller than two son pixels, or than 8 pixels, along a side are left out."""
    h, w = image.shape[:2]
    pairs = []
    for f in FATHER_SCALES:
        fw, fh = round(w * f), round(h * f)
        sw, sh = round(fw / scale), round(fh / scale)
        if min(fw, fh) < 8 or min(sw, sh) < 2 or (f < 1 and (fw, fh) == (w, h)):
            continue
        father = image if (fw, fh) == (w, h) else area(image, (fw, fh))
        son = area(father, (sw, sh))
        pairs.append((consistent_bicubic(son, (fw, fh), cfg.backproject_iters), father))
    return pairs


def _init(cfg: UpsampleConfig, seed: int):
    """He-initialised 3x3 convolutions; the last one zero (the CNN starts as the identity)."""
    rng = np.random.default_rng(seed)
    params, cin = [], 3
    for i in range(cfg.internal_layers):
        last = i == cfg.internal_layers - 1
        cout = 3 if last else cfg.internal_width
        w = np.zeros((3, 3, cin, cout)) if last else rng.normal(0, np.sqrt(2 / (9 * cin)), (3, 3, cin, cout))
        params.append({"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((cout,), jnp.float32)})
        cin = cout
    return params


def conv3x3(h, w):
    """'SAME' 3x3 convolution of h (B, H, W, C) with w (3, 3, C, C') as one matmul over the
    nine shifted copies (im2col): XLA's CPU convolution is about 20x slower inside the
    engine's jitted loop (measured on this CPU), though faster outside one."""
    hh, ww = h.shape[1], h.shape[2]
    p = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([p[:, i : i + hh, j : j + ww] for i in range(3) for j in range(3)], -1)
    return cols @ w.reshape(-1, w.shape[-1])


def _xla_conv3x3(h, w):
    return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def apply(params, x, im2col: bool = True):
    """The residual CNN on x (B, H, W, 3) -> (B, H, W, 3) (zero padding at the borders).
    im2col=True for the training step (inside the engine's loop); False (XLA's convolution,
    4x faster outside a loop on this CPU, same values to float rounding) for inference."""
    conv = conv3x3 if im2col else _xla_conv3x3
    h = x
    for i, layer in enumerate(params):
        h = conv(h, layer["w"]) + layer["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    return x + h


@functools.lru_cache(maxsize=8)
def _program(cfg: UpsampleConfig, patch: int):
    tx = optax.adam(engine.schedule(cfg.internal_lr, cfg.internal_steps, min(50, cfg.internal_steps // 10), 0.05))
    nb = cfg.internal_batch

    def crop(arr, f, a, b):
        return jax.lax.dynamic_slice(arr, (f, a, b, 0), (1, patch, patch, 3))[0]

    def step(state, data):
        key, kf, kg, ka, kb, kd = jax.random.split(state["key"], 6)
        nf = data["inp"].shape[0]
        # Half the crops from the input itself (the pair closest to the real task), half from any.
        f = jnp.where(jax.random.uniform(kf, (nb,)) < 0.5, 0, jax.random.randint(kg, (nb,), 0, nf))
        a = jax.random.randint(ka, (nb,), 0, data["size"][f, 0] - patch + 1)
        b = jax.random.randint(kb, (nb,), 0, data["size"][f, 1] - patch + 1)
        k = jax.random.randint(kd, (nb,), 0, 8)
        aug = jax.vmap(lambda arr, f, a, b, k: _dihedral(crop(arr, f, a, b), k), (None, 0, 0, 0, 0))
        xb, tb = aug(data["inp"], f, a, b, k), aug(data["tgt"], f, a, b, k)

        def loss_fn(p):
            d = apply(p, xb) - tb
            return jnp.mean(jnp.abs(d)), jnp.mean(d * d)

        (loss, mse), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        up, opt = tx.update(g, state["opt"], state["params"])
        psnr = -10 * jnp.log10(jnp.maximum(mse, 1e-12))  # on the training crops
        trivial = jnp.mean(jnp.abs(xb - tb))  # the input itself (the residual net's start): what it must beat
        new = {**state, "params": optax.apply_updates(state["params"], up), "opt": opt, "key": key}
        return new, {"loss": loss, "psnr": psnr, "trivial": trivial}

    return tx, engine.Runner(engine.lr_scaled(step), metrics=("loss", "psnr", "trivial"), donate=False)


_infer = jax.jit(functools.partial(apply, im2col=False))  # inference: XLA's convolution


def _stack(pairs, patch):
    """Pairs padded to one (F, Hmax, Wmax, 3) stack each, with their sizes (F, 2) (h, w)."""
    hm = max(p[1].shape[0] for p in pairs)
    wm = max(p[1].shape[1] for p in pairs)
    inp = np.zeros((len(pairs), hm, wm, 3), np.float32)
    tgt = np.zeros_like(inp)
    for i, (x, t) in enumerate(pairs):
        inp[i, : x.shape[0], : x.shape[1]] = x
        tgt[i, : t.shape[0], : t.shape[1]] = t
    size = np.array([p[1].shape[:2] for p in pairs], np.int32)
    return {"inp": jnp.asarray(inp)[None], "tgt": jnp.asarray(tgt)[None], "size": jnp.asarray(size)[None]}


def _predict(net, params, x: np.ndarray, radius: int) -> np.ndarray:
    """net on x (H, W, 3), in tiles of TILE with `radius` pixels of overlap: exactly the
    whole-image result (zero padding only at the image's own borders)."""
    h, w = x.shape[:2]
    if h * w <= TILE * TILE * 2:
        return np.asarray(net(params, jnp.asarray(x)[None]))[0]
    out = np.empty_like(x)
    for y0 in range(0, h, TILE):
        for x0 in range(0, w, TILE):
            y1, x1 = min(y0 + TILE, h), min(x0 + TILE, w)
            ya, xa = max(0, y0 - radius), max(0, x0 - radius)
            yb, xb = min(h, y1 + radius), min(w, x1 + radius)
            t = np.asarray(net(params, jnp.asarray(x[ya:yb, xa:xb])[None]))[0]
            out[y0:y1, x0:x1] = t[y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    return out


def train(pairs, cfg: UpsampleConfig, steps: int | None = None, reporter=None, tally: guard.Tally | None = None):
    """The CNN trained on `pairs` (see `training_pairs`) for `steps` (default cfg.internal_steps),
    by the one failure policy (`neurimg.guard`; the trivial answer is the input crop itself,
    where the residual net starts): (params, steps run, patch side, compile seconds)."""
    patch = int(min(cfg.internal_patch, min(pairs[0][1].shape[:2])))
    pairs = [p for p in pairs if min(p[1].shape[:2]) >= patch]
    if steps is not None and steps != cfg.internal_steps:
        cfg = dataclasses.replace(cfg, internal_steps=steps)
    tally = tally if tally is not None else guard.Tally()
    data = _stack(pairs, patch)

    def attempt(k: int, factor: float):
        rate = guard.restart_rate(cfg.internal_lr, UpsampleConfig().internal_lr, factor)
        c = cfg if k == 0 else dataclasses.replace(cfg, internal_lr=rate, seed=cfg.seed + k)
        tx, runner = _program(c, patch)
        params = _init(c, c.seed)
        state = {"params": params, "opt": jax.jit(tx.init)(params), "key": jax.random.key(c.seed + 23), "lr_scale": jnp.float32(1.0)}
        watch = guard.Guard(guard.Policy(warmup=min(50, c.internal_steps // 10), trivial="trivial", trivial_name="its input (bicubic)",
                                         regress_factor=math.inf,  # the regression rule was measured on field fits only
                                         hint="try more --internal-steps, or --method field"),
                            "upsample (internal)")
        loop = engine.Loop(runner, total=c.internal_steps, batches=lambda first, n: data, guard=watch, reporter=reporter,
                           what="upsample (internal)")
        try:
            return loop.run(state)
        finally:
            tally.rollbacks += watch.rollbacks

    state, stats = guard.attempts(attempt, reporter, "upsample (internal)", tally=tally)
    return state["params"], stats.steps, patch, stats.compile_seconds


def predict(params, image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None) -> np.ndarray:
    """The trained CNN's upsampling of image (H, W, 3) to out_size (W', H'): consistent bicubic,
    the CNN averaged over the flips/rotations, back-projected onto the image; clipped."""
    base = consistent_bicubic(image, out_size, cfg.backproject_iters)
    if params is None:
        return np.clip(base, 0, 1).astype(np.float32)
    acc = np.zeros_like(base)
    big = out_size[0] * out_size[1] > TILE * TILE * 2
    for k in range(ENSEMBLE):
        if reporter is not None and big:  # a pass over a large output takes a while: say so
            reporter.message(f"applying the CNN: flip/rotation {k + 1}/{ENSEMBLE} ({out_size[0]}x{out_size[1]})")
        r, flip = k % 4, k >= 4
        v = np.rot90(base[:, ::-1] if flip else base, r)
        o = np.rot90(_predict(_infer, params, np.ascontiguousarray(v), cfg.internal_layers), -r)
        acc += o[:, ::-1] if flip else o
    return np.clip(backproject(acc / ENSEMBLE, image, cfg.backproject_iters), 0, 1).astype(np.float32)


def upsample(image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None,
             steps: int | None = None) -> InternalResult:
    """Upsample image (H, W, 3) to out_size = (W', H') by internal learning (module doc).
    `steps` overrides cfg.internal_steps."""
    t0 = time.perf_counter()
    h, w = image.shape[:2]
    pairs = training_pairs(image, max(out_size[0] / w, out_size[1] / h), cfg)
    if not pairs:  # too small to learn from: consistent bicubic alone
        return InternalResult(predict(None, image, out_size, cfg), 0, 0, 0, time.perf_counter() - t0, 0.0)
    tally = guard.Tally()
    params, n, patch, comp = train(pairs, cfg, steps, reporter, tally)
    return InternalResult(predict(params, image, out_size, cfg, reporter), n, len(pairs), patch, time.perf_counter() - t0, comp, tally)
