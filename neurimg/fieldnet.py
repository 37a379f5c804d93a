"""A fitted run's network as plain NumPy arrays, for code that runs it outside JAX: the
browser viewer (`neurimg.viewer`), the ONNX export (`neurimg.export`) and their checks.

The arrays are those of `neurimg.siren` with the frequency factor w0 folded in, so that each
sine layer is one affine map and one sine:

    h_0 = (x, y)                                  coordinates as in `neurimg.coords`
    h_l = sin(h_{l-1} @ kernels[l-1] + biases[l-1] + z @ modulations[l-1])   l = 1 .. L
    rgb = h_L @ out_kernel + out_bias             unclipped (out_bias includes the +0.5)

with kernels[l] = w0 * W_l, biases[l] = w0 * b_l, modulations[l] = w0 * M[:, l-th block], and
z (D,) the image's latent. A latent between two stored images is their linear mix
(`mix_latents`); because the shift is linear in z, mixing latents and mixing shifts agree.

With a latent grid (`neurimg.siren`, "Latent grid") an image's row is its latent z (D) and then
its grid Z (rows, cols, C), and the first sine layer also gets the per-point shift
bilerp(Z, x) @ grid_modulation (w0 folded in). Interpolation and the linear map commute, so
that shift is the bilinear interpolation of the node table Z @ grid_modulation
(`node_shifts`), which is what the viewer and the ONNX export store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neurimg.errors import NeurimgError


@dataclass
class FieldNet:
    kernels: list[np.ndarray]  # (2, width), then (width, width) per hidden layer; float32
    biases: list[np.ndarray]  # (width,) per sine layer
    modulations: list[np.ndarray]  # (latent_dim, width) per sine layer
    out_kernel: np.ndarray  # (width, 3)
    out_bias: np.ndarray  # (3,)
    latents: np.ndarray  # (N, latent_dim), one per stored image
    names: list[str]
    sizes: list[tuple[int, int]]  # (width, height) of each stored image
    latent_dim: int = 0  # D: the row's latent part (the whole row without a grid)
    grid: tuple[int, int, int] | None = None  # (cols, rows, C) of each image's latent grid
    grid_modulation: np.ndarray | None = None  # (C, width): the grid's map to the first layer's shift
    supersample: int = 1  # m: a pixel is the mean of the field over its m x m sub-squares' centres (`TrainConfig.supersample`)

    def __post_init__(self):
        if not self.latent_dim:
            self.latent_dim = self.latents.shape[1]

    @property
    def width(self) -> int:
        return self.kernels[0].shape[1]

    @staticmethod
    def from_run(stored) -> "FieldNet":
        """From a loaded run (`neurimg.api.StoredRun`)."""
        p = stored.params
        w0 = np.float32(stored.config.model.w0)
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        layers = [p["layers"][i] for i in sorted(p["layers"])]
        width = stored.config.model.width
        mod = f32(p["modulation"])
        m = stored.config.model
        grid = gmod = None
        if m.grid:
            grid = (m.grid, m.grid_rows, m.grid_channels)
            gmod = w0 * f32(p["grid_modulation"])
        return FieldNet(
            kernels=[w0 * f32(layer["kernel"]) for layer in layers],
            biases=[w0 * f32(layer["bias"]) for layer in layers],
            modulations=[w0 * mod[:, i * width : (i + 1) * width] for i in range(len(layers))],
            out_kernel=f32(p["out_kernel"]),
            out_bias=f32(p["out_bias"]) + np.float32(0.5),
            latents=f32(p["latents"]),
            names=[i.name for i in stored.images],
            sizes=[(i.width, i.height) for i in stored.images],
            latent_dim=int(m.latent_dim),
            grid=grid,
            grid_modulation=gmod,
            supersample=int(stored.config.train.supersample),
        )

    def layer_biases(self, z: np.ndarray) -> list[np.ndarray]:
        """Each sine layer's bias with latent z (D,) applied: biases[l] + z @ modulations[l]."""
        z = np.asarray(z, np.float32)[: self.latent_dim]
        return [b + z @ m for b, m in zip(self.biases, self.modulations)]

    def node_shifts(self, z: np.ndarray) -> np.ndarray:
        """The first layer's per-node shift table of row z's grid: (rows, cols, width) float32."""
        cols, rows, c = self.grid
        g = np.asarray(z, np.float32)[self.latent_dim :].reshape(rows * cols, c)
        return (g @ self.grid_modulation).reshape(rows, cols, -1)

    def point_shift(self, xy: np.ndarray, z: np.ndarray):
        """The first layer's per-point shift (P, width) at points xy (P, 2) (0.0 without a grid):
        the node table interpolated bilinearly, clamped at the border (`siren.grid_cell`)."""
        if self.grid is None:
            return 0.0
        cols, rows, _ = self.grid
        i0, j0, fu, fv = grid_cell(np.asarray(xy, np.float32), cols, rows)
        t = self.node_shifts(z)
        a = t[j0, i0] * ((1 - fu) * (1 - fv))[:, None] + t[j0, i0 + 1] * (fu * (1 - fv))[:, None]
        return a + t[j0 + 1, i0] * ((1 - fu) * fv)[:, None] + t[j0 + 1, i0 + 1] * (fu * fv)[:, None]

    def forward(self, xy: np.ndarray, z: np.ndarray, *, weights_dtype=np.float32) -> np.ndarray:
        """RGB (P, 3), unclipped, at points xy (P, 2) for latent z (D,), in float32; with
        `weights_dtype` float16 the hidden and output weights are rounded to float16 first
        (what the viewer stores when that is accurate enough)."""
        rnd = lambda a: np.asarray(a, weights_dtype).astype(np.float32)  # noqa: E731
        h = np.asarray(xy, np.float32)
        for i, (k, b) in enumerate(zip(self.kernels, self.layer_biases(z))):
            h = np.sin(h @ (k if i == 0 else rnd(k)) + b + (self.point_shift(xy, z) if i == 0 else 0.0))
        return h @ rnd(self.out_kernel) + self.out_bias


def grid_cell(xy: np.ndarray, cols: int, rows: int):
    """NumPy twin of `neurimg.siren.grid_cell`: xy (P, 2) -> lower node column and row (P,)
    int, and the fractions (P,) float32 towards the next ones."""
    d = np.float32(2.0 / (cols - 1))
    u = np.clip((xy[:, 0] + np.float32(1.0)) / d, 0, cols - 1).astype(np.float32)
    v = np.clip(xy[:, 1] / d + np.float32((rows - 1) / 2.0), 0, rows - 1).astype(np.float32)
    i0 = np.minimum(np.floor(u), cols - 2)
    j0 = np.minimum(np.floor(v), rows - 2)
    return i0.astype(np.int64), j0.astype(np.int64), u - i0, v - j0


def mix_latents(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """(1 - t) a + t b, exactly a at t = 0 and exactly b at t = 1."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if t == 0:
        return a.copy()
    if t == 1:
        return b.copy()
    return ((1.0 - t) * a.astype(np.float64) + t * b.astype(np.float64)).astype(np.float32)


def parse_t(value: float, option: str = "--t") -> float:
    """A mixing weight in [0, 1]."""
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise NeurimgError(f"{option} must be a number in [0, 1] (0 is the first image, 1 the second), got {value}")
    return float(value)
