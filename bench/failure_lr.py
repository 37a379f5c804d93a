"""Where each trainer's learning rate starts to fail, against its default (issue 23's margin).

    python bench/failure_lr.py fit FOLDER... [--mult 1,2,3] [--name NAME] [--grad-clip F]
    python bench/failure_lr.py blend A B [--mult 1,2,3]
    python bench/failure_lr.py upsample IMAGE [--scale 4] [--mult 1,2,3]

For each multiplier m of the default rate (fit: the automatic --lr and the default --latent-lr
together; blend: --lr; upsample: the field's --lr), one real run through the library, and a
table row: rollbacks, restarts (each an event of `neurimg.guard`), failure, PSNR, seconds. The
*failure rate* of an input is the smallest multiplier with an event. The default keeps its
margin when it is at most half of it: no event at m = 2.

Folders the issue asks for are made by `bench/logo_sets.py` (tune, check, many; take the first
300 of many for the 300 row) and `bench/photos.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Events:
    """A reporter that keeps the guard's messages."""

    def __init__(self):
        self.lines: list[str] = []

    def start(self, total, done): pass
    def update(self, *a, **k): pass
    def stop(self): pass

    def message(self, text):
        self.lines.append(text)


def _row(name, m, lr, outcome, psnr, seconds, extra=""):
    print(f"| {name} | x{m:g} | {lr:.3g} | {outcome} | {psnr} | {seconds:.0f} |{extra}", flush=True)


def fit_rows(paths, mults, name, background=None, grad_clip=None):
    import tempfile

    from neurimg import guard
    from neurimg.config import Config
    from neurimg.fit import fit, prepare
    from neurimg.runfolder import RunFolder

    base = Config()
    if background is not None:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, background=background))
    if grad_clip is not None:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_clip=grad_clip))
    with tempfile.TemporaryDirectory() as tmp:
        # the automatic rate for these images: what `fit` resolves it to
        folder = RunFolder.open(Path(tmp) / "probe", resume=False, overwrite=True)
        prep = prepare(paths, folder, base.validate())
        default_lr, images = prep.cfg.train.lr, prep.images
        for m in mults:
            t = dataclasses.replace(base.train, lr=default_lr * m, latent_lr=base.train.latent_lr * m)
            cfg = dataclasses.replace(base, train=t)
            rep = _Events()
            t0 = time.perf_counter()
            try:
                r = fit(paths, Path(tmp) / f"run{m}", cfg, overwrite=True, reporter=rep, images=images)
                outcome = f"{r.rollbacks} rollbacks, {r.restarts} restarts"
                psnr = f"{r.mean_psnr:.2f} (min {r.worst['psnr']:.2f})"
            except guard.TrainingFailed as e:
                outcome, psnr = f"failed: {e.reason[:60]}", "-"
            first = next((x for x in rep.lines if "redoing" in x or "starting again" in x), "")
            _row(name, m, default_lr * m, outcome, psnr, time.perf_counter() - t0, f" {first[:90]}")


def blend_rows(a, b, mults, name):
    from neurimg import blend as bl
    from neurimg import guard
    from neurimg.config import auto_batch_pixels, auto_lr
    from neurimg.data import read_image

    A, B = read_image(a), read_image(b)
    n = A.shape[0] * A.shape[1]
    default = auto_lr(min(n, auto_batch_pixels(n)))  # fit's rules: the blend is one image
    for m in mults:
        rep = _Events()
        t0 = time.perf_counter()
        try:
            r = bl.blend(A, B, bl.BlendConfig(mode="mixed", lr=default * m), reporter=rep).report
            outcome, psnr = f"{r['rollbacks']} rollbacks, {r['restarts']} restarts", f"{r['psnr_vs_exact']:.2f} vs exact"
        except guard.TrainingFailed as e:
            outcome, psnr = f"failed: {e.reason[:60]}", "-"
        _row(name, m, default * m, outcome, psnr, time.perf_counter() - t0)


def upsample_rows(image, scale, mults, name):
    import numpy as np

    from neurimg import guard
    from neurimg import upsample as up
    from neurimg.data import read_image
    from neurimg.resample import area

    img = read_image(image)
    h, w = img.shape[:2]
    low = area(img, (round(w / scale), round(h / scale)))
    default = up.UpsampleConfig().lr
    for m in mults:
        cfg = up.UpsampleConfig(method="field", lr=default * m)
        t0 = time.perf_counter()
        try:
            r = up.upsample(low, (w, h), cfg)
            from neurimg.metrics import psnr

            outcome = f"{r.tally.rollbacks} rollbacks, {r.tally.restarts} restarts"
            score = f"{psnr(np.clip(r.image, 0, 1), img):.2f} vs truth"
        except guard.TrainingFailed as e:
            outcome, score = f"failed: {e.reason[:60]}", "-"
        _row(name, m, default * m, outcome, score, time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("fit", "blend", "upsample"))
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--mult", default="1,2")
    ap.add_argument("--name")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--background", help="fit: composite alpha onto this r,g,b (0-1) instead of white")
    ap.add_argument("--grad-clip", type=float, help="fit: --grad-clip (0: off, as before issue 23's third stop)")
    ap.add_argument("--header", action="store_true")
    args = ap.parse_args()
    mults = [float(x) for x in args.mult.split(",")]
    name = args.name or ",".join(Path(p).name for p in args.inputs)
    if args.header:
        print("| input | x default | lr | events | PSNR | s | first event |")
        print("|---|---|---|---|---|---|---|")
    if args.what == "fit":
        bg = tuple(float(v) for v in args.background.split(",")) if args.background else None
        fit_rows(args.inputs, mults, name, bg, args.grad_clip)
    elif args.what == "blend":
        blend_rows(args.inputs[0], args.inputs[1], mults, name)
    else:
        upsample_rows(args.inputs[0], args.scale, mults, name)


if __name__ == "__main__":
    main()
