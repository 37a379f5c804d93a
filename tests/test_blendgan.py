"""Issue 15: the GAN blender's targets, symmetries, ADA and training step (the command line:
test_cli_blendgan.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurimg import blendgan as bg
from neurimg.config import GanConfig
from neurimg.errors import NeurimgError


def test_mixed_target_by_hand(rng):
    """With B flat, the stronger gradient is A's everywhere: the least-squares image is A
    shifted to the naive average's mean, A + (c - mean A) / 2 per channel."""
    a = rng.uniform(0.3, 0.7, (12, 10, 3))
    c = np.array([0.5, 0.4, 0.6])
    b = np.broadcast_to(c, a.shape)
    want = a + (c - a.mean((0, 1))) / 2
    np.testing.assert_allclose(bg.combination(a, b, "mixed"), want, atol=1e-6)
    np.testing.assert_allclose(bg.combination(a, b, "naive"), (a + b) / 2, atol=1e-7)
    # symmetric in A and B (no ties between random gradients), and A with itself is A
    b2 = rng.uniform(0, 1, a.shape)
    np.testing.assert_allclose(bg.combination(a, b2, "mixed"), bg.combination(b2, a, "mixed"), atol=1e-6)
    np.testing.assert_allclose(bg.combination(a, a, "mixed"), a, atol=1e-6)


def test_device_targets_match_the_float64_solve(rng):
    """The training step's targets (DCT matrices, float32, on the device) against the host's
    float64 solve (scipy's DCT): random images, odd sizes and real logos; and the levels'
    endpoints: 0.5 the blend, 1 A, 0 B, the naive target linear in between."""
    from conftest import LOGOS
    from neurimg.data import read_image

    logos = np.stack([read_image(f) for f in sorted(LOGOS.glob("*.png"))[:4]]).astype(np.float32)
    for a, b in [(logos[:2], logos[2:]), tuple(rng.uniform(0, 1, (2, 2, 12, 10, 3)).astype(np.float32))]:
        want = np.stack([bg.combination(x, y, "mixed") for x, y in zip(a, b)])
        np.testing.assert_allclose(bg.mixed_blend(a, b), want, atol=2e-5)
        np.testing.assert_allclose(bg.target_of(a, b, "mixed", (0.5, 0.5, 0.5)), want, atol=2e-5)
        np.testing.assert_allclose(bg.target_of(a, b, "mixed", (1.0, 1.0, 1.0)), a, atol=2e-5)
        np.testing.assert_allclose(bg.target_of(a, b, "mixed", (0.0, 0.0, 0.0)), b, atol=2e-5)
        np.testing.assert_allclose(bg.target_of(a, b, "naive", (0.8, 0.8, 0.8)), 0.8 * a + 0.2 * b, atol=2e-5)
    # one level moved: only that band of the result changes (mid-range images: no clipping)
    from scipy.fft import dctn

    a, b = rng.uniform(0.4, 0.6, (2, 2, 32, 24, 3)).astype(np.float32)
    for k, lv in enumerate([(1.0, 0.5, 0.5), (0.5, 0.0, 0.5), (0.5, 0.5, 0.7)]):
        one = np.asarray(bg.target_of(a, b, "mixed", lv)) - np.asarray(bg.mixed_blend(a, b))
        band = bg.bands(*a.shape[1:3])[k]
        spec = np.stack([[dctn(one[i, :, :, c], norm="ortho") for c in range(3)] for i in range(len(a))])
        assert np.abs(spec * (1 - band)).max() < 1e-4 < np.abs(spec * band).max()
    masks = bg.bands(64, 64)
    np.testing.assert_array_equal(masks.sum(0), 1)  # a partition of the coefficients
    assert masks[0, 7, 0] == 1 and masks[1, 8, 0] == 1 and masks[2, 16, 0] == 1


def test_symmetries_move_both_images_of_a_pair_alike(rng):
    """Each row's images get one of the 8 turns and flips and one of the 6 channel orders,
    the same for both; over many rows every turn appears."""
    x = jnp.asarray(rng.uniform(0, 1, (64, 2, 6, 6, 3)), jnp.float32)
    y = np.asarray(bg.symmetries(x, jax.random.PRNGKey(1)))
    xs = np.asarray(x)
    seen = set()
    for r in range(len(xs)):
        found = None
        for flip in (0, 1):
            for k in range(4):
                for perm in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
                    t = [np.rot90(im[:, ::-1] if flip else im, k)[..., list(perm)] for im in xs[r]]
                    if all(np.array_equal(ti, yi) for ti, yi in zip(t, y[r])):
                        found = (flip, k)
        assert found is not None, r
        seen.add(found)
    assert len(seen) == 8
    pairs = np.asarray(bg.draw_pairs(jax.random.PRNGKey(0), 3, 500))
    assert np.all(pairs[:, 0] != pairs[:, 1]) and len({tuple(p) for p in pairs}) == 6


def test_pair_set(rng):
    imgs = rng.uniform(0, 1, (3, 8, 8, 3)).astype(np.float32)
    ps = bg.PairSet.build(imgs, "naive")
    assert ps.pairs.shape == (6, 2) and not np.any(ps.pairs[:, 0] == ps.pairs[:, 1])
    i, j = ps.pairs[4]
    np.testing.assert_allclose(ps.targets[4], (imgs[i] + imgs[j]) / 2, atol=1e-7)
    with pytest.raises(NeurimgError, match="at least two"):
        bg.PairSet.build(imgs[:1], "mixed")


def test_ada_probability_moves_with_the_sign_of_d():
    cfg = GanConfig(ada_target=0.6, ada_kimg=1.0)
    step = 16 / 1000.0
    sure = jnp.full((16, 4, 4), 3.0)  # D calls every real real: r = 1 > 0.6, augment more
    assert float(bg.ada_update(jnp.float32(0.5), sure, cfg, 16)) == pytest.approx(0.5 + step)
    unsure = jnp.concatenate([jnp.full((8, 4, 4), 1.0), jnp.full((8, 4, 4), -1.0)])  # r = 0 < 0.6
    assert float(bg.ada_update(jnp.float32(0.5), unsure, cfg, 16)) == pytest.approx(0.5 - step)
    assert float(bg.ada_update(jnp.float32(1.0), sure, cfg, 16)) == 1.0  # clipped
    assert float(bg.ada_update(jnp.float32(0.0), unsure, cfg, 16)) == 0.0


def test_augment_shares_one_transform_per_tuple(rng):
    img = jnp.asarray(rng.uniform(0, 1, (8, 16, 16, 3)), jnp.float32)
    x = jnp.concatenate([img, img, 2 * img], -1)
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(bg.augment(x, 0.0, key), x)  # p = 0: the identity
    y = bg.augment(x, 1.0, key)
    assert not np.allclose(y, x)
    # every transform is the same for the tuple's images; contrast and brightness act on the
    # whole tuple, so the images keep their relation up to that affine map
    np.testing.assert_allclose(y[..., :3], y[..., 3:6], atol=1e-6)
    g = jax.grad(lambda v: bg.augment(v, 1.0, key).sum())(x)
    assert np.all(np.isfinite(g))


def test_tiny_training_is_finite_and_levels_act(rng):
    imgs = rng.uniform(0, 1, (6, 16, 16, 3)).astype(np.float32)
    cfg = GanConfig(size=16, channels=8, batch=8).validate()  # test_cli_blendgan's tiny GAN: one compile
    (gdef, ddef), state = bg.init_state(cfg, imgs)
    g0 = jax.tree.map(np.asarray, state["g"])
    run = bg.runner(cfg, gdef, ddef)
    state, out = run(state, None, 8)
    assert bool(out["finite"])
    for k in bg.METRICS:
        assert np.all(np.isfinite(np.asarray(out[k][:8]))), k
    assert 0.0 <= float(state["p"]) <= 1.0 and int(state["step"]) == 8
    assert not np.allclose(np.asarray(state["g"]["out"]["kernel"]), g0["out"]["kernel"])
    # the style heads start at zero; after training, A's style at every level and B's differ
    a, b = jnp.asarray(imgs[:1]), jnp.asarray(imgs[1:2])
    key = jax.random.PRNGKey(0)
    to_a = bg.generate(gdef, state["g"], a, b, key, levels=(1.0, 1.0, 1.0))
    to_b = bg.generate(gdef, state["g"], a, b, key, levels=(0.0, 0.0, 0.0))
    assert float(jnp.abs(to_a - to_b).max()) > 0
    # the same noise seed repeats the output
    same = bg.generate(gdef, state["g"], a, b, key)
    np.testing.assert_array_equal(same, bg.generate(gdef, state["g"], a, b, key))
    assert same.shape == (1, 16, 16, 3)


def test_gan_config_validation():
    with pytest.raises(NeurimgError, match="target"):
        GanConfig(target="sum").validate()
    with pytest.raises(NeurimgError, match="multiple of 8"):
        GanConfig(size=20).validate()
    with pytest.raises(NeurimgError, match="ada target"):
        GanConfig(ada_target=1.0).validate()
