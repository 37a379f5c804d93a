"""The one grid evaluator: a field evaluated on pixel grids at any size, scale or crop, in
bounded memory. `render`, `fit`'s snapshots and metrics, `upsample` and `blend` all render
through it.

A field is `fn(params, coords, ids) -> values`: coords (B, P, 2) in the `neurimg.coords`
convention, ids (B,) int32 (which image; fields of one image ignore it), values (B, P, C).

`GridEvaluator.grid` samples `region` (pixel units of the W x H source; default all of it) on
the pixel centres of an out_W x out_H grid (`coords.region_grid`), or, with `supersample` q,
averages q x q stratified samples inside each output pixel (the centres of the q-times finer
grid over the same region). The network runs on fixed-size chunks of `chunk` points (the last
one padded), so memory is the output plus a constant: an 8192 x 8192 uint8 render needs
~0.2 GB for the image and ~0.1 GB of work space. Outputs above `coords.MAX_OUTPUT_PIXELS` are
refused.

`GridEvaluator.images` renders many images of a fitted set at their own sizes, packing a group
of them into each call (one compile for the whole set).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from neurimg import siren
from neurimg.coords import MAX_OUTPUT_PIXELS, image_grid, region_axes
from neurimg.data import to_uint8
from neurimg.errors import NeurimgError

CHUNK = 1 << 16  # points per network call


class GridEvaluator:
    """Evaluate `fn` (see the module docstring) on grids; `clip` clips values to [0, 1];
    `supersample` is the q of every render that does not name its own (a field fitted to pixels
    as area averages renders them so: `TrainConfig.supersample`)."""

    def __init__(self, fn: Callable, *, chunk: int = CHUNK, clip: bool = True, device=None, supersample: int = 1):
        self.supersample = int(supersample)
        self.chunk = chunk
        self.clip = clip
        self.device = device
        self._calls: dict[int, Callable] = {}
        self._fn = fn

    def _call(self, q: int) -> Callable:
        """The jitted fn with each run of q*q consecutive points averaged (one per q)."""
        if q not in self._calls:
            fn, clip = self._fn, self.clip

            @jax.jit
            def call(params, pts, ids):
                v = fn(params, pts, ids)
                v = v.reshape(v.shape[0], -1, q * q, v.shape[-1]).mean(2)
                return jnp.clip(v, 0.0, 1.0) if clip else v

            self._calls[q] = call
        return self._calls[q]

    def _put(self, x):
        return jax.device_put(x, self.device) if self.device is not None else x

    def grid(
        self,
        params: Any,
        src_size: tuple[int, int],
        out_size: tuple[int, int] | None = None,
        region: tuple[float, float, float, float] | None = None,
        *,
        image_id: int = 0,
        supersample: int | None = None,
        dtype=np.float32,
    ) -> np.ndarray:
        """`region` of the W x H source on an out_W x out_H grid -> (out_H, out_W, C) `dtype`
        (np.uint8: rounded from [0, 1], see `neurimg.data.to_uint8`)."""
        w, h = src_size
        ow, oh = out_size if out_size is not None else (w, h)
        if ow < 1 or oh < 1 or ow * oh > MAX_OUTPUT_PIXELS:
            raise NeurimgError(f"output of {ow}x{oh} pixels is empty or too large (at most {MAX_OUTPUT_PIXELS} pixels)")
        q = self.supersample if supersample is None else int(supersample)
        reg = region if region is not None else (0.0, 0.0, float(w), float(h))
        xs, ys = region_axes(w, h, reg, ow * q, oh * q)
        per_call = max(1, self.chunk // (q * q))  # output pixels per call
        total = ow * oh
        call = self._call(q)
        params = self._put(params)
        ids = self._put(jnp.asarray([image_id], jnp.int32))
        out = None
        for start in range(0, total, per_call):
            n = min(per_call, total - start)
            flat = np.minimum(np.arange(start, start + per_call, dtype=np.int64), total - 1)  # fixed shape
            pts = _subgrid(xs, ys, flat, ow, q).reshape(1, -1, 2)
            res = np.asarray(call(params, self._put(pts), ids))[0]
            if out is None:
                out = np.empty((total, res.shape[-1]), dtype)
            out[start : start + n] = to_uint8(res[:n]) if dtype == np.uint8 else res[:n]
        return out.reshape(oh, ow, -1)

    def images(self, params: Any, ids: np.ndarray, sizes: np.ndarray, max_points: int = 1 << 18) -> Iterator[np.ndarray]:
        """Images `ids` (N,) at their own sizes (N, 2) (width, height), one after the other as
        (H, W, C) float32, rendered `max_points // largest` images per call."""
        n = len(ids)
        if n == 0:
            return
        counts = sizes[:, 0].astype(np.int64) * sizes[:, 1]
        pmax = int(counts.max())
        q = self.supersample
        group = max(1, min(n, max_points // (pmax * q * q)))
        call = self._call(q)
        params = self._put(params)
        for s in range(0, n, group):
            idx = np.arange(s, s + group) % n  # a fixed group size: one compile
            crd = np.zeros((group, pmax * q * q, 2), np.float32)
            for j, k in enumerate(idx):
                w, h = (int(v) for v in sizes[k])
                if q == 1:
                    crd[j, : w * h] = image_grid(w, h).reshape(-1, 2)
                else:
                    xs, ys = region_axes(w, h, (0.0, 0.0, float(w), float(h)), w * q, h * q)
                    crd[j, : w * h * q * q] = _subgrid(xs, ys, np.arange(w * h), w, q).reshape(-1, 2)
            res = np.asarray(call(params, self._put(crd), self._put(jnp.asarray(np.asarray(ids)[idx], jnp.int32))))
            for j in range(min(group, n - s)):
                w, h = (int(v) for v in sizes[s + j])
                yield res[j, : w * h].reshape(h, w, -1)


def _subgrid(xs: np.ndarray, ys: np.ndarray, flat: np.ndarray, ow: int, q: int) -> np.ndarray:
    """The q x q points of the q-times finer grid (axes xs, ys) inside each output pixel `flat`
    (row-major indices on a grid ow wide): (len(flat), q * q, 2) float32, consecutive per pixel."""
    row, col = flat // ow, flat % ow
    sub = np.arange(q)
    xi = (col[:, None, None] * q + sub[None, None, :]).repeat(q, 1)  # (n, q, q): [pixel, b, a]
    yi = (row[:, None, None] * q + sub[None, :, None]).repeat(q, 2)
    return np.stack([xs[xi], ys[yi]], -1).astype(np.float32).reshape(len(flat), q * q, 2)


def siren_field(graphdef, precision: str = "float32") -> Callable:
    """The fitted model as a field: fn(params, coords, ids) = `siren.apply` (unclipped)."""

    def fn(params, coords, ids):
        return siren.apply(graphdef, params, coords, ids, precision)

    return fn


def single_image_field(graphdef) -> Callable:
    """A one-image model (latent_dim 1) as a field: every batch row uses latent 0."""

    def fn(params, coords, ids):
        return siren.apply(graphdef, params, coords, jnp.zeros_like(ids))

    return fn
