"""Image quality measures on float RGB in [0, 1] (NumPy, host side).

- `mse`: mean squared error over pixels and channels, after clipping both images to [0, 1].
- `psnr`: 10 log10(1 / mse) in dB on clipped values (data range 1). Identical images give inf;
  `mean_psnr` of a set is the mean of per-image PSNR (an inf is capped at 100 dB so means stay
  finite).
- `ssim`: structural similarity of Wang et al. 2004 with their constants (K1 = 0.01, K2 = 0.03,
  L = 1), an 11x11 Gaussian window with sigma 1.5, 'valid' positions only (no padding), computed
  per channel on RGB and averaged. Images smaller than the window use a window the image's size.
- `gradient_error`: mean squared difference of forward-difference gradients.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0


def _clip(a) -> np.ndarray:
    return np.clip(np.asarray(a, np.float64), 0.0, 1.0)


def mse(a, b) -> float:
    a, b = _clip(a), _clip(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.mean((a - b) ** 2))


def psnr(a, b) -> float:
    m = mse(a, b)
    return PSNR_CAP if m <= 10 ** (-PSNR_CAP / 10) else float(-10.0 * np.log10(m))


def mean_psnr(pairs) -> float:
    vals = [psnr(a, b) for a, b in pairs]
    return float(np.mean(vals))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of an (N, H, W, C) array with the 1-D kernel g along H and W
    (every image and channel at once)."""
    k = len(g)
    h, w = img.shape[1:3]
    rows = sum(g[i] * img[:, i : h - k + 1 + i] for i in range(k))
    return sum(g[j] * rows[:, :, j : w - k + 1 + j] for j in range(k))


def ssim(a, b, win: int = 11, sigma: float = 1.5) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    return float(ssim_batch(a[None], b[None], win, sigma)[0])


def ssim_batch(a, b, win: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM of each pair in a batch of same-sized images (N, H, W, C) -> (N,). Each image's
    value is the mean over its positions and channels (every channel has as many positions,
    so this is the mean of the per-channel SSIMs)."""
    a, b = _clip(a), _clip(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    win = min(win, a.shape[1], a.shape[2])
    g = _gaussian_window(win, sigma)
    c1, c2 = (0.01) ** 2, (0.03) ** 2
    mx, my = _filter_valid(a, g), _filter_valid(b, g)
    sxx = _filter_valid(a * a, g) - mx * mx
    syy = _filter_valid(b * b, g) - my * my
    sxy = _filter_valid(a * b, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(len(s), -1).mean(1)


def gradients(img) -> tuple[np.ndarray, np.ndarray]:
    """Forward differences (H, W, C): gx[i, j] = img[i, j+1] - img[i, j] (0 in the last column),
    likewise gy along rows; units are value per pixel (the blend solver's differences)."""
    from neurimg.poisson import forward_differences

    return forward_differences(img)


def gradient_error(a, b) -> float:
    """Mean squared difference of the forward-difference gradients of a and b."""
    ax, ay = gradients(_clip(a))
    bx, by = gradients(_clip(b))
    return float(np.mean((ax - bx) ** 2 + (ay - by) ** 2) / 2)


def image_metrics(pred, target) -> dict[str, float]:
    return {"psnr": psnr(pred, target), "ssim": ssim(pred, target), "mse": mse(pred, target)}


def batch_metrics(pred, target) -> np.ndarray:
    """PSNR, SSIM and MSE of each pair of same-sized images (N, H, W, C): (N, 3), the values
    `image_metrics` gives one pair at a time."""
    p, t = _clip(pred), _clip(target)
    m = ((p - t) ** 2).reshape(len(p), -1).mean(1)
    ps = np.where(m <= 10 ** (-PSNR_CAP / 10), PSNR_CAP, -10.0 * np.log10(np.maximum(m, 1e-300)))
    return np.stack([ps, ssim_batch(p, t), m], 1)
