"""Modulated SIREN: one network, many images.

Architecture (Sitzmann et al. 2020, "Implicit Neural Representations with Periodic Activation
Functions"; modulation as in Dupont et al. 2022, "From data to functa"):

    h_0 = (x, y)
    h_l = sin(w0 * (W_l h_{l-1} + b_l + s_{l,k}))      l = 1 .. 1 + hidden_layers
    rgb = W_out h_L + b_out + 0.5

where s_{l,k} is the shift modulation of layer l for image k: s_k = z_k @ M, with z_k the
image's learned latent vector (latent_dim) and M a learned latent_dim x (L * width) matrix.
The +0.5 offset centres the initial output in the [0, 1] colour range (functa does the same).

Initialisation, as in the reference code (github.com/vsitzmann/siren, `modules.py`,
`sine_init` / `first_layer_sine_init`), with fan_in the layer's input size:
- first sine layer weights ~ U(-1/fan_in, 1/fan_in);
- all later weights (hidden and output) ~ U(-sqrt(6/fan_in)/w0, sqrt(6/fan_in)/w0), which keeps
  pre-activations ~ N(0, 1)-like at every depth (paper, Sec. 3.2);
- biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's nn.Linear default, kept by the
  reference code).
Latents start at zero, so the modulation matrix M must start random, otherwise neither would
ever receive a gradient: M ~ U(-sqrt(6/latent_dim)/w0, sqrt(6/latent_dim)/w0), so a unit-size
latent shifts each pre-activation by O(1) (the shift is multiplied by w0 like the rest).

Latent grid (`ModelConfig.grid` > 0): each image also owns a grid of G x R nodes with C values
each (spacing d = 2 / (G - 1) in both axes, x from -1 to 1, the rows centred on y = 0;
`config.grid_rows_for`). At a point the grid is interpolated bilinearly (clamped at its border)
and mapped by a learned C x width matrix N to a per-point shift of the first sine layer:

    s_{1,k}(x) = z_k @ M_1 + bilerp(Z_k, x) @ N          (the other layers as above)

so an image holds detail where it has it, at C x width multiply-adds per point. Shifting the
later layers too measured no better (48 icons: 51.21 dB with all four, 50.83 with two, 51.39
with the first alone; bench/RESULTS.md, "A latent grid"). The grid is stored after the latent
in the image's row of `latents` (`ModelConfig.row_dim`), so everything that handles latent rows
(lazy Adam, the split over devices, morphs) handles the grid with it; it starts at zero, and N
starts like M.

Shapes: coords (B, P, 2) for B images with P points each, image ids (B,) int32 -> (B, P, 3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neurimg.config import ModelConfig


# --- sine -------------------------------------------------------------------------------------
# XLA's CPU sin/cos are not vectorised (about 0.3 G elements/s on our 2-core CPU, slower than
# the matmuls they follow). `sine` is a vectorisable sin: Cody-Waite reduction to [-pi, pi],
# a fold to [-pi/2, pi/2], then odd/even Taylor polynomials of degree 11/12. Its JVP reuses the
# same reduction for cos, so the backward pass needs no second transcendental. Measured: max
# abs error 2.1e-7 (sin) and 2.3e-7 (cos) over [-200, 200] vs float64, ~19x faster than
# jnp.sin on CPU (bench/RESULTS.md). tests/test_siren.py checks both.
_TWO_PI_HI = np.float32(6.28125)  # few mantissa bits, so k * _TWO_PI_HI is exact
_TWO_PI_LO = np.float32(2 * np.pi - 6.28125)
_INV_TWO_PI = np.float32(1 / (2 * np.pi))
_HALF_PI = np.float32(np.pi / 2)
_PI = np.float32(np.pi)


def _reduce(x):
    k = jnp.round(x * _INV_TWO_PI)
    r = (x - k * _TWO_PI_HI) - k * _TWO_PI_LO  # in [-pi, pi]
    hi, lo = r > _HALF_PI, r < -_HALF_PI
    rf = jnp.where(hi, _PI - r, jnp.where(lo, -_PI - r, r))  # sin(rf) = sin(r)
    sign = jnp.where(hi | lo, -1.0, 1.0).astype(x.dtype)  # cos(r) = sign * cos(rf)
    return rf, sign


def _sin_poly(r):
    r2 = r * r
    p = np.float32(-1 / 39916800)
    for c in (1 / 362880, -1 / 5040, 1 / 120, -1 / 6):
        p = p * r2 + np.float32(c)
    return r + r * r2 * p


def _cos_poly(r):
    r2 = r * r
    p = np.float32(-1 / 479001600)
    for c in (1 / 3628800, -1 / 40320, 1 / 720, -1 / 24, 1 / 2):
        p = p * r2 + np.float32(c)
    return 1 - r2 * p


@jax.custom_jvp
def sine(x):
    """sin(x) for float32 arrays, fast on CPU (see the note above)."""
    return _sin_poly(_reduce(x)[0])


@sine.defjvp
def _sine_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    rf, sign = _reduce(x)
    return _sin_poly(rf), sign * _cos_poly(rf) * t


PRECISIONS = ("float32", "tf32", "bf16")


def dense(x, kernel, precision: str = "float32"):
    """x @ kernel at the given matmul precision, accumulating in float32:
    - float32: full float32 (`Precision.HIGHEST`; on GPUs JAX's default would be TF32);
    - tf32: the backend's default (TF32 on recent NVIDIA GPUs; float32 on CPU);
    - bf16: operands rounded to bfloat16, products summed in float32.
    """
    if precision == "bf16":
        return jnp.dot(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    p = jax.lax.Precision.HIGHEST if precision == "float32" else jax.lax.Precision.DEFAULT
    return jnp.dot(x, kernel, precision=p)


def _uniform(rng: np.random.Generator, shape, bound):
    # NumPy, not jax.random: eagerly, each differently shaped jax.random draw compiles its own
    # program (~3.5 s for a 4-layer model on CPU, paid by every command); NumPy takes ~1 ms.
    return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))


class SineLayer(nnx.Module):
    """y = sin(w0 * (x @ kernel + bias + shift)); kernel (fan_in, fan_out)."""

    def __init__(self, fan_in: int, fan_out: int, w0: float, first: bool, *, rng: np.random.Generator):
        bound = 1.0 / fan_in if first else math.sqrt(6.0 / fan_in) / w0
        self.kernel = nnx.Param(_uniform(rng, (fan_in, fan_out), bound))
        self.bias = nnx.Param(_uniform(rng, (fan_out,), 1.0 / math.sqrt(fan_in)))
        self.w0 = w0

    def __call__(self, x, shift, precision: str = "float32", point=None):
        """x (B*P, fan_in), shift (B, fan_out) for B images of P points, and optionally a
        per-point shift (B*P, fan_out) -> (B*P, fan_out)."""
        # Keep the matmul 2-D: XLA's CPU dot is ~2x slower on (B, P, W) operands.
        pre = dense(x, self.kernel[...], precision) + self.bias[...]
        if point is not None:
            pre = pre + point
        b = shift.shape[0]
        pre = (pre.reshape(b, -1, pre.shape[-1]) + shift[:, None, :]).reshape(pre.shape)
        return sine(self.w0 * pre)


class ModulatedSiren(nnx.Module):
    """A SIREN shared by `num_images` images, each with its own latent code."""

    def __init__(self, cfg: ModelConfig, num_images: int, *, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        n_sine = cfg.hidden_layers + 1
        self.layers = nnx.List(
            [
                SineLayer(2 if i == 0 else cfg.width, cfg.width, cfg.w0, i == 0, rng=rng)
                for i in range(n_sine)
            ]
        )
        out_bound = math.sqrt(6.0 / cfg.width) / cfg.w0
        self.out_kernel = nnx.Param(_uniform(rng, (cfg.width, cfg.out_channels), out_bound))
        self.out_bias = nnx.Param(
            _uniform(rng, (cfg.out_channels,), 1.0 / math.sqrt(cfg.width))
        )
        self.latents = nnx.Param(jnp.zeros((num_images, cfg.row_dim), jnp.float32))
        mod_bound = math.sqrt(6.0 / cfg.latent_dim) / cfg.w0
        self.modulation = nnx.Param(
            _uniform(rng, (cfg.latent_dim, n_sine * cfg.width), mod_bound)
        )
        if cfg.grid:
            grid_bound = math.sqrt(6.0 / cfg.grid_channels) / cfg.w0
            self.grid_modulation = nnx.Param(_uniform(rng, (cfg.grid_channels, cfg.width), grid_bound))

    def rows(self, image_ids):
        """The images' rows of the latent table (B, row_dim); image_ids None: the table itself
        (the trainer passes each step's rows as the table, and a gather would cost a scatter
        of whole rows in the backward pass)."""
        lat = self.latents[...]
        return lat if image_ids is None else lat[image_ids]

    def shifts(self, rows):
        """Per-layer shift modulations of the rows' latents: (B, n_sine, width)."""
        z = rows[:, : self.cfg.latent_dim]
        s = dense(z, self.modulation[...])  # float32: on GPUs a plain @ would run as TF32
        return s.reshape(z.shape[0], len(self.layers), self.cfg.width)

    def __call__(self, coords, image_ids, precision: str = "float32"):
        """coords (B, P, 2), image_ids (B,) (or None: `rows`) -> RGB (B, P, out_channels),
        unclipped. `precision` applies to the hidden width x width matmuls (see `dense`)."""
        b, p, _ = coords.shape
        rows = self.rows(image_ids)
        shifts = self.shifts(rows)
        point = None
        if self.cfg.grid:  # the first layer's per-point shift
            point = dense(grid_lookup(rows[:, self.cfg.latent_dim :], coords, self.cfg), self.grid_modulation[...])
        h = coords.reshape(b * p, 2)
        for i, layer in enumerate(self.layers):
            # The first layer (2 inputs) stays float32: its error is multiplied by w0 at once.
            h = layer(h, shifts[:, i, :], precision if i > 0 else "float32", point if i == 0 else None)
        out = dense(h, self.out_kernel[...]) + self.out_bias[...] + 0.5
        return out.reshape(b, p, -1)


def grid_cell(coords, cols: int, rows: int):
    """Where points fall in a latent grid (see "Latent grid" above): coords (..., 2) ->
    (i0, j0, fu, fv): the lower node's column and row (int32, within [0, cols - 2] and
    [0, rows - 2]) and the fractions (float32, within [0, 1]) towards the next ones."""
    d = 2.0 / (cols - 1)
    u = jnp.clip((coords[..., 0] + 1.0) / d, 0.0, cols - 1.0)
    v = jnp.clip(coords[..., 1] / d + (rows - 1) / 2.0, 0.0, rows - 1.0)
    i0 = jnp.minimum(jnp.floor(u), cols - 2)
    j0 = jnp.minimum(jnp.floor(v), rows - 2)
    return i0.astype(jnp.int32), j0.astype(jnp.int32), u - i0, v - j0


def grid_lookup(grids, coords, cfg: ModelConfig):
    """grids (B, rows * cols * C) flat row-major, coords (B, P, 2) -> (B * P, C): each image's
    grid interpolated bilinearly at its points."""
    cols, rows, c = cfg.grid, cfg.grid_rows, cfg.grid_channels
    b, p, _ = coords.shape
    n = rows * cols
    g = grids.reshape(b * n, c)  # whole C-vectors are gathered (and scattered back): 1.7x faster than per value
    i0, j0, fu, fv = grid_cell(coords, cols, rows)
    base = (j0 * cols + i0 + (jnp.arange(b, dtype=jnp.int32) * n)[:, None]).reshape(-1)
    fu, fv = fu.reshape(-1, 1), fv.reshape(-1, 1)
    return (g[base] * ((1 - fu) * (1 - fv)) + g[base + 1] * (fu * (1 - fv))
            + g[base + cols] * ((1 - fu) * fv) + g[base + cols + 1] * (fu * fv))


def forward_flops_per_point(cfg: ModelConfig) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward evaluation at one point."""
    w = cfg.width
    grid = w * cfg.grid_channels + 4 * cfg.grid_channels if cfg.grid else 0
    return 2 * (2 * w + cfg.hidden_layers * w * w + w * cfg.out_channels + grid)


def init_params(cfg: ModelConfig, num_images: int, seed: int):
    """Build the model; return (graphdef, params) with params a pure dict of arrays. An
    automatic latent size (None) is chosen for `num_images` (`ModelConfig.for_images`)."""
    graphdef, state = nnx.split(ModulatedSiren(cfg.for_images(num_images), num_images, seed=seed))
    params = nnx.to_pure_dict(state)
    return graphdef, params


def apply(graphdef, params, coords, image_ids, precision: str = "float32"):
    """Pure forward: params (pure dict) -> RGB (B, P, 3). Usable inside jit."""
    return nnx.merge(graphdef, params)(coords, image_ids, precision)
