"""The acceptance check for the defaults: `neurimg fit FOLDER` with no options, timed end to end.

    python bench/fit_defaults.py /path/to/48-logos [--repeat 1]

Runs the real command (a subprocess, so import and compile are included), and prints wall
seconds, compile seconds, steady steps/s, and the mean / min per-image PSNR and SSIM from the
run's metrics.json. The target (issue 2): at most 300 s and a mean PSNR of at least 33 dB for
48 logos at 64x64 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", help="keep the (last) run folder here, e.g. to compare loss.csv across versions")
    args, extra = ap.parse_known_args()  # anything else is passed to neurimg fit, e.g. --lr 5e-4
    args.extra = [a for a in extra if a != "--"]
    print("| run | images | wall s | compile s | steps/s | mean PSNR | min PSNR | mean SSIM |")
    print("|---|---|---|---|---|---|---|---|")
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            t = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "neurimg.cli", "fit", args.folder, "-o", str(run), "--json", "-q", *args.extra],
                capture_output=True, text=True,
            )
            wall = time.perf_counter() - t
            if p.returncode != 0:
                print(p.stderr, file=sys.stderr)
                sys.exit(p.returncode)
            s = json.loads(p.stdout)
            m = json.loads((run / "metrics.json").read_text())
            mn = min(i["psnr"] for i in m["images"])
            print(f"| {r + 1} | {s['images']} | {wall:.1f} | {s['compile_seconds']:.1f} | {s['steps_per_second']:.2f} | "
                  f"{m['mean_psnr']:.2f} dB | {mn:.2f} dB | {m['mean_ssim']:.4f} |", flush=True)
            if args.keep:
                import shutil

                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.copytree(run, args.keep)


if __name__ == "__main__":
    main()
