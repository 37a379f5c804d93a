"""Discrete gradient fields and the exact least-squares (Poisson) solve on the pixel grid.

Conventions, for an image u of shape (H, W, C):
- forward differences in pixel units: gx[i, j] = u[i, j+1] - u[i, j] for j < W-1, and
  gy[i, j] = u[i+1, j] - u[i, j] for i < H-1; the last column of gx and the last row of gy are
  not differences and are kept at 0 (they are excluded from every sum);
- "per unit coordinate" (the units of a network's autodiff gradient, see `neurimg.coords`):
  pixel units times pixels per unit = W / 2 (x spans [-1, 1] over W pixels; y has the same
  spacing).

`solve_exact(gx, gy, mean)` minimises sum |D u - g|^2 over valid differences (Neumann
boundary): the normal equations D^T D u = D^T g are the discrete Poisson equation with the
path-graph Laplacian along each axis, diagonalised by the orthonormal DCT-II with eigenvalues
(2 - 2 cos(pi k / W)) + (2 - 2 cos(pi l / H)). The constant (k = l = 0) is free; it is set so
each channel's mean equals `mean`. With `color_weight` lam > 0 and a reference image N it
minimises sum |D u - g|^2 + lam sum |u - N|^2 instead (a screened Poisson equation,
(D^T D + lam) u = D^T g + lam N, same DCT basis); its mean is then N's, not a free constant.
"""

from __future__ import annotations

import numpy as np


def forward_differences(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) -> gx, gy (H, W, C) in pixel units, zero where not a difference."""
    u = np.asarray(u, np.float64)
    gx = np.zeros_like(u)
    gy = np.zeros_like(u)
    gx[:, :-1] = u[:, 1:] - u[:, :-1]
    gy[:-1] = u[1:] - u[:-1]
    return gx, gy


def x_valid(h: int, w: int) -> np.ndarray:
    """(H, W) bool: where gx is a real difference."""
    m = np.zeros((h, w), bool)
    m[:, :-1] = True
    return m


def y_valid(h: int, w: int) -> np.ndarray:
    """(H, W) bool: where gy is a real difference."""
    m = np.zeros((h, w), bool)
    m[:-1] = True
    return m


def divergence_adjoint(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """D^T g: (D^T g)[j] = g[j-1] - g[j] along each axis (g = 0 outside the valid range)."""
    gx = np.array(gx, np.float64)
    gy = np.array(gy, np.float64)
    gx[:, -1] = 0
    gy[-1] = 0
    out = -gx - gy
    out[:, 1:] += gx[:, :-1]
    out[1:] += gy[:-1]
    return out


def laplacian(u: np.ndarray) -> np.ndarray:
    """The discrete Neumann Laplacian -D^T D u (5-point stencil, mirrored boundary), pixel units."""
    gx, gy = forward_differences(u)
    return -divergence_adjoint(gx, gy)


def _eigenvalues(h: int, w: int) -> np.ndarray:
    lx = 2.0 - 2.0 * np.cos(np.pi * np.arange(w) / w)
    ly = 2.0 - 2.0 * np.cos(np.pi * np.arange(h) / h)
    return ly[:, None] + lx[None, :]


def solve_poisson(rhs: np.ndarray, mean) -> np.ndarray:
    """Solve D^T D u = rhs (H, W, C) (rhs must sum to ~0 per channel); per-channel mean `mean`."""
    from scipy.fft import dctn, idctn

    rhs = np.asarray(rhs, np.float64)
    h, w, c = rhs.shape
    lam = _eigenvalues(h, w)
    lam[0, 0] = 1.0
    out = np.empty_like(rhs)
    mean = np.broadcast_to(np.asarray(mean, np.float64), (c,))
    for ch in range(c):
        f = dctn(rhs[:, :, ch], type=2, norm="ortho")
        f /= lam
        f[0, 0] = 0.0
        out[:, :, ch] = idctn(f, type=2, norm="ortho") + mean[ch]
    return out


def solve_screened(rhs: np.ndarray, lam: float) -> np.ndarray:
    """Solve (D^T D + lam) u = rhs (H, W, C) for lam > 0."""
    from scipy.fft import dctn, idctn

    if not lam > 0:
        raise ValueError("lam must be > 0")
    rhs = np.asarray(rhs, np.float64)
    lam_k = _eigenvalues(*rhs.shape[:2]) + lam
    out = np.empty_like(rhs)
    for ch in range(rhs.shape[2]):
        out[:, :, ch] = idctn(dctn(rhs[:, :, ch], type=2, norm="ortho") / lam_k, type=2, norm="ortho")
    return out


def solve_exact(gx: np.ndarray, gy: np.ndarray, mean=None, color_weight: float = 0.0, reference=None) -> np.ndarray:
    """Least-squares u (H, W, C) with forward differences closest to (gx, gy) (pixel units).

    color_weight = 0: per-channel mean `mean`; > 0: plus color_weight * |u - reference|^2."""
    rhs = divergence_adjoint(gx, gy)
    if color_weight > 0:
        return solve_screened(rhs + color_weight * np.asarray(reference, np.float64), color_weight)
    return solve_poisson(rhs, mean)
