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

The SIREN f(x, y) -> RGB is fitted so that df/dx matches G_x on the segment between the two
pixel centres of each horizontal pair (likewise y). Each step averages the autodiff derivative
over K stratified random points of every segment ("jitter"; point k uniform in the k-th of K
equal parts): the average estimates the segment's integral, the pixel difference that the
discrete problem constrains, and the loss E|mean - G|^2 = |integral - G|^2 + variance only
penalises a derivative that varies along the segment through the variance, which shrinks like
1/K^3 for a smooth one (K = 1: the plain pointwise jitter loss). `order=2` fits the network's Laplacian at
the pixel centres to the divergence of G instead (as in the SIREN paper's Poisson experiments).

Colour: gradients fix an image up to a constant per channel. The exact solution has the naive
average's per-channel mean; the SIREN output is shifted so its *clipped* per-channel mean equals
the clipped exact solution's (the same anchor carried through the clip to [0, 1]). Output is
clipped, never rescaled.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg import poisson, siren
from neurimg.config import ModelConfig
from neurimg.coords import image_grid, region_grid
from neurimg.errors import NeurimgError
from neurimg.metrics import psnr

MODES = ("sum", "mean", "mixed", "replace")
SOLVERS = ("siren", "exact")
MAX_CHUNK = 1000  # most optimizer steps per jitted call (size of its loss buffer)
CHUNK_SECONDS = 0.5  # aim for progress updates about this often
RENDER_CHUNK = 1 << 14  # points per forward call when rendering
COLLAPSE_FACTOR = 4.0  # a chunk ending with a loss this many times the best chunk mean is redone
MAX_ROLLBACKS = 6


@dataclass(frozen=True)
class BlendConfig:
    """Every setting of a blend, with its default (chosen by measurement, bench/RESULTS.md)."""

    mode: str = "sum"
    order: int = 1  # 1: fit the gradient; 2: fit the Laplacian
    color_weight: float = 0.0  # weight of |f - N|^2 against the gradient term (pixel units)
    solver: str = "siren"  # or "exact": the DCT Poisson solve on the pixel grid
    # A small network suffices for one image; the gradient loss costs ~4x a plain fit step.
    width: int = 96
    hidden_layers: int = 3
    w0: float = 30.0
    steps: int = 1500
    # Peak Adam learning rate (linear warm-up, cosine decay to 5%); None: 7e-4 for order 1,
    # 1e-4 for order 2 (at 7e-4 the Laplacian fit collapsed to a flat image, bench/RESULTS.md).
    lr: float | None = None
    warmup_steps: int = 50
    batch_pairs: int = 512  # pixel pairs per direction per step (all of them if fewer)
    sampling: str = "jitter"  # "jitter" (random points on each segment) or "mid" (fixed points)
    samples_per_pair: int = 2  # K: the derivative is averaged over K stratified points per segment
    seed: int = 0

    def validate(self) -> "BlendConfig":
        if self.mode not in MODES:
            raise NeurimgError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise NeurimgError(f"--order must be 1 (gradient) or 2 (Laplacian), got {self.order}")
        if self.solver not in SOLVERS:
            raise NeurimgError(f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not math.isfinite(self.color_weight) or self.color_weight < 0:
            raise NeurimgError(f"--color-weight must be a finite number >= 0, got {self.color_weight}")
        if self.sampling not in ("jitter", "mid"):
            raise NeurimgError(f"sampling must be jitter or mid, got {self.sampling!r}")
        _model_cfg(self).validate()
        for name in ("steps", "batch_pairs", "samples_per_pair"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise NeurimgError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
        if self.steps > 10_000_000:
            raise NeurimgError(f"--steps {self.steps} is absurdly large")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0 or self.lr > 10):
            raise NeurimgError(f"--lr must be a positive number (at most 10), got {self.lr}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise NeurimgError(f"warmup steps must be an integer >= 0, got {self.warmup_steps}")
        return self

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (7e-4 if self.order == 1 else 1e-4)


def _model_cfg(cfg: BlendConfig) -> ModelConfig:
    return ModelConfig(width=cfg.width, hidden_layers=cfg.hidden_layers, latent_dim=1, w0=float(cfg.w0))


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


@dataclass
class FitStats:
    compile_seconds: float
    train_seconds: float
    steps: int
    final_loss: float
    rollbacks: int = 0  # chunks redone at half the lr after a collapse


def _apply_fn(graphdef):
    ids = jnp.zeros((1,), jnp.int32)

    def f(params, c):
        """(P, 2) -> (P, 3)."""
        return siren.apply(graphdef, params, c[None], ids)[0]

    return f


def fit_siren(t: Targets, cfg: BlendConfig, reporter=None):
    """Fit f so grad f ~ G (order 1) or lap f ~ div G (order 2).

    Returns (graphdef, params, FitStats). `reporter` gets the progress (see `neurimg.progress`);
    its "PSNR" is that of the fitted gradient field, 10 log10(1 / loss), in pixel units."""
    h, w = t.naive.shape[:2]
    ppu = t.ppu
    grid = image_grid(w, h).reshape(-1, 2)
    one_px = np.float32(2.0 / w)  # one pixel, in coordinates
    vx, vy = poisson.x_valid(h, w).reshape(-1), poisson.y_valid(h, w).reshape(-1)
    gpx, gpy = t.pixel_units()
    px, py = jnp.asarray(grid[vx]), jnp.asarray(grid[vy])
    tx = jnp.asarray(gpx.reshape(-1, 3)[vx], jnp.float32)
    ty = jnp.asarray(gpy.reshape(-1, 3)[vy], jnp.float32)
    centres = jnp.asarray(grid)
    naive = jnp.asarray(t.naive.reshape(-1, 3), jnp.float32)
    lap_t = jnp.asarray(-poisson.divergence_adjoint(gpx, gpy).reshape(-1, 3), jnp.float32)
    n_px = h * w
    # Weights make the loss an estimate of the exact objective divided by H*W.
    wx, wy = px.shape[0] / n_px, py.shape[0] / n_px

    graphdef, params = siren.init_params(_model_cfg(cfg), 1, cfg.seed)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.peak_lr, min(cfg.warmup_steps, cfg.steps - 1), max(cfg.steps, 1), cfg.peak_lr * 0.05
    )
    opt = optax.adam(sched)
    opt_state = opt.init(params)
    f = _apply_fn(graphdef)
    nb_x, nb_y = min(cfg.batch_pairs, px.shape[0]), min(cfg.batch_pairs, py.shape[0])
    nb_c = min(cfg.batch_pairs, n_px)
    lam = float(cfg.color_weight)
    ex, ey = jnp.array([1.0, 0.0], jnp.float32), jnp.array([0.0, 1.0], jnp.float32)

    def deriv(p, c, d):
        return jax.jvp(lambda q: f(p, q), (c,), (jnp.broadcast_to(d, c.shape),))[1]

    def deriv2(p, c, d):
        return jax.jvp(lambda q: deriv(p, q, d), (c,), (jnp.broadcast_to(d, c.shape),))[1]

    kk = cfg.samples_per_pair

    def segment_mean(p, start, d, key):
        """Mean of df/d(d) over K stratified random points of each segment, in pixel units."""
        n = start.shape[0]
        if cfg.sampling == "jitter":
            s = (jnp.arange(kk)[None, :] + jax.random.uniform(key, (n, kk))) / kk
        else:
            s = jnp.broadcast_to((jnp.arange(kk) + 0.5) / kk, (n, kk))
        pts = (start[:, None, :] + s[..., None] * one_px * d).reshape(n * kk, 2)
        return deriv(p, pts, d).reshape(n, kk, -1).mean(1) / ppu

    def pick(key, n_all, n):
        if n == n_all:
            return jnp.arange(n_all)
        return jax.random.randint(key, (n,), 0, n_all)

    def mse(a):
        return jnp.mean(jnp.sum(jnp.square(a), -1)) if a.shape[0] else 0.0

    def loss_fn(p, key):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        if cfg.order == 1:
            ix, iy = pick(k1, px.shape[0], nb_x), pick(k2, py.shape[0], nb_y)
            loss = wx * mse(segment_mean(p, px[ix], ex, k3) - tx[ix])
            loss = loss + wy * mse(segment_mean(p, py[iy], ey, k4) - ty[iy])
        else:
            ic = pick(k1, n_px, nb_c)
            c = centres[ic]
            lap = (deriv2(p, c, ex) + deriv2(p, c, ey)) / (ppu * ppu)
            loss = mse(lap - lap_t[ic])
        if lam > 0:
            ic = pick(k5, n_px, nb_c)
            loss = loss + lam * mse(f(p, centres[ic]) - naive[ic])
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def body(i, carry):
        p, o, key, losses, lr_scale = carry
        key, sub = jax.random.split(key)
        loss, g = grad_fn(p, sub)
        up, o = opt.update(g, o, p)
        up = jax.tree.map(lambda u: u * lr_scale, up)  # Adam's step is linear in its lr
        return optax.apply_updates(p, up), o, key, losses.at[i].set(loss), lr_scale

    def run(p, o, k, n, lr_scale):  # keys travel as raw data so the state is a plain array pytree
        losses = jnp.full((MAX_CHUNK,), jnp.nan, jnp.float32)
        p, o, k, losses, _ = jax.lax.fori_loop(0, n, body, (p, o, jax.random.wrap_key_data(k), losses, lr_scale))
        return p, o, jax.random.key_data(k), losses

    key = jax.random.key_data(jax.random.key(cfg.seed + 1))
    t0 = time.perf_counter()
    step_fn = jax.jit(run).lower(params, opt_state, key, jnp.int32(1), jnp.float32(1)).compile()
    compile_s = time.perf_counter() - t0
    done, sps, train_s, last = 0, None, 0.0, float("nan")
    best, lr_scale, rollbacks, first = math.inf, 1.0, 0, None
    if reporter is not None:
        reporter.start(cfg.steps, 0)
    try:
        while done < cfg.steps:
            n = min(MAX_CHUNK, cfg.steps - done, max(1, int(sps * CHUNK_SECONDS)) if sps else 10)
            tc = time.perf_counter()
            new = step_fn(params, opt_state, key, jnp.int32(n), jnp.float32(lr_scale))
            l = np.asarray(new[3])[:n]
            train_s += time.perf_counter() - tc
            # A SIREN trained too fast can collapse to a near-constant function within a few
            # steps (seen at lr 1e-3 with 512 pairs, or w0 45): the loss jumps to that of a
            # flat image. Then redo the chunk from the state before it at half the lr.
            collapsed = not np.all(np.isfinite(l)) or (done > cfg.warmup_steps and l[-1] > COLLAPSE_FACTOR * best)
            if collapsed:
                rollbacks += 1
                if rollbacks > MAX_ROLLBACKS:
                    bad = int(np.argmax(~np.isfinite(l))) if not np.all(np.isfinite(l)) else n - 1
                    raise NeurimgError(f"blend fit diverged at step {done + bad + 1}; try a lower --lr", exit_code=1)
                lr_scale *= 0.5
                if reporter is not None:
                    reporter.message(f"blend: loss jumped at step ~{done + n}; redoing the last {n} steps at lr x {lr_scale:g}")
                continue
            params, opt_state, key = new[0], new[1], new[2]
            done += n
            sps = done / max(train_s, 1e-9)
            last = float(l[-1])
            best = min(best, float(np.mean(l)))
            if reporter is not None:
                reporter.update(done, last, float(-10 * np.log10(max(last, 1e-12))), sps)
            if first is None:
                first = float(np.mean(l))
    finally:
        if reporter is not None:
            reporter.stop()
    if reporter is not None and first is not None and last > 0.5 * first:
        reporter.message("blend: the fit hardly improved on its start; try a lower --lr or more --steps")
    return graphdef, params, FitStats(compile_s, train_s, done, last, rollbacks)


def siren_gradients(graphdef, params, h: int, w: int):
    """Autodiff gradient of f at the pair midpoints, per unit coordinate: gx, gy (H, W, 3)."""
    f = _apply_fn(graphdef)
    grid = image_grid(w, h).reshape(-1, 2)

    @jax.jit
    def grads(c):
        ones = jnp.ones_like(c[:, :1])
        dx = jax.jvp(lambda q: f(params, q), (c + jnp.array([1.0 / w, 0.0]),), (ones * jnp.array([1.0, 0.0]),))[1]
        dy = jax.jvp(lambda q: f(params, q), (c + jnp.array([0.0, 1.0 / w]),), (ones * jnp.array([0.0, 1.0]),))[1]
        return dx, dy

    gx, gy = _chunked(grads, grid, 2)
    gx = gx.reshape(h, w, 3) * poisson.x_valid(h, w)[..., None]
    gy = gy.reshape(h, w, 3) * poisson.y_valid(h, w)[..., None]
    return gx, gy


def _chunked(fn, points: np.ndarray, n_out: int):
    """Apply a jitted fn on fixed-size chunks of points (one compile), concatenate in float64."""
    n = points.shape[0]
    size = min(RENDER_CHUNK, n)
    outs = [[] for _ in range(n_out)]
    for s in range(0, n, size):
        chunk = points[s : s + size]
        k = chunk.shape[0]
        if k < size:
            chunk = np.concatenate([chunk, np.zeros((size - k, 2), chunk.dtype)])
        res = fn(jnp.asarray(chunk))
        res = res if isinstance(res, tuple) else (res,)
        for o, r in zip(outs, res):
            o.append(np.asarray(r, np.float64)[:k])
    return tuple(np.concatenate(o) for o in outs)


def render_siren(graphdef, params, h: int, w: int, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """f on the pixel centres of the canvas (or of a finer/coarser out_size = (W', H') grid over
    the same rectangle), unclipped float64 (H', W', 3)."""
    ow, oh = out_size if out_size is not None else (w, h)
    grid = region_grid(w, h, (0.0, 0.0, float(w), float(h)), ow, oh).reshape(-1, 2)
    f = _apply_fn(graphdef)
    (out,) = _chunked(jax.jit(lambda c: f(params, c)), grid, 1)
    return out.reshape(oh, ow, 3)


# --------------------------------------------------------------------------------------------
# the whole blend


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
    b_canvas, inside = place(a, np.asarray(b, np.float64), offset, mask)
    t = targets(a, b_canvas, inside, cfg.mode)
    exact = exact_solution(t, cfg.color_weight)
    exact_c = np.clip(exact, 0.0, 1.0)
    extra: dict[str, Any] = {}
    if cfg.solver == "exact":
        if out_size is not None and tuple(out_size) != (w, h):
            raise NeurimgError("--solver exact works on the pixel grid only; drop --scale")
        fx, fy = (d * t.ppu for d in poisson.forward_differences(exact))
        on_grid = out = exact_c
    else:
        graphdef, params, stats = fit_siren(t, cfg, reporter)
        raw = render_siren(graphdef, params, h, w)
        shift = anchor_shift(raw, exact_c.mean((0, 1)))
        params = dict(params)
        params["out_bias"] = params["out_bias"] + jnp.asarray(shift, jnp.float32)
        on_grid = np.clip(raw + shift, 0.0, 1.0)
        fx, fy = siren_gradients(graphdef, params, h, w)
        out = on_grid
        if out_size is not None and tuple(out_size) != (w, h):
            out = np.clip(render_siren(graphdef, params, h, w, out_size), 0.0, 1.0)
        extra = {
            "compile_seconds": round(stats.compile_seconds, 3),
            "steps_per_second": round(stats.steps / max(stats.train_seconds, 1e-9), 2),
            "final_loss": stats.final_loss,
            "rollbacks": stats.rollbacks,
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
        "psnr_vs_exact": psnr(on_grid, exact_c),
        "mean_color_error": float(np.abs(on_grid.mean((0, 1)) - exact_c.mean((0, 1))).max()),
        "seconds": time.perf_counter() - t0,
        **extra,
        "config": {**asdict(cfg), "lr": cfg.peak_lr},
    }
    return BlendResult(out, exact_c, report)
