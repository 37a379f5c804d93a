"""Separable linear resampling on pixel grids: PIL-exact bicubic, exact area averaging, and
back-projection (Irani & Peleg 1991) between them.

Both operators keep the convention of `neurimg.coords`: an image of n pixels spans [0, n] along
its axis, pixel j is the square [j, j+1], and an n_out-pixel resampling covers the same span,
so output pixel k is [k r, (k+1) r] in input units with r = n_in / n_out.

- `cubic` samples Keys' cubic convolution (a = -0.5) at output pixel centres, taps outside the
  image dropped and the rest renormalised: PIL's `Image.BICUBIC` upsampling of a float image.
- `area` averages the input over each output pixel's square, fractional overlaps included: the
  forward model of a camera or of PIL's `Image.BOX` at integer factors.
- `backproject` moves an estimate x (H', W', C) toward consistency with a low-resolution image
  y: x += cubic(y - area(x)), `iters` times. Started at cubic(y) it converges to the bicubic
  interpolant of a sharpened y whose area averages are y again ("consistent bicubic").

Each operator is a per-axis table of (index, weight) taps, applied with a gather and a weighted
sum (memory O(taps x image), no dense matrices). Shapes: images (H, W, C) float32.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["area", "backproject", "consistent_bicubic", "cubic", "cubic_kernel"]


def cubic_kernel(t, a: float = -0.5):
    """Keys' cubic convolution kernel (PIL's a = -0.5); zero for |t| >= 2. numpy or jax arrays."""
    t = abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((t - 5) * t + 8) * t * a - 4 * a
    return (t < 1) * near + ((t >= 1) & (t < 2)) * far


@functools.lru_cache(maxsize=64)
def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, w), each (n_out, T): PIL's bicubic weights for n_in -> n_out (when shrinking, the
    kernel is stretched by n_in / n_out, as PIL does to avoid aliasing)."""
    fs = max(1.0, n_in / n_out)
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out)
    t = 2 * int(math.ceil(2 * fs)) + 1
    j = np.floor(centre - 2 * fs).astype(np.int64)[:, None] + np.arange(t)[None, :]
    w = cubic_kernel((j + 0.5 - centre[:, None]) / fs) * ((j >= 0) & (j < n_in))
    return np.clip(j, 0, n_in - 1), (w / w.sum(1, keepdims=True)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, w), each (n_out, T): the overlap of output pixel k's span with input pixel i,
    divided by the span's length r = n_in / n_out (rows sum to one)."""
    r = n_in / n_out
    lo = np.arange(n_out) * r
    first = np.floor(lo + 1e-9).astype(np.int64)
    t = int(math.ceil(r)) + 1
    i = first[:, None] + np.arange(t)[None, :]
    w = np.clip(np.minimum(i + 1, lo[:, None] + r) - np.maximum(i, lo[:, None]), 0, None) / r
    w[i >= n_in] = 0
    return np.clip(i, 0, n_in - 1), (w / w.sum(1, keepdims=True)).astype(np.float32)


def _apply(img: np.ndarray, taps_y, taps_x) -> np.ndarray:
    (iy, wy), (ix, wx) = taps_y, taps_x
    rows = np.einsum("ktwc,kt->kwc", img[iy], wy)  # (H', W, C)
    return np.einsum("hktc,kt->hkc", rows[:, ix], wx).astype(np.float32)  # (H', W', C)


def cubic(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """img (H, W, C) resampled to size = (W', H') with PIL's bicubic."""
    h, w = img.shape[:2]
    return _apply(img, _cubic_taps(h, size[1]), _cubic_taps(w, size[0]))


def area(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """img (H, W, C), as a piecewise-constant function, averaged over the squares of a
    size = (W', H') grid (a finer grid repeats pixels, with the overlaps at their edges)."""
    h, w = img.shape[:2]
    return _apply(img, _area_taps(h, size[1]), _area_taps(w, size[0]))


def backproject(x: np.ndarray, y: np.ndarray, iters: int) -> np.ndarray:
    """x (H', W', C) moved `iters` times by cubic(y - area(x)) toward area(x) == y (y (H, W, C))."""
    big, small = (x.shape[1], x.shape[0]), (y.shape[1], y.shape[0])
    for _ in range(iters):
        x = x + cubic(y - area(x, small), big)
    return x


def consistent_bicubic(y: np.ndarray, size: tuple[int, int], iters: int = 10) -> np.ndarray:
    """Bicubic upsampling of y to size (W', H'), back-projected `iters` times (unclipped)."""
    return backproject(cubic(y, size), y, iters)
