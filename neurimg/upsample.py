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

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg import siren
from neurimg.config import ModelConfig
from neurimg.coords import output_size as coords_output_size
from neurimg.coords import pixel_to_coord
from neurimg.errors import NeurimgError
from neurimg.metrics import psnr

MAX_CHUNK = 1000  # most steps per jitted call
RENDER_CHUNK = 1 << 15  # network evaluations per call when rendering
# Largest output: 8192 x 8192 (0.8 GB as float32). Rendering is chunked: memory is the output.
MAX_OUTPUT_PIXELS = 1 << 26


@dataclass(frozen=True)
class UpsampleConfig:
    """Every setting of `neurimg upsample`, with the defaults chosen in bench/RESULTS.md."""

    width: int = 64  # units per sine layer
    hidden_layers: int = 3  # hidden sine layers after the first
    w0: float = 45.0  # SIREN frequency factor (higher than fit's 30: sharper edges between pixels)
    steps: int = 600  # Adam steps
    lr: float = 1e-3  # peak learning rate (warm-up then cosine decay)
    warmup_steps: int = 50
    batch_pixels: int = 512  # input pixels per step (all of them if the image has fewer)
    supersample: int = 0  # m: sub-points per input pixel per axis; 0 = auto: max(3, ceil(scale)), at most 8
    output_supersample: int = 2  # q: samples per output pixel per axis (area-sampled output)
    tv_weight: float = 1e-3  # weight of the TV prior; 0 disables it
    tv_eps: float = 1e-3  # Charbonnier smoothing of |d|
    base: str = "none"  # "bilinear": the network learns the residual over bilinear interpolation
    # (photos: 29.1 dB instead of 23.4 at x2, bench/RESULTS.md; logos: 29.0 instead of 37.0 at x4)
    seed: int = 0

    def validate(self) -> "UpsampleConfig":
        ModelConfig(width=self.width, hidden_layers=self.hidden_layers, latent_dim=1, w0=self.w0).validate()
        for name in ("steps", "batch_pixels", "output_supersample"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise NeurimgError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if self.steps > 1_000_000:
            raise NeurimgError(f"--steps {self.steps} is absurdly large")
        if not isinstance(self.supersample, int) or not 0 <= self.supersample <= 16:
            raise NeurimgError(f"--supersample must be an integer in [0, 16] (0 = auto), got {self.supersample}")
        if self.output_supersample > 8:
            raise NeurimgError(f"output supersampling must be at most 8, got {self.output_supersample}")
        if not math.isfinite(self.lr) or self.lr <= 0 or self.lr > 10:
            raise NeurimgError(f"--lr must be a positive number (at most 10), got {self.lr}")
        if not math.isfinite(self.tv_weight) or self.tv_weight < 0:
            raise NeurimgError(f"--tv-weight must be a finite number >= 0, got {self.tv_weight}")
        if self.base not in ("bilinear", "none"):
            raise NeurimgError(f"--base must be bilinear or none, got {self.base!r}")
        if not math.isfinite(self.tv_eps) or self.tv_eps <= 0:
            raise NeurimgError(f"tv eps must be a positive number, got {self.tv_eps}")
        return self

    def sub(self, scale: float) -> int:
        """m for a given scale: at least one sub-point per output pixel along each axis."""
        if self.supersample:
            return self.supersample
        return min(8, max(3, math.ceil(scale - 1e-9)))


def _model_cfg(cfg: UpsampleConfig) -> ModelConfig:
    return ModelConfig(width=cfg.width, hidden_layers=cfg.hidden_layers, latent_dim=1, w0=cfg.w0)


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


def subpixel_coords(corners, offsets, wh):
    """Model coordinates of sub-points: corners (N, 2) top-left pixel corners (u, v) in pixel
    units, offsets (K, 2) within a pixel, wh = (W, H) -> (N, K, 2), as `coords.pixel_to_coord`."""
    uv = corners[:, None, :] + offsets[None, :, :]
    return (2.0 * uv - wh) / wh[0]


@dataclass
class Fitted:
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


@functools.lru_cache(maxsize=8)
def _programs(cfg: UpsampleConfig, m: int, nb: int):
    """(graphdef, optimizer, jitted multi-step update, jitted evaluation) for one setting.

    Cached, and the image's pixels, pixel corners and size are arguments rather than
    constants, so a folder of same-sized images compiles once."""
    graphdef, _ = siren.init_params(_model_cfg(cfg), 1, cfg.seed)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup_steps, cfg.steps - 1), cfg.steps, cfg.lr * 0.05
    )
    tx = optax.adam(sched)
    off = jnp.asarray(subpixel_offsets(m, extra=True).reshape(-1, 2), jnp.float32)  # ((m+1)^2, 2)
    ids = jnp.zeros((1,), jnp.int32)
    tv_w, eps = cfg.tv_weight, cfg.tv_eps

    def field(p, xy, img):
        """The upsampled image as a function: net (+ base interpolant of img) at xy (N, 2)."""
        out = siren.apply(graphdef, p, xy[None], ids)[0]
        return out if cfg.base == "none" else out + bilinear(img, xy)

    def loss_fn(p, img, corners, idx):
        target = img.reshape(-1, 3)
        wh = jnp.array([img.shape[1], img.shape[0]], jnp.float32)
        xy = subpixel_coords(corners[idx], off, wh)
        f = field(p, xy.reshape(-1, 2), img).reshape(nb, m + 1, m + 1, 3)
        data = jnp.mean(jnp.square(f[:, :m, :m].mean((1, 2)) - target[idx]))
        if tv_w == 0:
            return data, data
        dx = f[:, :m, 1:] - f[:, :m, :-1]
        dy = f[:, 1:, :m] - f[:, :-1, :m]
        tv = jnp.sqrt(jnp.sum(dx * dx, -1) + eps * eps).mean() + jnp.sqrt(jnp.sum(dy * dy, -1) + eps * eps).mean()
        return data + tv_w * m * tv, data  # m * mean |d| = TV per input-pixel length

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def run(p, o, key, n, img, corners):
        npix = img.shape[0] * img.shape[1]

        def body(i, carry):
            p, o, key, losses = carry
            key, sub = jax.random.split(key)
            idx = jax.random.permutation(sub, npix)[:nb] if nb < npix else jnp.arange(npix)
            (_, data), g = grad_fn(p, img, corners, idx)
            up, o = tx.update(g, o, p)
            return optax.apply_updates(p, up), o, key, losses.at[i].set(data)

        losses = jnp.full((MAX_CHUNK,), jnp.nan, jnp.float32)
        return jax.lax.fori_loop(0, n, body, (p, o, key, losses))

    @jax.jit
    def ev(params, coords, img):
        return field(params, coords, img)

    return graphdef, tx, jax.jit(run, donate_argnums=(0, 1)), ev


def fit(image: np.ndarray, scale: float, cfg: UpsampleConfig, progress=None) -> Fitted:
    """Fit a SIREN to `image` (H, W, 3) under the area-average model (see the module doc).

    `progress` is a `neurimg.fit.Reporter` (start/update/stop) or None."""
    cfg.validate()
    t0 = time.perf_counter()
    h, w = image.shape[:2]
    m = cfg.sub(scale)
    npix = h * w
    nb = min(cfg.batch_pixels, npix)
    graphdef, tx, step_fn, _ = _programs(cfg, m, nb)
    _, params = siren.init_params(_model_cfg(cfg), 1, cfg.seed)
    # Start at the image's mean colour rather than mid-grey (the model adds 0.5 itself).
    # Start at the base interpolant, or at the image's mean colour (the model adds 0.5 itself).
    start = 0.0 if cfg.base != "none" else image.reshape(-1, 3).mean(0)
    params["out_bias"] = jnp.asarray(start - 0.5 + np.zeros(3), jnp.float32)
    opt = jax.jit(tx.init)(params)  # one program, not one eager op per leaf
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    corners = jnp.asarray(np.stack([jj.ravel(), ii.ravel()], -1), jnp.float32)  # (N, 2) (u, v)
    key = jax.random.key(cfg.seed + 11)
    if progress is not None:
        progress.start(cfg.steps, 0)
    fitted = Fitted(cfg, graphdef, params, w, h, m, jnp.asarray(image, jnp.float32))
    t_call = time.perf_counter()
    done, sps, t_train = 0, 0.0, None
    while done < cfg.steps:
        n = min(MAX_CHUNK, cfg.steps - done, max(1, int(sps)) if t_train is not None else 1)
        params, opt, key, losses = step_fn(params, opt, key, jnp.int32(n), fitted.image, corners)
        loss = np.asarray(losses)[:n]
        done += n
        if t_train is None:  # the first call compiles (or finds the cached program)
            fitted.compile_seconds = time.perf_counter() - t_call
            t_train, start = time.perf_counter(), done
        else:
            sps = (done - start) / max(time.perf_counter() - t_train, 1e-9)
        if not np.all(np.isfinite(loss)):
            bad = int(np.argmax(~np.isfinite(loss)))
            raise NeurimgError(f"upsample fit diverged at step {done - n + bad + 1}; try a lower --lr", exit_code=1)
        if progress is not None:
            progress.update(done, float(loss[-1]), _psnr_of_mse(float(loss[-1])), sps)
    if progress is not None:
        progress.stop()
    fitted.params, fitted.steps = params, done
    fitted.fit_psnr = psnr(render(fitted, (w, h), q=m), image)
    fitted.seconds = time.perf_counter() - t0
    return fitted


def _psnr_of_mse(mse: float) -> float:
    return float(-10 * np.log10(max(mse, 1e-12)))


def render(fitted: Fitted, out_size: tuple[int, int], q: int = 2, region=None, clip: bool = True) -> np.ndarray:
    """f over `region` (pixel units of the input; default all of it) on an out_size = (W', H')
    grid, each output pixel the mean of q x q stratified samples inside it: float32
    (H', W', 3), clipped to [0, 1] unless clip=False. Chunked: memory is the output plus a
    constant."""
    ow, oh = out_size
    if ow * oh > MAX_OUTPUT_PIXELS:
        raise NeurimgError(f"output of {ow}x{oh} pixels is too large (at most {MAX_OUTPUT_PIXELS} pixels)")
    w, h = fitted.width, fitted.height
    x0, y0, x1, y1 = region if region is not None else (0.0, 0.0, float(w), float(h))
    ev = _programs(fitted.cfg, 1, 1)[3]
    img = fitted.image if fitted.image is not None else jnp.zeros((h, w, 3), jnp.float32)
    sub = subpixel_offsets(q).reshape(-1, 2)  # (q*q, 2)
    out = np.empty((oh * ow, 3), np.float32)
    rows_per = max(1, RENDER_CHUNK // (ow * q * q))
    sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
    for r0 in range(0, oh, rows_per):
        rows = np.arange(r0, r0 + rows_per)  # fixed chunk shape: one compile
        jj, ii = np.meshgrid(np.arange(ow), rows)
        u = x0 + (jj.reshape(-1, 1) + sub[None, :, 0]) * sx
        v = y0 + (ii.reshape(-1, 1) + sub[None, :, 1]) * sy
        x, y = pixel_to_coord(u, v, w, h)
        c = jnp.asarray(np.stack([x, y], -1).reshape(-1, 2), jnp.float32)
        f = np.asarray(ev(fitted.params, c, img)).reshape(-1, q * q, 3).mean(1)
        n = min(rows_per, oh - r0) * ow
        out[r0 * ow : r0 * ow + n] = f[:n]
    out = out.reshape(oh, ow, 3)
    return np.clip(out, 0.0, 1.0) if clip else out


def output_size(w: int, h: int, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    """round(scale * W) x round(scale * H), or `size`; refuses empty and over-large outputs."""
    if (scale is None) == (size is None):
        raise NeurimgError("give --scale or --size (one of them)")
    return coords_output_size(w, h, None, scale, size, max_pixels=MAX_OUTPUT_PIXELS)


def upsample(image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, progress=None):
    """Fit `image` (H, W, 3) and render it at out_size = (W', H'). Returns (output, report)."""
    h, w = image.shape[:2]
    scale = max(out_size[0] / w, out_size[1] / h)
    t0 = time.perf_counter()
    fitted = fit(image, scale, cfg, progress)
    out = render(fitted, out_size, cfg.output_supersample)
    report = {
        "width": int(out_size[0]),
        "height": int(out_size[1]),
        "input_width": w,
        "input_height": h,
        "fit_psnr": round(fitted.fit_psnr, 4),
        "steps": fitted.steps,
        "compile_seconds": round(fitted.compile_seconds, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return out, report
