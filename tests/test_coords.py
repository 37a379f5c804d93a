import numpy as np
import pytest

from neurimg.coords import image_grid, output_size, parse_region, parse_size, pixel_to_coord, region_grid
from neurimg.errors import NeurimgError


def test_square_grid_pixel_centres():
    g = image_grid(2, 2)
    assert g.shape == (2, 2, 2) and g.dtype == np.float32
    np.testing.assert_allclose(g[..., 0], [[-0.5, 0.5], [-0.5, 0.5]])
    np.testing.assert_allclose(g[..., 1], [[-0.5, -0.5], [0.5, 0.5]])


def test_non_square_keeps_aspect_ratio():
    g = image_grid(4, 2)  # W=4, H=2: x in [-1, 1], y in [-0.5, 0.5]
    np.testing.assert_allclose(g[0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(g[:, 0, 1], [-0.25, 0.25])
    tall = image_grid(2, 4)
    np.testing.assert_allclose(tall[:, 0, 1], [-1.5, -0.5, 0.5, 1.5])
    # equal pixel spacing along both axes
    assert np.isclose(g[0, 1, 0] - g[0, 0, 0], g[1, 0, 1] - g[0, 0, 1])


def test_scale_grid_covers_same_rectangle():
    fine = region_grid(2, 2, (0, 0, 2, 2), 4, 4)
    np.testing.assert_allclose(fine[0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    # scale 1 over the full image is the training grid
    np.testing.assert_array_equal(region_grid(5, 3, (0, 0, 5, 3), 5, 3), image_grid(5, 3))
    # fine pixel centres average to the coarse pixel centre (2x2 blocks)
    coarse = image_grid(2, 2)
    blocks = fine.reshape(2, 2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(blocks, coarse, atol=1e-7)


def test_pixel_to_coord_edges():
    x, y = pixel_to_coord(np.array([0.0, 64.0]), np.array([0.0, 32.0]), 64, 32)
    np.testing.assert_allclose(x, [-1, 1])
    np.testing.assert_allclose(y, [-0.5, 0.5])


def test_region_crop():
    g = region_grid(4, 4, (1, 1, 3, 3), 2, 2)
    np.testing.assert_allclose(g[0, :, 0], [-0.25, 0.25])
    np.testing.assert_allclose(g[:, 0, 1], [-0.25, 0.25])


@pytest.mark.parametrize("w,h,s,expect", [(64, 64, 2, (128, 128)), (64, 64, 2.5, (160, 160)), (7, 5, 1.5, (10, 8)), (10, 10, 0.5, (5, 5))])
def test_output_size_rounding(w, h, s, expect):
    assert output_size(w, h, scale=s) == expect


def test_output_size_region_and_size():
    assert output_size(64, 64, region=(0, 0, 32, 16), scale=4) == (128, 64)
    assert output_size(64, 64, size=(300, 200)) == (300, 200)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_bad_scales(bad):
    with pytest.raises(NeurimgError):
        output_size(64, 64, scale=bad)


def test_absurd_output_refused():
    with pytest.raises(NeurimgError, match="too large"):
        output_size(64, 64, scale=10000)


def test_parse_size_and_region():
    assert parse_size("640x480") == (640, 480)
    for bad in ("640", "axb", "0x10", "-5x5", "1x2x3"):
        with pytest.raises(NeurimgError):
            parse_size(bad)
    assert parse_region("0,0,10,5", 64, 64) == (0, 0, 10, 5)
    for bad in ("1,2,3", "5,0,1,1", "0,0,nan,1", "a,b,c,d"):
        with pytest.raises(NeurimgError):
            parse_region(bad, 64, 64)
