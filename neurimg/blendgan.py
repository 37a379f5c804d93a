"""The conditional GAN blender (issue 15; in progress: the data, the networks, ADA and the
training step; the command line, checkpoints and the measured defaults are still to come).

The proposal neurimg was built from: learn blends of a folder's images as a conditional GAN.
- Data (`PairSet`): every ordered pair (A, B) of the folder's images with its real
  combination, the exact mixed-gradient blend (`target="mixed"`: at each pixel the stronger
  of the two gradients, solved exactly over the full canvas by `neurimg.blend`) or the naive
  average (A + B) / 2 (`target="naive"`, the proposal as written).
- Generator (`Generator`): a U-Net over (A, B, (A+B)/2) that predicts the blend as the naive
  average plus a learned residual. Its decoder is modulated StyleGAN-style (AdaIN: each
  channel's instance-normalised activation scaled and shifted by a style) at three levels:
  coarse (1/8 and 1/4 resolution), middle (1/2) and fine (full). Each level's style is
  alpha * s(A) + (1 - alpha) * s(B), with s a style encoder shared by both images, alpha
  learned per level (the "learned balance") or set by the user (`levels`). Per-pixel noise,
  scaled by learned per-channel strengths, enters every decoder level.
- Discriminator (`Discriminator`): a conditional patch discriminator over the whole tuple
  (A, B, C), 9 channels.
- ADA (`augment`, `ada_update`; Karras et al. 2020): each real and generated tuple is
  augmented before the discriminator, one transform for the three images of a tuple: x-flip,
  a rotation by a multiple of 90 degrees, an integer translation (circular), brightness and
  contrast, each applied with probability p. p follows the sign-of-D heuristic:
  r = E[sign(D(real))] above the target means D is overfitting, so p rises.

Images are (B, H, W, 3) float32 in [0, 1], channels last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from neurimg.config import GanConfig
from neurimg.errors import NeurimgError

LEVELS = ("coarse", "middle", "fine")


# --------------------------------------------------------------------------------------------
# data


def combination(a: np.ndarray, b: np.ndarray, target: str) -> np.ndarray:
    """The real combination of two same-size images (H, W, 3): the exact mixed-gradient blend
    over the full canvas (clipped to [0, 1], as `neurimg blend --solver exact --mode mixed`
    writes it) or the naive average."""
    if target == "naive":
        return ((np.asarray(a, np.float64) + b) / 2).astype(np.float32)
    from neurimg import blend as bl

    inside = np.ones(a.shape[:2], bool)
    t = bl.targets(a, np.asarray(b, np.float64), inside, "mixed")
    return np.clip(bl.exact_solution(t), 0.0, 1.0).astype(np.float32)


@dataclass
class PairSet:
    """Every ordered pair (i, j), i != j, of `images` (N, H, W, 3) with its combination."""

    images: np.ndarray  # (N, H, W, 3) float32
    pairs: np.ndarray  # (P, 2) int32
    targets: np.ndarray  # (P, H, W, 3) float32

    @staticmethod
    def build(images: np.ndarray, target: str) -> "PairSet":
        images = np.asarray(images, np.float32)
        n = len(images)
        if n < 2:
            raise NeurimgError(f"a GAN blender needs at least two images, got {n}")
        pairs = np.array([(i, j) for i in range(n) for j in range(n) if i != j], np.int32)
        tg = np.stack([combination(images[i], images[j], target) for i, j in pairs])
        return PairSet(images, pairs, tg)


# --------------------------------------------------------------------------------------------
# networks


def _lrelu(x):
    return jax.nn.leaky_relu(x, 0.2)


def _up(x):
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")


def _instance_norm(x, eps=1e-5):
    mu = x.mean((1, 2), keepdims=True)
    var = x.var((1, 2), keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps)


def _downsampling(cin: int, c: int, rngs: nnx.Rngs) -> nnx.List:
    """Three stride-2 3x3 convolutions, cin -> c -> 2c -> 4c channels (S -> S/8)."""
    return nnx.List([nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in ((cin, c), (c, 2 * c), (2 * c, 4 * c))])


def _run_down(convs, x):
    for conv in convs:
        x = _lrelu(conv(x))
    return x


class StyleEncoder(nnx.Module):
    """One image (B, S, S, 3) -> its style code (B, style_dim): convolutions, global mean."""

    def __init__(self, cfg: GanConfig, rngs: nnx.Rngs):
        c = cfg.channels
        self.convs = _downsampling(3, c, rngs)
        self.out = nnx.Linear(4 * c, cfg.style_dim, rngs=rngs)

    def __call__(self, x):
        return self.out(_run_down(self.convs, x).mean((1, 2)))


class ModulatedBlock(nnx.Module):
    """conv -> + noise * strength -> AdaIN(style) -> leaky ReLU."""

    def __init__(self, cin: int, cout: int, style_dim: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
        self.style = nnx.Linear(style_dim, 2 * cout, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.noise_strength = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x, style, noise):
        x = self.conv(x) + noise * self.noise_strength[...]
        scale, shift = jnp.split(self.style(style), 2, axis=-1)
        x = _instance_norm(x) * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
        return _lrelu(x)


class Generator(nnx.Module):
    """(A, B) -> blend (see the module docstring). Decoder blocks by level: coarse at S/8 and
    S/4, middle at S/2, fine at S."""

    def __init__(self, cfg: GanConfig, rngs: nnx.Rngs):
        c = cfg.channels
        ch = [c, 2 * c, 4 * c, 4 * c]  # at S, S/2, S/4, S/8
        self.enc = nnx.List([
            nnx.Conv(9, ch[0], (3, 3), rngs=rngs),
            nnx.Conv(ch[0], ch[1], (3, 3), strides=2, rngs=rngs),
            nnx.Conv(ch[1], ch[2], (3, 3), strides=2, rngs=rngs),
            nnx.Conv(ch[2], ch[3], (3, 3), strides=2, rngs=rngs),
        ])
        sd = cfg.style_dim
        self.styles = StyleEncoder(cfg, rngs)
        self.dec = nnx.List([
            ModulatedBlock(ch[3], ch[3], sd, rngs),  # S/8, coarse
            ModulatedBlock(ch[3] + ch[2], ch[2], sd, rngs),  # S/4, coarse
            ModulatedBlock(ch[2] + ch[1], ch[1], sd, rngs),  # S/2, middle
            ModulatedBlock(ch[1] + ch[0], ch[0], sd, rngs),  # S, fine
        ])
        self.level_of_block = (0, 0, 1, 2)
        self.out = nnx.Conv(ch[0], 3, (1, 1), kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.balance = nnx.Param(jnp.zeros((3,), jnp.float32))  # logit of each level's share of A

    def alphas(self, levels=None):
        """Each level's share of A's style (3,): `levels` if given, else the learned balance."""
        return jax.nn.sigmoid(self.balance[...]) if levels is None else jnp.asarray(levels, jnp.float32)

    def __call__(self, a, b, key, levels=None):
        naive = (a + b) / 2
        x = jnp.concatenate([a, b, naive], -1)
        skips = []
        for i, conv in enumerate(self.enc):
            x = _lrelu(conv(x))
            skips.append(x)
        sa, sb = self.styles(a), self.styles(b)
        al = self.alphas(levels)
        keys = jax.random.split(key, len(self.dec))
        h = skips[-1]
        for k, block in enumerate(self.dec):
            if k > 0:
                h = jnp.concatenate([_up(h), skips[-1 - k]], -1)
            alpha = al[self.level_of_block[k]]
            style = alpha * sa + (1 - alpha) * sb
            noise = jax.random.normal(keys[k], h.shape[:3] + (1,), h.dtype)
            h = block(h, style, noise)
        return naive + self.out(h)


class Discriminator(nnx.Module):
    """A tuple (B, S, S, 9) -> patch logits (B, S/8, S/8)."""

    def __init__(self, cfg: GanConfig, rngs: nnx.Rngs):
        c = cfg.channels
        self.convs = _downsampling(9, c, rngs)
        self.out = nnx.Conv(4 * c, 1, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.out(_run_down(self.convs, x))[..., 0]


def init(cfg: GanConfig):
    """(generator graphdef, discriminator graphdef, {"g": params, "d": params}) as pure dicts."""
    rngs = nnx.Rngs(cfg.seed)
    gdef, gstate = nnx.split(Generator(cfg, rngs))
    ddef, dstate = nnx.split(Discriminator(cfg, rngs))
    return gdef, ddef, {"g": nnx.to_pure_dict(gstate), "d": nnx.to_pure_dict(dstate)}


def generate(gdef, gparams, a, b, key, levels=None):
    """The generator as a pure function of its parameters."""
    return nnx.merge(gdef, gparams)(a, b, key, levels)


def discriminate(ddef, dparams, tuples):
    return nnx.merge(ddef, dparams)(tuples)


# --------------------------------------------------------------------------------------------
# adaptive discriminator augmentation


def augment(x, p, key):
    """Augment tuples x (B, S, S, C), one random transform per tuple shared by its channels:
    x-flip, rotation by k * 90 degrees, integer translation by up to S/8 (circular), brightness
    (+N(0, 0.2)) and contrast (x lognormal(0, 0.5 ln 2) about the tuple's mean), each with
    probability p. Differentiable in x."""
    bsz, s = x.shape[0], x.shape[1]
    ks = jax.random.split(key, 9)
    on = [jax.random.uniform(ks[i], (bsz,)) < p for i in range(5)]

    def sel(m, new, old):
        return jnp.where(m[:, None, None, None], new, old)

    x = sel(on[0], x[:, :, ::-1], x)
    k = jax.random.randint(ks[5], (bsz,), 1, 4)
    rots = [jnp.rot90(x, r, axes=(1, 2)) for r in (1, 2, 3)]
    rot = jnp.select([(k == r)[:, None, None, None] for r in (1, 2, 3)], rots)
    x = sel(on[1], rot, x)
    t = s // 8
    shift = jax.random.randint(ks[6], (bsz, 2), -t, t + 1)
    moved = jax.vmap(lambda im, d: jnp.roll(im, (d[0], d[1]), axis=(0, 1)))(x, shift)
    x = sel(on[2], moved, x)
    bright = jax.random.normal(ks[7], (bsz, 1, 1, 1)) * 0.2
    x = sel(on[3], x + bright, x)
    contrast = jnp.exp(jax.random.normal(ks[8], (bsz, 1, 1, 1)) * 0.5 * math.log(2))
    mean = x.mean((1, 2, 3), keepdims=True)
    return sel(on[4], (x - mean) * contrast + mean, x)


def ada_update(p, real_logits, cfg: GanConfig, batch: int):
    """One step of the sign-of-D heuristic: p moves by batch / (ada_kimg * 1000) up when
    r = E[sign(D(real))] exceeds the target (D too sure of the reals), down otherwise."""
    r = jnp.mean(jnp.sign(real_logits))
    return jnp.clip(p + jnp.sign(r - cfg.ada_target) * batch / (cfg.ada_kimg * 1000.0), 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# the training step (two optimizers, alternating, in one engine step)


def optimizers(cfg: GanConfig):
    return (optax.adam(cfg.lr_g, b1=0.5, b2=0.99), optax.adam(cfg.lr_d, b1=0.5, b2=0.99))


def init_state(cfg: GanConfig, data: PairSet):
    """(graphdefs, the training state). The state holds the data on the device (constant)."""
    gdef, ddef, params = init(cfg)
    tx_g, tx_d = optimizers(cfg)
    state = {
        "g": params["g"], "d": params["d"],
        "opt_g": tx_g.init(params["g"]), "opt_d": tx_d.init(params["d"]),
        "p": jnp.float32(0.0), "step": jnp.int32(0), "key": jax.random.PRNGKey(cfg.seed),
        "data": {"images": jnp.asarray(data.images), "pairs": jnp.asarray(data.pairs), "targets": jnp.asarray(data.targets)},
    }
    return (gdef, ddef), state


def make_step(cfg: GanConfig, gdef, ddef):
    """step(state, batch) -> (state, metrics) for `neurimg.engine.Runner`: batch is None; a
    step draws cfg.batch pairs, updates D on real and generated tuples (both augmented with
    probability p), then G (adversarial + l1_weight * L1 to the target), then p (ADA)."""
    tx_g, tx_d = optimizers(cfg)
    n = cfg.batch

    def step(state: dict[str, Any], batch):
        key, k_idx, k_gen, k_a1, k_a2, k_a3 = jax.random.split(state["key"], 6)
        data = state["data"]
        idx = jax.random.randint(k_idx, (n,), 0, data["pairs"].shape[0])
        pr = data["pairs"][idx]
        a, b, t = data["images"][pr[:, 0]], data["images"][pr[:, 1]], data["targets"][idx]
        p = state["p"]
        # G runs once: its output feeds D's update, then G's gradient comes back through its VJP.
        f, g_vjp = jax.vjp(lambda gp: generate(gdef, gp, a, b, k_gen), state["g"])

        def d_loss(dp):
            real = discriminate(ddef, dp, augment(jnp.concatenate([a, b, t], -1), p, k_a1))
            gen = discriminate(ddef, dp, augment(jnp.concatenate([a, b, f], -1), p, k_a2))
            return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(gen)), real

        (ld, real_logits), gd = jax.value_and_grad(d_loss, has_aux=True)(state["d"])
        upd, opt_d = tx_d.update(gd, state["opt_d"], state["d"])
        dparams = optax.apply_updates(state["d"], upd)

        def g_loss(out):  # as a function of G's output; the updated D judges it
            adv = jnp.mean(jax.nn.softplus(-discriminate(ddef, dparams, augment(jnp.concatenate([a, b, out], -1), p, k_a3))))
            l1 = jnp.mean(jnp.abs(out - t))
            return adv + cfg.l1_weight * l1, (adv, l1)

        (lg, (adv, l1)), dout = jax.value_and_grad(g_loss, has_aux=True)(f)
        (gg,) = g_vjp(dout)
        upd, opt_g = tx_g.update(gg, state["opt_g"], state["g"])
        gparams = optax.apply_updates(state["g"], upd)
        mse = jnp.mean((jnp.clip(f, 0, 1) - t) ** 2, (1, 2, 3))
        new = {**state, "g": gparams, "d": dparams, "opt_g": opt_g, "opt_d": opt_d, "key": key,
               "p": ada_update(p, real_logits, cfg, n), "step": state["step"] + 1}
        metrics = {"loss": lg, "d_loss": ld, "g_adv": adv, "l1": l1, "p": p,
                   "psnr": jnp.mean(-10 * jnp.log10(jnp.maximum(mse, 1e-10))), "r_t": jnp.mean(jnp.sign(real_logits))}
        return new, metrics

    return step


METRICS = ("loss", "d_loss", "g_adv", "l1", "p", "psnr", "r_t")


def runner(cfg: GanConfig, gdef, ddef):
    """The engine runner of the GAN step: the host loop (convolutions are slow inside XLA CPU
    while loops, see `neurimg.engine.Runner._host`)."""
    from neurimg.engine import Runner

    return Runner(make_step(cfg, gdef, ddef), METRICS, loop="host")
