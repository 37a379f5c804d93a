"""Build ground-truth image sets from open-licence SVG icon sets (Iconify JSON packages on npm).

    python bench/icon_sets.py SET OUT_DIR [--count N] [--seed S] [--sizes 64,256]
    python bench/icon_sets.py flat    /work/sets/flat
    python bench/icon_sets.py fluent  /work/sets/fluent300 --count 300

Each icon is rendered from its SVG with resvg-py (`pip install resvg-py`) at exactly
size x size for every size in --sizes, as RGBA PNGs with the same name in each folder:
OUT_DIR/64/<icon>.png, OUT_DIR/256/<icon>.png, ... so a 64 px fit can be compared with the
256 px ground truth. OUT_DIR/SOURCES.md records the package, version, licence, author and the
icons; the PNGs already in OUT_DIR/<size>/ are replaced.

| SET     | npm package                           | licence (info.json = package.json) | author          |
| ------- | ------------------------------------- | ---------------------------------- | --------------- |
| flat    | @iconify-json/flat-color-icons@1.2.3  | MIT                                | Icons8          |
| fluent  | @iconify-json/fluent-emoji-flat@1.2.6 | MIT                                | Microsoft       |
| twemoji | @iconify-json/twemoji@1.2.5           | CC-BY-4.0 (credit Twitter)         | Twitter         |
| fxemoji | @iconify-json/fxemoji@1.2.2           | Apache-2.0                         | Mozilla         |
| noto    | @iconify-json/noto@1.2.9              | Apache-2.0                         | Google          |

The licences were read from each package's info.json "license" and package.json "license"
(icons.json itself has no "info" block in these versions); all match what they were chosen for,
and the script stops if a package's licence differs from this table. Versions are pinned so a
(SET, seed, count) always gives the same images. No brand-logo set is offered, on purpose.

Choice: the set's non-hidden icons (aliases are never icons here), sorted by name, visited in
the order of numpy default_rng(seed).permutation; an icon is skipped if resvg fails on it or if
fewer than 5% of its 64 px pixels are not fully transparent, until --count are kept.
An icon whose width and height differ is padded, centred, into a square viewBox (not skipped),
because resvg-py keeps the aspect ratio when given both width and height.
Packages are fetched with `npm pack` into ~/.cache/neurimg-bench/npm and reused from there.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import resvg_py
from PIL import Image

# name: (npm package, pinned version, SPDX licence)
SETS = {
    "flat": ("flat-color-icons", "1.2.3", "MIT"),
    "fluent": ("fluent-emoji-flat", "1.2.6", "MIT"),
    "twemoji": ("twemoji", "1.2.5", "CC-BY-4.0"),
    "fxemoji": ("fxemoji", "1.2.2", "Apache-2.0"),
    "noto": ("noto", "1.2.9", "Apache-2.0"),
}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neurimg-bench" / "npm"
MIN_COVER = 0.05  # fraction of 64 px pixels with alpha > 0 below which an icon counts as empty


def fetch_tarball(pkg: str, version: str, cache: Path = CACHE) -> Path:
    """The npm tarball of @iconify-json/<pkg>@<version>, packed into the cache if not there."""
    tgz = cache / f"iconify-json-{pkg}-{version}.tgz"
    if not tgz.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"@iconify-json/{pkg}@{version}", "--pack-destination", str(cache)],
                       check=True, stdout=subprocess.DEVNULL)
    return tgz


def read_package(tgz: Path) -> tuple[dict, dict, dict]:
    """(package.json, info.json, icons.json) of an @iconify-json tarball."""
    with tarfile.open(tgz) as t:
        return tuple(json.load(t.extractfile(f"package/{n}.json")) for n in ("package", "info", "icons"))


def check_licence(pkg_json: dict, info: dict, expected: str) -> str:
    """The package's SPDX licence; stops if info.json or package.json disagree with `expected`."""
    found = {pkg_json.get("license"), info.get("license", {}).get("spdx")}
    if found != {expected}:
        raise SystemExit(f"{pkg_json['name']}: licence {found} is not the expected {expected}")
    return expected


def candidates(icons_json: dict) -> list[str]:
    """Names of the set's non-hidden icons, sorted (aliases live in a separate map and are left out)."""
    return sorted(n for n, v in icons_json["icons"].items() if not v.get("hidden"))


def icon_svg(icons_json: dict, name: str) -> str:
    """A standalone SVG for one icon, its viewBox padded (centred) to a square if need be."""
    icon = icons_json["icons"][name]
    left, top = icon.get("left", icons_json.get("left", 0)), icon.get("top", icons_json.get("top", 0))
    w, h = icon.get("width", icons_json.get("width", 16)), icon.get("height", icons_json.get("height", 16))
    side = max(w, h)
    left, top = left - (side - w) / 2, top - (side - h) / 2
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left:g} {top:g} {side:g} {side:g}" width="{side:g}" height="{side:g}">'
            f'{icon["body"]}</svg>')


def render(svg: str, size: int) -> bytes:
    """RGBA PNG bytes of `svg` at exactly size x size (fonts are not loaded: no icon here has text)."""
    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, skip_system_fonts=True)
    png = bytes(png)  # older resvg-py versions returned a list of ints
    with Image.open(io.BytesIO(png)) as im:
        if im.size != (size, size) or im.mode != "RGBA":
            raise ValueError(f"resvg gave {im.size} {im.mode}, not ({size}, {size}) RGBA")
    return png


def coverage(png: bytes) -> float:
    """Fraction of pixels that are not fully transparent."""
    return float((np.asarray(Image.open(io.BytesIO(png)))[..., 3] > 0).mean())


def choose(icons_json: dict, count: int, seed: int, sizes: list[int]) -> tuple[dict, list[str]]:
    """Render icons in seeded random order until `count` pass; ({name: {size: png}}, skip notes)."""
    names = candidates(icons_json)
    kept, skipped = {}, []
    for i in np.random.default_rng(seed).permutation(len(names)):
        name = names[i]
        try:
            svg = icon_svg(icons_json, name)
            pngs = {s: render(svg, s) for s in sorted(set(sizes) | {64})}
        except ValueError as e:
            skipped.append(f"{name}: render failed ({e})")
            continue
        if (c := coverage(pngs[64])) < MIN_COVER:
            skipped.append(f"{name}: almost empty ({c:.1%} of 64 px pixels)")
            continue
        kept[name] = {s: pngs[s] for s in sizes}
        if len(kept) == count:
            break
    return kept, skipped


def write_pngs(out: Path, kept: dict, sizes: list[int]) -> None:
    """OUT/<size>/<name>.png for each kept icon, replacing the PNGs that were there."""
    for s in sizes:
        d = out / str(s)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.png"):
            old.unlink()
        for name, pngs in kept.items():
            (d / f"{name}.png").write_bytes(pngs[s])


def write_sources(out: Path, set_name: str, pkg_json: dict, info: dict, licence: str,
                  args: argparse.Namespace, kept: dict, skipped: list[str]) -> None:
    """OUT/SOURCES.md: where the images come from, under which licence, and which icons."""
    lic, author = info.get("license", {}), info.get("author", {})
    lines = [
        f"# {info.get('name', set_name)} icons",
        "",
        f"- package: `{pkg_json['name']}` {pkg_json['version']} (npm)"
        + (f", icon set version {info['version']}" if "version" in info else ""),
        f"- licence: {licence} ({lic.get('title', licence)}) {lic.get('url', '')}".rstrip(),
        f"- author: {author.get('name', '?')} {author.get('url', '')}".rstrip(),
        f"- built with: `python bench/icon_sets.py {set_name} OUT_DIR --count {args.count} "
        f"--seed {args.seed} --sizes {','.join(map(str, args.sizes))}` (resvg-py {resvg_py.__version__})",
        f"- images: {len(kept)} per size, RGBA PNG, in " + ", ".join(f"`{s}/`" for s in args.sizes),
        "",
        "## Icons",
        "",
        *[f"- {n}" for n in sorted(kept)],
    ]
    if skipped:
        lines += ["", "## Skipped", "", *[f"- {s}" for s in skipped]]
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")


def build(set_name: str, out: Path, args: argparse.Namespace) -> int:
    pkg, version, expected = SETS[set_name]
    pkg_json, info, icons_json = read_package(fetch_tarball(pkg, version))
    licence = check_licence(pkg_json, info, expected)
    kept, skipped = choose(icons_json, args.count, args.seed, args.sizes)
    if len(kept) < args.count:
        print(f"warning: only {len(kept)} of {args.count} icons usable in {set_name}")
    write_pngs(out, kept, args.sizes)
    write_sources(out, set_name, pkg_json, info, licence, args, kept, skipped)
    return len(kept)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", choices=list(SETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256],
                    help="comma-separated pixel sizes, default 64,256")
    a = ap.parse_args()
    t = time.perf_counter()
    n = build(a.set, a.out, a)
    print(f"{n} icons x sizes {a.sizes} in {a.out} ({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
