"""Loss, optimizer and the jitted multi-step update, data-parallel over a device mesh.

Batches come from the host (`neurimg.sampler`): a step trains on K image slots of P points
each, laid out on the mesh of `neurimg.parallel` (slots along "images", points along
"points"). The loss of a step is the mean, over its real image slots, of each image's MSE over
the pixels drawn from it: the quantity whose per-image PSNR we report. A pixel's prediction is
the field at its centre, or with `TrainConfig.supersample` m > 1 the mean over its m x m
lattice (the pixel as an area average; with `area_pixels` "detail" only on detail pixels, a
flat pixel being the field at one point in its square), plus `tv_weight` times the lattice's
total variation (`lattice_tv`) when the sampler adds the lattice's boundary points.

Training state (a pytree of arrays, replicated on every device):

    params  the model's pure dict (`neurimg.siren`), latents (N, latent_dim) included
    opt     {"net": Adam state of every other parameter,
             "latent_mu", "latent_nu": (N, latent_dim) Adam moments of the latents,
             "latent_count": (N,) int32 updates each latent row has had}
    step    int32 scalar, optimizer steps done
    lr_scale  float32 scalar, the guard's factor on every update (`neurimg.engine.lr_scaled`)

The latents use lazy ("sparse") Adam: only the rows of the step's images are updated, with
bias correction by each row's own update count. When every image is in every step this is
exactly Adam; when a step holds a subset of a large folder, the other images' latents stay put
instead of drifting on stale momentum.

`make_step` returns the pure step(state, batch) -> (state, metrics) that `neurimg.engine` runs
many times per jitted call; `make_runner` wraps it with the mesh's shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from neurimg import engine, siren
from neurimg.config import Config
from neurimg.parallel import Layout

ADAM_B1, ADAM_EPS = 0.9, 1e-8  # optax.adam's defaults, used for both parts; b2 is `TrainConfig.adam_b2`
CLIP_DECAY = 0.9  # the running mean of `relative_clip`: about the last 10 steps
TV_EPS = 1e-3  # Charbonnier smoothing of the TV prior's |d| (`lattice_tv`), for fit and upsample alike


def lr_schedule(cfg: Config, peak: float) -> optax.Schedule:
    """The run's schedule (`neurimg.engine.schedule`) for a peak rate."""
    t = cfg.train
    return engine.schedule(peak, t.steps, t.warmup_steps, t.final_lr_fraction, t.segments)


def relative_clip(factor: float, decay: float = CLIP_DECAY) -> optax.GradientTransformation:
    """Scale each gradient down to at most `factor` times the running mean of the (clipped)
    gradient norms before it, an exponential mean with `decay`; the first step passes as it is.

    The norm falls a hundredfold over a fit, smoothly, and a collapse starts as a jump of the
    norm over a few steps (x50 within a 50-step window on the bundled logos): scaled to the
    recent norm, the jump is held to a slow rise that Adam's moments follow. A fixed clip
    cannot do this, since the norm's level depends on the input (bench/RESULTS.md, "Relative
    gradient clipping"). State: {"mean": float32, 0 until a step has a non-zero gradient, so
    that a zero first gradient cannot hold every later one at 0; "count": int32 steps seen}."""

    def init(params):
        return {"mean": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)}

    def update(grads, state, params=None):
        norm = optax.global_norm(grads)
        started = state["mean"] > 0
        limit = jnp.where(started, factor * state["mean"], jnp.inf)
        scale = jnp.minimum(1.0, limit / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        kept = norm * scale
        mean = jnp.where(started, decay * state["mean"] + (1 - decay) * kept, kept)
        return grads, {"mean": mean, "count": state["count"] + 1}

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Adam for the shared weights (everything but the latents), after `relative_clip` unless
    `TrainConfig.grad_clip` is 0."""
    adam = optax.adam(lr_schedule(cfg, cfg.train.lr), b1=ADAM_B1, b2=cfg.train.adam_b2, eps=ADAM_EPS)
    if not cfg.train.grad_clip:
        return adam
    return optax.chain(relative_clip(cfg.train.grad_clip), adam)


def split_latents(params: dict) -> tuple[dict, jax.Array]:
    net = {k: v for k, v in params.items() if k != "latents"}
    return net, params["latents"]


def init_state(cfg: Config, num_images: int, start=None):
    """Fresh training state (see the module docstring) and the model's graphdef. `start` (3,),
    e.g. the images' mean colour (`TrainConfig.mean_start`), is where the output starts: the
    output bias is set so that the field begins near that flat colour rather than at grey."""
    graphdef, params = siren.init_params(cfg.model, num_images, cfg.train.seed)
    if start is not None:
        params["out_bias"] = jnp.asarray(np.asarray(start, np.float32) - 0.5)  # the model adds 0.5
    net, lat = split_latents(params)
    state = {
        "params": params,
        "opt": {
            "net": make_optimizer(cfg).init(net),
            "latent_mu": jnp.zeros_like(lat),
            "latent_nu": jnp.zeros_like(lat),
            "latent_count": jnp.zeros((num_images,), jnp.int32),
        },
        "step": jnp.zeros((), jnp.int32),
        "lr_scale": jnp.float32(1.0),
    }
    return graphdef, state


def lazy_adam_rows(lat, mu, nu, count, rows, grads, lr, b2: float = 0.999):
    """Adam on the given rows of a table only; `rows` beyond the table (padding) are dropped.
    lat/mu/nu (N, L), count (N,), rows (K,) distinct, grads (K, L) -> new (lat, mu, nu, count)."""
    n = lat.shape[0]
    keep = rows < n
    r = jnp.where(keep, rows, 0)
    c = count[r] + 1
    m = ADAM_B1 * mu[r] + (1 - ADAM_B1) * grads
    v = b2 * nu[r] + (1 - b2) * jnp.square(grads)
    cf = c.astype(jnp.float32)[:, None]
    m_hat = m / (1 - ADAM_B1**cf)
    v_hat = v / (1 - b2**cf)
    new_rows = lat[r] - lr * m_hat / (jnp.sqrt(v_hat) + ADAM_EPS)
    drop = jnp.where(keep, rows, n)  # out of range: dropped by the scatters
    return (
        lat.at[drop].set(new_rows, mode="drop"),
        mu.at[drop].set(m, mode="drop"),
        nu.at[drop].set(v, mode="drop"),
        count.at[drop].set(c, mode="drop"),
    )


def psnr_from_mse(mse):
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-12))


# Points (over all images) per forward/backward pass: a step's batch is processed in chunks of
# about this size and their gradients summed, so each layer's (points, width) activations stay
# in cache instead of streaming through memory (1.5x faster for a 65536-point full batch at
# width 256 on our CPU; bench/RESULTS.md). The gradient is the same up to summation order.
CHUNK_POINTS = 2048


def chunking(batch_images: int, points_per_image: int, chunk_points: int = CHUNK_POINTS) -> tuple[int, int]:
    """(chunks, points per image per chunk) covering `points_per_image` points of each image."""
    n = max(1, -(-batch_images * points_per_image // max(chunk_points, 1)))
    n = min(n, points_per_image)
    return n, -(-points_per_image // n)


def lattice_tv(pts, m: int, eps: float):
    """The total variation per unit of pixel length of each pixel's m x m lattice of values
    with its boundary (`neurimg.sampler`: S = m^2 + 2m points): m times the mean, over its m^2
    horizontal and m^2 vertical neighbour pairs, of the Charbonnier distance sqrt(|d|^2 + eps^2)
    (d over RGB). pts (..., S, C) -> (...)."""
    lead = pts.shape[:-2]
    g = pts[..., : m * m, :].reshape(*lead, m, m, -1)  # [row b, column a]
    right = pts[..., m * m : m * m + m, :][..., :, None, :]  # (..., m, 1, C): a = m, b = 0..m-1
    below = pts[..., m * m + m :, :][..., None, :, :]  # (..., 1, m, C): b = m, a = 0..m-1
    gx = jnp.concatenate([g, right], -2)  # (..., m, m + 1, C)
    gy = jnp.concatenate([g, below], -3)  # (..., m + 1, m, C)
    dx = jnp.sqrt(jnp.square(gx[..., 1:, :] - gx[..., :-1, :]).sum(-1) + eps * eps)
    dy = jnp.sqrt(jnp.square(gy[..., 1:, :, :] - gy[..., :-1, :, :]).sum(-1) + eps * eps)
    return m * (dx.mean((-2, -1)) + dy.mean((-2, -1)))


def make_loss_and_grad(cfg: Config, graphdef, layout: Layout, scale: float, chunk_points: int = CHUNK_POINTS):
    """loss_and_grad(net, z, batch) -> (loss, mse (K,), grad of net, grad of z (K, L)).

    `batch` is one step's batch (see `neurimg.sampler`) as global arrays on the mesh, `z` the
    latents of its slots (K, L). Each device runs its share in chunks of about `chunk_points`
    points and the shares are summed with `psum`; the result is that of one device doing the
    whole batch, up to summation order."""
    precision = cfg.train.precision
    tv_weight, tv_eps = cfg.train.tv_weight, TV_EPS
    axes = ("images", "points")

    detail = cfg.train.supersample > 1 and cfg.train.area_pixels == "detail"  # entries of S pixels' centres too

    def local(net, z, coords, colors, weight, area, denom, valid, total):
        kl, pl, s = coords.shape[:3]  # s points per entry (`neurimg.sampler`)
        m = cfg.train.supersample
        inner = m * m  # the m x m lattice; any more points are its boundary (`boundary`)
        t_all = colors.astype(jnp.float32) / np.float32(scale)
        n_chunks, c_pts = chunking(kl, pl, max(1, chunk_points // s))
        pad = n_chunks * c_pts - pl

        def split(x):
            """(Kl, Pl, ...) -> (n_chunks, Kl, c_pts, ...), zero-padded along Pl."""
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            x = x.reshape((kl, n_chunks, c_pts) + x.shape[2:])
            return jnp.swapaxes(x, 0, 1)

        def chunk_loss(net, z, c, t, w, a):
            pts = siren.apply(graphdef, {**net, "latents": z}, c.reshape(kl, -1, 2), None, precision)  # z: the slots' rows
            pts = pts.reshape(kl, -1, s, pts.shape[-1])  # (Kl, c_pts, S, 3)
            pred = pts[:, :, :inner].mean(2)  # an area entry's pixel: its lattice's mean
            sq = jnp.square(pred - t[:, :, 0]).sum(-1) * w[:, :, 0]  # (Kl, c_pts)
            if detail:  # a point entry: S flat pixels, each at its own point
                each = (jnp.square(pts - t).sum(-1) * w).sum(-1)
                sq = jnp.where(a > 0, sq, each)
            part = sq.sum(-1) / denom  # (Kl,): this chunk's share of each image's MSE
            loss = (part * valid).sum() / total
            if s > inner:  # the TV prior over the lattice and its pairs across the pixel's edges
                tv = (lattice_tv(pts, m, tv_eps) * w[:, :, 0] * a).sum(-1) * 3.0 / denom  # (Kl,), weighted as the MSE
                loss = loss + tv_weight * (tv * valid).sum() / total
            return loss, part

        grad = jax.value_and_grad(chunk_loss, argnums=(0, 1), has_aux=True)

        def body(acc, xs):
            (loss, part), (gn, gz) = grad(net, z, *xs)
            return (acc[0] + loss, acc[1] + part, jax.tree.map(jnp.add, acc[2], gn), acc[3] + gz), None

        zero = (jnp.zeros(()), jnp.zeros((kl,)), jax.tree.map(jnp.zeros_like, net), jnp.zeros_like(z))
        xs = (split(coords), split(t_all), split(weight), split(area))
        if n_chunks == 1:
            (loss, part, gn, gz), _ = body(zero, jax.tree.map(lambda x: x[0], xs))
        else:
            (loss, part, gn, gz), _ = jax.lax.scan(body, zero, xs)
        return (
            jax.lax.psum(loss, axes),
            jax.lax.psum(part, "points"),
            jax.lax.psum(gn, axes),
            jax.lax.psum(gz, "points"),
        )

    img, pts = P("images"), P("images", "points")
    sharded = jax.shard_map(
        local,
        mesh=layout.mesh,
        in_specs=(P(), img, pts, pts, pts, pts, img, img, P()),
        out_specs=(P(), img, P(), img),
        check_vma=False,  # the psums above are written out; gradients inside are per device
    )

    def loss_and_grad(net, z, b):
        total = jnp.maximum(b["valid"].sum(), 1.0)
        return sharded(net, z, b["coords"], b["colors"], b["weight"], b["area"], b["denom"], b["valid"], total)

    return loss_and_grad


def make_step(cfg: Config, graphdef, layout: Layout, scale: float, chunk_points: int = CHUNK_POINTS):
    """The pure step of `fit`: step(state, batch) -> (state, {"loss", "psnr"}) for the engine
    (`neurimg.engine`). psnr is the mean per-image PSNR on the step's batch, before the update."""
    tx = make_optimizer(cfg)
    lr_latent = lr_schedule(cfg, cfg.train.latent_lr)
    loss_and_grad = make_loss_and_grad(cfg, graphdef, layout, scale, chunk_points)

    def step(state, b):
        net, lat = split_latents(state["params"])
        opt = state["opt"]
        rows = b["slot"]
        z = lat[jnp.minimum(rows, lat.shape[0] - 1)]
        loss, mse, g_net, g_z = loss_and_grad(net, z, b)
        updates, net_opt = tx.update(g_net, opt["net"], net)
        net = optax.apply_updates(net, updates)
        lat, mu, nu, count = lazy_adam_rows(
            lat, opt["latent_mu"], opt["latent_nu"], opt["latent_count"], rows, g_z, lr_latent(state["step"]), cfg.train.adam_b2
        )
        new_state = {
            "params": {**net, "latents": lat},
            "opt": {"net": net_opt, "latent_mu": mu, "latent_nu": nu, "latent_count": count},
            "step": state["step"] + 1,
        }
        valid = b["valid"]
        psnr = (psnr_from_mse(mse) * valid).sum() / jnp.maximum(valid.sum(), 1.0)
        return new_state, {"loss": loss, "psnr": psnr}

    return step


def make_runner(
    cfg: Config, graphdef, layout: Layout, scale: float, chunk_points: int = CHUNK_POINTS, state_sharding: Any = None
) -> engine.Runner:
    """`fit`'s step as an engine runner: run(state, batches, n) -> (state, metrics), the input
    state kept (the guard may redo a window from it), the output placed where `state_sharding` says (default: replicated on every device;
    bench/large_folder.py measures latents split over "images" against replicated ones)."""
    rep = layout.replicated()
    return engine.Runner(
        engine.lr_scaled(make_step(cfg, graphdef, layout, scale, chunk_points)),
        ("loss", "psnr"),
        donate=False,  # the guard redoes a window from the state before it
        state_sharding=rep if state_sharding is None else state_sharding,
        out_sharding=rep,
    )
