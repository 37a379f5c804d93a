"""Upsampling quality against classical interpolation (issue 3).

For each test image: downsample by S with area averaging (PIL BOX), upsample back by S with
nearest, bilinear, bicubic, Lanczos (PIL) and with neurimg (library call, the CLI's defaults),
and compare with the original: PSNR (mean of per-image PSNR) and SSIM from neurimg.metrics,
seconds per image for neurimg (fit + render, compile included; the first image of a size pays
the compile).

    python bench/upsample.py                     # logos256 (+ the astronaut photo) at x2 and x4
    python bench/upsample.py --scales 4 --plain  # also a plain SIREN (pixel-centre fit) row
    python bench/upsample.py --folder DIR --steps 800

The photo is scikit-image's bundled `astronaut` (512x512), used only if scikit-image is
installed (`pip install scikit-image`; not a dependency of neurimg).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from neurimg.data import read_image, to_uint8  # noqa: E402
from neurimg.metrics import psnr, ssim  # noqa: E402
from neurimg.upsample import UpsampleConfig, upsample  # noqa: E402

CLASSIC = [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)]


def load_set(folder: str, photo: bool):
    items = [(os.path.basename(f), read_image(f)) for f in sorted(glob.glob(os.path.join(folder, "*.png")))]
    photos = []
    if photo:
        try:
            from skimage import data

            photos.append(("astronaut (photo)", data.astronaut().astype(np.float32) / 255.0))
        except ImportError:
            print("(scikit-image not installed: no photo row)", file=sys.stderr)
    return items, photos


def evaluate(images, s: int, variants: dict[str, UpsampleConfig]):
    """{method: (psnrs, ssims, seconds)} over images, at scale s."""
    res: dict[str, tuple[list, list, list]] = {}
    for name, hr in images:
        h, w = (hr.shape[0] // s) * s, (hr.shape[1] // s) * s
        hr = hr[:h, :w]
        lr = Image.fromarray(to_uint8(hr)).resize((w // s, h // s), Image.BOX)
        for meth, flt in CLASSIC:
            up = np.asarray(lr.resize((w, h), flt), np.float32) / 255.0
            r = res.setdefault(meth, ([], [], []))
            r[0].append(psnr(up, hr))
            r[1].append(ssim(up, hr))
        lrf = np.asarray(lr, np.float32) / 255.0
        for label, cfg in variants.items():
            t = time.perf_counter()
            out = upsample(lrf, (w, h), cfg).image
            dt = time.perf_counter() - t
            out = to_uint8(out).astype(np.float32) / 255.0  # what the CLI writes
            r = res.setdefault(label, ([], [], []))
            r[0].append(psnr(out, hr))
            r[1].append(ssim(out, hr))
            r[2].append(dt)
            print(f"  x{s} {name}: {label} {r[0][-1]:.2f} dB (bicubic {res['bicubic'][0][-1]:.2f}) {dt:.1f} s", file=sys.stderr, flush=True)
    return res


def table(title: str, res) -> str:
    lines = [f"{title}", "", "| method | PSNR dB | SSIM | s/image (median, max) |", "|---|---|---|---|"]
    bic = np.mean(res["bicubic"][0])
    for meth, (p, q, t) in res.items():
        tt = f"{np.median(t):.1f}, {np.max(t):.1f}" if t else "-"
        d = f" ({np.mean(p) - bic:+.2f})" if meth.startswith("neurimg") else ""
        lines.append(f"| {meth} | {np.mean(p):.2f}{d} | {np.mean(q):.4f} | {tt} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--folder", default=os.path.join(here, "..", "..", "shared", "data", "logos256"))
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--no-photo", action="store_true")
    ap.add_argument("--plain", action="store_true", help="add a plain SIREN row: fit pixel centres, point-sample the output")
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    cfg = UpsampleConfig() if a.steps is None else UpsampleConfig(steps=a.steps)
    variants = {"neurimg": cfg}
    if a.plain:
        variants["neurimg plain SIREN"] = dataclasses.replace(cfg, supersample=1, output_supersample=1, tv_weight=0.0, w0=30.0)
    logos, photos = load_set(a.folder, not a.no_photo)
    print(f"config: {dataclasses.asdict(cfg)}\n")
    for s in (int(x) for x in a.scales.split(",")):
        print(table(f"### x{s}, {len(logos)} logos from {os.path.basename(os.path.normpath(a.folder))}", evaluate(logos, s, variants)) + "\n")
        if photos:
            pv = {"neurimg": cfg, "neurimg --base bilinear": dataclasses.replace(cfg, base="bilinear")}
            print(table(f"### x{s}, {photos[0][0]}", evaluate(photos, s, pv)) + "\n", flush=True)


if __name__ == "__main__":
    main()
