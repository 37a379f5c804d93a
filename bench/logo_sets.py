"""Build the 48-logo folders the `fit` benchmarks use, from `../shared/data`.

    python bench/logo_sets.py tune  /tmp/logos48     # the tuning set
    python bench/logo_sets.py check /tmp/check48     # a second set, for checking what was tuned
    python bench/logo_sets.py many  /tmp/logos1024   # 1024 logos

tune:  the 32 logos of logos64, the 4 of logos256 box-downsampled to 64x64, and 12 of the
       64x64 ones (every 2nd from the first) flipped left-right or rotated, colour channels
       reversed: the set of `bench/RESULTS.md` "fit defaults" since issue 2.
check: the 32 logos of logos64 transposed with their channels rolled by one (R,G,B -> G,B,R),
       4 random 128x128 crops of each logos256 image box-downsampled to 64x64 (16), so the
       pixels and colours differ from the tuning set's.
many:  1024 logos of 64x64: the 32 of logos64 under the 8 flips/rotations, each with 4 colour
       orders of its RGB channels (for the README's "1000 small logos" figure).
Alpha is kept; `fit` composites it onto white.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rgba(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p).convert("RGBA"))


def _box(a: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BOX))


def build(kind: str, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    small = sorted((DATA / "logos64").glob("*.png"))
    large = sorted((DATA / "logos256").glob("*.png"))
    items: list[tuple[str, np.ndarray]] = []
    if kind == "tune":
        items += [(p.stem, _rgba(p)) for p in small]
        items += [(p.stem + "-64", _box(_rgba(p), 64)) for p in large]
        for i, p in enumerate(small[::2][:12]):
            a = _rgba(p)
            a = a[:, ::-1] if i % 2 == 0 else np.rot90(a, 1 + i % 3)
            a = np.concatenate([a[..., 2::-1], a[..., 3:]], -1)
            items.append((p.stem + "-t", a))
    elif kind == "check":
        for p in small:
            a = np.swapaxes(_rgba(p), 0, 1)
            a = np.concatenate([np.roll(a[..., :3], -1, -1), a[..., 3:]], -1)
            items.append((p.stem + "-c", a))
        rng = np.random.default_rng(13)
        for p in large:
            a = _rgba(p)
            for j in range(4):
                y, x = rng.integers(0, a.shape[0] - 128 + 1, 2)
                items.append((f"{p.stem}-crop{j}", _box(np.ascontiguousarray(a[y : y + 128, x : x + 128]), 64)))
    elif kind == "many":
        orders = ([0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1])
        for p in small:
            a = _rgba(p)
            for d in range(8):
                b = np.rot90(a[:, ::-1] if d >= 4 else a, d % 4)
                for j, o in enumerate(orders):
                    items.append((f"{p.stem}-d{d}c{j}", np.concatenate([b[..., o], b[..., 3:]], -1)))
    else:
        raise SystemExit(f"unknown set {kind!r}: tune or check")
    for name, a in items:
        Image.fromarray(np.ascontiguousarray(a)).save(out / f"{name}.png")
    return len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["tune", "check", "many"])
    ap.add_argument("out")
    a = ap.parse_args()
    print(f"{build(a.kind, Path(a.out))} images in {a.out}")


if __name__ == "__main__":
    main()
