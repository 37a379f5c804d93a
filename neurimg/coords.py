"""Pixel-centred coordinate grids.

Convention (used everywhere in neurimg):
- An image of W x H pixels covers the continuous rectangle x in [-1, 1], y in [-H/W, H/W]:
  x spans [-1, 1] across the width and the aspect ratio is kept. y grows downwards (row order).
- Pixel (row i, column j) is sampled at its centre: x = (2*(j + 0.5) - W) / W,
  y = (2*(i + 0.5) - H) / W.
- A point given in pixel units of the original image, (u, v) with u in [0, W] and v in [0, H]
  (0 = the left/top edge), maps to x = (2u - W) / W, y = (2v - H) / W.
- Rendering at scale s samples the same continuous function at the centres of a grid of
  round(s*W) x round(s*H) pixels covering the same rectangle, so scale 1 reproduces the
  training grid exactly.

Grids are float32 arrays of shape (rows, cols, 2) holding (x, y) in the last axis.
"""

from __future__ import annotations

import math

import numpy as np

from neurimg.errors import NeurimgError

# The one cap on output size, for every command that writes an image: 16384 x 16384 pixels
# (0.8 GB as uint8 RGB; rendering is chunked, so that is also about the memory a render needs).
MAX_OUTPUT_PIXELS = 1 << 28


def pixel_to_coord(u, v, width: int, height: int):
    """Map pixel-unit positions (u across, v down; edges at 0 and W/H) to model coordinates."""
    return (2.0 * np.asarray(u) - width) / width, (2.0 * np.asarray(v) - height) / width


def image_grid(width: int, height: int) -> np.ndarray:
    """Coordinates of the pixel centres of a W x H image: (H, W, 2) float32."""
    return region_grid(width, height, (0.0, 0.0, float(width), float(height)), width, height)


def region_grid(
    width: int,
    height: int,
    region: tuple[float, float, float, float],
    out_width: int,
    out_height: int,
) -> np.ndarray:
    """Sample `region` = (x0, y0, x1, y1), in pixel units of a W x H image, on an
    out_width x out_height grid of pixel centres: (out_height, out_width, 2) float32."""
    xs, ys = region_axes(width, height, region, out_width, out_height)
    grid = np.empty((out_height, out_width, 2), dtype=np.float32)
    grid[..., 0] = xs[None, :]
    grid[..., 1] = ys[:, None]
    return grid


def region_axes(
    width: int,
    height: int,
    region: tuple[float, float, float, float],
    out_width: int,
    out_height: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The x of each column and the y of each row of `region_grid` (float64): the grid is their
    outer product, so a renderer can build any block of it without building all of it."""
    x0, y0, x1, y1 = region
    u = x0 + (np.arange(out_width, dtype=np.float64) + 0.5) * (x1 - x0) / out_width
    v = y0 + (np.arange(out_height, dtype=np.float64) + 0.5) * (y1 - y0) / out_height
    return pixel_to_coord(u, v, width, height)


def parse_size(text: str) -> tuple[int, int]:
    """Parse 'WxH' into (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        w, h = int(parts[0]), int(parts[1])
    except ValueError:
        raise NeurimgError(f"--size must look like WIDTHxHEIGHT (e.g. 512x512), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise NeurimgError(f"--size must be positive, got {text!r}")
    return w, h


def parse_region(text: str, width: int, height: int) -> tuple[float, float, float, float]:
    """Parse 'x0,y0,x1,y1' (pixel units of the original; may reach outside it, not be empty)."""
    try:
        vals = [float(p) for p in text.split(",")]
        if len(vals) != 4:
            raise ValueError
    except ValueError:
        raise NeurimgError(f"--region must look like x0,y0,x1,y1 (pixel units), got {text!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise NeurimgError(f"--region values must be finite, got {text!r}")
    x0, y0, x1, y1 = vals
    if x1 <= x0 or y1 <= y0:
        raise NeurimgError(f"--region must have x1 > x0 and y1 > y0, got {text!r}")
    return x0, y0, x1, y1


def output_size(
    width: int,
    height: int,
    region: tuple[float, float, float, float] | None = None,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int = MAX_OUTPUT_PIXELS,
) -> tuple[int, int]:
    """Output (width, height) for rendering `region` of a W x H image at `scale` or `size`.

    With neither, the scale is 1: a region is rendered at the original pixel density. Outputs
    of more than `max_pixels` pixels are refused, naming the size.
    """
    if scale is not None and size is not None:
        raise NeurimgError("give --scale or --size, not both")
    if region is not None:
        x0, y0, x1, y1 = region
        if not (x1 > x0 and y1 > y0):
            raise NeurimgError(f"--region must have x1 > x0 and y1 > y0, got {region}")
    if size is not None:
        ow, oh = size
    else:
        s = 1.0 if scale is None else float(scale)
        if not math.isfinite(s) or s <= 0:
            raise NeurimgError(f"--scale must be a positive finite number, got {scale}")
        x0, y0, x1, y1 = region if region is not None else (0, 0, width, height)
        ow, oh = round(s * (x1 - x0)), round(s * (y1 - y0))
        if ow < 1 or oh < 1:
            if scale is None:
                raise NeurimgError(f"--region {x0:g},{y0:g},{x1:g},{y1:g} is smaller than a pixel at scale 1 ({ow}x{oh}); "
                                   "give --size WxH or a --scale large enough")
            raise NeurimgError(f"--scale {scale} gives an empty image ({ow}x{oh})")
    if ow * oh > max_pixels:
        raise NeurimgError(f"output of {ow}x{oh} pixels for a {width}x{height} image is too large (at most {max_pixels} pixels)")
    return int(ow), int(oh)
