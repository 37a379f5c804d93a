"""The conditional GAN blender: the targets, the networks, ADA and the training step (the tool
around it, `neurimg blend-train` and `blend --method gan`, is `neurimg.blender`).

The proposal neurimg was built from: learn blends of a folder's images as a conditional GAN.
- Data: pairs (A, B) of the folder's images and their real combination. Each step draws its
  pairs (`draw_pairs`), moves both images of a pair by one random symmetry (`symmetries`:
  the 8 turns and flips of the square, the 6 orders of the colour channels) and computes the
  pair's target on the device (`target_of`): the exact mixed-gradient blend (`target="mixed"`:
  at each pixel the stronger of the two gradients, least squares over the full canvas, the
  same solve as `neurimg blend --solver exact --mode mixed`, here with DCT matrices) or the
  naive average (A + B) / 2 (`target="naive"`, the proposal as written). `PairSet` and
  `combination` are the float64 host versions: the evaluation's reference.
- Levels: a pair's target also depends on its levels (alpha_c, alpha_m, alpha_f), A's share
  at the coarse, middle and fine level. Each level is a band of DCT frequencies (`bands`);
  alpha 0.5 takes the band from the blend M, 1 from A, 0 from B, linearly in between
  (`target_of`). A share of the training pairs (`level_prob`) is drawn at random levels, the
  rest at 0.5, so what `--levels` asks for at blend time is what the generator was trained
  to produce.
- Generator (`Generator`): a U-Net over (A, B, (A+B)/2) that predicts the blend as the naive
  average plus a learned residual (the residual layer starts at zero: the untrained generator
  is the naive average). Its decoder is modulated StyleGAN-style (AdaIN: each channel's
  instance-normalised activation scaled and shifted by a style) at the three levels: coarse
  (1/8 and 1/4 resolution), middle (1/2) and fine (full). A level's style is
  (alpha s(A), (1 - alpha) s(B)), with s a style encoder shared by both images and alpha
  that level's share. Per-pixel noise, scaled by learned per-channel strengths, enters every
  decoder block.
- Discriminator (`Discriminator`): a conditional patch discriminator over the whole tuple
  (A, B, C) and its levels.
- ADA (`augment`, `ada_update`; Karras et al. 2020): each real and generated tuple is
  augmented before the discriminator, one transform for the three images of a tuple: x-flip,
  a rotation by a multiple of 90 degrees, an integer translation (circular), brightness and
  contrast, each applied with probability p. p follows the sign-of-D heuristic:
  r = E[sign(D(real))] above the target means D is overfitting, so p rises.
- The step (`make_step`): D's update, then G's (adversarial + L1 to the target), then p, in
  one pure function run by `neurimg.engine` (`runner`).

Images are (B, H, W, 3) float32 in [0, 1], channels last.
"""

from __future__ import annotations

import dataclasses
import functools
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
DEFAULT_LEVELS = (0.5, 0.5, 0.5)  # A's share at each level: the blend itself


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


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II as an (n, n) matrix: X = C x, x = C^T X."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (i + 0.5) * k / n)
    c[0] /= np.sqrt(2.0)
    return c


def _dct2(x):
    """Orthonormal 2-D DCT-II of (B, H, W, C) over H and W."""
    ch, cw = (jnp.asarray(dct_matrix(n), jnp.float32) for n in x.shape[1:3])
    return jnp.einsum("ki,bijc,lj->bklc", ch, x, cw, precision="highest")


def _idct2(f):
    ch, cw = (jnp.asarray(dct_matrix(n), jnp.float32) for n in f.shape[1:3])
    return jnp.einsum("ki,bklc,lj->bijc", ch, f, cw, precision="highest")


def mixed_blend(a, b, clip: bool = True):
    """The exact mixed-gradient blends of a batch of pairs, (B, S, S, 3) each, on the device:
    the same least-squares solve as `combination(..., "mixed")` (forward differences, the
    stronger whole gradient per pixel, Neumann boundary, each channel's mean that of the naive
    average, clipped to [0, 1] unless `clip` is False) written with DCT matrices, so the
    training step computes the target of every pair it draws, turned and recoloured or not.
    float32: within 1e-5 of the float64 solve (tested)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    h, w = a.shape[1:3]

    def diffs(u):
        gx = jnp.pad(u[:, :, 1:] - u[:, :, :-1], ((0, 0), (0, 0), (0, 1), (0, 0)))
        gy = jnp.pad(u[:, 1:] - u[:, :-1], ((0, 0), (0, 1), (0, 0), (0, 0)))
        return gx, gy

    (ax, ay), (bx, by) = diffs(a), diffs(b)
    take_b = ((bx**2 + by**2).sum(-1) > (ax**2 + ay**2).sum(-1))[..., None]
    gx, gy = jnp.where(take_b, bx, ax), jnp.where(take_b, by, ay)
    # D^T g: g[j-1] - g[j] along each axis (gx's last column and gy's last row are zero)
    rhs = -gx - gy
    rhs = rhs.at[:, :, 1:].add(gx[:, :, :-1]).at[:, 1:].add(gy[:, :-1])
    lam = (2 - 2 * np.cos(np.pi * np.arange(h) / h))[:, None] + (2 - 2 * np.cos(np.pi * np.arange(w) / w))[None, :]
    lam[0, 0] = np.inf  # the constant is free: set from the mean below
    u = _idct2(_dct2(rhs) / jnp.asarray(lam, jnp.float32)[None, :, :, None])
    u = u + ((a + b) / 2).mean((1, 2), keepdims=True)
    return jnp.clip(u, 0.0, 1.0) if clip else u


def bands(h: int, w: int) -> np.ndarray:
    """(3, H, W) 0/1 masks of the DCT coefficients of the three levels, by the radius r of
    the frequency index (k_y, k_x) scaled to a square of side S = max(H, W): coarse r < S/8,
    middle S/8 <= r < S/4, fine the rest."""
    s = max(h, w)
    r = np.hypot(np.arange(h)[:, None] * s / h, np.arange(w)[None, :] * s / w)
    coarse, middle = r < s / 8, (r >= s / 8) & (r < s / 4)
    return np.stack([coarse, middle, ~(coarse | middle)]).astype(np.float32)


def target_of(a, b, target: str, levels=None):
    """The real combination of a batch of pairs (B, S, S, 3) on the device, at `levels`
    (B, 3) or (3,), A's share at the coarse, middle and fine levels (None: 0.5 each).

    With M the blend (`target`: the exact mixed-gradient blend, unclipped, or the naive
    average), each level's band of DCT coefficients (`bands`) is taken from
    M + (2 alpha - 1)(A - M) for alpha >= 1/2 and from M + (1 - 2 alpha)(B - M) below: alpha
    1/2 gives the blend itself, 1 that band of A, 0 that band of B, linearly in between; the
    sum is clipped to [0, 1]. At levels 0.5 it is `combination(a, b, target)`; at 1, 1, 1 it is
    A; at 0, 0, 0 it is B (tested)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    m = (a + b) / 2 if target == "naive" else mixed_blend(a, b, clip=False)
    if levels is None:
        return jnp.clip(m, 0.0, 1.0)
    al = jnp.broadcast_to(jnp.asarray(levels, jnp.float32), (a.shape[0], 3))
    wa, wb = jnp.maximum(2 * al - 1, 0.0), jnp.maximum(1 - 2 * al, 0.0)  # (B, 3)
    masks = jnp.asarray(bands(*a.shape[1:3]))  # (3, H, W)
    ka = jnp.einsum("bl,lhw->bhw", wa, masks)[..., None]
    kb = jnp.einsum("bl,lhw->bhw", wb, masks)[..., None]
    return jnp.clip(m + _idct2(ka * _dct2(a - m) + kb * _dct2(b - m)), 0.0, 1.0)


def draw_levels(key, batch: int, prob: float):
    """Each pair's levels (batch, 3): with probability `prob` uniform in [0, 1] per level,
    otherwise 0.5 each (the blend itself)."""
    k1, k2 = jax.random.split(key)
    on = jax.random.bernoulli(k1, prob, (batch, 1))
    return jnp.where(on, jax.random.uniform(k2, (batch, 3)), 0.5)


def symmetries(x, key):
    """The same random symmetry for each row's images: x (B, K, S, S, 3) -> one of the 8
    turns and flips of the square and one of the 6 orders of the colour channels per row. The
    training step draws a pair, moves both images by one symmetry and recomputes the target
    (the discrete mixed blend is not exactly equivariant: its forward differences have a
    direction; a turned target is 26-36 dB from the target of the turned pair)."""
    bsz = x.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    rot = jax.random.randint(k1, (bsz,), 0, 4)
    flip = jax.random.bernoulli(k2, 0.5, (bsz,))
    x = jnp.where(flip[:, None, None, None, None], x[:, :, :, ::-1], x)
    turned = [jnp.rot90(x, r, axes=(2, 3)) for r in range(4)]
    x = jnp.select([(rot == r)[:, None, None, None, None] for r in range(4)], turned)
    perms = jnp.asarray([(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)], jnp.int32)
    perm = perms[jax.random.randint(k3, (bsz,), 0, 6)]
    return jnp.take_along_axis(x, perm[:, None, None, None, :], axis=-1)


def draw_pairs(key, n_images: int, batch: int):
    """`batch` ordered pairs (i, j), i != j, uniformly: (batch, 2) int32."""
    k1, k2 = jax.random.split(key)
    i = jax.random.randint(k1, (batch,), 0, n_images)
    j = (i + jax.random.randint(k2, (batch,), 1, n_images)) % n_images
    return jnp.stack([i, j], 1)


@dataclass
class PairSet:
    """Every ordered pair (i, j), i != j, of `images` (N, H, W, 3) with its combination worked
    out on the host in float64 (`combination`): the held-out evaluation's reference."""

    images: np.ndarray  # (N, H, W, 3) float32
    pairs: np.ndarray  # (P, 2) int32
    targets: np.ndarray  # (P, H, W, 3) float32

    @staticmethod
    def build(images: np.ndarray, target: str, pairs: np.ndarray | None = None) -> "PairSet":
        images = np.asarray(images, np.float32)
        n = len(images)
        if n < 2:
            raise NeurimgError(f"a GAN blender needs at least two images, got {n}")
        if pairs is None:
            pairs = np.array([(i, j) for i in range(n) for j in range(n) if i != j], np.int32)
        tg = np.stack([combination(images[i], images[j], target) for i, j in pairs])
        return PairSet(images, np.asarray(pairs, np.int32), tg)


# --------------------------------------------------------------------------------------------
# networks


def _host_lecun_normal(key, shape, dtype=jnp.float32):
    """Flax's default kernel initializer (LeCun: a truncated normal, variance 1 / fan-in),
    drawn by NumPy from a seed taken from `key`. jax.random compiles a program per kernel
    shape, about 0.9 s each on the CPU: 15 s for the GAN's networks; this takes milliseconds.
    Traced (`abstract`: shapes only), it is flax's own."""
    if isinstance(key, jax.core.Tracer):
        return nnx.initializers.lecun_normal()(key, shape, dtype)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    x = rng.standard_normal(shape)
    while np.any(out := np.abs(x) > 2):  # truncated at two standard deviations
        x[out] = rng.standard_normal(int(out.sum()))
    fan_in = int(np.prod(shape[:-1]))
    return jnp.asarray(x / 0.87962566103423978 / np.sqrt(fan_in), dtype)


_Conv = functools.partial(nnx.Conv, kernel_init=_host_lecun_normal)
_Linear = functools.partial(nnx.Linear, kernel_init=_host_lecun_normal)


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
    return nnx.List([_Conv(a, b, (3, 3), strides=2, rngs=rngs) for a, b in ((cin, c), (c, 2 * c), (2 * c, 4 * c))])


def _run_down(convs, x):
    for conv in convs:
        x = _lrelu(conv(x))
    return x


class StyleEncoder(nnx.Module):
    """One image (B, S, S, 3) -> its style code (B, style_dim): convolutions, global mean."""

    def __init__(self, cfg: GanConfig, rngs: nnx.Rngs):
        c = cfg.channels
        self.convs = _downsampling(3, c, rngs)
        self.out = _Linear(4 * c, cfg.style_dim, rngs=rngs)

    def __call__(self, x):
        return self.out(_run_down(self.convs, x).mean((1, 2)))


class ModulatedBlock(nnx.Module):
    """conv -> + noise * strength -> AdaIN(style) -> leaky ReLU."""

    def __init__(self, cin: int, cout: int, style_dim: int, rngs: nnx.Rngs):
        self.conv = _Conv(cin, cout, (3, 3), rngs=rngs)
        self.style = _Linear(style_dim, 2 * cout, kernel_init=nnx.initializers.zeros, rngs=rngs)
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
            _Conv(9, ch[0], (3, 3), rngs=rngs),
            _Conv(ch[0], ch[1], (3, 3), strides=2, rngs=rngs),
            _Conv(ch[1], ch[2], (3, 3), strides=2, rngs=rngs),
            _Conv(ch[2], ch[3], (3, 3), strides=2, rngs=rngs),
        ])
        sd = 2 * cfg.style_dim  # a level's style: (alpha s(A), (1 - alpha) s(B))
        self.styles = StyleEncoder(cfg, rngs)
        self.dec = nnx.List([
            ModulatedBlock(ch[3], ch[3], sd, rngs),  # S/8, coarse
            ModulatedBlock(ch[3] + ch[2], ch[2], sd, rngs),  # S/4, coarse
            ModulatedBlock(ch[2] + ch[1], ch[1], sd, rngs),  # S/2, middle
            ModulatedBlock(ch[1] + ch[0], ch[0], sd, rngs),  # S, fine
        ])
        self.level_of_block = (0, 0, 1, 2)
        self.out = _Conv(ch[0], 3, (1, 1), kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, a, b, key, levels=None):
        """a, b (B, S, S, 3); levels (3,) or (B, 3), A's share at each level (None: 0.5)."""
        naive = (a + b) / 2
        x = jnp.concatenate([a, b, naive], -1)
        skips = []
        for i, conv in enumerate(self.enc):
            x = _lrelu(conv(x))
            skips.append(x)
        sa, sb = self.styles(a), self.styles(b)
        al = jnp.broadcast_to(jnp.asarray(DEFAULT_LEVELS if levels is None else levels, jnp.float32), (a.shape[0], 3))
        keys = jax.random.split(key, len(self.dec))
        h = skips[-1]
        for k, block in enumerate(self.dec):
            if k > 0:
                h = jnp.concatenate([_up(h), skips[-1 - k]], -1)
            alpha = al[:, self.level_of_block[k], None]
            style = jnp.concatenate([alpha * sa, (1 - alpha) * sb], -1)
            noise = jax.random.normal(keys[k], h.shape[:3] + (1,), h.dtype)
            h = block(h, style, noise)
        return naive + self.out(h)


class Discriminator(nnx.Module):
    """A tuple (B, S, S, 9) and its levels (B, 3) -> patch logits (B, S/8, S/8). The levels
    enter as three constant planes: a real tuple at levels 1, 1, 1 is (A, B, A)."""

    def __init__(self, cfg: GanConfig, rngs: nnx.Rngs):
        c = cfg.channels
        self.convs = _downsampling(12, c, rngs)
        self.out = _Conv(4 * c, 1, (3, 3), rngs=rngs)

    def __call__(self, x, levels):
        planes = jnp.broadcast_to(levels[:, None, None, :], x.shape[:3] + (3,))
        return self.out(_run_down(self.convs, jnp.concatenate([x, planes], -1)))[..., 0]


def _networks(cfg: GanConfig):
    rngs = nnx.Rngs(cfg.seed)
    gdef, gstate = nnx.split(Generator(cfg, rngs))
    ddef, dstate = nnx.split(Discriminator(cfg, rngs))
    return gdef, ddef, {"g": nnx.to_pure_dict(gstate), "d": nnx.to_pure_dict(dstate)}


def init(cfg: GanConfig):
    """(generator graphdef, discriminator graphdef, {"g": params, "d": params}) as pure dicts."""
    return _networks(cfg)


def abstract(cfg: GanConfig):
    """(generator graphdef, discriminator graphdef, the parameters' shapes and types) without
    computing any parameter: what loading a checkpoint needs."""
    out = {}

    def shapes():
        gdef, ddef, params = _networks(cfg)
        out["defs"] = (gdef, ddef)
        return params

    params = jax.eval_shape(shapes)
    return (*out["defs"], params)


def generate(gdef, gparams, a, b, key, levels=None):
    """The generator as a pure function of its parameters."""
    return nnx.merge(gdef, gparams)(a, b, key, levels)


def discriminate(ddef, dparams, tuples, levels):
    return nnx.merge(ddef, dparams)(tuples, levels)


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


def init_state(cfg: GanConfig, images: np.ndarray):
    """(graphdefs, the training state) for a folder's images (N, S, S, 3), which the state
    holds on the device (constant): each step draws its pairs from them."""
    images = np.asarray(images, np.float32)
    if len(images) < 2:
        raise NeurimgError(f"a GAN blender needs at least two images, got {len(images)}")
    gdef, ddef, params = init(cfg)
    tx_g, tx_d = optimizers(cfg)
    state = {
        "g": params["g"], "d": params["d"],
        "opt_g": tx_g.init(params["g"]), "opt_d": tx_d.init(params["d"]),
        "p": jnp.float32(0.0), "step": jnp.int32(0), "key": jax.random.PRNGKey(cfg.seed),
        "images": jnp.asarray(images), "lr_scale": jnp.float32(1.0),
    }
    return (gdef, ddef), state


def make_step(cfg: GanConfig, gdef, ddef):
    """step(state, batch) -> (state, metrics) for `neurimg.engine.Runner`: batch is None; a
    step draws cfg.batch ordered pairs, moves each by a random symmetry (if cfg.symmetries),
    computes their targets, updates D on real and generated tuples (both augmented with
    probability p), then G (adv_weight * adversarial + l1_weight * L1 to the target), then p
    (ADA)."""
    tx_g, tx_d = optimizers(cfg)
    n = cfg.batch

    def step(state: dict[str, Any], batch):
        key, k_idx, k_sym, k_lv, k_gen, k_a1, k_a2, k_a3 = jax.random.split(state["key"], 8)
        images = state["images"]
        pr = draw_pairs(k_idx, images.shape[0], n)
        ab = images[pr]  # (n, 2, S, S, 3)
        if cfg.symmetries:
            ab = symmetries(ab, k_sym)
        a, b = ab[:, 0], ab[:, 1]
        levels = draw_levels(k_lv, n, cfg.level_prob)
        t = target_of(a, b, cfg.target, levels)
        p = state["p"]
        # G runs once: its output feeds D's update, then G's gradient comes back through its VJP.
        f, g_vjp = jax.vjp(lambda gp: generate(gdef, gp, a, b, k_gen, levels), state["g"])

        def d_loss(dp):
            real = discriminate(ddef, dp, augment(jnp.concatenate([a, b, t], -1), p, k_a1), levels)
            gen = discriminate(ddef, dp, augment(jnp.concatenate([a, b, f], -1), p, k_a2), levels)
            return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(gen)), real

        (ld, real_logits), gd = jax.value_and_grad(d_loss, has_aux=True)(state["d"])
        upd, opt_d = tx_d.update(gd, state["opt_d"], state["d"])
        dparams = optax.apply_updates(state["d"], upd)

        def g_loss(out):  # as a function of G's output; the updated D judges it
            adv = jnp.mean(jax.nn.softplus(-discriminate(ddef, dparams, augment(jnp.concatenate([a, b, out], -1), p, k_a3), levels)))
            l1 = jnp.mean(jnp.abs(out - t))
            return cfg.adv_weight * adv + cfg.l1_weight * l1, (adv, l1)

        (lg, (adv, l1)), dout = jax.value_and_grad(g_loss, has_aux=True)(f)
        (gg,) = g_vjp(dout)
        upd, opt_g = tx_g.update(gg, state["opt_g"], state["g"])
        gparams = optax.apply_updates(state["g"], upd)
        mse = jnp.mean((jnp.clip(f, 0, 1) - t) ** 2, (1, 2, 3))
        # the trivial answer's L1 (what the guard compares l1 with): the naive average the
        # generator starts from, or for the naive target the better of the inputs alone
        if cfg.target == "naive":
            trivial = jnp.mean(jnp.minimum(jnp.mean(jnp.abs(a - t), (1, 2, 3)), jnp.mean(jnp.abs(b - t), (1, 2, 3))))
        else:
            trivial = jnp.mean(jnp.abs((a + b) / 2 - t))
        new = {**state, "g": gparams, "d": dparams, "opt_g": opt_g, "opt_d": opt_d, "key": key,
               "p": ada_update(p, real_logits, cfg, n), "step": state["step"] + 1}
        metrics = {"loss": lg, "d_loss": ld, "g_adv": adv, "l1": l1, "p": p,
                   "psnr": jnp.mean(-10 * jnp.log10(jnp.maximum(mse, 1e-10))), "r_t": jnp.mean(jnp.sign(real_logits)),
                   "trivial_l1": trivial}
        return new, metrics

    return step


METRICS = ("loss", "d_loss", "g_adv", "l1", "p", "psnr", "r_t", "trivial_l1")


def runner(cfg: GanConfig, gdef, ddef):
    """The engine runner of the GAN step: the host loop (convolutions are slow inside XLA CPU
    while loops, see `neurimg.engine.Runner._host`). One per process for the settings the step
    depends on, so its compiled step serves every training with them (a resume, a benchmark's
    second run)."""
    step_only = dataclasses.replace(cfg, steps=1, seed=0, snapshots=(), log_every=1, checkpoint_seconds=1.0)
    return _runner(step_only, gdef, ddef)


@functools.lru_cache(maxsize=4)
def _runner(cfg: GanConfig, gdef, ddef):
    from neurimg.engine import Runner

    from neurimg.engine import lr_scaled

    # both networks' updates scaled by the guard's lr_scale; the input kept for a rollback
    return Runner(lr_scaled(make_step(cfg, gdef, ddef), ("g", "d")), METRICS, loop="host", donate=False)
