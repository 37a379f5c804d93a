"""Issue 14: latent morphs (`render --mix`, `morph`), the ONNX export and the browser viewer.

Every output is checked against `neurimg render` (the JAX renderer): the export with
onnxruntime, the viewer with a real headless Chromium's pixels."""

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurimg.api import load_run
from neurimg.coords import image_grid, region_grid
from neurimg.fieldnet import FieldNet, mix_latents
from neurimg.metrics import psnr

from conftest import LOGOS, err_of, run_cli

SIZE = (40, 30)  # not square: the aspect convention is part of what is checked


def _tiny_run(d: Path, logos: slice, *extra: str) -> Path:
    """A tiny run (width 24, two hidden layers, latents of 8) of the bundled logos in `logos`,
    resized to SIZE, in folder d."""
    from neurimg.cli import main

    src = d / "imgs"
    src.mkdir()
    for f in sorted(LOGOS.glob("*.png"))[logos]:
        Image.open(f).convert("RGB").resize(SIZE, Image.LANCZOS).save(src / f.name)
    run = d / "run"
    code = main(["fit", str(src), "-o", str(run), "--steps", "150", "--width", "24", "--hidden-layers", "2",
                 "--latent-dim", "8", "--lr", "2e-3", "--latent-lr", "3e-2", "--snapshots", "1", *extra, "-q"])
    assert code == 0
    return run


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    """A tiny run of three 40x30 logos."""
    return _tiny_run(tmp_path_factory.mktemp("share"), slice(0, 3))


@pytest.fixture(scope="module")
def run1(tmp_path_factory) -> Path:
    from neurimg.cli import main

    d = tmp_path_factory.mktemp("share1")
    img = d / "one.png"
    Image.open(sorted(LOGOS.glob("*.png"))[0]).convert("RGB").resize((16, 16)).save(img)
    code = main(["fit", str(img), "-o", str(d / "run"), "--steps", "100", "--width", "8", "--hidden-layers", "1", "--latent-dim", "4", "-q"])
    assert code == 0
    return d / "run"


def as_render(f, m: int, ow: int = SIZE[0], oh: int = SIZE[1]) -> np.ndarray:
    """What `neurimg render` draws of the point function `f` (xy (N, 2) -> (N, 3)) over the
    whole image on an ow x oh grid: each pixel the mean of f at its m x m sub-squares' centres
    (`FieldNet.supersample`; m = 1: its centre), clipped after the mean. (oh, ow, 3)."""
    xy = region_grid(*SIZE, (0, 0, *SIZE), ow * m, oh * m).reshape(-1, 2).astype(np.float32)
    return np.clip(np.asarray(f(xy)).reshape(oh, m, ow, m, -1).mean((1, 3)), 0, 1)


def names(run) -> list[str]:
    return [i.name for i in load_run(str(run)).images]


def rendered(capsys, tmp_path, run, *args) -> np.ndarray:
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.png"
    code, _, err = run_cli(capsys, "render", run, *args, "-o", out, "-q")
    assert code == 0, err
    return np.asarray(Image.open(out).convert("RGB"))


# --- the NumPy network -----------------------------------------------------------------------


def test_fieldnet_is_the_model(run3):
    """The w0-folded NumPy network gives the JAX renderer's colours (float32 rounding only)."""
    r = load_run(str(run3))
    net = FieldNet.from_run(r)
    assert net.supersample == r.config.train.supersample == 2  # fitted as areas (the default for icons): render averages 2 x 2
    for k in range(3):
        want = r.render_index(k, dtype=np.float32)
        np.testing.assert_allclose(as_render(lambda xy: net.forward(xy, net.latents[k]), 2), want, atol=2e-5)


def test_mix_latents_endpoints_are_exact():
    a, b = np.array([0.1, -3.3, 7.0], np.float32), np.array([1e-3, 2.0, -5.5], np.float32)
    assert np.array_equal(mix_latents(a, b, 0.0), a) and np.array_equal(mix_latents(a, b, 1.0), b)
    np.testing.assert_allclose(mix_latents(a, b, 0.25), 0.75 * a + 0.25 * b, rtol=1e-6)


# --- render --mix and morph ------------------------------------------------------------------


def test_render_mix(capsys, tmp_path, run3):
    n = names(run3)
    a, b = rendered(capsys, tmp_path, run3, "--image", n[0]), rendered(capsys, tmp_path, run3, "--image", n[2])
    assert np.array_equal(rendered(capsys, tmp_path, run3, "--mix", f"{n[0]},{n[2]}", "--t", "0"), a)
    assert np.array_equal(rendered(capsys, tmp_path, run3, "--mix", "0,2", "--t", "1"), b)
    mid = rendered(capsys, tmp_path, run3, "--mix", "0,2", "--t", "0.5", "--scale", "2")
    assert mid.shape == (60, 80, 3)
    # the mix is the field at the mixed latent: the NumPy network agrees
    r = load_run(str(run3))
    net = FieldNet.from_run(r)
    z = mix_latents(net.latents[0], net.latents[2], 0.5)
    want = as_render(lambda xy: net.forward(xy, z), net.supersample, 80, 60)
    assert np.abs(mid / 255.0 - want).max() <= 0.5 / 255 + 1e-4
    # a mix is neither end
    half = rendered(capsys, tmp_path, run3, "--mix", "0,2", "--t", "0.5")
    assert not np.array_equal(half, a) and not np.array_equal(half, b)
    # default output name and --json
    code, out, err = run_cli(capsys, "render", run3, "--mix", "0,1", "--t", "0.3", "--json", "-q")
    assert code == 0, err
    o = json.loads(out)["outputs"][0]
    assert o["mix"] == n[:2] and o["t"] == 0.3 and Path(o["path"]).exists() and Path(o["path"]).parent.name == "render"


def test_render_mix_errors(capsys, tmp_path, run3, run1):
    o = ["-o", tmp_path / "x.png"]
    assert "go together" in err_of(capsys, "render", run3, "--t", "0.5", *o)
    assert "go together" in err_of(capsys, "render", run3, "--mix", "0,1", *o)
    for bad in ("1.5", "-0.1", "nan", "inf"):
        assert "--t must be" in err_of(capsys, "render", run3, "--mix", "0,1", "--t", bad, *o)
    assert "no image named" in err_of(capsys, "render", run3, "--mix", "0,nope.png", "--t", "0.5", *o)
    assert "two stored images" in err_of(capsys, "render", run3, "--mix", "0", "--t", "0.5", *o)
    assert "twice" in err_of(capsys, "render", run3, "--mix", "1,1", "--t", "0.5", *o)
    assert "not both" in err_of(capsys, "render", run3, "--mix", "0,1", "--t", "0.5", "--image", "0", *o)
    assert "one image" in err_of(capsys, "render", run1, "--mix", "0,0", "--t", "0.5", *o)
    assert not (tmp_path / "x.png").exists()


def gif_frames(path) -> np.ndarray:
    import imageio.v3 as iio

    return iio.imread(path, index=None)[..., :3]


@pytest.mark.learned
def test_morph_gif_and_mp4(capsys, tmp_path, run3):
    n = names(run3)
    a, b = rendered(capsys, tmp_path, run3, "--image", "1"), rendered(capsys, tmp_path, run3, "--image", "2")
    code, out, err = run_cli(capsys, "morph", run3, n[1], n[2], "-o", tmp_path / "m.gif", "--frames", "5", "--json", "-q")
    assert code == 0, err
    s = json.loads(out)
    assert s["frames"] == 5 and (s["width"], s["height"]) == SIZE and s["bytes"] == (tmp_path / "m.gif").stat().st_size
    fr = gif_frames(tmp_path / "m.gif")
    assert fr.shape == (5, 30, 40, 3)
    # GIF stores a palette of 256 colours per frame: the ends are A and B up to that
    assert psnr(fr[0] / 255.0, a / 255.0) > 30 and psnr(fr[-1] / 255.0, b / 255.0) > 30
    assert psnr(fr[0] / 255.0, b / 255.0) < psnr(fr[0] / 255.0, a / 255.0) - 3
    # --loop: A -> B -> A with no frame repeated; a looped animation's frames mirror
    code, _, err = run_cli(capsys, "morph", run3, "1", "2", "-o", tmp_path / "l.gif", "--frames", "4", "--loop", "-q")
    assert code == 0, err
    lf = gif_frames(tmp_path / "l.gif")
    assert len(lf) == 6 and np.array_equal(lf[1], lf[5]) and np.array_equal(lf[2], lf[4])
    # MP4 through imageio-ffmpeg: odd sizes are padded to even ones for H.264
    code, _, err = run_cli(capsys, "morph", run3, "0", "1", "-o", tmp_path / "m.mp4", "--frames", "3", "--size", "41x31", "-q")
    assert code == 0, err
    import imageio.v2 as iio2

    with warnings.catch_warnings():  # reading runs ffmpeg by fork + exec: JAX's fork warning
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        vid = iio2.mimread(tmp_path / "m.mp4")
    assert len(vid) == 3 and vid[0].shape == (32, 42, 3)
    # '-' writes a GIF to stdout
    p = subprocess.run([sys.executable, "-m", "neurimg.cli", "morph", str(run3), "0", "1", "-o", "-", "--frames", "2", "-q"],
                       capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout[:6] in (b"GIF89a", b"GIF87a"), p.stderr


def test_morph_errors(capsys, tmp_path, run3, run1, monkeypatch):
    o = ["-o", tmp_path / "m.gif"]
    assert "--frames" in err_of(capsys, "morph", run3, "0", "1", "--frames", "1", *o)
    assert "--fps" in err_of(capsys, "morph", run3, "0", "1", "--fps", "0", *o)
    assert ".gif or .mp4" in err_of(capsys, "morph", run3, "0", "1", "-o", tmp_path / "m.png")
    assert "no image named" in err_of(capsys, "morph", run3, "0", "nope", *o)
    assert "twice" in err_of(capsys, "morph", run3, "0", "0", *o)
    assert "one image" in err_of(capsys, "morph", run1, "0", "0", *o)
    assert "--json" in err_of(capsys, "morph", run3, "0", "1", "-o", "-", "--json")
    assert "no such run" in err_of(capsys, "morph", tmp_path / "nothing", "0", "1", *o)
    assert not (tmp_path / "m.gif").exists()
    # MP4 without the optional imageio-ffmpeg: refused before any rendering
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    assert "imageio-ffmpeg" in err_of(capsys, "morph", run3, "0", "1", "-o", tmp_path / "m.mp4")
    assert not (tmp_path / "m.mp4").exists()


# --- ONNX export -----------------------------------------------------------------------------


def test_onnx_export_matches_render(capsys, tmp_path, run3):
    import onnxruntime as ort

    code, out, err = run_cli(capsys, "export", run3, "--format", "onnx", "-o", tmp_path / "f.onnx", "--json", "-q")
    assert code == 0, err
    s = json.loads(out)
    assert s["inputs"] == ["xy", "latent"] and s["bytes"] == (tmp_path / "f.onnx").stat().st_size
    sess = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["xy", "latent"] and [o.name for o in sess.get_outputs()] == ["rgb"]
    meta = sess.get_modelmeta().custom_metadata_map
    latents = json.loads(meta["neurimg.latents"])
    images = json.loads(meta["neurimg.images"])
    assert [i["name"] for i in images] == names(run3) and images[0]["width"] == SIZE[0]
    r = load_run(str(run3))
    m = int(meta["neurimg.supersample"])
    assert m == r.config.train.supersample == 2
    xy = image_grid(*SIZE).reshape(-1, 2)
    for k, name in enumerate(names(run3)):
        want = r.render_index(k, dtype=np.float32)
        z = np.asarray(latents[name], np.float32)
        one = sess.run(["rgb"], {"xy": xy, "latent": z[None]})[0]  # one latent for all points
        per = sess.run(["rgb"], {"xy": xy, "latent": np.repeat(z[None], len(xy), 0)})[0]  # one per point
        assert one.shape == (len(xy), 3)
        assert psnr(as_render(lambda p: sess.run(["rgb"], {"xy": p, "latent": z[None]})[0], m), want) >= 50
        np.testing.assert_allclose(per, one, atol=1e-5)
    # unclipped: the raw field, not a clipped picture (a logo's white exceeds 1 somewhere)
    assert one.max() > 1.0 or one.min() < 0.0

    # --image bakes the latent in: xy alone
    code, _, err = run_cli(capsys, "export", run3, "--image", names(run3)[1], "-o", tmp_path / "b.onnx", "-q")
    assert code == 0, err
    sb = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sb.get_inputs()] == ["xy"]
    got = as_render(lambda p: sb.run(None, {"xy": p})[0], m)
    assert psnr(got, r.render_index(1, dtype=np.float32)) >= 50
    assert sb.get_modelmeta().custom_metadata_map["neurimg.image"] == names(run3)[1]
    assert sb.get_modelmeta().custom_metadata_map["neurimg.supersample"] == "2"


def test_export_to_stdout_and_errors(capsys, tmp_path, run3):
    p = subprocess.run([sys.executable, "-m", "neurimg.cli", "export", str(run3), "-o", "-", "-q"], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    import onnx

    m = onnx.load_from_string(p.stdout)
    assert [i.name for i in m.graph.input] == ["xy", "latent"]
    o = ["-o", tmp_path / "x.onnx"]
    assert "--format" in err_of(capsys, "export", run3, "--format", "tflite", *o)
    assert "no image named" in err_of(capsys, "export", run3, "--image", "nope", *o)
    assert "no such run" in err_of(capsys, "export", tmp_path / "nothing", *o)
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "checkpoint.safetensors").write_bytes(b"\x80\x04K\x01.")
    assert "checkpoint" in err_of(capsys, "export", tmp_path / "notarun", *o)
    assert "Missing option" in err_of(capsys, "export", run3)
    assert not (tmp_path / "x.onnx").exists()


# --- the viewer: the page --------------------------------------------------------------------


def page_data(html: str) -> dict:
    m = re.search(r'<script id="neurimg-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


@pytest.mark.learned
def test_view_page_is_self_contained(capsys, tmp_path, run3):
    code, out, err = run_cli(capsys, "view", run3, "--html", tmp_path / "v.html", "--json", "-q")
    assert code == 0, err
    s = json.loads(out)
    html = (tmp_path / "v.html").read_text()
    assert s["bytes"] == len(html.encode()) and s["opened"] is False and s["images"] == 3
    # nothing fetched from elsewhere: no external scripts, styles, images or requests
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', html)
    assert "<link" not in html and "fetch(" not in html and "XMLHttpRequest" not in html and "import(" not in html
    d = page_data(html)
    assert [i["name"] for i in d["images"]] == names(run3)
    assert all(i["thumb"].startswith("data:image/png;base64,") for i in d["images"])
    assert d["loss"]["step"][-1] == 150 and len(d["snapshots"]) >= 1
    # float16 was chosen because it is accurate enough: the stored weights are the halves
    assert s["weights"] == "float16" and s["float16_psnr"] >= 50
    net = d["net"]
    hidden = np.frombuffer(base64.b64decode(net["hidden"]), "<f2")
    assert hidden.size == net["hidden_rows"] * net["wp"] * 4 and net["wp"] == 24 and net["layers"] == 3
    # --bare: no thumbnails, curve or snapshots; float32 on request
    code, out, _ = run_cli(capsys, "view", run3, "--html", tmp_path / "b.html", "--bare", "--weights", "float32", "--json", "-q")
    b = page_data((tmp_path / "b.html").read_text())
    assert json.loads(out)["weights"] == "float32" and b["net"]["dtype"] == "float32"
    assert b["loss"] is None and b["snapshots"] == [] and b["images"][0]["thumb"] is None
    assert json.loads(out)["bytes"] < s["bytes"]


def test_view_texture_layout_by_hand(run3):
    """The packed hidden texture holds K_l[4i + c, 4j : 4j + 4] at texel (4i + c, row j)."""
    from neurimg.viewer import pack_network

    net = FieldNet.from_run(load_run(str(run3)))
    p = pack_network(net, np.float32)
    tex = np.frombuffer(base64.b64decode(p["hidden"]), "<f4").reshape(p["hidden_rows"], p["wp"], 4)
    k1 = net.kernels[1]
    for i, c, j in ((0, 0, 0), (2, 3, 1), (5, 1, 5)):
        np.testing.assert_array_equal(tex[j, 4 * i + c], k1[4 * i + c, 4 * j : 4 * j + 4])
    np.testing.assert_array_equal(tex[p["hidden_rows"] - 1, 7, :3], net.out_kernel[7])
    first = np.frombuffer(base64.b64decode(p["first"]), "<f4").reshape(-1, 4)
    np.testing.assert_array_equal(first[2 * 3 + 1], net.kernels[0][1, 12:16])  # y weights of units 12..15


def _script_end(html: str, i: int) -> int:
    """Where the script element whose content starts at html[i] ends (the index of its end tag),
    by the HTML tokenizer's script data states: the escaped (`<!--`) and double-escaped
    (`<!--<script>`) states included, which Python's html.parser does not model. In those,
    `</script>` does not end the element. -1 if it never ends."""
    n, state, dashes = len(html), "data", 0

    def word(j: int) -> tuple[str, int]:  # the ASCII letters from j, and the index after them
        k = j
        while k < n and html[k].isascii() and html[k].isalpha():
            k += 1
        return html[j:k].lower(), k

    def script_tag_end(j: int) -> bool:  # "script" (any case) at j, then whitespace, / or >
        w, k = word(j)
        return w == "script" and k < n and html[k] in " \t\n\f\r/>"

    while i < n:
        c = html[i]
        if state == "data":
            if html.startswith("</", i) and script_tag_end(i + 2):
                return i
            if html.startswith("<!--", i):
                state, dashes, i = "escaped", 2, i + 4
                continue
            i += 1
        elif c == "-":
            dashes, i = min(dashes + 1, 2), i + 1
        elif c == ">" and dashes == 2:
            state, dashes, i = "data", 0, i + 1
        elif c == "<" and state == "escaped":
            dashes = 0
            if html.startswith("</", i) and script_tag_end(i + 2):
                return i
            w, k = word(i + 1)
            if w == "script" and k < n and html[k] in " \t\n\f\r/>":
                state, i = "double", k + 1
            else:
                i = max(k, i + 1)
        elif c == "<" and state == "double":
            dashes = 0
            if html.startswith("</", i):
                w, k = word(i + 2)
                if w == "script" and k < n and html[k] in " \t\n\f\r/>":
                    state, i = "escaped", k + 1
                    continue
            i += 1
        else:
            dashes, i = 0, i + 1
    return -1


def test_script_end_follows_the_html_tokenizer():
    """The checker itself, on hand-made script contents (as a browser tokenizes them)."""
    for content, ends_at in (("a</script>", 1), ("a</SCRIPT >", 1), ("a<\\/script></script>", 11),
                             ("<!-- x --></script>", 10), ("<!--<script>--></script>", 15),
                             ("<!-- <script> </script> --></script>", 27)):
        assert _script_end(content, 0) == ends_at, content
    assert _script_end("<!--<script></script>", 0) == -1  # the end tag only leaves the double-escaped state
    assert _script_end('{"a":"<!--<script>"}</script><script>f()</script>', 0) == -1


class _Scripts(HTMLParser):
    """The page's script elements, as (attributes, text) pairs, by Python's html.parser."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict, str]] = []
        self._open = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append((dict(attrs), ""))
            self._open = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._open = False

    def handle_data(self, data):
        if self._open:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


@pytest.mark.parametrize("evil", [
    "a</script><script>alert(1)</script>.png",
    "b</SCRIPT ><script>alert(1)</script>.png",
    "c<!--<script>.png",
    "d<!-- -->\u2028\u2029&amp;<b>.png",
])
def test_view_escapes_hostile_names(run3, evil):
    """An image named like the end of a script element (or like the start of the double-escaped
    state, in which the data element's own end tag would not end it) cannot break out of the
    page's data: the page has its two script elements, the data element ends where its JSON
    does, and that JSON gives the name back."""
    from neurimg import viewer

    stored = load_run(str(run3))
    # a file name cannot hold "/": the name is given to the loaded run (a new list, not its own)
    stored.images = [dataclasses.replace(i, name=evil) if k == 1 else i for k, i in enumerate(stored.images)]
    html, _ = viewer.build(stored, str(run3))
    p = _Scripts()
    p.feed(html)
    p.close()
    assert [a.get("id") for a, _ in p.scripts] == ["neurimg-data", None], [a for a, _ in p.scripts]
    assert [i["name"] for i in json.loads(p.scripts[0][1])["images"]] == [n if k != 1 else evil for k, n in enumerate(names(run3))]
    tag = '<script id="neurimg-data" type="application/json">'
    start = html.index(tag) + len(tag)
    end = _script_end(html, start)
    assert end != -1 and html[end:].startswith("</script>"), "the data element does not end at its own end tag"
    assert json.loads(html[start:end])["images"][1]["name"] == evil


def test_view_embeds_only_the_runs_own_png_snapshots(capsys, tmp_path, run3):
    """The page is meant to be shared: of RUN/snapshots it embeds only regular files inside that
    folder that decode as PNG. A link (to a secret, or even to a real PNG), a text file with a
    PNG name, a FIFO (it must not hang) and a linked snapshots folder are all left out."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run3, run, symlinks=True)
    real = sorted(int(p.stem.split("_")[1]) for p in (run / "snapshots").glob("step_*.png"))
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:SECRET-LINE:/root:/bin/bash\n")
    outside_png = tmp_path / "outside.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(outside_png)
    snaps = run / "snapshots"
    (snaps / "step_000099.png").symlink_to(secret)
    (snaps / "step_000098.png").symlink_to(outside_png)
    (snaps / "step_000097.png").write_text("not a png")
    (snaps / "step_000096.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, no image
    os.mkfifo(snaps / "step_000095.png")
    code, out, err = run_cli(capsys, "view", run, "--html", "-")
    assert code == 0, err
    assert [s["step"] for s in page_data(out)["snapshots"]] == real
    assert "SECRET" not in out and base64.b64encode(secret.read_bytes()).decode()[:24] not in out
    # a snapshots folder that is itself a link: none of it
    run2 = tmp_path / "run2"
    shutil.copytree(run3, run2, symlinks=True, ignore=shutil.ignore_patterns("snapshots"))
    (run2 / "snapshots").symlink_to(run3 / "snapshots", target_is_directory=True)
    code, out, err = run_cli(capsys, "view", run2, "--html", "-")
    assert code == 0, err
    assert page_data(out)["snapshots"] == []


def test_view_default_page_goes_to_a_private_folder(capsys, run3):
    """Without --html, the page is written into a new folder of mode 0700 with an unpredictable
    name (never a guessable, world-readable /tmp file)."""
    import shutil
    import stat

    pages = []
    for _ in range(2):
        code, out, err = run_cli(capsys, "view", run3, "--no-open", "--bare", "--json", "-q")
        assert code == 0, err
        pages.append(Path(json.loads(out)["html"]))
    try:
        for page in pages:
            assert page.is_file() and page.read_text().lstrip().startswith("<!doctype html>")
            assert stat.S_IMODE(page.parent.stat().st_mode) == 0o700
            assert page.parent.name.startswith("neurimg-view-")
        assert pages[0].parent != pages[1].parent
    finally:
        for page in pages:
            shutil.rmtree(page.parent, ignore_errors=True)


def test_view_to_stdout_and_errors(capsys, tmp_path, run3):
    code, out, err = run_cli(capsys, "view", run3, "--html", "-", "--bare")
    assert code == 0, err
    assert out.lstrip().startswith("<!doctype html>") and page_data(out)["images"][0]["thumb"] is None
    assert "--weights" in err_of(capsys, "view", run3, "--weights", "int8", "--html", tmp_path / "v.html")
    assert "--json" in err_of(capsys, "view", run3, "--html", "-", "--json")
    assert "no such run" in err_of(capsys, "view", tmp_path / "nothing", "--html", tmp_path / "v.html")
    assert not (tmp_path / "v.html").exists()


# --- the viewer in a real browser ------------------------------------------------------------


def browser_or_skip():
    from browser import missing

    why = missing()
    if why is not None:
        if os.environ.get("NEURIMG_REQUIRE_BROWSER"):
            pytest.fail(f"NEURIMG_REQUIRE_BROWSER is set but {why}")
        pytest.skip(f"{why} (CI installs Debian's chromium and sets NEURIMG_REQUIRE_BROWSER)")


def test_viewer_pixels_match_render_in_headless_chromium(capsys, tmp_path, run3, run1):
    """The test contract: ?image=NAME&w=W&h=H&embed=1 draws that image alone on a W x H canvas at
    the top-left and sets the title neurimg:ready; its pixels are `neurimg render --size WxH`
    within 40 dB (float16 weights, the browser's float32 shader). Also a mix, an unknown name,
    and the interactive page's gallery."""
    browser_or_skip()
    from browser import Browser

    code, _, err = run_cli(capsys, "view", run3, "--html", tmp_path / "v.html", "-q")
    assert code == 0, err
    url = (tmp_path / "v.html").resolve().as_uri()
    n = names(run3)
    # CPU renderers draw 4 pixels per fragment (then interleave them), GPUs 1: ppf=1 forces the
    # latter; odd widths leave part of the last fragment unused.
    cases = [(n[1], 40, 30, (), ""), (n[0], 63, 47, (), ""), (n[0], 63, 47, (), "&ppf=1"), (n[2], 40, 30, ("mix", n[0], 0.3), "")]
    with Browser() as b:
        for name, w, h, mix, extra in cases:
            q = f"?image={name}&w={w}&h={h}&embed=1" + (f"&mix={mix[1]}&t={mix[2]}" if mix else "") + extra
            b.open(url + q, w + 20, h + 20)  # a larger window: the canvas must sit at the top-left
            b.wait_title("neurimg:ready", timeout=45)
            shot = np.asarray(Image.open(__import__("io").BytesIO(b.screenshot(w + 20, h + 20))).convert("RGB"))
            args = ("--mix", f"{name},{mix[1]}", "--t", str(mix[2])) if mix else ("--image", name)
            want = rendered(capsys, tmp_path, run3, *args, "--size", f"{w}x{h}")
            got = shot[:h, :w]
            assert psnr(got / 255.0, want / 255.0) >= 40, (name, w, h, psnr(got / 255.0, want / 255.0))
            assert np.all(shot[h + 2 :, :] == 255) and np.all(shot[:, w + 2 :] == 255)  # nothing else drawn
        b.open(url + "?image=nope.png&embed=1", 50, 50)
        with pytest.raises(RuntimeError, match="no image named"):
            b.wait_title("neurimg:ready", timeout=30)
        # the interactive page: a gallery of the three images, no errors
        b.open(url, 900, 600)
        b.wait_title("neurimg · run", timeout=30)
        assert b.evaluate("document.querySelectorAll('.tile').length") == 3
        assert b.evaluate("document.querySelectorAll('#snaps img').length") >= 1
        assert not [c for c in b.console if "rror" in c], b.console
        # a one-image run: no gallery or morph tabs, the training tab only; embed still works
        code, _, err = run_cli(capsys, "view", run1, "--html", tmp_path / "one.html", "-q")
        assert code == 0, err
        one = (tmp_path / "one.html").resolve().as_uri()
        b.open(one, 700, 400)
        b.wait_title("neurimg · run", timeout=30)
        assert b.evaluate("[...document.querySelectorAll('#tabs button')].map(b => b.textContent).join()") == "Training"
        b.open(one + "?image=0&w=16&h=16&embed=1", 16, 16)
        b.wait_title("neurimg:ready", timeout=30)
        got = np.asarray(Image.open(__import__("io").BytesIO(b.screenshot(16, 16))).convert("RGB"))
        assert psnr(got / 255.0, rendered(capsys, tmp_path, run1, "--image", "0") / 255.0) >= 40


@pytest.fixture(scope="module")
def run_area(tmp_path_factory) -> Path:
    """A tiny run of two 40x30 logos fitted as area averages (`--supersample 2`)."""
    return _tiny_run(tmp_path_factory.mktemp("share_area"), slice(3, 5), "--supersample", "2")


def test_viewer_averages_each_pixel_like_render_for_an_area_fit(capsys, tmp_path, run_area):
    """A run fitted to pixels as area averages (`--supersample 2`): the page averages the field
    over each pixel's 2 x 2 sub-squares as `neurimg render` does, at 1:1 and zoomed, with 4 and
    with 1 pixels per fragment; it is closer to render than one centre sample per pixel is."""
    browser_or_skip()
    from browser import Browser

    code, _, err = run_cli(capsys, "view", run_area, "--html", tmp_path / "a.html", "-q")
    assert code == 0, err
    url = (tmp_path / "a.html").resolve().as_uri()
    stored = load_run(str(run_area))
    name = stored.images[1].name
    with Browser() as b:
        for w, h, extra in [(40, 30, ""), (97, 71, ""), (97, 71, "&ppf=1")]:
            b.open(url + f"?image={name}&w={w}&h={h}&embed=1" + extra, w + 20, h + 20)
            b.wait_title("neurimg:ready", timeout=45)
            assert b.evaluate("window.neurimgStats.supersample") == 2, "the page must sample as the run was fitted"
            shot = np.asarray(Image.open(__import__("io").BytesIO(b.screenshot(w + 20, h + 20))).convert("RGB"))
            got = shot[:h, :w] / 255.0
            want = rendered(capsys, tmp_path, run_area, "--image", name, "--size", f"{w}x{h}") / 255.0
            centre = stored.evaluator.grid(stored.params, (40, 30), (w, h), image_id=1, supersample=1, dtype=np.uint8) / 255.0
            assert psnr(got, want) >= 40, (w, h, extra, psnr(got, want))
            assert psnr(got, want) >= psnr(got, centre) + 3, (w, h, extra, psnr(got, want), psnr(got, centre))


def test_viewer_with_hostile_names_works_in_headless_chromium(capsys, tmp_path):
    """Images named like the start of a comment and of a script element, and holding U+2028: in a
    real browser the page still runs (its application script is not swallowed by the data)."""
    browser_or_skip()
    from browser import Browser

    src = tmp_path / "imgs"
    src.mkdir()
    hostile = ["c<!--<script>.png", "d<!-- --><b>&amp;\u2028.png"]
    for f, name in zip(sorted(LOGOS.glob("*.png"))[:2], hostile):
        Image.open(f).convert("RGB").resize((16, 16)).save(src / name)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "fit", src, "-o", run, "--steps", "150", "--width", "16", "--hidden-layers", "1", "--latent-dim", "4", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "view", run, "--html", tmp_path / "v.html", "-q")
    assert code == 0, err
    with Browser() as b:
        b.open((tmp_path / "v.html").resolve().as_uri(), 700, 400)
        b.wait_title("neurimg · run", timeout=30)
        assert b.evaluate("document.querySelectorAll('.tile').length") == 2
        assert b.evaluate("DATA.images.map(i => i.name)") == sorted(hostile)
        assert not [c for c in b.console if "rror" in c], b.console


def test_readme_onnxruntime_lines_run(tmp_path, run3, capsys):
    """The README's five lines that run an exported model give `neurimg render`'s picture."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"With onnxruntime:\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    rc, _, err = run_cli(capsys, "export", run3, "-o", tmp_path / "model.onnx", "-q")
    assert rc == 0, err
    name = names(run3)[2]
    code = code.replace('"model.onnx"', repr(str(tmp_path / "model.onnx"))).replace("vite-icon.png", name)
    code = code.replace("W = H = 256", f"W, H = {SIZE[0]}, {SIZE[1]}")
    ns: dict = {}
    exec(code, ns)
    assert psnr(ns["rgb"], load_run(str(run3)).render_index(2, dtype=np.float32)) >= 50


# --- a run with a latent grid ----------------------------------------------------------------


@pytest.fixture(scope="module")
def run_grid(tmp_path_factory) -> Path:
    """A tiny run of three 40x30 logos with a latent grid of 5 x 4 nodes of 4 values."""
    return _tiny_run(tmp_path_factory.mktemp("share_grid"), slice(0, 3), "--grid", "5", "--grid-channels", "4")


def test_a_grid_run_is_the_same_field_in_numpy_and_onnx(capsys, tmp_path, run_grid):
    """The NumPy network, the ONNX model (one row for all points, one per point, an image baked
    in) and a mix of two rows give render's colours; and the grid is part of each picture
    (zeroing it changes the render), so the checks are not of the latent alone."""
    import onnxruntime as ort

    r = load_run(str(run_grid))
    assert (r.config.model.grid, r.config.model.grid_rows, r.config.model.grid_channels) == (5, 4, 4)
    net = FieldNet.from_run(r)
    assert net.latents.shape == (3, 8 + 5 * 4 * 4) and net.latent_dim == 8
    xy = image_grid(*SIZE).reshape(-1, 2)
    code, _, err = run_cli(capsys, "export", run_grid, "-o", tmp_path / "g.onnx", "-q")
    assert code == 0, err
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(sess.get_modelmeta().custom_metadata_map["neurimg.latent_layout"]) == {"latent_dim": 8, "grid": {"cols": 5, "rows": 4, "channels": 4}}
    m = net.supersample
    for k in range(3):
        want = r.render_index(k, dtype=np.float32)
        np.testing.assert_allclose(as_render(lambda p: net.forward(p, net.latents[k]), m), want, atol=2e-5)
        one = sess.run(None, {"xy": xy, "latent": net.latents[k][None]})[0]
        assert psnr(as_render(lambda p: sess.run(None, {"xy": p, "latent": net.latents[k][None]})[0], m), want) >= 50
        per = sess.run(None, {"xy": xy, "latent": np.repeat(net.latents[k][None], len(xy), 0)})[0]
        np.testing.assert_allclose(per, one, atol=1e-5)
        zeroed = net.latents[k].copy()
        zeroed[8:] = 0
        assert psnr(as_render(lambda p: net.forward(p, zeroed), m), want) < 35
    # different rows for different points in one call
    half = len(xy) // 2
    rows = np.concatenate([np.repeat(net.latents[0][None], half, 0), np.repeat(net.latents[2][None], len(xy) - half, 0)])
    both = sess.run(None, {"xy": xy, "latent": rows})[0]
    np.testing.assert_allclose(both[:half], net.forward(xy[:half], net.latents[0]), atol=2e-5)
    np.testing.assert_allclose(both[half:], net.forward(xy[half:], net.latents[2]), atol=2e-5)
    # baked
    code, _, err = run_cli(capsys, "export", run_grid, "--image", "1", "-o", tmp_path / "b.onnx", "-q")
    assert code == 0, err
    sb = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
    assert psnr(as_render(lambda p: sb.run(None, {"xy": p})[0], m), r.render_index(1, dtype=np.float32)) >= 50
    # a mix of two rows mixes their grids too: render --mix is the NumPy field at the mixed row
    mid = rendered(capsys, tmp_path, run_grid, "--mix", "0,2", "--t", "0.5")
    want = as_render(lambda p: net.forward(p, mix_latents(net.latents[0], net.latents[2], 0.5)), m)
    assert np.abs(mid / 255.0 - want).max() <= 0.5 / 255 + 1e-4


def test_viewer_draws_a_grid_run_like_render(capsys, tmp_path, run_grid, monkeypatch):
    """The page interpolates the latent grid's node shifts as the model does: 1:1, zoomed and
    offset, 4 and 1 pixels per fragment, and a mix, all within 40 dB of render; and with the
    nodes wrapped over several texture rows (as a megapixel photo's 66,000 nodes are), made to
    happen here by a texture limit of 42 texels: 7 nodes a row."""
    browser_or_skip()
    from browser import Browser

    from neurimg import viewer

    code, _, err = run_cli(capsys, "view", run_grid, "--html", tmp_path / "g.html", "-q")
    assert code == 0, err
    monkeypatch.setattr(viewer, "MAX_TEXTURE_SIDE", 42)
    code, _, err = run_cli(capsys, "view", run_grid, "--html", tmp_path / "wrapped.html", "-q")
    assert code == 0, err
    assert viewer.pack_network(FieldNet.from_run(load_run(str(run_grid))), np.float32)["grid"]["per_row"] == 7
    url = (tmp_path / "g.html").resolve().as_uri()
    wrapped = (tmp_path / "wrapped.html").resolve().as_uri()
    n = names(run_grid)
    with Browser() as b:
        for name, w, h, mix, extra in [(n[0], 40, 30, None, ""), (n[1], 97, 71, None, ""), (n[1], 97, 71, None, "&ppf=1"), (n[2], 40, 30, n[0], ""),
                                       (n[1], 97, 71, None, "wrapped")]:
            page = wrapped if extra == "wrapped" else url
            extra = "" if extra == "wrapped" else extra
            b.open(page + f"?image={name}&w={w}&h={h}&embed=1" + (f"&mix={mix}&t=0.4" if mix else "") + extra, w + 20, h + 20)
            b.wait_title("neurimg:ready", timeout=45)
            shot = np.asarray(Image.open(__import__("io").BytesIO(b.screenshot(w + 20, h + 20))).convert("RGB"))
            args = ("--mix", f"{name},{mix}", "--t", "0.4") if mix else ("--image", name)
            want = rendered(capsys, tmp_path, run_grid, *args, "--size", f"{w}x{h}")
            assert psnr(shot[:h, :w] / 255.0, want / 255.0) >= 40, (name, w, h, mix, extra, psnr(shot[:h, :w] / 255.0, want / 255.0))
        assert not [c for c in b.console if "rror" in c], b.console
