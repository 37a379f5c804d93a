import math

import numpy as np
import pytest

from neurimg import metrics


def test_psnr_hand_values():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 0.1)
    assert metrics.mse(a, b) == pytest.approx(0.01)
    assert metrics.psnr(a, b) == pytest.approx(20.0)
    # clipping: values outside [0, 1] count as 0 and 1
    assert metrics.psnr(np.full((4, 4, 3), -5.0), np.zeros((4, 4, 3))) == metrics.PSNR_CAP
    assert metrics.psnr(np.full((4, 4, 3), 1.5), np.full((4, 4, 3), 0.9)) == pytest.approx(-10 * math.log10(0.01))
    # one pixel of 16 off by 0.4 in one channel: mse = 0.16 / 48
    c = np.zeros((4, 4, 3))
    c[0, 0, 0] = 0.4
    assert metrics.psnr(c, np.zeros_like(c)) == pytest.approx(-10 * math.log10(0.16 / 48))


def test_mean_psnr_is_mean_of_per_image():
    a, b = np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.1)
    c = np.full((4, 4, 3), 0.01)
    assert metrics.mean_psnr([(a, b), (a, c)]) == pytest.approx((20 + 40) / 2)


def test_ssim_identical_and_constant_images():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(20, 20, 3))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    # constant images: variances are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = 0.01**2
    expect = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim(np.full((16, 16, 3), a), np.full((16, 16, 3), b)) == pytest.approx(expect, rel=1e-9)


def _ssim_bruteforce(x, y):
    """SSIM by explicit loops over every 11x11 window (independent of the separable filter)."""
    g1 = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g1, g1)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(x.shape[2]):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i : i + 11, j : j + 11, ch], y[i : i + 11, j : j + 11, ch]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = (w * (px - mx) ** 2).sum()
                vy = (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(np.array(vals).reshape(x.shape[2], -1), axis=1).mean()


def test_ssim_against_bruteforce():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(16, 18, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    assert metrics.ssim(x, y) == pytest.approx(_ssim_bruteforce(x, y), abs=1e-9)


def test_gradient_error():
    a = np.zeros((4, 4, 1))
    b = np.zeros((4, 4, 1))
    b[:, 2:] = 1.0  # one vertical edge: gx = 1 at column 1 for 4 rows
    # mean over 16 pixels of (gx^2 + gy^2) / 2 = (4 * 1) / 16 / 2
    assert metrics.gradient_error(a, b) == pytest.approx(4 / 16 / 2)


def test_batch_metrics_equal_one_pair_at_a_time():
    from neurimg.metrics import batch_metrics, image_metrics

    rng = np.random.default_rng(5)
    a = rng.uniform(-0.1, 1.1, size=(4, 13, 17, 3))
    b = np.clip(a + rng.normal(0, 0.05, size=a.shape), 0, 1)
    b[2] = np.clip(a[2], 0, 1)  # identical after clipping: PSNR capped
    got = batch_metrics(a, b)
    for k in range(4):
        m = image_metrics(a[k], b[k])
        np.testing.assert_allclose(got[k], [m["psnr"], m["ssim"], m["mse"]], rtol=1e-12, atol=1e-15)
    assert got[2, 0] == 100.0
