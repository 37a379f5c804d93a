"""`neurimg view`: one self-contained HTML file that evaluates a fitted field in the browser.

The page (`assets/viewer.html`, plain JavaScript and a WebGL2 fragment shader, no external
resources) gets the network as textures and evaluates it per pixel, so it stays sharp at any
zoom and works offline from `file://`. A run fitted to pixels as area averages
(`TrainConfig.supersample` m > 1) is drawn as `neurimg render` draws it: each pixel the mean
of the field over its m x m sub-squares' centres (payload `supersample`), then clamped.
This module packs the payload the page reads from its
`<script id="neurimg-data" type="application/json">` element.

Texture layout (Wp = width rounded up to a multiple of 4, W4 = Wp / 4, L sine layers; units
past the real width are zero, so they add nothing):
- `hidden` (RGBA, Wp x ((L-1) W4 + 1) texels; float16 or float32 in the file, float32 on the
  GPU): texel (4i + c, (l-1) W4 + j)
  holds K_l[4i + c, 4j : 4j + 4], the weights from input unit 4i + c to output units 4j..4j+3
  of sine layer l = 1 .. L-1; the last row's texel 4i + c holds (K_out[4i + c, :3], 0);
- `first` (RGBA float32, 2 W4 x 1): texels 2j and 2j + 1 hold the weights of x and of y to
  units 4j..4j+3 of the first sine layer;
- the page builds the bias texture (RGBA float32, W4 x L) for the latent on screen from
  `biases` (L, Wp) and `modulation` (D, L Wp): bias = biases + z @ modulation
  (`neurimg.fieldnet`, w0 folded in); a morph mixes the two images' latents.
- with a latent grid (`neurimg.siren`, "Latent grid"; payload `grid`: cols, rows, channels),
  the page also builds the node-shift texture (RGBA float32, T W4 x ceil(rows cols / T), T =
  `per_row` nodes a texture row) for the row on screen from `modulation` (C, Wp): node
  n = r cols + i (column i, row r) holds at texel ((n % T) W4 + j, n / T) the first sine layer's
  shifts of units 4j..4j+3, the row's grid @ modulation (`FieldNet.node_shifts`); the shader
  interpolates it bilinearly at each point.
Arrays travel as base64 of little-endian float32 or float16 (IEEE half) data.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from neurimg.coords import region_grid
from neurimg.data import encode_png, pil, to_uint8
from neurimg.errors import NeurimgError
from neurimg.fieldnet import FieldNet

WEIGHTS = ("auto", "float16", "float32")  # how the page stores the network (`build`)
FLOAT16_MIN_PSNR = 50.0  # float16 weights only when the picture stays this close to float32
THUMB_SIZE = 64  # longest side of a gallery thumbnail
CHECK_IMAGES = 8  # images the float16 check renders
CHECK_SIDE = 128  # ... at most this many pixels on a side
MAX_LOSS_POINTS = 600
MAX_SNAPSHOTS = 6
MAX_SNAPSHOT_BYTES = 4 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXTURE_SIDE = 4096  # WebGL2 guarantees 2048; every browser we know gives 4096 or more


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def pack_network(net: FieldNet, dtype) -> dict[str, Any]:
    """The network's arrays in the page's texture layout (see the module docstring)."""
    w, layers = net.width, len(net.kernels)
    wp = 4 * math.ceil(w / 4)
    w4 = wp // 4
    hidden = np.zeros(((layers - 1) * w4 + 1, wp, 4), np.float32)
    for li in range(1, layers):
        k = np.zeros((wp, wp), np.float32)
        k[:w, :w] = net.kernels[li]
        hidden[(li - 1) * w4 : li * w4] = k.reshape(wp, w4, 4).transpose(1, 0, 2)
    hidden[-1, :w, :3] = net.out_kernel
    k0 = np.zeros((2, wp), np.float32)
    k0[:, :w] = net.kernels[0]
    first = np.zeros((1, 2 * w4, 4), np.float32)
    first[0, 0::2], first[0, 1::2] = k0[0].reshape(w4, 4), k0[1].reshape(w4, 4)
    biases = np.zeros((layers, wp), np.float32)
    modulation = np.zeros((net.latent_dim, layers, wp), np.float32)
    for li in range(layers):
        biases[li, :w] = net.biases[li]
        modulation[:, li, :w] = net.modulations[li]
    if wp > MAX_TEXTURE_SIDE or hidden.shape[0] > MAX_TEXTURE_SIDE:
        raise NeurimgError(f"a network of width {w} and {layers} layers is too large for the browser viewer (textures of at most {MAX_TEXTURE_SIDE} texels a side)")
    grid = None
    if net.grid is not None:
        cols, rows, c = net.grid
        per_row = min(cols * rows, MAX_TEXTURE_SIDE // w4)
        if -(-cols * rows // per_row) > MAX_TEXTURE_SIDE:
            raise NeurimgError(f"a latent grid of {cols} x {rows} nodes is too large for the browser viewer (at most {MAX_TEXTURE_SIDE} x {MAX_TEXTURE_SIDE} texels)")
        gmod = np.zeros((c, wp), np.float32)
        gmod[:, :w] = net.grid_modulation
        grid = {"cols": cols, "rows": rows, "channels": c, "per_row": per_row, "modulation": _b64(gmod)}
    return {
        "width": w, "wp": wp, "layers": layers, "latent_dim": net.latent_dim, "row_dim": int(net.latents.shape[1]), "grid": grid,
        "dtype": np.dtype(dtype).name,
        "hidden": _b64(hidden.astype(dtype)), "hidden_rows": hidden.shape[0],
        "first": _b64(first), "biases": _b64(biases), "modulation": _b64(modulation.astype(dtype)),
        "out_bias": [float(v) for v in net.out_bias], "latents": _b64(net.latents.astype(np.float32)),
    }


def float16_psnr(net: FieldNet) -> float:
    """The worst PSNR, over up to CHECK_IMAGES stored images (at most CHECK_SIDE pixels a side),
    of the field with float16 hidden, output and modulation weights against float32."""
    worst = math.inf
    step = max(1, len(net.names) // CHECK_IMAGES)
    for k in range(0, len(net.names), step)[:CHECK_IMAGES]:
        w, h = net.sizes[k]
        f = min(1.0, CHECK_SIDE / max(w, h))
        xy = region_grid(w, h, (0.0, 0.0, float(w), float(h)), max(1, round(w * f)), max(1, round(h * f))).reshape(-1, 2)
        a = np.clip(net.forward(xy, net.latents[k]), 0, 1)
        b = np.clip(net.forward(xy, net.latents[k], weights_dtype=np.float16), 0, 1)
        mse = float(np.mean((a.astype(np.float64) - b) ** 2))
        worst = min(worst, math.inf if mse == 0 else 10 * math.log10(1.0 / mse))
    return worst


def _png_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(rgb)).decode("ascii")


def _thumbnails(stored) -> list[str]:
    """A PNG data URI per stored image, rendered from the field, THUMB_SIZE on the longest side:
    small images at their own size in batches (`GridEvaluator.images`), then Lanczos-reduced;
    large ones directly at the thumbnail size."""
    from PIL import Image as PILImage

    sizes = np.array([[i.width, i.height] for i in stored.images])
    small = np.flatnonzero(sizes.prod(1) <= 128 * 128)
    native = dict(zip(small.tolist(), stored.evaluator.images(stored.params, small, sizes[small])))
    out: list[str] = []
    for k, info in enumerate(stored.images):
        f = min(1.0, THUMB_SIZE / max(info.width, info.height))
        tw, th = max(1, round(info.width * f)), max(1, round(info.height * f))
        if k in native:
            img = to_uint8(native[k])
            if (tw, th) != (info.width, info.height):
                img = np.asarray(PILImage.fromarray(img).resize((tw, th), PILImage.LANCZOS))
        else:
            img = stored.render_index(k, (tw, th))
        out.append(_png_uri(img))
    return out


def _loss_curve(run_dir: Path) -> dict[str, list[float]] | None:
    try:
        with open(run_dir / "loss.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        cols = {k: [float(r[k]) for r in rows] for k in ("step", "loss", "psnr")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    n = len(cols["step"])
    if n == 0:
        return None
    keep = np.unique(np.linspace(0, n - 1, min(n, MAX_LOSS_POINTS)).round().astype(int))
    return {k: [v[i] for i in keep if math.isfinite(v[i])] if k != "step" else [v[i] for i in keep] for k, v in cols.items()}


def _snapshot_bytes(path: Path) -> bytes | None:
    """The bytes of one snapshot, or None unless it is a regular file (not a link) inside the
    run's snapshots folder, at most MAX_SNAPSHOT_BYTES, that decodes as a PNG: the page is meant
    to be shared, so it never carries what a planted link points to."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SNAPSHOT_BYTES:  # a link is not a regular file
            return None
        # O_NOFOLLOW: a file swapped for a link after the check is not followed either;
        # O_NONBLOCK: nor does a FIFO swapped in block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
        if len(data) > MAX_SNAPSHOT_BYTES or not data.startswith(PNG_SIGNATURE):
            return None
        with pil().open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                return None
            im.load()  # the whole stream decodes, not only the header
        return data
    except Exception:  # unreadable, or not a PNG: left out
        return None


def _snapshots(run_dir: Path) -> list[dict[str, Any]]:
    """Up to MAX_SNAPSHOTS of the run's snapshots (evenly spread over the steps), as data URIs."""
    folder = run_dir / "snapshots"
    if folder.is_symlink() or not folder.is_dir():
        return []
    folder = folder.resolve()
    found = []
    for p in sorted(folder.glob("step_*.png")):
        try:
            found.append((int(p.stem.split("_")[1]), p))
        except (ValueError, IndexError):
            continue
    if len(found) > MAX_SNAPSHOTS:
        found = [found[i] for i in np.unique(np.linspace(0, len(found) - 1, MAX_SNAPSHOTS).round().astype(int))]
    out = []
    for step, p in found:
        data = _snapshot_bytes(p)
        if data is not None:
            out.append({"step": step, "src": "data:image/png;base64," + base64.b64encode(data).decode("ascii")})
    return out


def _metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    try:
        return {m["name"]: {"psnr": float(m["psnr"]), "ssim": float(m["ssim"])} for m in json.loads((run_dir / "metrics.json").read_text())["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def script_json(obj) -> str:
    """JSON that is safe as the text of a <script> element whatever the strings hold: every "<"
    (hence "</script", "<!--" and "<script", which could end the element or enter the
    double-escaped state in which its own end tag no longer ends it), ">" and "&" as \\u escapes,
    and every non-ASCII character too (U+2028 and U+2029 among them). JSON.parse reads it back
    unchanged."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise NeurimgError(f"--weights must be {', '.join(WEIGHTS[:-1])} or {WEIGHTS[-1]}, got {weights!r}")


def build(stored, run: str, weights: str = "auto", extras: bool = True) -> tuple[str, dict[str, Any]]:
    """(the page's HTML, a summary) for a loaded run (`neurimg.api.StoredRun`). `weights`:
    auto (float16 when `float16_psnr` >= FLOAT16_MIN_PSNR), float16 or float32. Without
    `extras` the page has no thumbnails, loss curve or snapshots (a smaller file)."""
    check_weights(weights)
    net = FieldNet.from_run(stored)
    f16 = float16_psnr(net)
    dtype = np.float16 if weights == "float16" or (weights == "auto" and f16 >= FLOAT16_MIN_PSNR) else np.float32
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    metrics = _metrics(run_dir)
    thumbs = _thumbnails(stored) if extras else [None] * len(stored.images)
    payload = {
        "version": 1,
        "run": run_dir.resolve().name,
        "step": stored.step,
        "net": pack_network(net, dtype),
        "supersample": int(stored.config.train.supersample),  # the page averages as many per pixel per axis
        "images": [
            {"name": i.name, "width": i.width, "height": i.height, "thumb": th,
             **({"psnr": metrics[i.name]["psnr"], "ssim": metrics[i.name]["ssim"]} if i.name in metrics else {})}
            for i, th in zip(stored.images, thumbs)
        ],
        "loss": _loss_curve(run_dir) if extras else None,
        "snapshots": _snapshots(run_dir) if extras else [],
    }
    data = script_json(payload)
    template = resources.files("neurimg").joinpath("assets/viewer.html").read_text(encoding="utf-8")
    marker = "/*NEURIMG_DATA*/"
    if template.count(marker) != 1:  # pragma: no cover - a packaging error
        raise NeurimgError("the viewer template is damaged")
    html = template.replace(marker, data)
    summary = {"images": len(stored.images), "weights": np.dtype(dtype).name,
               "float16_psnr": round(f16, 2) if math.isfinite(f16) else None, "bytes": len(html.encode("utf-8"))}
    return html, summary
