import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neurimg import engine, parallel, sampler, train
from neurimg.fit import fit
from neurimg.imageset import ImageSet

from conftest import tiny_config


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = np.ones((16, 16, 3), np.float32)
        im[4:12, 2 + k : 10 + k] = rng.uniform(size=3)
        out.append(im)
    return out


def _setup(cfg, images, batch_images=0, devices=1):
    """(image set, sampler, layout) for float images, on `devices` CPU devices."""
    s = ImageSet.from_arrays([f"{k}.png" for k in range(len(images))], ["-"] * len(images), images)
    t = cfg.train.batched(int(s.counts.sum()), len(s))
    plan = sampler.plan_batches(s.sizes, t.batch_pixels, batch_images)
    layout = parallel.make_layout(jax.local_devices()[:devices], plan.images)
    plan = sampler.plan_batches(s.sizes, t.batch_pixels, batch_images, point_multiple=layout.shape[1])
    return s, sampler.Sampler(s, plan, len(s), t.seed), layout


@pytest.mark.learned
def test_step_runs_any_chunk_length_with_one_compile():
    cfg = tiny_config(steps=50)
    s, draw, layout = _setup(cfg, _images())
    g, st = train.init_state(cfg, 3)
    st = layout.put_replicated(jax.device_get(st))  # as fit places it: the same sharding in and out
    before = engine.TRACE_COUNT
    fn = train.make_runner(cfg, g, layout, s.scale)
    losses, step = [], 0
    for n in (1, 7, 3, 20):
        st, m = fn(st, layout.put_batch(draw.batches(step, n, 32)), n)
        step += n
        l = np.asarray(m["loss"])
        assert np.all(np.isfinite(l[:n])) and np.all(np.isnan(l[n:]))
        losses.extend(l[:n])
    assert int(st["step"]) == 31 and bool(m["finite"])
    assert engine.TRACE_COUNT - before == 1
    assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_chunked_equals_single_steps():
    """n steps in one call == n calls of one step (the same batches, the same updates)."""
    cfg = tiny_config(steps=20)
    s, draw, layout = _setup(cfg, _images())
    g, a = train.init_state(cfg, 3)
    _, b = train.init_state(cfg, 3)
    fn = train.make_runner(cfg, g, layout, s.scale)
    a, _ = fn(a, layout.put_batch(draw.batches(0, 6, 8)), 6)
    for i in range(6):
        b, _ = fn(b, layout.put_batch(draw.batches(i, 1, 8)), 1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.learned
def test_mixed_sizes_full_batch_mask():
    imgs = [np.full((4, 6, 3), 0.2, np.float32), np.full((8, 8, 3), 0.9, np.float32)]
    cfg = tiny_config(batch_pixels=0, steps=100)
    s, draw, layout = _setup(cfg, imgs)
    assert draw.plan.static and draw.plan.points == 64
    b = draw.batch(0)
    assert b["weight"].sum((1, 2)).tolist() == [24, 64] and b["denom"].tolist() == [72, 192]
    g, st = train.init_state(cfg, 2)
    fn = train.make_runner(cfg, g, layout, s.scale)
    st, m = fn(st, layout.put_batch(draw.batches(0, 1, 1)), 100)
    assert float(m["loss"][99]) < 1e-3  # padding (zeros) did not pull the first image down


def test_fit_compiles_once(tmp_path, logos4):
    before = engine.TRACE_COUNT
    cfg = tiny_config(steps=87, log_every=5, snapshots=(1, 3, 11))
    res = fit([str(logos4)], tmp_path / "run", cfg)
    assert res.steps == 87
    assert engine.TRACE_COUNT - before == 1


def _reference_loss(params, cfg, images):
    """A plain, independent SIREN and loss (jnp.sin, one image at a time, no chunks, no
    padding): loss = mean over images of each image's MSE over its pixels."""
    from neurimg.coords import image_grid

    n_sine = cfg.model.hidden_layers + 1
    mses = []
    for k, im in enumerate(images):
        h, w = im.shape[:2]
        x = jnp.asarray(image_grid(w, h).reshape(-1, 2))
        shifts = (params["latents"][k] @ params["modulation"]).reshape(n_sine, -1)
        for i in range(n_sine):
            layer = params["layers"][i]
            x = jnp.sin(cfg.model.w0 * (x @ layer["kernel"] + layer["bias"] + shifts[i]))
        pred = x @ params["out_kernel"] + params["out_bias"] + 0.5
        mses.append(jnp.mean(jnp.square(pred - jnp.asarray(im.reshape(-1, 3)))))
    mses = jnp.stack(mses)
    return mses.mean(), mses


def _grads(cfg, images, chunk_points, params):
    s, draw, layout = _setup(cfg, images)
    b = layout.put_batch(draw.batches(0, 1, 1))
    b = jax.tree.map(lambda x: x[0], b)
    g, _ = train.init_state(cfg, len(images))
    net, lat = train.split_latents(params)
    fn = jax.jit(train.make_loss_and_grad(cfg, g, layout, s.scale, chunk_points))
    loss, mse, gn, gz = fn(net, lat[b["slot"]], b)
    return loss, mse, {**gn, "latents": gz}


def test_fast_loss_and_gradients_match_a_plain_reference():
    """The chunked, padded, polynomial-sine step computes the same loss, per-image MSE and
    gradient as the plain reference, for mixed image sizes (masked padding) and with chunks
    that do not divide the pixel count. Tolerance: 1e-5 relative on the loss, and 2e-4 of each
    gradient leaf's largest entry (the fast sine's error is 2e-7 absolute, amplified by w0).
    The images are exact multiples of 1/255, so storing them as uint8 loses nothing."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(12, 10, 3)).astype(np.float32) / 255, rng.integers(0, 256, size=(7, 9, 3)).astype(np.float32) / 255]
    cfg = tiny_config(batch_pixels=0)
    g, st = train.init_state(cfg, 2)
    params = jax.tree.map(jnp.asarray, st["params"])
    params["latents"] = jnp.asarray(rng.normal(size=params["latents"].shape), jnp.float32)  # non-zero shifts
    ref_loss, ref_mse = _reference_loss(params, cfg, images)
    ref_grads = jax.grad(lambda p: _reference_loss(p, cfg, images)[0])(params)
    for chunk_points in (10_000, 50, 7):  # one pass; 5 chunks with padding; 18 chunks
        loss, mse, grads = _grads(cfg, images, chunk_points, params)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(mse), np.asarray(ref_mse), rtol=1e-5)
        for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            scale = float(np.max(np.abs(r))) + 1e-12
            assert float(np.max(np.abs(np.asarray(a) - np.asarray(r)))) <= 2e-4 * scale, chunk_points


def test_minibatch_chunks_give_the_same_gradient():
    """A minibatch split into padded chunks gives the gradient of the unsplit minibatch."""
    cfg = tiny_config(batch_pixels=3 * 37)
    g, st = train.init_state(cfg, 3)
    outs = [_grads(cfg, _images(), c, st["params"]) for c in (10_000, 16)]
    assert train.chunking(3, 37, 16) == (7, 6)  # 7 chunks of 6 points per image: 5 padded
    (l1, m1, g1), (l2, m2, g2) = outs
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m1), np.asarray(m2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b))))


def test_chunking_covers_every_point():
    for b, p, c in [(1, 65536, 2048), (48, 170, 2048), (1, 5, 2048), (3, 10, 1), (12, 682, 2048)]:
        n, per = train.chunking(b, p, c)
        assert n * per >= p and (n - 1) * per < p and per >= 1
        assert b * per < c + b or n == p  # about chunk_points: at most one extra point per image


def test_lazy_latent_adam_is_adam_on_the_rows_it_touches():
    """Updating every row each step is exactly optax.adam; rows left out do not move at all,
    and a row's bias correction counts only its own updates."""
    rng = np.random.default_rng(0)
    lat = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    mu, nu, count = jnp.zeros_like(lat), jnp.zeros_like(lat), jnp.zeros((5,), jnp.int32)
    tx = optax.adam(0.01)
    ref, opt = lat, tx.init(lat)
    for _ in range(4):
        gr = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
        lat, mu, nu, count = train.lazy_adam_rows(lat, mu, nu, count, jnp.arange(5), gr, 0.01)
        up, opt = tx.update(gr, opt)
        ref = optax.apply_updates(ref, up)
    np.testing.assert_allclose(np.asarray(lat), np.asarray(ref), rtol=1e-6, atol=1e-7)
    # rows 1 and 3 only, plus a padding slot (index 5, out of range): the others stay put
    gr = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    new, mu2, nu2, count2 = train.lazy_adam_rows(lat, mu, nu, count, jnp.array([1, 3, 5]), gr, 0.01)
    assert np.asarray(count2).tolist() == [4, 5, 4, 5, 4]
    changed = np.any(np.asarray(new) != np.asarray(lat), axis=1)
    assert changed.tolist() == [False, True, False, True, False]
    np.testing.assert_array_equal(np.asarray(mu2)[[0, 2, 4]], np.asarray(mu)[[0, 2, 4]])


def test_precision_reaches_the_hidden_matmuls_of_the_real_step():
    """The compiled step asks the backend for what --precision says (a CPU computes tf32 as
    float32, so comparing numbers there would prove nothing): float32 keeps every dot at
    HIGHEST; tf32 leaves the hidden dots at the backend's DEFAULT (TF32 on NVIDIA GPUs) and the
    first layer's at HIGHEST; bf16 feeds the hidden dots bfloat16 operands."""
    import re

    texts = {}
    for prec in ("float32", "tf32", "bf16"):
        cfg = tiny_config(batch_pixels=0, precision=prec)
        s, draw, layout = _setup(cfg, _images())
        g, st = train.init_state(cfg, 3)
        b = jax.tree.map(lambda x: x[0], layout.put_batch(draw.batches(0, 1, 1)))
        net, lat = train.split_latents(st["params"])
        fn = jax.jit(train.make_loss_and_grad(cfg, g, layout, s.scale))
        texts[prec] = fn.lower(net, lat[b["slot"]], b).as_text()
    dots = {p: re.findall(r"dot_general .*?precision = \[(\w+), \w+\] : \(tensor<[^>]*x(\w+)>", t) for p, t in texts.items()}
    assert dots["float32"] and all(d == ("HIGHEST", "f32") for d in dots["float32"])
    assert ("DEFAULT", "f32") in dots["tf32"] and ("HIGHEST", "f32") in dots["tf32"]  # hidden / first layer
    assert ("DEFAULT", "bf16") in dots["bf16"] and ("DEFAULT", "bf16") not in dots["tf32"] + dots["float32"]


@pytest.mark.learned
def test_bf16_steps_stay_close_to_float32():
    """bf16 (training only) gives the float32 loss and gradient up to its rounding (8 mantissa
    bits: a few 1e-2 relative), and bf16 training still learns."""
    results = {}
    for prec in ("float32", "bf16"):
        cfg = tiny_config(batch_pixels=0, precision=prec)
        g, st = train.init_state(cfg, 3)
        results[prec] = _grads(cfg, _images(), train.CHUNK_POINTS, st["params"])
    l32, _, g32 = results["float32"]
    loss, _, grads = results["bf16"]
    np.testing.assert_allclose(float(loss), float(l32), rtol=5e-2)
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b)
    assert np.linalg.norm(a - b) > 0  # bf16 did round something
    cfg = tiny_config(batch_pixels=0, precision="bf16", steps=60)
    s, draw, layout = _setup(cfg, _images())
    g, st = train.init_state(cfg, 3)
    st, m = train.make_runner(cfg, g, layout, s.scale)(st, layout.put_batch(draw.batches(0, 1, 1)), 60)
    loss = np.asarray(m["loss"])[:60]
    assert loss[-5:].mean() < 0.3 * loss[0]


def test_lattice_tv_is_the_total_variation_of_the_lattice_and_its_boundary():
    """`train.lattice_tv` against a NumPy computation on the (m+1) x (m+1) lattice (the pixel's
    m x m points, one more column to the right and one more row below): m times the mean of
    the m^2 horizontal and m^2 vertical neighbour distances (Charbonnier)."""
    m, eps = 3, 1e-3
    rng = np.random.default_rng(0)
    full = rng.random((2, 5, m + 1, m + 1, 3))  # (pixels..., b, a, C)
    inner = full[..., :m, :m, :].reshape(2, 5, m * m, 3)
    right = full[..., :m, m, :]  # a = m, b = 0..m-1
    below = full[..., m, :m, :]  # b = m, a = 0..m-1
    pts = np.concatenate([inner, right, below], -2)
    got = np.asarray(train.lattice_tv(jnp.asarray(pts, jnp.float32), m, eps))
    dx = np.sqrt(np.square(full[..., :m, 1:, :] - full[..., :m, :-1, :]).sum(-1) + eps**2)
    dy = np.sqrt(np.square(full[..., 1:, :m, :] - full[..., :-1, :m, :]).sum(-1) + eps**2)
    want = m * (dx.mean((-2, -1)) + dy.mean((-2, -1)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_relative_clip_holds_a_jump_to_its_factor_of_the_running_mean():
    """Worked by hand with factor 1.5 and decay 0.9: norms 2, 2, 20, 1, 30.
    step 0 passes (mean 2); step 1 passes (2 <= 3; mean 2); step 2 is held to 3 (scale 3/20;
    mean 0.9*2 + 0.1*3 = 2.1); step 3 passes (mean 1.99); step 4 is held to 2.985."""
    tx = train.relative_clip(1.5, 0.9)
    direction = {"a": jnp.array([0.6, 0.0]), "b": jnp.array([[0.8]])}  # unit norm over the tree
    state = tx.init(direction)
    got = []
    for n in (2.0, 2.0, 20.0, 1.0, 30.0):
        g = jax.tree.map(lambda x: x * n, direction)
        out, state = tx.update(g, state)
        got.append(float(optax.global_norm(out)))
        # the direction is kept: only the length changes
        np.testing.assert_allclose(np.asarray(out["a"]) / got[-1], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got, [2.0, 2.0, 3.0, 1.0, 2.985], rtol=1e-6)
    np.testing.assert_allclose(float(state["mean"]), 0.9 * 1.99 + 0.1 * 2.985, rtol=1e-6)
    # a zero first gradient does not start the mean at 0 (which would hold every later one at 0)
    state = tx.init(direction)
    for n, want in ((0.0, 0.0), (5.0, 5.0), (100.0, 7.5)):
        out, state = tx.update(jax.tree.map(lambda x: x * n, direction), state)
        np.testing.assert_allclose(float(optax.global_norm(out)), want, rtol=1e-6)


def test_grad_clip_zero_is_plain_adam_and_old_runs_keep_it_off():
    """--grad-clip 0 gives optax.adam's state (what runs stored before the clip hold), and a
    stored config without the setting reads as 0, so resuming an old run trains as it did."""
    from neurimg.config import Config

    cfg = tiny_config()
    off = Config(cfg.model, dataclasses.replace(cfg.train, grad_clip=0.0, lr=1e-3))
    on = Config(cfg.model, dataclasses.replace(cfg.train, grad_clip=1.5, lr=1e-3))
    params = {"w": jnp.ones((3,))}
    plain = optax.adam(train.lr_schedule(off, 1e-3)).init(params)
    assert jax.tree.structure(train.make_optimizer(off).init(params)) == jax.tree.structure(plain)
    assert jax.tree.structure(train.make_optimizer(on).init(params)) != jax.tree.structure(plain)
    d = on.to_dict()
    del d["train"]["grad_clip"]
    assert Config.from_dict(d).train.grad_clip == 0.0
    for bad in (-1, 0.5, 1000, True, float("nan")):
        with pytest.raises(Exception, match="grad-clip"):
            Config(cfg.model, dataclasses.replace(cfg.train, grad_clip=bad)).validate()
