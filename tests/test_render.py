"""The one grid evaluator (neurimg.render): grids, crops, supersampling, chunks, the size cap."""

import jax.numpy as jnp
import numpy as np
import pytest

from neurimg import coords, render
from neurimg.coords import image_grid, region_grid
from neurimg.data import to_uint8
from neurimg.errors import NeurimgError


def xy_field(p, c, ids):
    """f(x, y) = (x, y, id): the coordinates it is evaluated at, and which image."""
    return jnp.concatenate([c, jnp.broadcast_to(ids[:, None, None].astype(c.dtype), c.shape[:2] + (1,))], -1)


@pytest.mark.parametrize(
    "src,out,region",
    [((6, 4), (6, 4), None), ((6, 4), (15, 10), None), ((6, 4), (7, 5), (1.0, 0.5, 4.5, 3.0)), ((5, 9), (3, 11), (-2.0, 0.0, 7.0, 9.5))],
)
@pytest.mark.parametrize("q", [1, 3])
def test_grid_samples_exactly_the_region_grid(src, out, region, q):
    """At q = 1 the evaluator samples the pixel centres of `coords.region_grid`; at q = 3 the
    mean of its 9 samples of a linear field is again that centre."""
    ev = render.GridEvaluator(xy_field, clip=False, chunk=37)  # chunks that do not divide the grid
    got = ev.grid(None, src, out, region, image_id=2, supersample=q)
    want = region_grid(*src, region or (0, 0, *src), *out)
    np.testing.assert_allclose(got[..., :2], want, atol=1e-6)
    assert np.all(got[..., 2] == 2)


def test_supersamples_are_the_centres_of_the_finer_grid():
    """q x q samples per output pixel: the centres of the q-times finer grid over the same
    region, so f = x^2 averages to the mean of x^2 over those centres (worked out here with
    NumPy from the finer grid)."""
    ev = render.GridEvaluator(lambda p, c, ids: jnp.square(c), clip=False)
    got = ev.grid(None, (4, 4), (2, 2), supersample=2)
    fine = region_grid(4, 4, (0, 0, 4, 4), 4, 4).astype(np.float64) ** 2
    want = fine.reshape(2, 2, 2, 2, 2).mean((1, 3))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_uint8_output_and_clipping():
    ev = render.GridEvaluator(lambda p, c, ids: 2.0 * c[..., :1].repeat(3, -1))
    f = ev.grid(None, (8, 3), (8, 3))
    assert f.min() == 0.0 and f.max() == 1.0  # clipped
    u = ev.grid(None, (8, 3), (8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(u, to_uint8(f))


def test_images_renders_a_set_at_its_own_sizes_in_groups():
    ev = render.GridEvaluator(xy_field, clip=False)
    sizes = np.array([[3, 2], [5, 4], [1, 1], [4, 4]])
    out = list(ev.images(None, np.array([7, 8, 9, 10]), sizes, max_points=40))  # 2 images per call
    assert [o.shape for o in out] == [(2, 3, 3), (4, 5, 3), (1, 1, 3), (4, 4, 3)]
    for o, (w, h), k in zip(out, sizes, (7, 8, 9, 10)):
        np.testing.assert_allclose(o[..., :2], image_grid(w, h), atol=1e-6)
        assert np.all(o[..., 2] == k)


def test_a_supersampled_evaluator_renders_every_image_as_its_grid_does():
    """An evaluator made with supersample q (a field fitted to area averages) averages q x q
    points per pixel in `images` (fit's metrics and snapshots) exactly as `grid` does (render),
    unless a render names its own q."""
    field = lambda p, c, ids: jnp.square(c).sum(-1, keepdims=True).repeat(3, -1) + ids[:, None, None]  # noqa: E731
    ev = render.GridEvaluator(field, clip=False, supersample=3)
    sizes = np.array([[5, 3], [2, 6]])
    for k, got in enumerate(ev.images(None, np.array([0, 1]), sizes, max_points=60)):
        w, h = sizes[k]
        np.testing.assert_allclose(got, ev.grid(None, (w, h), image_id=k), atol=1e-6)
        np.testing.assert_allclose(got, render.GridEvaluator(field, clip=False).grid(None, (w, h), image_id=k, supersample=3), atol=1e-6)
        assert not np.allclose(got, ev.grid(None, (w, h), image_id=k, supersample=1), atol=1e-4)  # x^2: the mean is not the centre


def test_one_output_cap_for_every_render(monkeypatch):
    ev = render.GridEvaluator(xy_field)
    monkeypatch.setattr(render, "MAX_OUTPUT_PIXELS", 100)
    with pytest.raises(NeurimgError, match="11x10"):
        ev.grid(None, (4, 4), (11, 10))
    ev.grid(None, (4, 4), (10, 10))
    with pytest.raises(NeurimgError, match="20000x20000"):
        coords.output_size(64, 64, scale=20000 / 64)  # the same cap decides the sizes of every command
    assert coords.MAX_OUTPUT_PIXELS == 16384 * 16384
