"""Photo test images for the benchmarks: bundled with scikit-image and matplotlib (no network).

Needs `pip install scikit-image matplotlib` (benchmarks only; neurimg itself does not).
Each photo is centre-cropped to a square and resized (PIL Lanczos) to the size asked for.

    python bench/photos.py OUT_DIR --size 256     # writes OUT_DIR/<name>.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

TUNING = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "grace_hopper", "camera")


def _load(name: str) -> np.ndarray:
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    from skimage import data

    im = getattr(data, name)()
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, -1)
    return im[..., :3]


def photo(name: str, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]."""
    im = _load(name)
    h, w = im.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    pil = Image.fromarray(np.ascontiguousarray(im[y0 : y0 + s, x0 : x0 + s]).astype(np.uint8))
    if s != size:
        pil = pil.resize((size, size), Image.LANCZOS)
    return np.asarray(pil, np.float32) / 255.0


def crop(name: str, size: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A size x size crop at the photo's own resolution (no resizing), centred and then moved
    by offset = (down, right) pixels (kept inside the photo): (size, size, 3) float32 in [0, 1]."""
    im = _load(name)
    h, w = im.shape[:2]
    y0 = min(max((h - size) // 2 + offset[0], 0), h - size)
    x0 = min(max((w - size) // 2 + offset[1], 0), w - size)
    return np.ascontiguousarray(im[y0 : y0 + size, x0 : x0 + size]).astype(np.float32) / 255.0


def photos(size: int, names=TUNING) -> dict[str, np.ndarray]:
    return {n: photo(n, size) for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, im in photos(args.size).items():
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(out / f"{name}.png")
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
