"""Benchmark `neurimg blend` on pairs of logos: quality against the exact solve, and wall time.

Each row runs the real CLI in a subprocess (import, reading, compile, fit, writing all count in
"wall s"), then checks the written PNG independently: the exact discrete Poisson solution is
recomputed here (forward differences, Neumann boundary, per-channel mean of (A+B)/2, clipped)
and compared with the output. "self" rows blend an image with itself in --mode mean and compare
the output with the image.

    python bench/blend.py ../shared/data/logos64 --pairs 4 [other neurimg blend options]
    python bench/blend.py ../shared/data/logos256 --pairs 2 --photos 256 --modes sum,mixed --clone --self 0

`--photos N` adds pairs of NxN photos bundled with scikit-image/matplotlib (bench/photos.py);
`--clone` adds, per pair, a masked clone (B's centre disc, mixed gradients, placed off-centre),
compared with the PNG that `--solver exact` writes for the same options.
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

from neurimg import poisson
from neurimg.data import read_image
from neurimg.metrics import psnr


def exact_reference(a, b, mode):
    ax, ay = poisson.forward_differences(a)
    bx, by = poisson.forward_differences(b)
    if mode == "sum":
        gx, gy = ax + bx, ay + by
    elif mode == "mean":
        gx, gy = (ax + bx) / 2, (ay + by) / 2
    else:
        take_b = ((bx**2 + by**2).sum(-1) > (ax**2 + ay**2).sum(-1))[..., None]
        gx, gy = np.where(take_b, bx, ax), np.where(take_b, by, ay)
    return np.clip(poisson.solve_exact(gx, gy, ((a + b) / 2).mean((0, 1))), 0, 1)


PHOTO_PAIRS = (("astronaut", "coffee"), ("chelsea", "rocket"), ("grace_hopper", "immunohistochemistry"), ("camera", "hubble_deep_field"))


def _blend(pa, pb, args, out):
    return subprocess.run([sys.executable, "-m", "neurimg.cli", "blend", pa, pb, "-o", str(out), "--json", "-q", *args],
                          capture_output=True, text=True)


def clone_args(pb: str, tmp: Path) -> list[str]:
    """A disc mask over B's centre, B placed a quarter of the canvas right and down."""
    b = read_image(pb)
    h, w = b.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    disc = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2).astype(np.uint8) * 255
    mask = tmp / "mask.png"
    Image.fromarray(disc).save(mask)
    return ["--mask", str(mask), "--offset", f"{w // 4},{h // 4}"]


def run_one(pa: str, pb: str, mode: str, extra: list[str], tmp: Path) -> dict:
    out = tmp / "out.png"
    clone = mode == "clone"
    args = ["--mode", "mixed", *clone_args(pb, tmp)] if clone else ["--mode", mode]
    t0 = time.perf_counter()
    p = _blend(pa, pb, args + extra, out)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"blend failed: {p.stderr.strip()}")
    s = json.loads(p.stdout)
    a, b = read_image(pa).astype(np.float64), read_image(pb).astype(np.float64)
    res = read_image(out).astype(np.float64)
    if clone:
        if _blend(pa, pb, args + ["--solver", "exact"], tmp / "exact.png").returncode != 0:
            raise SystemExit("exact clone failed")
        ref = read_image(tmp / "exact.png").astype(np.float64)
    else:
        ref = a if pa == pb else exact_reference(a, b, mode)
    return {
        "psnr_png": psnr(res, ref),
        "mean_err_png": float(np.abs(res.mean((0, 1)) - ref.mean((0, 1))).max()),
        "psnr": s["psnr_vs_exact"],
        "gmse": s["gradient_mse"],
        "cos": s["gradient_cosine"],
        "wall": wall,
        "seconds": s["seconds"],
        "restarts": s.get("restarts", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--pairs", type=int, default=4, help="pairs of consecutive logos (sorted by name)")
    ap.add_argument("--modes", default="sum,mean,mixed")
    ap.add_argument("--self", type=int, default=2, dest="n_self", help="images blended with themselves (mean)")
    ap.add_argument("--photos", type=int, default=0, metavar="N", help="add pairs of NxN photos (bench/photos.py)")
    ap.add_argument("--photo-pairs", default=",".join(map(str, range(len(PHOTO_PAIRS)))),
                    help="which photo pairs (indices into PHOTO_PAIRS, comma-separated)")
    ap.add_argument("--clone", action="store_true", help="add a masked clone per pair")
    args, extra = ap.parse_known_args()  # any other option goes to neurimg blend
    args.extra = [e for e in extra if e != "--"]
    files = sorted(str(p) for p in Path(args.folder).glob("*.png"))
    pairs = [(files[2 * i], files[2 * i + 1]) for i in range(args.pairs)]
    d = tempfile.TemporaryDirectory()
    if args.photos:
        sys.path.insert(0, str(Path(__file__).parent))
        from photos import photo

        for na, nb in [PHOTO_PAIRS[int(i)] for i in args.photo_pairs.split(",")]:
            paths = []
            for n in (na, nb):
                paths.append(str(Path(d.name) / f"{n}{args.photos}.png"))
                Image.fromarray(np.round(photo(n, args.photos) * 255).astype(np.uint8)).save(paths[-1])
            pairs.append(tuple(paths))
    modes = [m for m in args.modes.split(",") if m] + (["clone"] if args.clone else [])
    jobs = [(m, a, b) for m in modes for a, b in pairs]
    jobs += [("mean", f, f) for f in files[: args.n_self]]
    print("| mode | A | B | PSNR vs exact (PNG) | PSNR vs exact (float) | gradient MSE | cosine | mean colour error (PNG, /255) | wall s | blend s | restarts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with d as dname:
        for mode, a, b in jobs:
            r = run_one(a, b, mode, args.extra, Path(dname))
            r["mode"] = "self" if a == b else mode
            rows.append(r)
            print(
                f"| {r['mode']} | {Path(a).stem} | {Path(b).stem} | {r['psnr_png']:.2f} | {r['psnr']:.2f} | {r['gmse']:.4f} | "
                f"{r['cos']:.4f} | {r['mean_err_png'] * 255:.2f} | {r['wall']:.1f} | {r['seconds']:.1f} | {r['restarts']} |",
                flush=True,
            )
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        print(
            f"| **{mode}: mean (min)** | {len(rs)} | | {np.mean([r['psnr_png'] for r in rs]):.2f} ({min(r['psnr_png'] for r in rs):.2f}) | "
            f"{np.mean([r['psnr'] for r in rs]):.2f} | {np.mean([r['gmse'] for r in rs]):.4f} | {np.mean([r['cos'] for r in rs]):.4f} | "
            f"{np.mean([r['mean_err_png'] for r in rs]) * 255:.2f} (max {max(r['mean_err_png'] for r in rs) * 255:.2f}) | "
            f"{np.mean([r['wall'] for r in rs]):.1f} (max {max(r['wall'] for r in rs):.1f}) | | |",
            flush=True,
        )


if __name__ == "__main__":
    main()
