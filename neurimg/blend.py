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
Fitting the gradient objective itself was measured to fail on photos and images above 64 px
(bench/RESULTS.md, "blend on photos"): it pins the high frequencies but leaves the low ones
drifting, and at a learning rate fast enough for 256 px it collapses to a flat image. So the
field f(x, y) -> RGB is fitted to E clipped to [0, 1] (what the output shows) as one image, by
the field trainer `fit` uses (`neurimg.fit.train_field`): the same sampler, width, steps and lr
rules, and the one failure policy (`neurimg.guard`: rollbacks, fresh starts, then exit code 1
with one line that points to `--solver exact`). A blend is as good and as fast as a fit of an
image of its detail.

Colour: gradients fix an image up to a constant per channel. The exact solution has the naive
average's per-channel mean; the SIREN output is shifted so its *clipped* per-channel mean equals
the clipped exact solution's (the same anchor carried through the clip to [0, 1]). Output is
clipped, never rescaled.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from neurimg import fit, guard, poisson
from neurimg.config import BLEND_MODES as MODES
from neurimg.config import BlendConfig
from neurimg.errors import NeurimgError
from neurimg.imageset import ImageSet
from neurimg.metrics import psnr
from neurimg.render import GridEvaluator, single_image_field

HINT = "use --solver exact"  # what every failed SIREN blend suggests

__all__ = ["BlendConfig", "BlendResult", "blend", "fit_field", "targets", "place", "exact_solution"]


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
# the SIREN fit: E through the field trainer


def fit_field(exact_c: np.ndarray, cfg: BlendConfig, reporter=None) -> "fit.Trained":
    """Fit a SIREN to the clipped exact solution `exact_c` (H, W, 3) in [0, 1] with the field
    trainer `fit` uses (`neurimg.fit.train_field`: its sampler, rules, guard and restarts), the
    blend being one image (held at 16 bits) to fit. Its failures exit 1 with one line that
    points to `--solver exact`."""
    images = ImageSet.from_arrays(["blend"], ["-"], [np.asarray(exact_c, np.float32)], bits=16)
    try:
        return fit.train_field([], cfg.field_config(), images=images, reporter=reporter, what="blend fit")
    except guard.TrainingFailed as e:
        raise guard.TrainingFailed(e.reason, HINT, restartable=False) from None


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

        fitted = fit_field(exact_c, cfg, reporter)
        graphdef, params, stats = fitted.prep.graphdef, fitted.params(), fitted.stats
        raw, (fx, fy) = render_siren(graphdef, params, h, w), siren_gradients(graphdef, params, h, w)
        shift = anchor_shift(raw, exact_c.mean((0, 1)))  # a constant shift leaves the gradients as they are
        params = {**params, "out_bias": params["out_bias"] + jnp.asarray(shift, jnp.float32)}
        on_grid = np.clip(raw + shift, 0.0, 1.0)
        out = on_grid
        if out_size is not None and tuple(out_size) != (w, h):
            out = np.clip(render_siren(graphdef, params, h, w, out_size), 0.0, 1.0)
        extra = {
            "steps": stats.steps,
            "compile_seconds": round(stats.compile_seconds, 3),
            "steps_per_second": round(stats.steps_per_second, 2),
            "fit_psnr": fitted.per_image[0]["psnr"],
            **fitted.tally.summary(),
            "train": asdict(fitted.cfg),
        }
    gmse, cos = gradient_stats(fx, fy, t.gx, t.gy)
    report = {
        "mode": cfg.mode,
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
