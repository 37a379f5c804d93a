"""Arbitrary-scale upsampling: fit a SIREN to an image the way its pixels were formed, then
render the continuous function on a finer grid.

Forward model. A low-resolution pixel is taken to be the *area average* of a sharp underlying
image over the pixel's square (that is how box/area downsampling and camera sensors form
pixels). The network f(x, y) -> RGB represents the sharp image: for every input pixel it is
evaluated on an m x m stratified grid of points inside the pixel's square (m = `supersample`,
by default max(3, ceil(scale)), at most 8), and the mean of those m^2 values is compared with the
pixel (MSE). Fitting pixel *averages* rather than pixel-centre values lets the network keep an
edge sharp inside a pixel instead of interpolating a blur between centres.

Prior. Averages alone leave the sub-pixel detail underdetermined, and a bare SIREN fills it
with ringing. Logos are mostly flat colour with sharp edges, which a total-variation prior
favours: the Charbonnier TV (sqrt(d^2 + eps^2) summed over RGB) of f between neighbouring
sub-points, including the pair that crosses into the next pixel, weighted by `tv_weight`.
The TV term is measured per unit of input-pixel length so its weight does not depend on m.

Output. Each output pixel of the round(sW) x round(sH) grid (pixel-centre convention of
`neurimg.coords`, the same rectangle as the input) is the mean of f over a q x q stratified grid
inside it (q = `output_supersample`), i.e. the output is area-sampled like the ground truth it
is compared with. Scale 1 thus reproduces the fitted input.

Base. With `base="bilinear"` the function is bilinear interpolation of the input plus the
network, which learns only the residual: better for photos, whose detail the small network
cannot fit in the time budget, worse for logos, whose sharp edges must then cancel the blur.

Shapes: input (H, W, 3) float32 in [0, 1]; output (H', W', 3) float32 in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg import engine, guard, siren
from neurimg.config import UpsampleConfig
from neurimg.coords import output_size as coords_output_size
from neurimg.errors import NeurimgError
from neurimg.metrics import psnr
from neurimg.render import GridEvaluator
from neurimg.resample import cubic_kernel

__all__ = ["UpsampleConfig", "UpsampleField", "UpsampleResult", "fit_field", "render", "upsample", "output_size"]


def subpixel_offsets(m: int, extra: bool = False) -> np.ndarray:
    """Stratified offsets inside a unit pixel, (m, m, 2) (u across, v down) in [0, 1);
    with extra=True an (m+1) x (m+1) grid whose last row/column lies in the next pixel."""
    n = m + 1 if extra else m
    t = (np.arange(n, dtype=np.float64) + 0.5) / m
    off = np.empty((n, n, 2))
    off[..., 0] = t[None, :]
    off[..., 1] = t[:, None]
    return off


def bilinear(img, xy):
    """Bilinear interpolation of img (H, W, 3) between pixel centres at model coordinates xy
    (N, 2) (the `neurimg.coords` convention), edge pixels extended: (N, 3)."""
    h, w = img.shape[0], img.shape[1]
    cx = jnp.clip((xy[:, 0] * w + w) / 2 - 0.5, 0, w - 1)  # column index space
    cy = jnp.clip((xy[:, 1] * w + h) / 2 - 0.5, 0, h - 1)
    x0 = jnp.minimum(jnp.floor(cx).astype(jnp.int32), w - 2) if w > 1 else jnp.zeros_like(cx, jnp.int32)
    y0 = jnp.minimum(jnp.floor(cy).astype(jnp.int32), h - 2) if h > 1 else jnp.zeros_like(cy, jnp.int32)
    x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
    fx, fy = (cx - x0)[:, None], (cy - y0)[:, None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def _cubic_taps(u, n: int):
    """Indices (N, 4) and normalised weights (N, 4) of the cubic kernel along one axis at pixel
    coordinates u (N,) (pixel j spans [j, j+1]), as PIL's resampler weighs them: taps outside
    [0, n) are dropped and the remaining weights renormalised to sum to one."""
    j = jnp.floor(u - 0.5).astype(jnp.int32)[:, None] + jnp.arange(-1, 3)[None, :]
    wt = cubic_kernel(j + 0.5 - u[:, None]) * ((j >= 0) & (j < n))
    return jnp.clip(j, 0, n - 1), wt / jnp.sum(wt, -1, keepdims=True)


def bicubic(img, xy):
    """Bicubic interpolation of img (H, W, C) at model coordinates xy (N, 2) (the
    `neurimg.coords` convention): a continuous function that, sampled at the pixel centres of
    an output grid, is PIL's `Image.BICUBIC` resize (float images; PIL's 8-bit path rounds in
    between). (N, C)."""
    h, w = img.shape[0], img.shape[1]
    ju, wu = _cubic_taps((xy[:, 0] * w + w) / 2, w)
    jv, wv = _cubic_taps((xy[:, 1] * w + h) / 2, h)
    taps = img[jv[:, :, None], ju[:, None, :]]  # (N, 4, 4, C)
    return jnp.einsum("nijc,ni,nj->nc", taps, wv, wu)


def subpixel_coords(corners, offsets, wh):
    """Model coordinates of sub-points: corners (N, 2) top-left pixel corners (u, v) in pixel
    units, offsets (K, 2) within a pixel, wh = (W, H) -> (N, K, 2), as `coords.pixel_to_coord`."""
    uv = corners[:, None, :] + offsets[None, :, :]
    return (2.0 * uv - wh) / wh[0]


@dataclass
class UpsampleField:
    """A fitted upsampling field: f(x, y) over the input's rectangle."""

    cfg: UpsampleConfig
    graphdef: Any
    params: Any
    width: int  # input size
    height: int
    m: int  # sub-points per input pixel per axis used in the fit
    image: Any = None  # the input (H, W, 3), for the base interpolant
    steps: int = 0
    fit_psnr: float = 0.0  # PSNR of the model's pixel averages against the input
    seconds: float = 0.0
    compile_seconds: float = 0.0
    tally: guard.Tally = dataclasses.field(default_factory=guard.Tally)


@dataclass
class UpsampleResult:
    image: np.ndarray  # (H', W', 3): float32 in [0, 1], or uint8 if asked
    method: str  # "field", "internal", "mix" or "backproject"
    fit_psnr: float  # PSNR of the output averaged back onto the input grid, against the input
    seconds: float
    steps: int = 0
    field: UpsampleField | None = None  # the fitted SIREN (method "field")
    validation: dict[str, float] | None = None  # self-validation PSNR per candidate (method "auto")
    tally: guard.Tally = dataclasses.field(default_factory=guard.Tally)  # every training's rollbacks and restarts

    def report(self) -> dict[str, Any]:
        rep = {
            "width": int(self.image.shape[1]),
            "height": int(self.image.shape[0]),
            "method": self.method,
            "fit_psnr": round(self.fit_psnr, 4),
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            **self.tally.summary(),
        }
        if self.validation:
            rep["validation"] = {k: round(v, 3) for k, v in self.validation.items()}
        return rep


def _field_fn(graphdef, base: str):
    """The upsampled image as a field over params = (network, input image): the network (+ the
    base interpolant of the image) at coords (B, P, 2)."""

    def fn(params, coords, ids):
        net, img = params
        out = siren.apply(graphdef, net, coords, jnp.zeros_like(ids))
        if base == "none":
            return out
        interp = bicubic if base == "bicubic" else bilinear
        return out + interp(img, coords.reshape(-1, 2)).reshape(out.shape)

    return fn


@functools.lru_cache(maxsize=8)
def _graphdef(cfg: UpsampleConfig):
    return siren.init_params(cfg.model, 1, cfg.seed)[0]


@functools.lru_cache(maxsize=8)
def _program(cfg: UpsampleConfig, m: int, nb: int):
    """(optimizer, engine runner) for one setting. Cached, and the image, its pixel corners
    and size are batch data rather than constants, so a folder of same-sized images compiles
    once."""
    graphdef = _graphdef(cfg)
    tx = optax.adam(engine.schedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.final_lr_fraction))
    off = jnp.asarray(subpixel_offsets(m, extra=True).reshape(-1, 2), jnp.float32)  # ((m+1)^2, 2)
    field = _field_fn(graphdef, cfg.base)
    ids = jnp.zeros((1,), jnp.int32)
    tv_w, eps = cfg.tv_weight, cfg.tv_eps

    def loss_fn(p, img, corners, idx):
        target = img.reshape(-1, 3)
        wh = jnp.array([img.shape[1], img.shape[0]], jnp.float32)
        xy = subpixel_coords(corners[idx], off, wh)
        f = field((p, img), xy.reshape(1, -1, 2), ids).reshape(nb, m + 1, m + 1, 3)
        data = jnp.mean(jnp.square(f[:, :m, :m].mean((1, 2)) - target[idx]))
        if tv_w == 0:
            return data, data
        dx = f[:, :m, 1:] - f[:, :m, :-1]
        dy = f[:, 1:, :m] - f[:, :-1, :m]
        tv = jnp.sqrt(jnp.sum(dx * dx, -1) + eps * eps).mean() + jnp.sqrt(jnp.sum(dy * dy, -1) + eps * eps).mean()
        return data + tv_w * m * tv, data  # m * mean |d| = TV per input-pixel length

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        img, corners = batch["img"], batch["corners"]
        npix = img.shape[0] * img.shape[1]
        key, sub = jax.random.split(state["key"])
        idx = jax.random.permutation(sub, npix)[:nb] if nb < npix else jnp.arange(npix)
        (_, data), g = grad_fn(state["params"], img, corners, idx)
        up, opt = tx.update(g, state["opt"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], up), "opt": opt, "key": key}, {"loss": data}

    return tx, engine.Runner(engine.lr_scaled(step), donate=False)


def fit_field(image: np.ndarray, scale: float, cfg: UpsampleConfig, reporter=None) -> UpsampleField:
    """Fit a SIREN to `image` (H, W, 3) under the area-average model (see the module doc),
    by the one failure policy (`neurimg.guard`): the trivial answer is the field it starts
    from (the image's mean colour, or the base interpolant), which the fit must beat.

    `reporter` gets the progress (see `neurimg.progress`) or is None."""
    cfg.validate()
    t0 = time.perf_counter()
    tally = guard.Tally()

    def attempt(k: int, factor: float) -> UpsampleField:
        c = cfg if k == 0 else dataclasses.replace(cfg, lr=guard.restart_rate(cfg.lr, UpsampleConfig().lr, factor), seed=cfg.seed + k)
        return _fit_once(image, scale, c, reporter, tally)

    fitted = guard.attempts(attempt, reporter, "upsample fit", tally=tally)
    fitted.tally = tally
    fitted.seconds = time.perf_counter() - t0
    return fitted


def initial_field(image: np.ndarray, scale: float, cfg: UpsampleConfig) -> UpsampleField:
    """The field a fit starts from: the base interpolant (its residual network's output layer
    zero), or with base "none" the image's mean colour plus the fresh network."""
    h, w = image.shape[:2]
    _, params = siren.init_params(cfg.model, 1, cfg.seed)
    # Start at the base interpolant, or at the image's mean colour (the model adds 0.5 itself).
    start = 0.0 if cfg.base != "none" else image.reshape(-1, 3).mean(0)
    params["out_bias"] = jnp.asarray(start - 0.5 + np.zeros(3), jnp.float32)
    if cfg.base != "none":  # the residual starts at zero: the fit starts at the base interpolant
        params["out_kernel"] = jnp.zeros_like(params["out_kernel"])
    return UpsampleField(cfg, _graphdef(cfg), params, w, h, cfg.sub(scale), jnp.asarray(image, jnp.float32))


def _fit_once(image: np.ndarray, scale: float, cfg: UpsampleConfig, reporter, tally: guard.Tally) -> UpsampleField:
    h, w = image.shape[:2]
    start = initial_field(image, scale, cfg)
    m, params, img = start.m, start.params, start.image
    nb = min(cfg.batch_pixels, h * w)
    tx, runner = _program(cfg, m, nb)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    corners = np.stack([jj.ravel(), ii.ravel()], -1).astype(np.float32)  # (N, 2) (u, v)
    if cfg.base == "none":
        trivial = float(np.mean(np.square(image - image.reshape(-1, 3).mean(0))))
    else:  # the base interpolant's pixel averages: exactly where the fit starts
        trivial = _mse(render(start, (w, h), q=m), image)
    batch = {"img": img[None], "corners": jnp.asarray(corners)[None]}
    state = {"params": params, "opt": jax.jit(tx.init)(params), "key": jax.random.key(cfg.seed + 11), "lr_scale": jnp.float32(1.0)}
    name = "the image's mean colour" if cfg.base == "none" else f"the {cfg.base} interpolant"
    watch = guard.Guard(guard.Policy(warmup=cfg.warmup_steps, trivial=trivial, trivial_name=name), "upsample fit")
    loop = engine.Loop(runner, total=cfg.steps, batches=lambda first, n: batch, guard=watch, reporter=reporter, what="upsample fit")
    try:
        state, stats = loop.run(state)
    finally:
        tally.rollbacks += watch.rollbacks
    fitted = UpsampleField(cfg, _graphdef(cfg), state["params"], w, h, m, img, stats.steps)
    fitted.compile_seconds = stats.compile_seconds
    out = render(fitted, (w, h), q=m)
    mse = _mse(out, image)
    if trivial > 0 and not mse < trivial:
        raise guard.TrainingFailed(f"the upsampling field is no better than {name} (MSE {mse:.4g} vs {trivial:.4g})")
    fitted.fit_psnr = psnr(out, image)
    return fitted


def _mse(a, b) -> float:
    return float(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.lru_cache(maxsize=16)
def _evaluator(cfg: UpsampleConfig, clip: bool) -> GridEvaluator:
    return GridEvaluator(_field_fn(_graphdef(cfg), cfg.base), chunk=1 << 15, clip=clip)


def render(fitted: UpsampleField, out_size: tuple[int, int], q: int = 2, region=None, clip: bool = True, dtype=np.float32) -> np.ndarray:
    """f over `region` (pixel units of the input; default all of it) on an out_size = (W', H')
    grid, each output pixel the mean of q x q stratified samples inside it (the one grid
    evaluator, `neurimg.render`): (H', W', 3) `dtype`, clipped to [0, 1] unless clip=False."""
    img = fitted.image if fitted.image is not None else jnp.zeros((fitted.height, fitted.width, 3), jnp.float32)
    return _evaluator(fitted.cfg, clip).grid(
        (fitted.params, img), (fitted.width, fitted.height), out_size, region, supersample=q, dtype=dtype
    )


def output_size(w: int, h: int, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    """round(scale * W) x round(scale * H), or `size`; refuses empty and over-large outputs."""
    if (scale is None) == (size is None):
        raise NeurimgError("give --scale or --size (one of them)")
    return coords_output_size(w, h, None, scale, size)


VALIDATION_MIN_SIDE = 8  # shortest side of the son self-validation upsamples, in pixels
VALIDATION_FIELD_STEPS = 0.5  # fraction of the field's steps in self-validation
FLAT_MARGIN_DB = 0.25  # the field must beat consistent bicubic by this much on the son: "flat"
CNN_MIN_SON = 32  # from this son side up the internal CNN has enough to learn from and is used


def _run(method: str, image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None,
         fraction: float = 1.0) -> UpsampleResult:
    """One method on image (H, W, 3) -> out_size (W', H'); `fraction` of its steps."""
    from neurimg import internal
    from neurimg.resample import area, backproject, consistent_bicubic

    t0 = time.perf_counter()
    h, w = image.shape[:2]
    if method == "field":
        scale = max(out_size[0] / w, out_size[1] / h)
        c = cfg if fraction == 1 else dataclasses.replace(cfg, steps=max(1, round(cfg.steps * fraction)))
        fitted = fit_field(image, scale, c, reporter)
        out = render(fitted, out_size, cfg.output_supersample, clip=False)
        steps, tally = fitted.steps, fitted.tally
    elif method == "internal":
        res = internal.upsample(image, out_size, cfg, reporter, steps=max(1, round(cfg.internal_steps * fraction)))
        out, fitted, steps, tally = res.image, None, res.steps, res.tally
    elif method == "mix":  # the mean of the two learned upsamplings, back-projected
        a = _run("internal", image, out_size, cfg, reporter, fraction)
        b = _run("field", image, out_size, cfg, reporter, fraction)
        out = backproject((a.image + b.image) / 2, image, cfg.backproject_iters)
        fitted, steps, tally = b.field, a.steps + b.steps, a.tally.add(b.tally)
    else:
        out, fitted, steps, tally = consistent_bicubic(image, out_size, cfg.backproject_iters), None, 0, guard.Tally()
    out = np.clip(out, 0, 1).astype(np.float32)
    fit = psnr(area(out, (w, h)), image)
    return UpsampleResult(out, method, fit, time.perf_counter() - t0, steps, fitted, tally=tally)


def choose(image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None) -> tuple[str, dict[str, float], float]:
    """Self-validation: which method suits this image, with no ground truth.

    The image's son is the image area-downsampled by the scale; it is what the internal CNN
    learns from (its largest training input).
    - Son at least CNN_MIN_SON pixels a side: the internal CNN, for every image (it won on
      every photo and logo measured with a 64 px son: x2 of 128 px inputs).
    - Son under VALIDATION_MIN_SIDE a side: too small to judge; such inputs are icons, and
      get the field.
    - Otherwise the son is upsampled back to the image's size by the field (the SIREN,
      VALIDATION_FIELD_STEPS of its steps) and by consistent bicubic, both scored against the
      image itself (PSNR). Where the field wins by more than FLAT_MARGIN_DB the image is
      flat-coloured (logos, icons, diagrams: the field's TV prior fits them) and gets the
      field; otherwise ("mix") the mean of the field and the CNN, which beat either alone on
      every photo measured with a 16 px son (x4 of 64 px inputs).

    Returns (method, {candidate: validation PSNR}, scale)."""
    from neurimg.resample import area, consistent_bicubic

    h, w = image.shape[:2]
    scale = max(out_size[0] / w, out_size[1] / h)
    son_size = (round(w / scale), round(h / scale))
    if scale <= 1:  # not an upsampling: the field, rendered area-sampled on the coarser grid
        return "field", {}, scale
    if min(son_size) >= CNN_MIN_SON:
        return "internal", {}, scale
    if min(son_size) < VALIDATION_MIN_SIDE:
        return "field", {}, scale
    son = area(image, son_size)
    scores = {
        "field": psnr(_run("field", son, (w, h), cfg, None, VALIDATION_FIELD_STEPS).image, image),
        "backproject": psnr(np.clip(consistent_bicubic(son, (w, h), cfg.backproject_iters), 0, 1), image),
    }
    best = "field" if scores["field"] > scores["backproject"] + FLAT_MARGIN_DB else "mix"
    if reporter is not None:
        told = ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items())
        reporter.message(f"self-validation ({son_size[0]}x{son_size[1]} -> {w}x{h}): {told}; using {best}")
    return best, scores, scale


def upsample(image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None, dtype=np.float32) -> UpsampleResult:
    """Upsample `image` (H, W, 3) to out_size = (W', H') with cfg.method ("auto": chosen by
    `choose`). The output is (H', W', 3) in [0, 1], `dtype` (uint8: rounded)."""
    cfg.validate()
    t0 = time.perf_counter()
    scores = None
    method = cfg.method
    if method == "auto":
        method, scores, _ = choose(image, out_size, cfg, reporter)
    res = _run(method, image, out_size, cfg, reporter)
    if dtype == np.uint8:
        res.image = np.round(res.image * 255).astype(np.uint8)
    res.validation = scores
    res.seconds = time.perf_counter() - t0
    return res
