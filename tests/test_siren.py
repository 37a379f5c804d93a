
import jax
import jax.numpy as jnp
import numpy as np

from neurimg import siren
from neurimg.config import ModelConfig


def test_sine_matches_numpy_sin_and_cos():
    x = np.linspace(-300, 300, 200_001).astype(np.float32)
    s = np.asarray(jax.jit(siren.sine)(x))
    np.testing.assert_allclose(s, np.sin(x.astype(np.float64)), atol=5e-7, rtol=0)
    c = np.asarray(jax.jit(jax.vmap(jax.grad(siren.sine)))(x))
    np.testing.assert_allclose(c, np.cos(x.astype(np.float64)), atol=5e-7, rtol=0)


def _params(cfg, n=3, seed=0):
    return siren.init_params(cfg, n, seed)


def test_init_bounds_and_statistics():
    cfg = ModelConfig(width=256, hidden_layers=3, latent_dim=64, w0=30.0)
    _, p = _params(cfg)
    first = np.asarray(p["layers"][0]["kernel"])
    assert first.shape == (2, 256)
    assert np.abs(first).max() <= 1 / 2 and np.abs(first).max() > 0.45  # U(-1/fan_in, 1/fan_in)
    for i in (1, 2, 3):
        k = np.asarray(p["layers"][i]["kernel"])
        # The reference code's hidden init for fan_in 256, w0 30 (vsitzmann/siren modules.py,
        # sine_init: U(-sqrt(6/256)/30, +sqrt(6/256)/30)), worked out by hand: 0.15309/30.
        bound = 0.0051031
        assert np.abs(k).max() <= bound * 1.00001 and np.abs(k).max() > 0.99 * bound
        # uniform variance bound^2 / 3
        assert abs(k.var() / (bound**2 / 3) - 1) < 0.02
        b = np.asarray(p["layers"][i]["bias"])
        assert np.abs(b).max() <= 1 / 16
    ok = np.asarray(p["out_kernel"])
    assert ok.shape == (256, 3) and np.abs(ok).max() <= 0.0051031 * 1.00001
    assert np.all(np.asarray(p["latents"]) == 0)
    m = np.asarray(p["modulation"])
    assert m.shape == (64, 4 * 256) and m.std() > 0  # must start random (latents start at 0)


def test_activations_stay_unit_scale_through_depth():
    """The SIREN init keeps pre-activations of order 1 at every layer (paper, Sec. 3.2)."""
    cfg = ModelConfig(width=256, hidden_layers=5, latent_dim=8)
    _, p = _params(cfg, n=1)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4096, 2)), jnp.float32)
    h = x
    for i in range(6):
        pre = cfg.w0 * (h @ p["layers"][i]["kernel"] + p["layers"][i]["bias"])
        h = jnp.sin(pre)
        if i > 0:
            assert 0.5 < float(jnp.std(pre)) < 2.0
        assert 0.55 < float(jnp.std(h)) < 0.85  # arcsine distribution: std 1/sqrt(2)


def test_modulation_shapes_and_effect():
    cfg = ModelConfig(width=16, hidden_layers=2, latent_dim=4)
    g, p = _params(cfg, n=3)
    coords = jnp.zeros((3, 5, 2)) + 0.1
    ids = jnp.arange(3)
    model = siren.ModulatedSiren(cfg, 3, seed=0)
    assert model.shifts(model.rows(ids)).shape == (3, 3, 16)
    out = siren.apply(g, p, coords, ids)
    assert out.shape == (3, 5, 3)
    # zero latents: every image is the same function
    np.testing.assert_allclose(out[0], out[1])
    p2 = jax.tree.map(lambda a: a, p)
    p2["latents"] = p["latents"].at[1].set(1.0)
    out2 = siren.apply(g, p2, coords, ids)
    np.testing.assert_allclose(out2[0], out[0])
    assert not np.allclose(out2[1], out[1])


def test_matches_plain_reference_forward():
    """The model equals a plain NumPy SIREN with explicit shifts (float64, jnp.sin-free)."""
    cfg = ModelConfig(width=8, hidden_layers=2, latent_dim=3)
    g, p = _params(cfg, n=2)
    p["latents"] = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)), jnp.float32)
    rng = np.random.default_rng(2)
    coords = rng.uniform(-1, 1, (2, 7, 2)).astype(np.float32)
    out = np.asarray(siren.apply(g, p, jnp.asarray(coords), jnp.arange(2)))
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    shifts = (P["latents"] @ P["modulation"]).reshape(2, 3, 8)
    for k in range(2):
        h = coords[k].astype(np.float64)
        for i in range(3):
            h = np.sin(cfg.w0 * (h @ P["layers"][i]["kernel"] + P["layers"][i]["bias"] + shifts[k, i]))
        ref = h @ P["out_kernel"] + P["out_bias"] + 0.5
        np.testing.assert_allclose(out[k], ref, atol=2e-5)


def test_gradients_match_jnp_sin_reference():
    """Gradients through the fast sine equal those through jnp.sin (tolerance 1e-4 relative)."""
    cfg = ModelConfig(width=16, hidden_layers=2, latent_dim=4)
    g, p = _params(cfg, n=2)
    coords = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 9, 2)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (2, 9, 3)), jnp.float32)

    def ref_apply(params, c):
        shifts = (params["latents"] @ params["modulation"]).reshape(2, 3, 16)
        h = c
        for i in range(3):
            h = jnp.sin(cfg.w0 * (h @ params["layers"][i]["kernel"] + params["layers"][i]["bias"] + shifts[:, None, i]))
        return h @ params["out_kernel"] + params["out_bias"] + 0.5

    lf = lambda q: jnp.mean((siren.apply(g, q, coords, jnp.arange(2)) - target) ** 2)
    lr_ = lambda q: jnp.mean((ref_apply(q, coords) - target) ** 2)
    v1, g1 = jax.value_and_grad(lf)(p)
    v2, g2 = jax.value_and_grad(lr_)(p)
    assert abs(float(v1) - float(v2)) < 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_flops_formula():
    cfg = ModelConfig(width=256, hidden_layers=3)
    # counted by hand: 2x256 + 3 x 256x256 + 256x3 multiply-adds = 197,888, 2 FLOPs each
    assert siren.forward_flops_per_point(cfg) == 395_776


def test_latent_grid_geometry_and_locality():
    """The grid's nodes sit 2 / (cols - 1) apart from x = -1 to 1, rows centred on y = 0 and
    enough for the tallest image; a node's values shift the field only in the four cells
    around it, by the bilinear weight (worked out by hand at the node and half-way)."""
    from neurimg.config import grid_rows_for

    assert grid_rows_for(17, [(64, 64)]) == 17 and grid_rows_for(17, [(64, 32), (40, 30)]) == 13
    assert grid_rows_for(5, [(100, 10)]) == 2 and grid_rows_for(5, [(30, 60)]) == 9
    cfg = ModelConfig(width=16, hidden_layers=1, latent_dim=2, grid=5, grid_rows=5, grid_channels=3)
    assert cfg.row_dim == 2 + 5 * 5 * 3
    i0, j0, fu, fv = (np.asarray(a) for a in siren.grid_cell(jnp.array([[-1.0, 0.0], [0.25, -0.25], [1.0, 1.0], [5.0, -9.0]]), 5, 5))
    assert i0.tolist() == [0, 2, 3, 3] and j0.tolist() == [2, 1, 3, 0]
    np.testing.assert_allclose(fu, [0, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(fv, [0, 0.5, 1, 0], atol=1e-6)
    grids = np.zeros((1, 5 * 5 * 3), np.float32)
    grids[0, (2 * 5 + 3) * 3 : (2 * 5 + 3) * 3 + 3] = [1.0, -2.0, 4.0]  # node (column 3, row 2): x = 0.5, y = 0
    pts = jnp.array([[[0.5, 0.0], [0.75, 0.0], [0.75, 0.25], [0.0, 0.0], [-0.5, 0.5]]])
    feat = np.asarray(siren.grid_lookup(jnp.asarray(grids), pts, cfg))
    np.testing.assert_allclose(feat, [[1, -2, 4], [0.5, -1, 2], [0.25, -0.5, 1], [0, 0, 0], [0, 0, 0]], atol=1e-6)
    # through the model: the grid part of image 1's row moves image 1 only, and only near the node
    graphdef, p = siren.init_params(cfg, 2, 0)
    lat = np.zeros((2, cfg.row_dim), np.float32)
    lat[1, 2:] = grids[0]
    p2 = {**p, "latents": jnp.asarray(lat)}
    xy = jnp.asarray(np.stack(np.meshgrid(np.linspace(-1, 1, 21), np.linspace(-1, 1, 21)), -1).reshape(1, -1, 2).repeat(2, 0))
    before = np.asarray(siren.apply(graphdef, p, xy, jnp.array([0, 1])))
    after = np.asarray(siren.apply(graphdef, p2, xy, jnp.array([0, 1])))
    assert np.array_equal(before[0], after[0])
    moved = np.abs(after[1] - before[1]).max(-1) > 1e-6
    near = (np.abs(np.asarray(xy[1, :, 0]) - 0.5) < 0.5) & (np.abs(np.asarray(xy[1, :, 1])) < 0.5)
    assert moved.any() and not (moved & ~near).any()
