"""Large folders: reading time and host memory, and training on them with bounded device memory.

    python bench/large_folder.py                      # 20k synthetic 32x32 PNGs in /tmp
    python bench/large_folder.py --folder DIR --images 20000 --size 32 --devices 4

1. Makes (once) a folder of N small PNGs: crops of the bundled logos, flipped and shifted.
2. Reads it with `load_image_set` in a fresh process, with 1 worker and with the default
   (one per core): wall seconds, files/s, peak RSS of that process, the store's bytes, and
   what float32 storage (the old layout) would have held.
3. Times training steps on it (width 64, defaults otherwise: 128 images x 64 pixels a step)
   with the per-image tables (latents and their Adam moments) split over the "images" axis
   (what `fit` does) and, with --devices > 1, replicated on every device: s/step and the
   state's bytes per device. On CPU, --devices
   needs XLA_FLAGS=--xla_force_host_platform_device_count=N (this script sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def make_folder(folder: str, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    if os.path.isdir(folder) and len(os.listdir(folder)) >= n:
        return
    os.makedirs(folder, exist_ok=True)
    src = sorted(os.path.join(HERE, "..", "examples", "logos", f) for f in os.listdir(os.path.join(HERE, "..", "examples", "logos")))
    logos = [np.asarray(Image.open(f).convert("RGB")) for f in src if f.endswith(".png")]
    for i in range(n):
        a = logos[i % len(logos)]
        a = np.roll(a, (i * 7) % a.shape[1], axis=1)
        a = a[:: max(1, a.shape[0] // size), :: max(1, a.shape[1] // size)][:size, :size]
        if (i // len(logos)) % 2:
            a = a[:, ::-1]
        Image.fromarray(np.ascontiguousarray(a)).save(os.path.join(folder, f"img{i:06d}.png"))


LOAD = """
import json, resource, sys, time
from neurimg.imageset import load_image_set
if __name__ == "__main__":
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    s = load_image_set([sys.argv[1]], workers=int(sys.argv[2]))
    dt = time.perf_counter() - t
    print(json.dumps(dict(seconds=dt, images=len(s), store=s.nbytes, pixels=int(s.store.shape[0]),
                          rss_before=base * 1024, rss_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def load_row(folder: str, workers: int) -> dict:
    path = os.path.join("/tmp", "neurimg_bench_load.py")
    with open(path, "w") as f:
        f.write(LOAD)
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    out = subprocess.run([sys.executable, path, folder, str(workers)], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out)


TRAIN = """
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from common import Trainer
from neurimg.config import Config, ModelConfig, TrainConfig
from neurimg.imageset import load_image_set
folder, devices, calls = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
imgs = load_image_set([folder])
cfg = Config(ModelConfig(width=64), TrainConfig(steps=100000))
rows = []
for mode in (["split", "replicated"] if devices > 1 else ["split"]):
    tr = Trainer(cfg, imgs, devices=devices, replicated=mode == "replicated")
    lay = tr.layout
    st = tr.init()
    n = tr.max_steps
    st, _ = tr.run(st, 0, n); jax.block_until_ready(st)
    ts = []
    for c in range(calls):
        t = time.perf_counter()
        st, m = tr.run(st, (c + 1) * n, n)
        jax.block_until_ready(st)
        ts.append((time.perf_counter() - t) / n)
    per_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(st))
    batch = sum(v.nbytes for v in tr.draw.batches(0, n, tr.size).values())
    rows.append(dict(mode=mode, devices=devices, mesh=list(lay.shape), images_per_step=tr.plan.images,
                     points=tr.plan.drawn, s_step=statistics.median(ts), state_bytes_per_device=per_dev,
                     batch_bytes_per_call=batch))
print(json.dumps(rows))
"""


def train_rows(folder: str, devices: int, calls: int) -> list[dict]:
    path = os.path.join("/tmp", "neurimg_bench_train.py")
    with open(path, "w") as f:
        f.write(TRAIN)
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, ".."))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    p = subprocess.run([sys.executable, path, HERE, folder, str(devices), str(calls)], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="/tmp/neurimg_bench_20k")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3, help="load timings per worker count (median)")
    args = ap.parse_args()
    t = time.perf_counter()
    make_folder(args.folder, args.images, args.size)
    print(f"folder: {args.folder} ({len(os.listdir(args.folder))} PNGs, made/checked in {time.perf_counter() - t:.1f} s); "
          f"{os.cpu_count()} CPUs\n")
    print("| workers | load s (median) | files/s | store MB | float32 would be MB | peak RSS MB | RSS before MB |")
    print("|---|---|---|---|---|---|---|")
    from neurimg.imageset import default_workers

    for w in sorted({1, default_workers()}):
        rs = [load_row(args.folder, w) for _ in range(args.repeat)]
        r = rs[0]
        sec = statistics.median(x["seconds"] for x in rs)
        print(f"| {w} | {sec:.2f} | {r['images'] / sec:.0f} | {r['store'] / 1e6:.1f} | {r['pixels'] * 12 / 1e6:.1f} | "
              f"{max(x['rss_peak'] for x in rs) / 1e6:.0f} | {r['rss_before'] / 1e6:.0f} |")
    print()
    rows = train_rows(args.folder, args.devices, args.calls)
    print("| latents | devices | mesh | images x points per step | s/step (median) | state MB per device | batch MB per call |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['devices']} | {r['mesh'][0]}x{r['mesh'][1]} | {r['images_per_step']} x {r['points']} | "
              f"{r['s_step']:.4f} | {r['state_bytes_per_device'] / 1e6:.1f} | {r['batch_bytes_per_call'] / 1e6:.2f} |")


if __name__ == "__main__":
    main()
