"""Benchmark the GAN blender (issue 15) on held-out pairs: neither image was trained on.

Trains blenders with `neurimg blend-train`'s defaults (or reuses them) on the first 24 logos of
logos64, then blends every ordered pair of the held-out images: the other 8 logos of logos64
and the 4 logos of logos256 reduced to 64x64 (area averaging), 132 pairs. Each method is
scored by `neurimg.blend.score` against the exact mixed-gradient blend (the float64 DCT solve
on the host): PSNR, SSIM, gradient cosine with the mixed target field, mean colour error, and
seconds per blend (median; the GAN's compile excluded, its forward pass and resizing included).

    python bench/gan_blend.py --out /tmp/ganbench [--steps N] [--naive-steps N] [--siren-pairs 8]

Methods: the GAN (target mixed, and target naive: the proposal as written), the SIREN blend
(`neurimg blend --mode mixed`, defaults; on the first --siren-pairs pairs only: ~14 s each),
the naive average and the exact solver. Also the levels: the GAN at --levels 1,1,1 against A,
0,0,0 against B, and at random levels against their targets (`blendgan.target_of`); the
noise: two noise seeds against each other. Pictures: docs/gan_blend.png (a few pairs: A | B |
exact | GAN | SIREN | naive) and docs/gan_levels.png (A | B | levels 1,1,1 | 1,0.5,0 | 0.5 |
0,0.5,1 | 0,0,0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"


def held_out_images(size: int = 64):
    from neurimg import resample
    from neurimg.data import read_image

    l64 = sorted((DATA / "logos64").glob("*.png"))
    train = [str(f) for f in l64[:24]]
    held = [read_image(f) for f in l64[24:]]
    held += [np.clip(resample.area(read_image(f), (size, size)), 0, 1) for f in sorted((DATA / "logos256").glob("*.png"))]
    names = [f.stem for f in l64[24:]] + [f.stem for f in sorted((DATA / "logos256").glob("*.png"))]
    return train, np.stack(held).astype(np.float32), names


def trained(folder: Path, files, target: str, steps: int | None):
    from neurimg.blender import train
    from neurimg.config import GanConfig
    from neurimg.progress import RichReporter

    if not (folder / "metrics.json").exists():
        cfg = GanConfig(target=target)
        t0 = time.perf_counter()
        r = train(files, folder, cfg, overwrite=True, reporter=RichReporter(f"blend-train {target}"), steps=steps)
        print(f"trained {folder} ({target}): {r.steps} steps in {time.perf_counter() - t0:.0f} s, "
              f"{r.steps_per_second:.2f} steps/s, train-pair PSNR {r.psnr:.2f} dB", flush=True)


def scores(outs, imgs, pairs, seconds):
    from neurimg import blend as bl
    from neurimg.metrics import ssim

    rows = []
    for o, (i, j) in zip(outs, pairs):
        s = bl.score(o, imgs[i], imgs[j], "mixed")
        exact = np.clip(bl.exact_solution(bl.targets(imgs[i].astype(np.float64), imgs[j].astype(np.float64), np.ones(imgs[i].shape[:2], bool), "mixed")), 0, 1)
        s["ssim"] = ssim(o, exact)
        rows.append(s)
    agg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    agg["min_psnr"] = float(np.min([r["psnr_vs_exact"] for r in rows]))
    agg["seconds"] = float(statistics.median(seconds))
    agg["pairs"] = len(rows)
    return agg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ganbench")
    ap.add_argument("--steps", type=int, default=None, help="GAN steps (default: blend-train's)")
    ap.add_argument("--naive-steps", type=int, default=None)
    ap.add_argument("--siren-pairs", type=int, default=8)
    ap.add_argument("--pictures", default=str(ROOT / "docs"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from neurimg import blend as bl
    from neurimg.blender import Blender
    from neurimg.config import BlendConfig
    from neurimg.metrics import psnr

    files, imgs, names = held_out_images()
    pairs = [(i, j) for i in range(len(imgs)) for j in range(len(imgs)) if i != j]
    trained(out / "gan-mixed", files, "mixed", args.steps)
    trained(out / "gan-naive", files, "naive", args.naive_steps or args.steps)

    results, outputs = {}, {}
    for target in ("mixed", "naive"):
        g = Blender.load(out / f"gan-{target}")
        g.blend(imgs[0], imgs[1])  # compile
        o, secs = [], []
        for i, j in pairs:
            t0 = time.perf_counter()
            o.append(g.blend(imgs[i], imgs[j]))
            secs.append(time.perf_counter() - t0)
        outputs[f"gan-{target}"] = o
        results[f"GAN, target {target} ({g.step} steps)"] = scores(o, imgs, pairs, secs)
        if target == "mixed":
            gan = g
    o, secs = [], []
    for i, j in pairs[: args.siren_pairs]:
        t0 = time.perf_counter()
        o.append(bl.blend(imgs[i], imgs[j], BlendConfig(mode="mixed")).image)
        secs.append(time.perf_counter() - t0)
    outputs["siren"] = o
    results["SIREN blend, --mode mixed (first %d pairs)" % len(o)] = scores(o, imgs, pairs[: len(o)], secs)
    o = [(imgs[i] + imgs[j]) / 2 for i, j in pairs]
    outputs["naive"] = o
    results["naive average (A+B)/2"] = scores(o, imgs, pairs, [0.0])
    o, secs = [], []
    for i, j in pairs:
        t0 = time.perf_counter()
        o.append(bl.blend(imgs[i], imgs[j], BlendConfig(mode="mixed", solver="exact")).image)
        secs.append(time.perf_counter() - t0)
    results["exact solver (--solver exact)"] = scores(o, imgs, pairs, secs)
    gan_same = scores(outputs["gan-mixed"][: args.siren_pairs], imgs, pairs[: args.siren_pairs], [0.0])

    print(f"\n{len(pairs)} held-out ordered pairs of {len(imgs)} logos ({', '.join(names)}), 64x64; "
          "scored against the exact mixed-gradient blend\n")
    print("| method | pairs | PSNR dB (mean / min) | SSIM | gradient cosine | gradient MSE | mean colour error | s per blend |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['pairs']} | {r['psnr_vs_exact']:.2f} / {r['min_psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['gradient_cosine']:.4f} | {r['gradient_mse']:.1f} | {r['mean_color_error']:.4f} | {r['seconds']:.4f} |")
    print(f"\nthe GAN (mixed) on the SIREN's {gan_same['pairs']} pairs: {gan_same['psnr_vs_exact']:.2f} dB, "
          f"cosine {gan_same['gradient_cosine']:.4f}")

    # levels and noise
    import jax.numpy as jnp

    from neurimg import blendgan as bg

    A = imgs[[i for i, _ in pairs]]
    B = imgs[[j for _, j in pairs]]
    lv_rows = {}
    for lv, ref in (((1.0, 1.0, 1.0), A), ((0.0, 0.0, 0.0), B)):
        got = np.stack([gan.blend(a, b, lv) for a, b in zip(A, B)])
        mid = np.stack(outputs["gan-mixed"])
        lv_rows[lv] = (np.mean([psnr(g, r) for g, r in zip(got, ref)]), np.mean([psnr(m, r) for m, r in zip(mid, ref)]))
    rl = np.random.default_rng(0).uniform(0, 1, (len(pairs), 3)).astype(np.float32)
    want = np.asarray(bg.target_of(jnp.asarray(A), jnp.asarray(B), "mixed", jnp.asarray(rl)))
    got = [gan.blend(a, b, tuple(l)) for a, b, l in zip(A, B, rl)]
    rand_psnr = np.mean([psnr(g, w) for g, w in zip(got, want)])
    noise = np.mean([psnr(gan.blend(a, b, noise_seed=1), gan.blend(a, b, noise_seed=2)) for a, b in zip(A[:20], B[:20])])
    print("\nlevels (GAN, target mixed):")
    for lv, (p_lv, p_mid) in lv_rows.items():
        which = "A" if lv[0] == 1 else "B"
        print(f"- --levels {','.join(f'{v:g}' for v in lv)}: {p_lv:.2f} dB against {which} (the default levels: {p_mid:.2f} dB against {which})")
    print(f"- random levels: {rand_psnr:.2f} dB against their targets (target_of)")
    print(f"- noise seeds 1 and 2: {noise:.2f} dB apart (20 pairs)")
    json.dump({k: v for k, v in results.items()}, open(out / "results.json", "w"), indent=1)

    # pictures
    from neurimg.data import write_png
    from neurimg.runfolder import snapshot_grid

    pics = Path(args.pictures)
    pics.mkdir(exist_ok=True)
    show = list(range(min(args.siren_pairs, 4)))
    exact_o = [np.clip(bl.exact_solution(bl.targets(imgs[i].astype(np.float64), imgs[j].astype(np.float64), np.ones((64, 64), bool), "mixed")), 0, 1) for i, j in pairs]
    rows = [[imgs[pairs[k][0]], imgs[pairs[k][1]], exact_o[k], outputs["gan-mixed"][k], outputs["siren"][k], outputs["naive"][k]] for k in show]
    write_png(pics / "gan_blend.png", _big(snapshot_grid(rows, cols=1)))
    lvs = [(1, 1, 1), (1, 0.5, 0), (0.5, 0.5, 0.5), (0, 0.5, 1), (0, 0, 0)]
    rows = [[imgs[pairs[k][0]], imgs[pairs[k][1]]] + [gan.blend(imgs[pairs[k][0]], imgs[pairs[k][1]], lv) for lv in lvs] for k in (0, 13, 40)]
    write_png(pics / "gan_levels.png", _big(snapshot_grid(rows, cols=1)))
    print(f"\npictures: {pics / 'gan_blend.png'}, {pics / 'gan_levels.png'}")


def _big(grid: np.ndarray, k: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(grid, k, 0), k, 1).astype(np.float32) / 255.0


if __name__ == "__main__":
    main()
