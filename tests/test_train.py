import jax
import jax.numpy as jnp
import numpy as np

from neurimg import train
from neurimg.data import load_images
from neurimg.fit import fit

from conftest import tiny_config


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = np.ones((16, 16, 3), np.float32)
        im[4:12, 2 + k : 10 + k] = rng.uniform(size=3)
        out.append(im)
    return out


def test_step_runs_any_chunk_length_with_one_compile():
    cfg = tiny_config(steps=50)
    data = train.make_dataset(_images())
    g, st = train.init_state(cfg, 3)
    before = train.TRACE_COUNT
    fn = train.make_step_fn(cfg, g, data)
    losses = []
    for n in (1, 7, 3, 20):
        st, m = fn(st, jnp.int32(n))
        l = np.asarray(m["loss"])
        assert np.all(np.isfinite(l[:n])) and np.all(np.isnan(l[n:]))
        losses.extend(l[:n])
    assert int(st["step"]) == 31
    assert train.TRACE_COUNT - before == 1
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_chunked_equals_single_steps():
    """n steps in one call == n calls of one step (same keys, same updates)."""
    cfg = tiny_config(steps=20)
    data = train.make_dataset(_images())
    g, a = train.init_state(cfg, 3)
    _, b = train.init_state(cfg, 3)
    fn = train.make_step_fn(cfg, g, data)
    a, _ = fn(a, jnp.int32(6))
    for _ in range(6):
        b, _ = fn(b, jnp.int32(1))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_mixed_sizes_full_batch_mask():
    imgs = [np.full((4, 6, 3), 0.2, np.float32), np.full((8, 8, 3), 0.9, np.float32)]
    data = train.make_dataset(imgs)
    assert data.pixels.shape == (2, 64, 3) and list(np.asarray(data.counts)) == [24, 64]
    cfg = tiny_config(batch_pixels=0, steps=100)
    g, st = train.init_state(cfg, 2)
    fn = train.make_step_fn(cfg, g, data)
    st, m = fn(st, jnp.int32(100))
    assert float(m["loss"][99]) < 1e-3  # padding (zeros) did not pull the first image down


def test_fit_compiles_once(tmp_path, logos4):
    before = train.TRACE_COUNT
    cfg = tiny_config(steps=37, log_every=5, snapshots=(1, 3, 11))
    res = fit([str(logos4)], tmp_path / "run", cfg)
    assert res.steps == 37
    assert train.TRACE_COUNT - before == 1
