"""Training speed: steps/s, achieved GFLOP/s against a matmul peak measured in the same process,
compile time, and PSNR reached per wall-clock second.

    python bench/train_speed.py                       # default table (CPU-sized)
    python bench/train_speed.py --configs big         # 256x256 image, width 256 full batch
    python bench/train_speed.py --configs gpu --precision float32,tf32,bf16 --psnr-steps 300
                                                      # 256x256 and 512x512 full batch (bench/gpu_check.sh)
    python bench/train_speed.py --folder ../shared/data/logos64 --seconds 60
    python bench/train_speed.py --configs big --torch-python /path/to/venv-with-torch/bin/python --cli

`--torch-python` adds the PyTorch reference SIREN (bench/torch_siren.py, same architecture,
full batch 256x256) timed in a subprocess of this run; `--cli` runs the issue's command
`neurimg fit IMG --steps 40 --width 256 --hidden-layers 3 --batch-pixels all --json` on the
256x256 test image and reports its steady-state steps/s.

FLOPs per step are counted as 3x the forward matmul FLOPs (forward, input grad, weight grad;
2 FLOPs per multiply-add), times the pixels in the batch; elementwise work is not counted, so
the percentage is of useful matmul work. s/step is the median over several timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import Trainer  # noqa: E402
from neurimg import siren, train  # noqa: E402
from neurimg.config import AUTO_BATCH, WIDTH, Config, ModelConfig, TrainConfig  # noqa: E402
from neurimg.coords import image_grid  # noqa: E402
from neurimg.data import load_images  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 10, precision: str = "float32") -> float:
    """GFLOP/s of an n^3 matmul at a training precision (`siren.dense`: float32 is HIGHEST,
    tf32 the backend's default, bf16 bfloat16 operands with float32 sums)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: siren.dense(x, x, precision))
    f(a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts) / 1e9


def synthetic_photo(size: int) -> np.ndarray:
    """A smooth-plus-edges test image (deterministic), as a stand-in photo."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([
        0.5 + 0.4 * np.sin(9 * x + 3 * y),
        0.5 + 0.4 * np.cos(7 * y - 2 * x * y),
        0.5 + 0.3 * np.sin(13 * x * y),
    ], -1)
    img[(x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.04] = (0.9, 0.2, 0.1)
    img[(x > 0.1) & (x < 0.3) & (y > 0.6)] *= 0.5
    return img.astype(np.float32)


def bench_config(name, images, mcfg: ModelConfig, batch_pixels: int, seconds: float, calls: int, steps_per_call: int,
                 chunk_points: int = train.CHUNK_POINTS, precision: str = "float32", psnr_steps: int = 0):
    """Timed calls include drawing and sending the batches, as in `neurimg fit`. The PSNR is
    reached after `seconds` of training, or after `psnr_steps` steps if given (the same work at
    every precision: the PSNR cost of a precision)."""
    cfg = Config(mcfg, TrainConfig(steps=100000, batch_pixels=batch_pixels, precision=precision))
    tr = Trainer(cfg, images, chunk_points=chunk_points)
    steps_per_call = min(steps_per_call, tr.max_steps)
    pixels = tr.points_per_step
    flops_step = 3 * siren.forward_flops_per_point(mcfg) * pixels
    st = tr.init()
    st, _ = tr.run(st, 0, 1)
    jax.block_until_ready(st)
    ts, step = [], 1
    for _ in range(calls):
        t = time.perf_counter()
        st, m = tr.run(st, step, steps_per_call)
        jax.block_until_ready(st)
        step += steps_per_call
        ts.append((time.perf_counter() - t) / steps_per_call)
    s_step = statistics.median(ts)
    # PSNR after `seconds` of training from scratch (compile excluded)
    st, step = tr.init(), 0
    t = time.perf_counter()
    while (step < psnr_steps) if psnr_steps else (time.perf_counter() - t < seconds):
        n = min(tr.max_steps, max(1, int(0.5 / s_step)))
        if psnr_steps:
            n = min(n, psnr_steps - step)
        st, m = tr.run(st, step, n)
        step += n
        jax.block_until_ready(st)
    params = jax.device_get(st["params"])
    ev = jax.jit(lambda p, c, i: jnp.clip(siren.apply(tr.graphdef, p, c, i), 0, 1))
    psnrs = []
    for k, im in enumerate(images):
        h, w = im.shape[:2]
        out = np.asarray(ev(params, image_grid(w, h).reshape(1, -1, 2), jnp.array([k]))).reshape(h, w, 3)
        psnrs.append(-10 * np.log10(max(float(np.mean((out - im) ** 2)), 1e-10)))
    return dict(name=name, pixels=pixels, s_step=s_step, gflops=flops_step / s_step / 1e9, compile=tr.compile_seconds,
                steps=step, psnr=float(np.mean(psnrs)), precision=precision)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="default", choices=["default", "big", "all", "gpu"])
    ap.add_argument("--psnr-steps", type=int, default=0, help="PSNR after this many steps instead of --seconds")
    ap.add_argument("--peak-size", type=int, default=2048, help="n of the n^3 matmul peak (8192 on a GPU)")
    ap.add_argument("--folder", default=os.path.join(os.path.dirname(__file__), "..", "examples", "logos"))
    ap.add_argument("--seconds", type=float, default=20.0, help="training time for the PSNR column")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--compare-sine", action="store_true", help="add rows with XLA's jnp.sin (the pre-optimisation step)")
    ap.add_argument("--torch-python", help="a Python with torch: add the PyTorch reference SIREN row")
    ap.add_argument("--cli", action="store_true", help="add the issue's `neurimg fit ... --batch-pixels all` command as a row")
    ap.add_argument("--precision", default="float32", help="comma-separated training precisions to compare (float32, tf32, bf16)")
    ap.add_argument("--chunk-points", default=str(train.CHUNK_POINTS),
                    help="comma-separated points per gradient chunk to compare (0 = one pass over the batch)")
    args = ap.parse_args()

    precs = args.precision.split(",")
    peaks = {p: matmul_peak(args.peak_size, precision=p) for p in precs}
    peak = peaks[precs[0]]
    logos = [i.pixels for i in load_images([args.folder])]
    photo = [synthetic_photo(256)]
    rows = []
    d = ModelConfig(width=WIDTH)  # the centre fit's width (an icon folder's area fit: bench/zoom.py)
    chunks = [int(c) for c in args.chunk_points.split(",")]

    def label(name, cp, prec):
        name = name if len(chunks) == 1 else f"{name}, chunk {cp or 'off'}"
        return name if len(precs) == 1 else f"{name}, {prec}"

    for cp, prec in [(c, p) for p in precs for c in chunks]:
        cpv = cp or 1 << 40
        if args.configs in ("default", "all"):
            rows.append(bench_config(label(f"logos x{len(logos)}, defaults (w{d.width}, {AUTO_BATCH} px)", cp, prec), logos, d, AUTO_BATCH, args.seconds, args.calls, 20, cpv, prec))
            rows.append(bench_config(label(f"logos x{len(logos)}, w128, 16k px", cp, prec), logos, ModelConfig(width=128), 16384, args.seconds, args.calls, 20, cpv, prec))
        if args.configs in ("big", "all"):
            rows.append(bench_config(label("photo 256x256, w256 L3, full batch", cp, prec), photo, ModelConfig(width=256, hidden_layers=3, latent_dim=16), 0, args.seconds, args.calls, 2, cpv, prec))
        if args.configs == "gpu":
            for size in (256, 512):
                rows.append(bench_config(label(f"photo {size}x{size}, w256 L3, full batch", cp, prec), [synthetic_photo(size)],
                                         ModelConfig(width=256, hidden_layers=3, latent_dim=16), 0, args.seconds, args.calls, 20,
                                         cpv, prec, args.psnr_steps))
    if args.compare_sine:
        fast = siren.sine
        siren.sine = jnp.sin  # SineLayer looks the function up at trace time
        try:
            if args.configs in ("default", "all"):
                rows.append(bench_config(f"logos x{len(logos)}, defaults, jnp.sin", logos, d, AUTO_BATCH, args.seconds, args.calls, 20))
            if args.configs in ("big", "all"):
                rows.append(bench_config("photo 256x256, w256 L3, full, jnp.sin", photo, ModelConfig(width=256, hidden_layers=3, latent_dim=16), 0, args.seconds, args.calls, 2))
        finally:
            siren.sine = fast
    extra = []
    big_flops = 3 * siren.forward_flops_per_point(ModelConfig(width=256, hidden_layers=3)) * 256 * 256
    if args.cli:
        extra.append(cli_row(photo[0], big_flops))
    if args.torch_python:
        extra.append(torch_row(args.torch_python, args.calls))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    for p, v in peaks.items():
        print(f"matmul peak ({args.peak_size}^3, {p}, median of 10): {v:.1f} GFLOP/s")
    print()
    after = f"{args.psnr_steps} steps" if args.psnr_steps else f"{args.seconds:g}s"
    hdr = f"| {'config':52s} | px/step | s/step | steps/s | GFLOP/s | % peak | compile s | PSNR after {after} (steps) |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['name']:52s} | {r['pixels']:7d} | {r['s_step']:.4f} | {1 / r['s_step']:7.2f} | {r['gflops']:7.1f} | "
              f"{100 * r['gflops'] / peaks[r['precision']]:5.1f}% | {r['compile']:9.2f} | {r['psnr']:.2f} dB ({r['steps']}) |")
    for r in extra:
        print(f"| {r['name']:52s} | {65536:7d} | {r['s_step']:.4f} | {1 / r['s_step']:7.2f} | {r['gflops']:7.1f} | "
              f"{100 * r['gflops'] / peak:5.1f}% | {r['compile']} | - |")
    if len(precs) > 1 and "float32" in precs:  # the PSNR cost of each precision, same config
        print()
        for r in rows:
            if r["precision"] != "float32":
                base = next(q for q in rows if q["precision"] == "float32" and q["name"].rsplit(",", 1)[0] == r["name"].rsplit(",", 1)[0])
                print(f"{r['name']}: {r['psnr'] - base['psnr']:+.2f} dB against float32, {base['s_step'] / r['s_step']:.2f}x its steps/s")
    big = [r for r in rows if r["name"].startswith("photo 256x256, w256 L3, full batch")][-1:]
    tor = [r for r in extra if r["name"].startswith("pytorch")]
    if big and tor:
        print(f"\nneurimg full-batch step vs PyTorch reference: {tor[0]['s_step'] / big[0]['s_step']:.2f}x the steps/s")


def cli_row(img: np.ndarray, flops: float) -> dict:
    """The issue's command, as a user runs it: steady-state steps/s from its --json."""
    from neurimg.data import write_png

    with tempfile.TemporaryDirectory() as d:
        write_png(os.path.join(d, "img.png"), img)
        cmd = [sys.executable, "-m", "neurimg.cli", "fit", os.path.join(d, "img.png"), "-o", os.path.join(d, "run"),
               "--steps", "40", "--width", "256", "--hidden-layers", "3", "--batch-pixels", "all", "--json", "-q"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    sps = r["steps_per_second"]
    return dict(name="neurimg fit CLI, 256x256 full, 40 steps", s_step=1 / sps, gflops=flops * sps / 1e9,
                compile=f"{r['compile_seconds']:9.2f}")


def torch_row(python: str, calls: int) -> dict:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_siren.py")
    out = subprocess.run([python, script, "--calls", str(calls)], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return dict(name=f"pytorch {r['torch']} reference SIREN, full", s_step=r["s_step"], gflops=r["gflops"], compile="      n/a")


if __name__ == "__main__":
    main()
