"""Chunked rendering of stored images at any size, scale or crop, in bounded memory.

The output is built as uint8 (H, W, 3) on the host; the network is evaluated on fixed-size
chunks of CHUNK points (the last one padded) by one compiled function, so memory is about
H*W*3 bytes for the output plus a constant (CHUNK x width floats per layer) for the network:
an 8192 x 8192 render needs ~0.2 GB for the image and ~0.1 GB of work space.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from neurimg import siren
from neurimg.config import ModelConfig
from neurimg.coords import pixel_to_coord
from neurimg.data import to_uint8

CHUNK = 1 << 16  # points per network call


class Renderer:
    """Evaluate a fitted model: `render(index, src_size, out_size, region)` -> uint8 image."""

    def __init__(self, model_cfg: ModelConfig, graphdef, params, chunk: int = CHUNK):
        self.cfg = model_cfg
        self.graphdef = graphdef
        self.params = params
        self.chunk = chunk

        @jax.jit
        def _eval(params, coords, image_id):
            out = siren.apply(graphdef, params, coords[None], image_id[None])[0]
            return jnp.clip(out, 0.0, 1.0)

        self._eval = _eval

    def render_float(
        self,
        index: int,
        src_size: tuple[int, int],
        out_size: tuple[int, int] | None = None,
        region: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """Like `render`, but float32 in [0, 1] (for metrics; 4x the memory)."""
        return self._render(index, src_size, out_size, region, np.float32, lambda a: a)

    def render(
        self,
        index: int,
        src_size: tuple[int, int],
        out_size: tuple[int, int] | None = None,
        region: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """Render image `index` (original size src_size = (W, H)) over `region` (pixel units of
        the original, default the whole image) on an out_size = (W', H') grid -> uint8 RGB."""
        return self._render(index, src_size, out_size, region, np.uint8, to_uint8)

    def _render(self, index, src_size, out_size, region, dtype, convert: Callable):
        w, h = src_size
        x0, y0, x1, y1 = region if region is not None else (0.0, 0.0, float(w), float(h))
        ow, oh = out_size if out_size is not None else (w, h)
        out = np.empty((oh * ow, 3), dtype)
        total = ow * oh
        image_id = jnp.asarray(index, jnp.int32)
        sx, sy = (x1 - x0) / ow, (y1 - y0) / oh
        for start in range(0, total, self.chunk):
            n = min(self.chunk, total - start)
            flat = np.arange(start, start + self.chunk, dtype=np.int64)
            row, col = flat // ow, flat % ow
            u = x0 + (col + 0.5) * sx
            v = y0 + (row + 0.5) * sy
            cx, cy = pixel_to_coord(u, v, w, h)
            coords = np.stack([cx, cy], -1).astype(np.float32)
            res = np.asarray(self._eval(self.params, jnp.asarray(coords), image_id))
            out[start : start + n] = convert(res[:n])
        return out.reshape(oh, ow, 3)
