"""fit's area-average observation against upsample's field, on one constructed sharp image.

A sharp image of a disc and a tilted bar (`tests/test_fit.py::_sharp_shapes`, each pixel the
mean of 8 x 8 samples) at 4N px, box-averaged to N px, is fitted by

- `neurimg.fit` with --supersample 4 --tv-weight 1e-3 and upsample's model (width 64, 3 hidden
  layers, w0 45, 600 steps, lr 1e-3), full batch and 512-pixel minibatches;
- `neurimg.upsample.fit_field` (its defaults: the same model, m = 4, TV 1e-3, 512 pixels a step;
  since issue 25 also fit's trainer, through `UpsampleConfig.field_config`, which adds the
  mean-colour start);

and rendered at 4x (4 x 4 points per output pixel), against the sharp image and PIL bicubic.

    python bench/area_shapes.py [--size 32] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_fit import _sharp_shapes  # noqa: E402

from neurimg import upsample as up  # noqa: E402
from neurimg.api import load_run  # noqa: E402
from neurimg.config import Config, ModelConfig, TrainConfig, UpsampleConfig  # noqa: E402
from neurimg.fit import fit  # noqa: E402
from neurimg.metrics import psnr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    n = a.size
    sharp = _sharp_shapes(4 * n)
    small = (sharp.reshape(n, 4, n, 4, 3).mean((1, 3)) * 255 + 0.5).astype(np.uint8)
    d = Path(tempfile.mkdtemp(prefix="shapes-"))
    Image.fromarray(small).save(d / "shapes.png")
    bicubic = psnr(np.asarray(Image.fromarray(small).resize((4 * n, 4 * n), Image.BICUBIC)) / 255.0, sharp)
    model = ModelConfig(width=64, hidden_layers=3, latent_dim=1, w0=45.0)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for seed in (int(s) for s in a.seeds.split(",")):
        for label, bp in (("fit, area m=4 + TV, full batch", 0), ("fit, area m=4 + TV, 512 px a step", 512)):
            t0 = time.perf_counter()
            cfg = Config(model, TrainConfig(steps=600, batch_pixels=bp, supersample=4, tv_weight=1e-3, seed=seed, snapshots=(),
                                            lr=1e-3, warmup_steps=50, edge_share=0.0, adam_b2=0.999))
            res = fit([str(d / "shapes.png")], d / f"run-{bp}-{seed}", cfg)
            zoom = psnr(load_run(str(d / f"run-{bp}-{seed}")).render_index(0, (4 * n, 4 * n), dtype=np.float32), sharp)
            rows.setdefault(label, []).append((zoom - bicubic, res.mean_psnr, time.perf_counter() - t0))
        t0 = time.perf_counter()
        f = up.fit_field(small / 255.0, 4.0, UpsampleConfig(method="field", seed=seed))
        zoom = psnr(up.render(f, (4 * n, 4 * n), q=4), sharp)
        rows.setdefault("upsample's field (defaults)", []).append((zoom - bicubic, f.fit_psnr, time.perf_counter() - t0))
    print(f"{n} px -> {4 * n} px, bicubic {bicubic:.2f} dB; seeds {a.seeds}")
    print("| trainer | 4x zoom minus bicubic, dB (per seed) | 1:1 PSNR dB | seconds (median) |")
    print("|---|---|---|---|")
    for label, r in rows.items():
        z = " / ".join(f"{v[0]:+.2f}" for v in r)
        print(f"| {label} | {z} (mean {np.mean([v[0] for v in r]):+.2f}) | {np.mean([v[1] for v in r]):.1f} | {np.median([v[2] for v in r]):.1f} |")


if __name__ == "__main__":
    main()
