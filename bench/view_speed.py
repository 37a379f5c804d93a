"""The browser viewer: file size, accuracy against `neurimg render`, and frame time in headless
Chromium (SwiftShader: WebGL on the CPU, so this is the no-GPU case).

    python bench/view_speed.py RUN [RUN ...] [--frame 1024x768] [--repeat 1]

For each run: the page's size (default and --bare), the weights chosen and their float16 check,
the PSNR of the page's 1:1 pixels against `neurimg render` for every stored image (min/mean),
and the time of a full frame (after the shader is compiled and warm) at --frame and at a small
frame, from the page's own clock (`window.neurimgStats.frameMs`, fence to fence).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from neurimg import viewer
from neurimg.api import load_run
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import Browser  # noqa: E402 (Playwright over the system's Chromium)
from neurimg.metrics import psnr


def frame_ms(b: Browser, url: str, w: int, h: int, timeout: float) -> float:
    b.open(f"{url}?image=0&w={w}&h={h}&embed=1", w, h)
    b.wait_title("neurimg:ready", timeout=timeout)
    return float(b.evaluate("window.neurimgStats.frameMs"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--frame", default="1024x768")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--max-images", type=int, default=12, help="images checked against render")
    args = ap.parse_args()
    fw, fh = (int(v) for v in args.frame.split("x"))
    rows = []
    tmp = Path(tempfile.mkdtemp())
    for run in args.runs:
        stored = load_run(run)
        cfg = stored.config.model
        t0 = time.perf_counter()
        html, s = viewer.build(stored, run)
        build_s = time.perf_counter() - t0
        bare, _ = viewer.build(stored, run, extras=False)
        page = tmp / f"{Path(run).name}.html"
        page.write_text(html)
        url = page.resolve().as_uri()
        with Browser() as b:
            ps = []
            for k, info in enumerate(stored.images[: args.max_images]):
                b.open(f"{url}?image={k}&w={info.width}&h={info.height}&embed=1", info.width, info.height)
                b.wait_title("neurimg:ready", timeout=600)
                got = np.asarray(Image.open(io.BytesIO(b.screenshot(info.width, info.height))).convert("RGB")) / 255.0
                ps.append(psnr(got, stored.render_index(k) / 255.0))
            small = statistics.median(frame_ms(b, url, 256, 192, 600) for _ in range(max(1, args.repeat)))
            big = statistics.median(frame_ms(b, url, fw, fh, 1800) for _ in range(max(1, args.repeat)))
            renderer = b.evaluate("window.neurimgStats.renderer")
        rows.append((Path(run).name, f"{cfg.hidden_layers + 1}x{cfg.width}", len(stored.images), len(html.encode()) / 1024,
                     len(bare.encode()) / 1024, s["weights"], s["float16_psnr"], min(ps), float(np.mean(ps)),
                     small, big, 256 * 192 / small / 1000, build_s))
    print(f"renderer: {renderer}")
    print(f"| run | sine layers x width | images | page KiB | --bare KiB | weights | float16 vs float32 dB | page vs render dB (min / mean) | 256x192 frame s | {fw}x{fh} frame s | Mpixel/s | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]} | {r[6]:.1f} | {r[7]:.1f} / {r[8]:.1f} | {r[9] / 1000:.2f} | {r[10] / 1000:.1f} | {r[11]:.4f} | {r[12]:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
