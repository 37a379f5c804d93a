"""A screenshot of the interactive viewer in headless Chromium, taken once the view is fully
refined (the README's picture).

    python bench/view_screenshot.py RUN OUT.png [--image NAME] [--size 860x520] [--tab Images|Morph|Training]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from neurimg import viewer
from neurimg.api import load_run
from neurimg.data import atomic_write_bytes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import Browser  # noqa: E402 (Playwright over the system's Chromium)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--image", default="0")
    ap.add_argument("--size", default="860x520")
    ap.add_argument("--tab", default="Images")
    ap.add_argument("--zoom", type=float, default=1.0, help="zoom in by this factor after fitting")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    html, _ = viewer.build(load_run(args.run), args.run)
    page = Path(tempfile.mkdtemp()) / "view.html"
    page.write_text(html)
    with Browser() as b:
        b.open(page.resolve().as_uri() + f"?image={args.image}", w, h)
        end = time.monotonic() + 30
        while b.evaluate("document.querySelectorAll('.tile').length") is None and time.monotonic() < end:
            time.sleep(0.2)
        b.evaluate(f"[...document.querySelectorAll('#tabs button')].find(b => b.textContent === {args.tab!r})?.click()")
        if args.zoom != 1.0:
            b.evaluate(f"document.getElementById('stage').dispatchEvent(new WheelEvent('wheel', {{deltaY: {-1000 * __import__('math').log(args.zoom) / 1.5:.1f}, clientX: 200, clientY: 200, bubbles: true, cancelable: true}}))")
        b.evaluate("window.neurimgStats.frameMs = null")
        t0 = time.monotonic()
        while b.evaluate("window.neurimgStats.frameMs") is None:
            time.sleep(1.0)
        print(f"refined in {time.monotonic() - t0:.0f} s (page: {b.evaluate('window.neurimgStats.frameMs') / 1000:.1f} s)")
        atomic_write_bytes(args.out, b.screenshot(w, h))


if __name__ == "__main__":
    main()
