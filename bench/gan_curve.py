"""Held-out PSNR of the GAN blender over training (issue 15): train on the first 24 logos of
logos64, report every 250 steps the PSNR on the 56 ordered pairs of the other 8 against the
exact mixed blend, and the levels: 1,1,1 against A, 0,0,0 against B, random levels against
their targets.

    python bench/gan_curve.py STEPS ['{"adv_weight": 0}']   # GanConfig overrides as JSON
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import time, sys, json, numpy as np, jax, jax.numpy as jnp
from pathlib import Path
from neurimg.config import GanConfig
from neurimg import blendgan as bg
from neurimg.data import read_image
fs = sorted((Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "logos64").glob("*.png"))
imgs = np.stack([read_image(f) for f in fs]).astype(np.float32)
train, held = imgs[:24], imgs[24:]
steps = int(sys.argv[1]); over = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
cfg = GanConfig(**over).validate()
hp = bg.PairSet.build(held, "mixed")
A, B = hp.images[hp.pairs[:, 0]], hp.images[hp.pairs[:, 1]]
(gdef, ddef), st = bg.init_state(cfg, train)
run = bg.runner(cfg, gdef, ddef)
gen = jax.jit(lambda g, a, b, k, lv: bg.generate(gdef, g, a, b, k, lv))
def ps(f, t): return list(-10*np.log10(np.mean((f - t)**2, (1, 2, 3))))
def held_psnr(g, lv=None, ref=None):
    out = []
    for s in range(0, len(hp.pairs), 28):
        l = None if lv is None else (jnp.asarray(lv, jnp.float32)[s:s+28] if np.ndim(lv) == 2 else jnp.asarray(lv, jnp.float32))
        f = np.clip(np.asarray(gen(g, A[s:s+28], B[s:s+28], jax.random.PRNGKey(0), l)), 0, 1)
        out += ps(f, (hp.targets if ref is None else ref)[s:s+28])
    return round(float(np.mean(out)), 2)
rl = np.random.default_rng(0).uniform(0, 1, (len(A), 3)).astype(np.float32)
ref_rl = np.asarray(bg.target_of(A, B, "mixed", rl))
t0 = time.time(); done = 0
print(over, flush=True)
while done < steps:
    n = min(250, steps - done)
    st, out = run(st, None, n); jax.block_until_ready(st['p']); done += n
    m = {k: float(np.nanmean(np.asarray(v[:n]))) for k, v in out.items() if k != 'finite'}
    print(done, round(time.time()-t0, 1), 's', {k: round(v, 3) for k, v in m.items()}, 'held', held_psnr(st['g']),
          'lv1->A', held_psnr(st['g'], (1., 1., 1.), A), 'lv0->B', held_psnr(st['g'], (0., 0., 0.), B), 'rand lv', held_psnr(st['g'], rl, ref_rl), flush=True)
