"""Tuning runs behind the `fit` defaults: train on a folder for a fixed number of steps and
print the mean and min per-image PSNR (full images) every `--every` steps with the wall time.

    python bench/tune_fit.py FOLDER --width 256 --steps 2400 --bp 8192 --lr 5e-4

Prints one JSON line: the settings, compile seconds, steady steps/s, total seconds, the final
mean PSNR and a log of [step, seconds, mean PSNR]. Evaluation time is excluded from `total`.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import Trainer  # noqa: E402
from neurimg import data, siren  # noqa: E402
from neurimg.config import AUTO_BATCH, WIDTH, Config, ModelConfig, TrainConfig  # noqa: E402
from neurimg.coords import image_grid  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("--width", type=int, default=WIDTH)
ap.add_argument("--layers", type=int, default=ModelConfig.hidden_layers)
ap.add_argument("--latent", type=int, default=ModelConfig.latent_dim)
ap.add_argument("--w0", type=float, default=ModelConfig.w0)
ap.add_argument("--steps", type=int, default=TrainConfig.steps)
ap.add_argument("--lr", type=float, default=TrainConfig.lr)
ap.add_argument("--latent_lr", type=float, default=TrainConfig.latent_lr)
ap.add_argument("--bp", type=int, default=AUTO_BATCH)
ap.add_argument("--chunk", type=int, default=100)
ap.add_argument("--warmup", type=int, default=TrainConfig.warmup_steps)
ap.add_argument("--final", type=float, default=TrainConfig.final_lr_fraction)
ap.add_argument("--edge-share", type=float, default=TrainConfig.edge_share)
ap.add_argument("--b2", type=float, default=TrainConfig.adam_b2)
ap.add_argument("--every", type=int, default=500, help="evaluate every this many steps")
a = ap.parse_args()

cfg = Config(
    ModelConfig(a.width, a.layers, a.latent, a.w0),
    TrainConfig(steps=a.steps, lr=a.lr, latent_lr=a.latent_lr, batch_pixels=a.bp, warmup_steps=a.warmup,
                final_lr_fraction=a.final, edge_share=a.edge_share, adam_b2=a.b2),
)
imgs = data.load_images([a.folder])
pix = [i.pixels for i in imgs]
tr = Trainer(cfg, pix)
st, tc = tr.init(), tr.compile_seconds
rend = jax.jit(lambda p, c, i: jnp.clip(siren.apply(tr.graphdef, p, c, i), 0, 1))


def mean_psnr(p):
    out = []
    for k, im in enumerate(pix):
        h, w = im.shape[:2]
        r = np.asarray(rend(p, image_grid(w, h).reshape(1, -1, 2), jnp.array([k]))).reshape(h, w, 3)
        out.append(-10 * np.log10(np.mean((r - im) ** 2)))
    return float(np.mean(out)), float(np.min(out))


done, train_s, log = 0, 0.0, []
while done < a.steps:
    n = min(a.chunk, a.steps - done, tr.max_steps)
    t = time.time()
    st, m = tr.run(st, done, n)
    jax.block_until_ready(st["step"])
    train_s += time.time() - t
    done += n
    if done % a.every < n or done == a.steps:
        mean, mn = mean_psnr(jax.device_get(st["params"]))
        log.append((done, round(train_s, 1), round(mean, 2), round(mn, 2)))
print(json.dumps(dict(args=vars(a), compile=round(tc, 1), steps_per_second=round(a.steps / train_s, 2),
                      total=round(tc + train_s, 1), final=log[-1][2], min=log[-1][3], log=log)))
