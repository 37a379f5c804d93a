"""Zoom: a folder of 64 px images fitted by `neurimg fit`, rendered at 256 px, against ground
truth rendered at 256 px from the same SVGs (`bench/icon_sets.py`), next to PIL's bicubic and
Lanczos upscaling of the 64 px images; and the fit at 1:1.

    python bench/icon_sets.py flat /tmp/sets/flat                     # 64/ and 256/ folders
    python bench/zoom.py /tmp/sets/flat [--scale 4] [-- FIT OPTIONS...]

Prints one table row per run (wall time, 1:1 PSNR, zoomed PSNR, bicubic, Lanczos); every PSNR
on [0, 1] values composited onto white, the mean of per-image PSNR (`neurimg.metrics.psnr`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from neurimg.api import load_run
from neurimg.data import read_image
from neurimg.metrics import psnr


def upscaled(path: Path, size: tuple[int, int], method) -> np.ndarray:
    """PIL's resize of the image composited onto white, as float RGB in [0, 1]."""
    rgb = (read_image(path) * 255.0 + 0.5).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize(size, method), np.float32) / 255.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", type=Path, help="a folder holding 64/ and 256/ (or --small/--large)")
    ap.add_argument("--small", default="64")
    ap.add_argument("--large", default="256")
    ap.add_argument("--run", type=Path, help="the run folder (default: a temporary one)")
    ap.add_argument("fit_args", nargs="*", help="options passed to neurimg fit (after --)")
    a = ap.parse_args()
    small, large = a.set / a.small, a.set / a.large
    run = a.run or Path(tempfile.mkdtemp(prefix="zoom-")) / "run"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "neurimg.cli", "fit", str(small), "-o", str(run), "--overwrite", "--json", "-q", *a.fit_args],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"fit failed: {p.stderr.strip()}")
    summary = json.loads(p.stdout)
    stored = load_run(str(run))
    zoom, cubic, lanczos = [], [], []
    for k, info in enumerate(stored.images):
        truth = read_image(large / info.name)
        size = (truth.shape[1], truth.shape[0])
        zoom.append(psnr(stored.render_index(k, size, dtype=np.float32), truth))
        cubic.append(psnr(upscaled(small / info.name, size, Image.BICUBIC), truth))
        lanczos.append(psnr(upscaled(small / info.name, size, Image.LANCZOS), truth))
    print("| set | fit options | images | steps | wall s | rollbacks / restarts | 1:1 PSNR (min) | zoomed PSNR (min) | bicubic | Lanczos | zoom - bicubic |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.set.name} | {' '.join(a.fit_args) or 'defaults'} | {len(zoom)} | {summary['steps']} | {wall:.0f} "
          f"| {summary['rollbacks']} / {summary['restarts']} "
          f"| {summary['mean_psnr']:.2f} ({summary['min_psnr']:.2f}) | {np.mean(zoom):.2f} ({np.min(zoom):.2f}) "
          f"| {np.mean(cubic):.2f} | {np.mean(lanczos):.2f} | {np.mean(zoom) - np.mean(cubic):+.2f} |")


if __name__ == "__main__":
    main()
