"""Loss, optimizer and the jitted multi-step update.

Data layout on the device (`Dataset`): every image's pixels are flattened row-major and padded
to the largest image, so B images form arrays of shape (B, Pmax, 3) (colours) and (B, Pmax, 2)
(coordinates, see `neurimg.coords`), with `counts` (B,) the real pixel count of each image.

Each step draws the same number of pixels from every image (uniformly within the image), so
every image weighs the same in the loss: loss = mean over images of that image's MSE. That is
the quantity whose per-image PSNR we report. With `batch_pixels = 0` ("all") every pixel is used
every step (padding masked out).

`make_step_fn` returns a pure function (state, n) -> (state, metrics) that runs n optimizer steps
inside one jitted call (`lax.fori_loop` with a traced trip count, so any n up to `chunk` reuses
the same compiled program). The state is donated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg import siren
from neurimg.config import Config
from neurimg.coords import image_grid

# Largest number of steps one jitted call runs; also the size of its loss buffer.
MAX_CHUNK = 1000

# Incremented each time a step function is traced (tests assert one trace per fit).
TRACE_COUNT = 0


@dataclass
class Dataset:
    pixels: jax.Array  # (B, Pmax, 3) float32
    coords: jax.Array  # (B, Pmax, 2) float32
    counts: jax.Array  # (B,) int32
    sizes: list[tuple[int, int]]  # (width, height) of each image

    @property
    def num_images(self) -> int:
        return len(self.sizes)

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


def make_dataset(images: list[np.ndarray]) -> Dataset:
    """images: list of (H, W, 3) float32 arrays -> padded device arrays."""
    pmax = max(im.shape[0] * im.shape[1] for im in images)
    b = len(images)
    pix = np.zeros((b, pmax, 3), np.float32)
    crd = np.zeros((b, pmax, 2), np.float32)
    counts = np.zeros((b,), np.int32)
    for k, im in enumerate(images):
        h, w = im.shape[:2]
        pix[k, : h * w] = im.reshape(-1, 3)
        crd[k, : h * w] = image_grid(w, h).reshape(-1, 2)
        counts[k] = h * w
    return Dataset(
        jnp.asarray(pix), jnp.asarray(crd), jnp.asarray(counts), [(im.shape[1], im.shape[0]) for im in images]
    )


def pixels_per_image(cfg: Config, data: Dataset) -> int:
    """Pixels drawn from each image per step (0 = full batch)."""
    bp = cfg.train.batch_pixels
    if bp == 0:
        return 0
    pmax = int(data.pixels.shape[1])
    per = max(1, bp // data.num_images)
    return 0 if per >= pmax else per


def lr_schedule(cfg: Config, peak: float) -> optax.Schedule:
    t = cfg.train
    warm = min(t.warmup_steps, max(t.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warm,
        decay_steps=max(t.steps, warm + 1),
        end_value=peak * t.final_lr_fraction,
    )


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Adam for the shared weights and (with its own, larger lr) for the per-image latents."""

    def labels(params):
        return {k: jax.tree.map(lambda _: "latent" if k == "latents" else "net", v) for k, v in params.items()}

    return optax.multi_transform(
        {
            "net": optax.adam(lr_schedule(cfg, cfg.train.lr)),
            "latent": optax.adam(lr_schedule(cfg, cfg.train.latent_lr)),
        },
        labels,
    )


def init_state(cfg: Config, num_images: int):
    """Fresh training state: a pytree of arrays {params, opt, step, key} and the graphdef."""
    graphdef, params = siren.init_params(cfg.model, num_images, cfg.train.seed)
    opt = make_optimizer(cfg).init(params)
    state = {
        "params": params,
        "opt": opt,
        "step": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
    }
    return graphdef, state


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


def make_loss_and_grad(cfg: Config, graphdef, data: Dataset, chunk_points: int = CHUNK_POINTS):
    """Build (batch(key) -> (coords, targets), loss_and_grad(params, coords, targets)).

    `batch` draws a step's pixels: (B, P, 2) coordinates and (B, P, 3) colours, P = the pixels
    per image per step (or Pmax for the full batch). `loss_and_grad` returns the loss (mean
    over images of each image's MSE over its real pixels), the per-image MSE (B,) and the
    gradient, computed in chunks of about `chunk_points` points whose gradients are summed.
    """
    per = pixels_per_image(cfg, data)
    b = data.num_images
    ids = jnp.arange(b, dtype=jnp.int32)
    pixels, coords, counts = data.pixels, data.coords, data.counts
    p_step = per if per else int(pixels.shape[1])
    n_chunks, c_pts = chunking(b, p_step, chunk_points)
    pad = n_chunks * c_pts - p_step
    weight = None
    if (per == 0 and not data.uniform) or pad:
        limit = counts[:, None] if per == 0 else jnp.full((b, 1), p_step)
        valid = jnp.arange(p_step)[None, :] < limit  # (B, p_step): real pixels
        weight = jnp.pad(valid.astype(jnp.float32), ((0, 0), (0, pad)))
    # Per-image denominators of the MSE: real pixels (full batch) or pixels drawn (minibatch).
    denom = (counts.astype(jnp.float32) if per == 0 else jnp.full((b,), float(per))) * 3.0

    def batch(key):
        if per == 0:
            return coords, pixels
        u = jax.random.uniform(key, (b, per))
        idx = jnp.minimum((u * counts[:, None]).astype(jnp.int32), counts[:, None] - 1)
        c = jnp.take_along_axis(coords, idx[..., None], axis=1)
        t = jnp.take_along_axis(pixels, idx[..., None], axis=1)
        return c, t

    def split(x):
        """(B, P, k) -> (n_chunks, B, c_pts, k), zero-padded along P."""
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        return x.reshape(b, n_chunks, c_pts, x.shape[-1]).swapaxes(0, 1)

    def chunk_loss(params, c, t, w):
        """Sum over the chunk's points of each image's squared error / its denominator."""
        pred = siren.apply(graphdef, params, c, ids, cfg.train.precision)
        sq = jnp.square(pred - t).sum(-1)  # (B, c_pts)
        part = (sq if w is None else sq * w).sum(-1) / denom  # (B,)
        return part.mean(), part

    chunk_grad = jax.value_and_grad(chunk_loss, has_aux=True)

    def loss_and_grad(params, c, t):
        if n_chunks == 1:
            (loss, mse), grads = chunk_grad(params, c, t, weight)
            return loss, mse, grads
        w = None if weight is None else weight.reshape(b, n_chunks, c_pts).swapaxes(0, 1)

        def body(acc, xs):
            (loss, part), g = chunk_grad(params, xs[0], xs[1], None if w is None else xs[2])
            return (acc[0] + loss, acc[1] + part, jax.tree.map(jnp.add, acc[2], g)), None

        zero = (jnp.zeros(()), jnp.zeros((b,)), jax.tree.map(jnp.zeros_like, params))
        xs = (split(c), split(t)) if w is None else (split(c), split(t), w)
        (loss, mse, grads), _ = jax.lax.scan(body, zero, xs)
        return loss, mse, grads

    return batch, loss_and_grad


def make_step_fn(
    cfg: Config, graphdef, data: Dataset, chunk_points: int = CHUNK_POINTS
) -> Callable[[Any, Any], tuple[Any, dict]]:
    """Build `run(state, n) -> (state, {'loss': (MAX_CHUNK,), 'psnr': (MAX_CHUNK,)})`.

    Runs n (1 <= n <= MAX_CHUNK) optimizer steps; entries i < n of the buffers hold the loss and
    mean per-image PSNR (on that step's pixel batch, before the update) of each step.
    """
    tx = make_optimizer(cfg)
    batch, loss_and_grad = make_loss_and_grad(cfg, graphdef, data, chunk_points)

    def one_step(i, carry):
        state, losses, psnrs = carry
        key = jax.random.wrap_key_data(state["key"])
        key, sub = jax.random.split(key)
        c, t = batch(sub)
        loss, mse, grads = loss_and_grad(state["params"], c, t)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt": opt, "step": state["step"] + 1, "key": jax.random.key_data(key)}
        losses = losses.at[i].set(loss)
        psnrs = psnrs.at[i].set(psnr_from_mse(mse).mean())
        return new_state, losses, psnrs

    def run(state, n):
        global TRACE_COUNT
        TRACE_COUNT += 1
        buf = jnp.full((MAX_CHUNK,), jnp.nan, jnp.float32)
        state, losses, psnrs = jax.lax.fori_loop(0, n, one_step, (state, buf, buf))
        return state, {"loss": losses, "psnr": psnrs}

    return jax.jit(run, donate_argnums=0)


def make_render_fn(graphdef):
    """Jitted (params, coords (1, P, 2), image id (1,)) -> RGB (1, P, 3)."""

    @jax.jit
    def render(params, coords, image_ids):
        return siren.apply(graphdef, params, coords, image_ids)

    return render
