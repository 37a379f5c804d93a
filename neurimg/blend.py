"""Gradient-domain blending with a SIREN, checked against the exact Poisson solve.

Two images A (the canvas) and B (placed at `offset`, optionally restricted to `mask`) define a
target gradient field G on A's pixel grid from forward differences (see `neurimg.poisson`):
- sum:     G = grad A + grad B
- mean:    G = (grad A + grad B) / 2
- mixed:   at each pixel, the gradient (x and y, all channels) of whichever of A, B has the
           larger magnitude (Perez et al. 2003, "Poisson image editing", mixing gradients)
- replace: grad B (seamless cloning, Perez et al. 2003)
Outside B's region (or mask) G = grad A; a pixel pair counts as inside only if both pixels are.

Units: G is stored per unit coordinate, the units of the network's autodiff gradient: pixel
differences times pixels per unit, ppu = W / 2 (x spans [-1, 1] over W pixels; y has the same
spacing, see `neurimg.coords`). Losses and `color_weight` are expressed in pixel units (G / ppu),
so they mean the same at every resolution and match the exact solver's objective:

    sum over pairs |D u - G / ppu|^2 + color_weight * sum over pixels |u - N|^2

with N the naive average ((A + B) / 2 where B contributes, A elsewhere).

Over a full canvas with no mask, `sum` and `mean` have closed forms: the least-squares image is
A + B minus a constant per channel, and (A + B) / 2. `mixed` and cloning (`--mask`/`--offset`)
have none; those are where the gradient domain earns its keep.

The SIREN path. The exact least-squares solution E on the pixel grid costs milliseconds (DCT,
`neurimg.poisson`), and E is also what the continuous objective asks for at the pixel centres.
Fitting the gradient objective alone was measured to fail on photos and images above 64 px
(bench/RESULTS.md, "blend on photos"): it pins the high frequencies but leaves the low ones
drifting (a 256 px photo pair: gradient cosine 0.965 at 16 dB vs E), and at a learning rate
fast enough for 256 px it collapses to a flat image. So the field f(x, y) -> RGB is fitted in
up to two phases through the engine:
1. fit: f ~ E at the pixel centres (plain least squares on `batch_pixels` pixels per step);
2. refine (optional, `refine_steps`): the gradient objective below plus `anchor_weight` |f - E|^2.
   E minimises the gradient objective too, so the anchor changes the conditioning, not the
   answer; at equal time this phase lowered both the PSNR vs E and the gradient cosine in our
   measurements, so it is off by default.
The refine objective: df/dx matches G_x on the segment between the two pixel centres of each
horizontal pair (likewise y). Each step averages the autodiff derivative over K stratified random
points of every segment ("jitter"; point k uniform in the k-th of K equal parts): the average
estimates the segment's integral, the pixel difference that the discrete problem constrains,
and the loss E|mean - G|^2 = |integral - G|^2 + variance only penalises a derivative that varies
along the segment through the variance, which shrinks like 1/K^3 for a smooth one. `order=2`
fits the network's Laplacian at the pixel centres to the divergence of G instead.

Never a silent failure, by the one policy of `neurimg.guard`: a window whose loss jumps is
rolled back with a lower lr; an attempt whose loss stays above FLAT_FRACTION x a flat image's
past half of the fit, or whose final gradient cosine with G is below COLLAPSE_COSINE x the
exact solution's while its values are within COLLAPSE_GAIN_DB of a flat image's error, starts
again (`guard.attempts`: a new seed, lower rates); then exit code 1 with one line that names
the figure and points to `--solver exact`.

Colour: gradients fix an image up to a constant per channel. The exact solution has the naive
average's per-channel mean; the SIREN output is shifted so its *clipped* per-channel mean equals
the clipped exact solution's (the same anchor carried through the clip to [0, 1]). Output is
clipped, never rescaled.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg import engine, guard, poisson, siren
from neurimg.config import BLEND_MODES as MODES
from neurimg.config import BlendConfig
from neurimg.coords import image_grid
from neurimg.errors import NeurimgError
from neurimg.metrics import psnr
from neurimg.render import GridEvaluator, single_image_field

CHUNK_SECONDS = 0.5  # aim for progress updates about this often
COLLAPSE_FACTOR = 4.0  # a window whose mean loss is this many times the best window mean is redone
FLAT_FRACTION = 0.5  # past half of the fit, a window's loss above half a flat image's fails the attempt
HINT = "use --solver exact"  # what every failed SIREN blend suggests
# A result has collapsed when its gradient cosine is below COLLAPSE_COSINE x the exact solution's
# and its values are less than COLLAPSE_GAIN_DB closer to the exact solution than a flat image
# (the cosine alone misjudges low-contrast images, where sub-pixel ripples dominate tiny gradients).
COLLAPSE_COSINE, COLLAPSE_GAIN_DB = 0.5, 10.0

__all__ = ["BlendConfig", "BlendResult", "blend", "fit_gradient_field", "targets", "place", "exact_solution"]


# --------------------------------------------------------------------------------------------
# geometry and targets (NumPy)


@dataclass
class Targets:
    gx: np.ndarray  # (H, W, 3) target d/dx per unit coordinate; 0 where not a pixel pair
    gy: np.ndarray  # (H, W, 3) target d/dy
    naive: np.ndarray  # (H, W, 3) the naive average N
    inside: np.ndarray  # (H, W) bool: where B contributes

    @property
    def ppu(self) -> float:
        """Pixels per unit coordinate (W / 2)."""
        return self.naive.shape[1] / 2.0

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean of the naive average: the colour anchor."""
        return self.naive.mean((0, 1))

    def pixel_units(self) -> tuple[np.ndarray, np.ndarray]:
        """The target as pixel differences (what the discrete problem constrains)."""
        return self.gx / self.ppu, self.gy / self.ppu


def parse_offset(text: str) -> tuple[int, int]:
    """'X,Y' (integers, pixels; B's top-left corner on A's canvas, may be negative)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise NeurimgError(f"--offset must look like X,Y (integer pixels), got {text!r}") from None


def place(a: np.ndarray, b: np.ndarray, offset: tuple[int, int] | None = None, mask: np.ndarray | None = None):
    """Put B on A's canvas with B's top-left pixel at `offset` (x, y); default: centred.

    B may reach outside the canvas (it is cropped) but must overlap it. `mask` (B's size, bool)
    restricts where B contributes. Returns (B on the canvas (H, W, 3), inside (H, W) bool)."""
    h, w = a.shape[:2]
    bh, bw = b.shape[:2]
    if mask is not None and mask.shape[:2] != (bh, bw):
        raise NeurimgError(f"--mask is {mask.shape[1]}x{mask.shape[0]} but B is {bw}x{bh}: they must be the same size")
    if offset is None:
        offset = ((w - bw) // 2, (h - bh) // 2)
    ox, oy = offset
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + bw, w), min(oy + bh, h)
    if x1 <= x0 or y1 <= y0:
        raise NeurimgError(f"--offset {ox},{oy} puts B ({bw}x{bh}) outside A's canvas ({w}x{h})")
    canvas = np.zeros((h, w, 3), np.float64)
    inside = np.zeros((h, w), bool)
    canvas[y0:y1, x0:x1] = b[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    m = np.ones((bh, bw), bool) if mask is None else np.asarray(mask, bool)
    inside[y0:y1, x0:x1] = m[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    if not inside.any():
        raise NeurimgError("--mask selects no pixel of B on A's canvas")
    return canvas, inside


def targets(a: np.ndarray, b_canvas: np.ndarray, inside: np.ndarray, mode: str) -> Targets:
    """The target gradient field (per unit coordinate) and the naive average."""
    if mode not in MODES:
        raise NeurimgError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    a = np.asarray(a, np.float64)
    h, w = a.shape[:2]
    ax, ay = poisson.forward_differences(a)
    bx, by = poisson.forward_differences(b_canvas)
    in_x = np.zeros_like(inside)
    in_x[:, :-1] = inside[:, :-1] & inside[:, 1:]
    in_y = np.zeros_like(inside)
    in_y[:-1] = inside[:-1] & inside[1:]
    if mode == "sum":
        gx, gy = ax + bx, ay + by
    elif mode == "mean":
        gx, gy = (ax + bx) / 2, (ay + by) / 2
    elif mode == "replace":
        gx, gy = bx, by
    else:  # mixed: compare whole gradients (both directions, all channels) pixel by pixel
        take_b = ((bx**2 + by**2).sum(-1) > (ax**2 + ay**2).sum(-1))[..., None]
        gx, gy = np.where(take_b, bx, ax), np.where(take_b, by, ay)
    gx = np.where(in_x[..., None], gx, ax)
    gy = np.where(in_y[..., None], gy, ay)
    naive = np.where(inside[..., None], (a + b_canvas) / 2, a)
    ppu = w / 2.0
    return Targets(gx * ppu, gy * ppu, naive, inside)


def exact_solution(t: Targets, color_weight: float = 0.0) -> np.ndarray:
    """The exact least-squares solution on the pixel grid (unclipped, float64)."""
    gx, gy = t.pixel_units()
    return poisson.solve_exact(gx, gy, t.mean, color_weight, t.naive)


def anchor_shift(raw: np.ndarray, target_mean: np.ndarray, iters: int = 60) -> np.ndarray:
    """Per-channel constant c with mean(clip(raw + c, 0, 1)) = target_mean (bisection; the
    clipped mean grows monotonically with c). Falls back to the unclipped anchor where the
    target cannot be reached."""
    raw = np.asarray(raw, np.float64)
    out = np.empty(raw.shape[-1])
    for ch in range(raw.shape[-1]):
        v = raw[..., ch].ravel()
        tgt = float(target_mean[ch])
        lo, hi = -1.0 - v.max(), 1.0 - v.min()  # clipped mean is 0 at lo, 1 at hi
        if not 0.0 < tgt < 1.0:
            out[ch] = lo if tgt <= 0 else hi
            continue
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if np.clip(v + mid, 0, 1).mean() < tgt:
                lo = mid
            else:
                hi = mid
        out[ch] = 0.5 * (lo + hi)
    return out


# --------------------------------------------------------------------------------------------
# the SIREN fit (JAX)


def _apply_fn(graphdef):
    ids = jnp.zeros((1,), jnp.int32)

    def f(params, c):
        """(P, 2) -> (P, 3)."""
        return siren.apply(graphdef, params, c[None], ids)[0]

    return f


def make_step(t: Targets, cfg: BlendConfig, graphdef, tx, exact: np.ndarray, gradient: bool = True):
    """The pure step of either phase: step(state, None) -> (state, {"loss"}), drawing its pixels
    and pairs from the key in the state. State: {"params", "opt", "key", "lr_scale"}; `lr_scale`
    multiplies every update (`engine.lr_scaled`), lowered by the guard on a rollback.

    Loss (per pixel, pixel units): [gradient] the pair term (order 1) or Laplacian term (order
    2) + color_weight * |f - N|^2, plus anchor * |f - E|^2 with E = `exact`; anchor is 1 in the
    start phase (gradient=False: the anchor term alone) and `cfg.anchor_weight` when refining.
    E minimises the gradient terms, so the anchor does not move the minimiser on the grid."""
    h, w = t.naive.shape[:2]
    ppu = t.ppu
    grid = image_grid(w, h).reshape(-1, 2)
    one_px = np.float32(2.0 / w)  # one pixel, in coordinates
    vx, vy = poisson.x_valid(h, w).reshape(-1), poisson.y_valid(h, w).reshape(-1)
    gpx, gpy = t.pixel_units()
    centres = jnp.asarray(grid)
    n_px = h * w
    f = _apply_fn(graphdef)
    mu = float(cfg.anchor_weight) if gradient else 1.0
    anchor = jnp.asarray(np.asarray(exact).reshape(-1, 3), jnp.float32)
    nb_a = min(cfg.batch_pixels, n_px)
    ex, ey = jnp.array([1.0, 0.0], jnp.float32), jnp.array([0.0, 1.0], jnp.float32)
    kk = cfg.samples_per_pair
    lam = float(cfg.color_weight) if gradient else 0.0
    if gradient:
        px, py = jnp.asarray(grid[vx]), jnp.asarray(grid[vy])
        tgx = jnp.asarray(gpx.reshape(-1, 3)[vx], jnp.float32)
        tgy = jnp.asarray(gpy.reshape(-1, 3)[vy], jnp.float32)
        naive = jnp.asarray(t.naive.reshape(-1, 3), jnp.float32)
        lap_t = jnp.asarray(-poisson.divergence_adjoint(gpx, gpy).reshape(-1, 3), jnp.float32)
        # Weights make the loss an estimate of the exact objective divided by H*W.
        wx, wy = px.shape[0] / n_px, py.shape[0] / n_px
        nb_x, nb_y = min(cfg.batch_pairs, px.shape[0]), min(cfg.batch_pairs, py.shape[0])
        nb_c = min(cfg.batch_pairs, n_px)

    def deriv(p, c, d):
        return jax.jvp(lambda q: f(p, q), (c,), (jnp.broadcast_to(d, c.shape),))[1]

    def deriv2(p, c, d):
        return jax.jvp(lambda q: deriv(p, q, d), (c,), (jnp.broadcast_to(d, c.shape),))[1]

    def segment_mean(p, start, d, key):
        """Mean of df/d(d) over K stratified random points of each segment, in pixel units."""
        n = start.shape[0]
        if cfg.sampling == "jitter":
            s = (jnp.arange(kk)[None, :] + jax.random.uniform(key, (n, kk))) / kk
        else:
            s = jnp.broadcast_to((jnp.arange(kk) + 0.5) / kk, (n, kk))
        pts = (start[:, None, :] + s[..., None] * one_px * d).reshape(n * kk, 2)
        return deriv(p, pts, d).reshape(n, kk, -1).mean(1) / ppu

    def bilinear(i, d):
        """E interpolated bilinearly at pixel i's centre + d (pixels; constant beyond the outer
        centres): the continuous extension the gradient objective prefers (its derivative is
        constant along every pair segment, and its differences are E's)."""
        u = jnp.clip(i % w + d[:, 0], 0, w - 1)
        v = jnp.clip(i // w + d[:, 1], 0, h - 1)
        x0, y0 = jnp.floor(u).astype(jnp.int32), jnp.floor(v).astype(jnp.int32)
        x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
        fx, fy = (u - x0)[:, None], (v - y0)[:, None]
        top = anchor[y0 * w + x0] * (1 - fx) + anchor[y0 * w + x1] * fx
        bottom = anchor[y1 * w + x0] * (1 - fx) + anchor[y1 * w + x1] * fx
        return top * (1 - fy) + bottom * fy

    def pick(key, n_all, n):
        if n == n_all:
            return jnp.arange(n_all)
        return jax.random.randint(key, (n,), 0, n_all)

    def mse(a):
        return jnp.mean(jnp.sum(jnp.square(a), -1)) if a.shape[0] else 0.0

    def loss_fn(p, key):
        k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
        loss = 0.0
        if gradient and cfg.order == 1:
            ix, iy = pick(k1, px.shape[0], nb_x), pick(k2, py.shape[0], nb_y)
            loss = wx * mse(segment_mean(p, px[ix], ex, k3) - tgx[ix])
            loss = loss + wy * mse(segment_mean(p, py[iy], ey, k4) - tgy[iy])
        elif gradient:
            ic = pick(k1, n_px, nb_c)
            c = centres[ic]
            lap = (deriv2(p, c, ex) + deriv2(p, c, ey)) / (ppu * ppu)
            loss = mse(lap - lap_t[ic])
        if lam > 0:
            ic = pick(k5, n_px, nb_c)
            loss = loss + lam * mse(f(p, centres[ic]) - naive[ic])
        if mu > 0:
            ia = pick(k6, n_px, nb_a)
            if gradient or cfg.jitter == 0:
                loss = loss + mu * mse(f(p, centres[ia]) - anchor[ia])
            else:
                d = cfg.jitter * (jax.random.uniform(k1, (ia.shape[0], 2)) - 0.5)  # pixels
                loss = loss + mu * mse(f(p, centres[ia] + d * one_px) - bilinear(ia, d))
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state, batch):
        key, sub = jax.random.split(state["key"])
        p = state["params"]
        loss, g = grad_fn(p, sub)
        up, opt = tx.update(g, state["opt"], p)
        metrics = {"loss": loss}
        if not gradient:  # the fit's PSNR vs E on this step's pixels (the loss sums 3 channels)
            metrics["psnr"] = -10.0 * jnp.log10(jnp.maximum(loss / 3.0, 1e-12))
        return {**state, "params": optax.apply_updates(p, up), "opt": opt, "key": key}, metrics

    return engine.lr_scaled(step)


@dataclass
class GradientField:
    """A fitted blend field and how the fit went."""

    graphdef: Any
    params: Any
    stats: engine.LoopStats
    final_loss: float
    tally: guard.Tally
    attempts: list[dict[str, Any]]  # every try: lr, seed, outcome


def _phase(t, cfg, graphdef, params, exact, gradient: bool, steps: int, lr: float, seed: int, reporter, flat_loss, tally):
    """One phase through the engine, judged by the one guard (its rollbacks added to
    `tally`); returns (params, stats, the window mean loss it ended on)."""
    warm = min(cfg.warmup_steps, steps - 1)
    tx = optax.adam(engine.schedule(lr, steps, warm, cfg.final_lr_fraction))
    metrics = ("loss",) if gradient else ("loss", "psnr")
    runner = engine.Runner(make_step(t, cfg, graphdef, tx, exact, gradient), metrics=metrics, donate=False)  # a redone window needs its start
    state = {"params": params, "opt": tx.init(params), "key": jax.random.key(seed + 1), "lr_scale": jnp.float32(1.0)}
    what = "blend refine" if gradient else "blend fit"
    policy = guard.Policy(warmup=warm, trivial=flat_loss, trivial_name=f"{FLAT_FRACTION:g} x a flat image's",
                          collapse_factor=COLLAPSE_FACTOR, learn_margin=FLAT_FRACTION)
    watch = guard.Guard(policy, what)
    loop = engine.Loop(runner, total=steps, guard=watch, reporter=reporter, chunk_seconds=CHUNK_SECONDS, what=what)
    try:
        state, stats = loop.run(state)
    finally:
        tally.rollbacks += watch.rollbacks
    return state["params"], stats, watch.last_mean


def fit_gradient_field(t: Targets, cfg: BlendConfig, exact: np.ndarray, reporter=None, quality=None) -> GradientField:
    """Fit the SIREN f to the blend, through the engine, in up to two phases:

    1. fit: f ~ E (`exact`, the exact solution) at the pixel centres, `cfg.steps` steps;
    2. refine (if `cfg.refine_steps`): the gradient objective (order 1: grad f ~ G on the pixel
       pairs; order 2: lap f ~ div G) plus `anchor_weight` |f - E|^2, at `refine_lr`.

    The one failure policy (`neurimg.guard`): windows are judged and rolled back; an attempt
    that fails (the guard, or `quality(graphdef, params)` returning a reason) starts again
    (`guard.attempts`: new seed, lower rates); then `TrainingFailed`, exit code 1. `cfg` must
    be resolved (`BlendConfig.resolved`)."""
    anchored = np.asarray(exact, np.float64)
    flat_fit = float(np.mean(np.sum((anchored - anchored.mean((0, 1))) ** 2, -1)))
    attempts: list[dict[str, Any]] = []
    tally = guard.Tally()

    def attempt(k: int, factor: float) -> GradientField:
        seed = cfg.seed + k
        default = BlendConfig(order=cfg.order)
        lr = guard.restart_rate(cfg.peak_lr, default.peak_lr, factor)
        refine_lr = guard.restart_rate(cfg.refine_peak_lr, default.refine_peak_lr, factor)
        info = {"lr": lr, "seed": seed, **({"refine_lr": refine_lr} if cfg.refine_steps else {})}
        attempts.append(info)
        graphdef, params = siren.init_params(cfg.model, 1, seed)
        try:
            params, stats, last = _phase(t, cfg, graphdef, params, anchored, False, cfg.steps, lr, seed, reporter, flat_fit, tally)
            if cfg.refine_steps:
                params, stats, last = _phase(t, cfg, graphdef, params, anchored, True, cfg.refine_steps, refine_lr, seed + 1000, reporter, math.inf, tally)
            reason = quality(graphdef, params) if quality is not None else None
            if reason is not None:
                raise guard.TrainingFailed(f"the blend field collapsed ({reason})", HINT)
        except guard.TrainingFailed as e:
            info["outcome"] = e.reason
            raise guard.TrainingFailed(e.reason, HINT) from None
        info["outcome"] = "ok"
        return GradientField(graphdef, params, stats, last, tally, attempts)

    return guard.attempts(attempt, reporter, "blend", tally=tally)



def _gradient_fn(graphdef):
    """The field's derivative as a field: params = (network, direction (2,))."""
    field = single_image_field(graphdef)

    def fn(params, coords, ids):
        net, d = params
        return jax.jvp(lambda q: field(net, q, ids), (coords,), (jnp.broadcast_to(d, coords.shape),))[1]

    return fn


@functools.lru_cache(maxsize=4)
def _evaluators(graphdef) -> tuple[GridEvaluator, GridEvaluator]:
    """(field, gradient) evaluators of a network shape, kept so repeated renders compile once."""
    return GridEvaluator(single_image_field(graphdef), clip=False), GridEvaluator(_gradient_fn(graphdef), clip=False)


def siren_gradients(graphdef, params, h: int, w: int):
    """Autodiff gradient of f at the pair midpoints (half a pixel right of / below each pixel
    centre), per unit coordinate: gx, gy (H, W, 3) float64, 0 where not a pixel pair."""
    ev = _evaluators(graphdef)[1]
    gx = ev.grid((params, jnp.array([1.0, 0.0])), (w, h), (w, h), (0.5, 0.0, w + 0.5, float(h)))
    gy = ev.grid((params, jnp.array([0.0, 1.0])), (w, h), (w, h), (0.0, 0.5, float(w), h + 0.5))
    gx = gx.astype(np.float64) * poisson.x_valid(h, w)[..., None]
    gy = gy.astype(np.float64) * poisson.y_valid(h, w)[..., None]
    return gx, gy


def render_siren(graphdef, params, h: int, w: int, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """f on the pixel centres of the canvas (or of a finer/coarser out_size = (W', H') grid over
    the same rectangle), unclipped float64 (H', W', 3)."""
    return _evaluators(graphdef)[0].grid(params, (w, h), out_size).astype(np.float64)


@dataclass
class BlendResult:
    image: np.ndarray  # (H', W', 3) float in [0, 1]: the output
    exact: np.ndarray  # (H, W, 3) the clipped exact solution, for comparison
    report: dict[str, Any]


def gradient_stats(fx, fy, gx, gy) -> tuple[float, float]:
    """(MSE, cosine similarity) of two gradient fields over the valid pixel pairs."""
    h, w = gx.shape[:2]
    vx, vy = poisson.x_valid(h, w), poisson.y_valid(h, w)
    a = np.concatenate([fx[vx].ravel(), fy[vy].ravel()])
    b = np.concatenate([gx[vx].ravel(), gy[vy].ravel()])
    mse_ = float(np.mean((a - b) ** 2)) if a.size else 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return mse_, 1.0
    if na == 0 or nb == 0:
        return mse_, 0.0
    return mse_, float(a @ b / (na * nb))


def score(image: np.ndarray, a: np.ndarray, b: np.ndarray, mode: str = "mixed") -> dict[str, float]:
    """How close a blend on the pixel grid (H, W, 3) of two same-size images is to the exact
    full-canvas solve of `mode`: PSNR against it (both clipped), the cosine and MSE of the
    image's forward differences with the target gradient field, and the largest per-channel
    difference of mean colour. The same figures `blend` reports, for blends made elsewhere
    (the GAN's, the naive average's)."""
    a = np.asarray(a, np.float64)
    t = targets(a, np.asarray(b, np.float64), np.ones(a.shape[:2], bool), mode)
    exact_c = np.clip(exact_solution(t), 0.0, 1.0)
    img = np.clip(np.asarray(image, np.float64), 0.0, 1.0)
    fx, fy = (d * t.ppu for d in poisson.forward_differences(img))
    gmse, cos = gradient_stats(fx, fy, t.gx, t.gy)
    return {"psnr_vs_exact": psnr(img, exact_c), "gradient_cosine": cos, "gradient_mse": gmse,
            "mean_color_error": float(np.abs(img.mean((0, 1)) - exact_c.mean((0, 1))).max())}


def blend(
    a: np.ndarray,
    b: np.ndarray,
    cfg: BlendConfig,
    offset: tuple[int, int] | None = None,
    mask: np.ndarray | None = None,
    out_size: tuple[int, int] | None = None,
    reporter=None,
) -> BlendResult:
    """Blend B into A (float RGB (H, W, 3) arrays in [0, 1]); see the module docstring.

    `out_size` = (W', H') renders the SIREN at another resolution over the same rectangle."""
    cfg.validate()
    t0 = time.perf_counter()
    a = np.asarray(a, np.float64)
    h, w = a.shape[:2]
    cfg = cfg.resolved(h * w)
    b_canvas, inside = place(a, np.asarray(b, np.float64), offset, mask)
    t = targets(a, b_canvas, inside, cfg.mode)
    exact = exact_solution(t, cfg.color_weight)
    exact_c = np.clip(exact, 0.0, 1.0)
    ex_fx, ex_fy = (d * t.ppu for d in poisson.forward_differences(exact))
    exact_cos = gradient_stats(ex_fx, ex_fy, t.gx, t.gy)[1]
    extra: dict[str, Any] = {"rollbacks": 0, "restarts": 0}  # nothing trained: nothing to redo
    if cfg.solver == "exact":
        if out_size is not None and tuple(out_size) != (w, h):
            raise NeurimgError("--solver exact works on the pixel grid only; drop --scale")
        fx, fy = ex_fx, ex_fy
        on_grid = out = exact_c
    else:

        flat_err = float(np.mean((exact - exact.mean((0, 1))) ** 2))

        seen: dict[str, Any] = {}  # the last field checked: its render and gradients, reused below

        def quality(graphdef, params):
            """None, or why the fitted field counts as collapsed: its gradient cosine is low and
            its values are hardly closer to E than a flat image (mean-matched, unclipped)."""
            grads = siren_gradients(graphdef, params, h, w)
            raw = render_siren(graphdef, params, h, w)
            seen.update(params=params, raw=raw, grads=grads)
            c = gradient_stats(*grads, t.gx, t.gy)[1]
            err = float(np.mean((raw - raw.mean((0, 1)) - exact + exact.mean((0, 1))) ** 2))
            gain = 10 * math.log10(flat_err / err) if err > 0 and flat_err > 0 else math.inf
            if not (c >= COLLAPSE_COSINE * exact_cos or gain >= COLLAPSE_GAIN_DB):
                return (f"gradient cosine {c:.3f} with the target, the exact solve's {exact_cos:.3f}; "
                        f"{gain:.1f} dB closer to the exact solution than a flat image")
            return None

        fitted = fit_gradient_field(t, cfg, exact, reporter, quality)
        graphdef, params, stats = fitted.graphdef, fitted.params, fitted.stats
        assert seen["params"] is params  # the accepted attempt was the last one checked
        raw, (fx, fy) = seen["raw"], seen["grads"]  # a constant shift leaves the gradients as they are
        shift = anchor_shift(raw, exact_c.mean((0, 1)))
        params = dict(params)
        params["out_bias"] = params["out_bias"] + jnp.asarray(shift, jnp.float32)
        on_grid = np.clip(raw + shift, 0.0, 1.0)
        out = on_grid
        if out_size is not None and tuple(out_size) != (w, h):
            out = np.clip(render_siren(graphdef, params, h, w, out_size), 0.0, 1.0)
        extra = {
            "compile_seconds": round(stats.compile_seconds, 3),
            "steps_per_second": round(stats.steps_per_second, 2),
            "final_loss": fitted.final_loss,
            **fitted.tally.summary(),
            "attempts": fitted.attempts,
        }
    gmse, cos = gradient_stats(fx, fy, t.gx, t.gy)
    report = {
        "mode": cfg.mode,
        "order": cfg.order,
        "solver": cfg.solver,
        "width": int(out.shape[1]),
        "height": int(out.shape[0]),
        "gradient_mse": gmse,
        "gradient_cosine": cos,
        "exact_gradient_cosine": exact_cos,
        "psnr_vs_exact": psnr(on_grid, exact_c),
        "mean_color_error": float(np.abs(on_grid.mean((0, 1)) - exact_c.mean((0, 1))).max()),
        "seconds": time.perf_counter() - t0,
        **extra,
        "config": asdict(cfg),
    }
    return BlendResult(out, exact_c, report)
