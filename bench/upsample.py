"""Upsampling quality against classical interpolation (issues 3 and 12).

For each test image: downsample by S with area averaging (PIL BOX), upsample back by S with
nearest, bilinear, bicubic, Lanczos (PIL) and with neurimg (library call: `neurimg.upsample`,
the code behind the CLI), and compare with the original: PSNR (mean of per-image PSNR) and
SSIM from neurimg.metrics, seconds per image for neurimg (everything included: self-
validation, training, compile, render). The output is rounded to 8 bits, as the CLI writes it.

Two tables per scale: logos (a folder of PNGs, default ../shared/data/logos256) and photos
(256x256 crops at each photo's own resolution, from the scikit-image and matplotlib photos of
bench/photos.py: needs `pip install scikit-image matplotlib`).

    python bench/upsample.py                                   # defaults, x2 and x4, both tables
    python bench/upsample.py --variants auto,internal,field,backproject --photos 4
    python bench/upsample.py --no-logos --offset 37,-61         # other crops of the photos

Variants: auto (the default: self-validation chooses), internal, field, mix, backproject
(consistent bicubic).
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
sys.path.insert(0, os.path.dirname(__file__))

from neurimg.data import read_image, to_uint8  # noqa: E402
from neurimg.metrics import psnr, ssim  # noqa: E402
from neurimg.upsample import UpsampleConfig, upsample  # noqa: E402

CLASSIC = [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC), ("lanczos", Image.LANCZOS)]
VARIANTS = {
    "auto": {},
    "internal": {"method": "internal"},
    "field": {"method": "field"},
    "mix": {"method": "mix"},
    "backproject": {"method": "backproject"},
}


def evaluate(images, s: int, variants: dict[str, UpsampleConfig], log: list):
    """{method: (psnrs, ssims, seconds)} over images, at scale s; chosen methods into `log`."""
    res: dict[str, tuple[list, list, list]] = {}
    for name, hr in images:
        h, w = (hr.shape[0] // s) * s, (hr.shape[1] // s) * s
        hr = to_uint8(hr[:h, :w]).astype(np.float32) / 255.0
        lr = Image.fromarray(to_uint8(hr)).resize((w // s, h // s), Image.BOX)
        for meth, flt in CLASSIC:
            up = np.asarray(lr.resize((w, h), flt), np.float32) / 255.0
            r = res.setdefault(meth, ([], [], []))
            r[0].append(psnr(up, hr))
            r[1].append(ssim(up, hr))
        lrf = np.asarray(lr, np.float32) / 255.0
        for label, cfg in variants.items():
            t = time.perf_counter()
            out = upsample(lrf, (w, h), cfg, dtype=np.uint8)
            dt = time.perf_counter() - t
            img = out.image.astype(np.float32) / 255.0
            r = res.setdefault(f"neurimg {label}", ([], [], []))
            r[0].append(psnr(img, hr))
            r[1].append(ssim(img, hr))
            r[2].append(dt)
            val = "" if not out.validation else " (validation " + ", ".join(f"{k} {v:.2f}" for k, v in out.validation.items()) + ")"
            log.append(f"x{s} {name}: {label} -> {out.method}{val}")
            print(f"  x{s} {name}: {label} [{out.method}] {r[0][-1]:.2f} dB (bicubic {res['bicubic'][0][-1]:.2f}) {dt:.1f} s{val}",
                  file=sys.stderr, flush=True)
    return res


def table(title: str, res) -> str:
    lines = [f"{title}", "", "| method | PSNR dB (vs bicubic) | SSIM | s/image (median, max) |", "|---|---|---|---|"]
    bic = np.mean(res["bicubic"][0])
    for meth, (p, q, t) in res.items():
        tt = f"{np.median(t):.1f}, {np.max(t):.1f}" if t else "-"
        d = f" ({np.mean(p) - bic:+.2f})" if meth != "bicubic" else ""
        lines.append(f"| {meth} | {np.mean(p):.2f}{d} | {np.mean(q):.4f} | {tt} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--folder", default=os.path.join(here, "..", "..", "shared", "data", "logos256"))
    ap.add_argument("--logos", type=int, default=0, help="use only the first N logos (0 = all)")
    ap.add_argument("--no-logos", action="store_true")
    ap.add_argument("--photos", type=int, default=8, help="how many photos of bench/photos.py (0 = none)")
    ap.add_argument("--offset", default="0,0", help="photo crop offset from the centre: down,right pixels")
    ap.add_argument("--scales", default="2,4")
    ap.add_argument("--variants", default="auto", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    a = ap.parse_args()
    variants = {v: dataclasses.replace(UpsampleConfig(), **VARIANTS[v]) for v in a.variants.split(",")}
    logos = [] if a.no_logos else [(os.path.basename(f), read_image(f)) for f in sorted(glob.glob(os.path.join(a.folder, "*.png")))]
    logos = logos[: a.logos] if a.logos else logos
    photos = []
    if a.photos:
        try:
            import photos as ph

            off = tuple(int(x) for x in a.offset.split(","))
            photos = [(n, ph.crop(n, 256, off)) for n in ph.TUNING[: a.photos]]
        except ImportError as e:
            print(f"(no photo table: {e})", file=sys.stderr)
    print(f"config: {dataclasses.asdict(UpsampleConfig())}\n")
    log: list[str] = []
    for s in (int(x) for x in a.scales.split(",")):
        if logos:
            print(table(f"### x{s}, {len(logos)} logos from {os.path.basename(os.path.normpath(a.folder))}", evaluate(logos, s, variants, log)) + "\n", flush=True)
        if photos:
            title = f"### x{s}, {len(photos)} photo crops 256x256 ({', '.join(n for n, _ in photos)}; offset {a.offset})"
            print(table(title, evaluate(photos, s, variants, log)) + "\n", flush=True)
    print("methods chosen:\n" + "\n".join("    " + x for x in log))


if __name__ == "__main__":
    main()
