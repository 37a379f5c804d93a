"""Inputs made to hurt: decompression bombs, files that are not files, checkpoints whose
metadata lies. Each must end in one clear NeurimgError (exit code 2), quickly."""

import json
import os
import signal
import struct
import zlib
from contextlib import contextmanager

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save as st_save

from neurimg import checkpoint as ckpt
from neurimg import data, train
from neurimg.data import list_image_files, read_bytes, read_image
from neurimg.errors import NeurimgError
from neurimg.imageset import load_image_set

from conftest import err_of, tiny_config, write_png


def _png16_rgb(path, arr):
    import png  # pypng writes true 16-bit RGB

    h, w, _ = arr.shape
    with open(path, "wb") as f:
        png.Writer(w, h, greyscale=False, bitdepth=16).write(f, arr.reshape(h, -1).tolist())


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _one_line(e: NeurimgError) -> str:
    assert e.exit_code == 2 and "\n" not in str(e), str(e)
    return str(e)


# decompression bombs


@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)  # 10x10


@pytest.mark.parametrize("kind", ["rgb8", "rgb16", "gray16-tiff"])
def test_pixel_cap_on_every_decode_path(tmp_path, small_cap, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "rgb8":  # Pillow; through load_image_set, imageset's direct path
        f = d / "big.png"
        Image.fromarray(np.zeros((11, 10, 3), np.uint8)).save(f)
    elif kind == "rgb16":  # pypng
        f = d / "big.png"
        _png16_rgb(f, np.zeros((11, 10, 3), np.uint16))
    else:  # Pillow mode I;16
        f = d / "big.tif"
        Image.fromarray(np.zeros((11, 10), np.uint16)).save(f)
    for load in (read_image, lambda f: load_image_set([str(f)])):
        with pytest.raises(NeurimgError, match="big.* 10x11 pixels is too large") as e:
            load(f)
        _one_line(e.value)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(d / "ok.png")
    assert load_image_set([str(d / "ok.png")]).sizes.tolist() == [[10, 10]]  # at the cap: fine


def test_16_bit_png_bomb_is_refused_before_decoding(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 16, 2, 0, 0, 0)  # 60 GB of pixels
    rows = zlib.compress(b"\0" * 600_001 * 4)  # a few rows; pypng would decode on and on
    f = tmp_path / "bomb.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))
    for load in (read_image, lambda f: load_image_set([str(f)])):
        with pytest.raises(NeurimgError, match="bomb.png: image of 100000x100000 pixels is too large"):
            load(f)


# files that are not regular files


@contextmanager
def _deadline(seconds):
    """Fail instead of hanging: SIGALRM interrupts a blocking open() of a FIFO."""

    def stop(*_):
        raise TimeoutError("blocked on a file that is not a regular file")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "link.png").symlink_to(fifo)
    with _deadline(10):
        for call in (
            lambda: list_image_files([str(fifo)]),
            lambda: list_image_files([str(tmp_path / "link.png")]),  # links are followed
            lambda: read_bytes(fifo),
            lambda: load_image_set([str(fifo)]),
            lambda: ckpt.load(fifo),
        ):
            with pytest.raises(NeurimgError, match="is not a regular file") as e:
                call()
            _one_line(e.value)
    # a folder listing skips it (as before) and keeps the images
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "a.png")
    assert list_image_files([str(tmp_path)]) == [str(tmp_path / "a.png")]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_devices_are_refused():
    with pytest.raises(NeurimgError, match="/dev/zero: is not a regular file"):
        list_image_files(["/dev/zero"])  # read, it would fill memory
    with pytest.raises(NeurimgError, match="/dev/null: is not a regular file"):
        read_bytes("/dev/null")
    with pytest.raises(NeurimgError, match="/dev/null: is not a regular file"):
        list_image_files(["/dev/null", "-"])


def test_link_to_a_regular_file_is_fine(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert list_image_files([str(tmp_path / "b.png"), "-"]) == [str(tmp_path / "b.png"), "-"]
    assert read_image(tmp_path / "b.png").shape == (2, 2, 3)


# checkpoints whose metadata lies


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid checkpoint of 2 images: (tensors, metadata) to tamper with."""
    cfg = tiny_config()
    _, st = train.init_state(cfg, 2)
    p = tmp_path_factory.mktemp("good") / "checkpoint.safetensors"
    infos = [ckpt.ImageInfo("a.png", "/in/a.png", 8, 6), ckpt.ImageInfo("b.png", "/in/b.png", 5, 5)]
    ckpt.save(p, cfg, infos, jax.device_get(st), 1.0)
    with safe_open(str(p), framework="numpy") as f:
        meta = dict(f.metadata())
    return load_file(str(p)), meta


def _write(path, good, images=None, config=None, step=None, tensors=None):
    t, meta = good
    meta = dict(meta)
    t = {**t, **(tensors or {})}
    if images is not None:
        meta["images"] = json.dumps(images)
    if config is not None:
        meta["config"] = json.dumps(config)
    if step is not None:
        meta["step"] = step
    path.write_bytes(st_save(t, metadata=meta))
    return path


def _entry(**kw):
    return {"name": "a.png", "source": "/in/a.png", "width": 8, "height": 6, **kw}


BAD_IMAGES = {
    "parent": [_entry(name="../../x.png"), _entry(name="b.png")],
    "absolute": [_entry(name="/abs/x.png"), _entry(name="b.png")],
    "subfolder": [_entry(name="a/b.png"), _entry(name="b.png")],
    "dotdot": [_entry(name=".."), _entry(name="b.png")],
    "dot": [_entry(name="."), _entry(name="b.png")],
    "empty": [_entry(name=""), _entry(name="b.png")],
    "nul": [_entry(name="a\0.png"), _entry(name="b.png")],
    "backslash": [_entry(name="..\\x.png"), _entry(name="b.png")],
    "duplicate": [_entry(), _entry()],
    "name-not-str": [_entry(name=3), _entry(name="b.png")],
    "source-not-str": [_entry(source=None), _entry(name="b.png")],
    "width-str": [_entry(width="8"), _entry(name="b.png")],
    "width-float": [_entry(width=8.0), _entry(name="b.png")],
    "height-bool": [_entry(height=True), _entry(name="b.png")],
    "width-zero": [_entry(width=0), _entry(name="b.png")],
    "height-huge": [_entry(height=(1 << 20) + 1), _entry(name="b.png")],
    "missing-field": [{"name": "a.png", "source": "x", "width": 8}, _entry(name="b.png")],
    "extra-field": [_entry(evil=1), _entry(name="b.png")],
    "not-a-dict": [["a.png", "x", 8, 6], _entry(name="b.png")],
    "not-a-list": {"a.png": _entry()},
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_image_metadata_is_validated(tmp_path, good, case):
    p = _write(tmp_path / "c.safetensors", good, images=BAD_IMAGES[case])
    with pytest.raises(NeurimgError, match="damaged checkpoint") as e:
        ckpt.load(p)
    _one_line(e.value)


def _config(good, part, **kw):
    c = json.loads(good[1]["config"])
    c[part].update(kw)
    return c


@pytest.mark.parametrize(
    "part, field, value",
    [("model", "width", "x"), ("model", "width", 3.5), ("model", "width", -1), ("model", "latent_dim", True), ("model", "latent_dim", None),
     ("model", "w0", "30"), ("model", "out_channels", 4), ("model", "grid", None), ("model", "grid", 1), ("model", "grid", "17"),
     ("model", "grid_rows", "x"), ("model", "grid_rows", 1), ("model", "grid_channels", 0), ("train", "steps", 0), ("train", "precision", "fp8"), ("train", "area_pixels", "edges"),
     ("model", "width", None), ("train", "supersample", None), ("train", "supersample", "2"), ("train", "supersample", 9),
     ("train", "warmup_steps", "x"), ("train", "seed", "0"), ("train", "segments", [[5, 10], [20, 30]])],
)
def test_config_metadata_is_validated(tmp_path, good, part, field, value):
    p = _write(tmp_path / "c.safetensors", good, config=_config(good, part, **{field: value}))
    with pytest.raises(NeurimgError, match="damaged checkpoint") as e:
        ckpt.load(p)
    _one_line(e.value)


@pytest.mark.parametrize(
    "step, tensor",
    [("5", np.array(0, np.int32)), ("0", np.array(5, np.int32)), ("0", np.array(0.0, np.float32)),
     ("0", np.zeros(1, np.int32)), ("-1", np.array(-1, np.int32)), ("x", np.array(0, np.int32))],
)
def test_step_tensor_must_agree_with_metadata(tmp_path, good, step, tensor):
    p = _write(tmp_path / "c.safetensors", good, step=step, tensors={"step": tensor})
    with pytest.raises(NeurimgError, match="damaged checkpoint") as e:
        ckpt.load(p)
    _one_line(e.value)


def test_untampered_copy_loads(tmp_path, good):
    c = ckpt.load(_write(tmp_path / "c.safetensors", good, step="0", tensors={"step": np.array(0, np.int32)}))
    assert [i.name for i in c.images] == ["a.png", "b.png"] and c.step == 0


def test_render_refuses_a_name_leaving_its_folder(capsys, tmp_path, good):
    run = tmp_path / "deep" / "run"
    run.mkdir(parents=True)
    _write(run / ckpt.FILENAME, good, images=[_entry(name="../../escaped.png"), _entry(name="b.png")])
    assert "damaged checkpoint" in err_of(capsys, "render", run, "-o", run / "out")
    assert not list(tmp_path.rglob("escaped.png"))


# checkpoints holding values that are not finite: refused as damaged by every command, before
# anything is written (a NaN weight renders black PNGs, exports a NaN model; w0 = 1e30 makes
# every output NaN)

# case: (tensor key, index, value) or (config part, field, value); what the error must name
NOT_FINITE = {
    "nan-weight": ("params['layers'][1]['kernel']", (3, 4), np.nan, "tensor params['layers'][1]['kernel'] has 1 non-finite values"),
    "inf-latent": ("params['latents']", (1, [0, 5, 9]), np.inf, "tensor params['latents'] has 3 non-finite values"),
    "nan-optimizer": ("opt['net'][1][0].nu['modulation']", (2, 7), np.nan, "tensor opt['net'][1][0].nu['modulation'] has 1 non-finite values"),
    "w0-huge": ("model", "w0", 1e30, "--w0 1e+30 is too large"),
    "w0-nan": ("model", "w0", float("nan"), "stored config holds a non-finite number (NaN)"),
    "warmup-nan": ("train", "warmup_steps", float("nan"), "stored config holds a non-finite number (NaN)"),
}


def _set(tensors, key, index, value):
    """{key: the tensor `key` of `tensors` with the values at `index` set to `value`}."""
    a = tensors[key].copy()
    a[index] = value
    return {key: a}


def _not_finite(path, good, case):
    """`good` written to `path` with the NOT_FINITE `case` in it (the config through Python's
    json, which writes NaN as a bare literal)."""
    where, what, value, _ = NOT_FINITE[case]
    if where in ("model", "train"):
        return _write(path, good, config=_config(good, where, **{what: value}))
    return _write(path, good, tensors=_set(good[0], where, what, value))


@pytest.mark.parametrize("only", [None, "params"])
@pytest.mark.parametrize("case", sorted(NOT_FINITE))
def test_non_finite_checkpoint_is_refused_as_damaged(tmp_path, good, case, only):
    p = _not_finite(tmp_path / "c.safetensors", good, case)
    with pytest.raises(NeurimgError) as e:
        ckpt.load(p, only=only)  # "params": the optimizer state is checked though not kept
    msg = _one_line(e.value)
    assert msg.startswith(f"{p}: damaged checkpoint (") and NOT_FINITE[case][3] in msg, msg


def test_metadata_number_past_the_float_range_is_refused(tmp_path, good):
    t, meta = good
    text = json.dumps(_config(good, "train", warmup_steps=12345)).replace("12345", "1e400")  # parses as inf
    p = tmp_path / "c.safetensors"
    p.write_bytes(st_save(t, metadata={**meta, "config": text}))
    with pytest.raises(NeurimgError, match=r"damaged checkpoint \(stored config holds a non-finite number \(1e400\)\)") as e:
        ckpt.load(p)
    _one_line(e.value)


@pytest.fixture(scope="module")
def good_pngs(tmp_path_factory):
    """A folder holding `good`'s two images (a.png 8x6, b.png 5x5): what `fit --resume` reads."""
    d = tmp_path_factory.mktemp("pngs")
    write_png(d / "a.png", np.full((6, 8, 3), 200, np.uint8))
    write_png(d / "b.png", np.full((5, 5, 3), 50, np.uint8))
    return d


FIT_COMMANDS = {  # each reads RUN's checkpoint and would write under OUT (fit --resume: into RUN)
    "render": lambda run, out, imgs: ["render", run, "-o", out / "render"],
    "view": lambda run, out, imgs: ["view", run, "--html", out / "view.html", "--no-open"],
    "export": lambda run, out, imgs: ["export", run, "-o", out / "model.onnx"],
    "morph": lambda run, out, imgs: ["morph", run, "a.png", "b.png", "-o", out / "morph.gif"],
    "upsample": lambda run, out, imgs: ["upsample", "--from", run, "--scale", "2", "-o", out / "up"],
    "fit-resume": lambda run, out, imgs: ["fit", imgs / "a.png", imgs / "b.png", "--resume", "-o", run, "--steps", "4"],
}


@pytest.mark.parametrize("command", sorted(FIT_COMMANDS))
@pytest.mark.parametrize("case", sorted(NOT_FINITE))
def test_every_command_refuses_a_non_finite_checkpoint(capsys, tmp_path, good, good_pngs, case, command):
    run = tmp_path / "run"
    run.mkdir()
    p = _not_finite(run / ckpt.FILENAME, good, case)
    before = p.read_bytes()
    line = err_of(capsys, *FIT_COMMANDS[command](run, tmp_path / "out", good_pngs))
    assert f"{p}: damaged checkpoint (" in line and NOT_FINITE[case][3] in line, line
    assert sorted(tmp_path.rglob("*")) == [run, p] and p.read_bytes() == before  # nothing written


@pytest.fixture(scope="module")
def gan_good(tmp_path_factory):
    """A GAN blender's checkpoint as `blend-train` starts it (tiny: 16x16, 8 channels), with its
    two training images as PNGs: (tensors, metadata, folder of a.png and b.png)."""
    from neurimg import blendgan as bg
    from neurimg.config import GanConfig

    root = tmp_path_factory.mktemp("gan")
    cfg = GanConfig(size=16, channels=8, batch=8, steps=40, log_every=10, snapshots=())
    pixels = np.full((2, 16, 16, 3), 0.5, np.float32)
    _, st = bg.init_state(cfg, pixels)
    infos = [ckpt.ImageInfo(n, str(root / n), 16, 16) for n in ("a.png", "b.png")]
    for n in ("a.png", "b.png"):
        write_png(root / n, np.full((16, 16, 3), 128, np.uint8))
    p = root / "checkpoint.safetensors"
    ckpt.save(p, cfg, infos, jax.device_get(st), 1.0)
    with safe_open(str(p), framework="numpy") as f:
        meta = dict(f.metadata())
    return load_file(str(p)), meta, root


GAN_NOT_FINITE = {  # the generator (what `blend` keeps), the discriminator and its Adam state (what it does not)
    "nan-generator": ("g['enc'][0]['kernel']", (0, 0, 0, 0), np.nan),
    "inf-discriminator": ("d['out']['bias']", (0,), -np.inf),
    "nan-optimizer": ("opt_d[0].nu['convs'][0]['bias']", (3,), np.nan),
}
GAN_COMMANDS = {
    "blend-gan": lambda run, out, imgs: ["blend", imgs / "a.png", imgs / "b.png", "--method", "gan", "--model", run, "-o", out / "x.png"],
    "blend-train-resume": lambda run, out, imgs: ["blend-train", "--resume", "-o", run],
}


@pytest.mark.parametrize("command", sorted(GAN_COMMANDS))
@pytest.mark.parametrize("case", sorted(GAN_NOT_FINITE))
def test_gan_commands_refuse_a_non_finite_blender(capsys, tmp_path, gan_good, case, command):
    tensors, meta, imgs = gan_good
    key, index, value = GAN_NOT_FINITE[case]
    run = tmp_path / "blender"
    run.mkdir()
    p = _write(run / ckpt.FILENAME, (tensors, meta), tensors=_set(tensors, key, index, value))
    before = p.read_bytes()
    line = err_of(capsys, *GAN_COMMANDS[command](run, tmp_path / "out", imgs))
    assert f"{p}: damaged checkpoint (tensor {key} has 1 non-finite values)" in line, line
    assert sorted(tmp_path.rglob("*")) == [run, p] and p.read_bytes() == before


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height (8-bit RGB) whose pixel data is one short zlib stream:
    Pillow opens it (the header is all it reads), decoding it fails."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side, says", [
    (10_000, "not a readable image"),  # 100 Mpx: Pillow warned (DecompressionBombWarning, two lines)
    (15_000, "not a readable image"),  # 225 Mpx: Pillow refused it, under neurimg's documented cap
    (20_000, "image of 20000x20000 pixels is too large"),  # 400 Mpx: past neurimg's cap (2^28)
])
def test_one_pixel_cap_one_message_and_no_pillow_warning(capsys, tmp_path, side, says):
    """Before: Pillow's warning reached stderr for 100 Mpx and its own limit refused 179-268 Mpx."""
    import warnings

    p = tmp_path / "big.png"
    p.write_bytes(_png_header(side, side))
    with warnings.catch_warnings(record=True) as caught:  # what would reach stderr outside pytest
        warnings.simplefilter("always")
        line = err_of(capsys, "fit", p, "-o", tmp_path / "r")  # one line, nothing else on stderr
    assert line.startswith(f"neurimg: error: {p}: ") and says in line, line
    assert not any("DecompressionBomb" in type(w.message).__name__ for w in caught), [str(w.message) for w in caught]
    assert "exceeds limit" not in line and "decompression bomb" not in line.lower()


def test_an_undecodable_file_is_named_not_a_bytesio_object(capsys, tmp_path):
    p = tmp_path / "noise.png"
    p.write_bytes(b"\x00" * 64)
    line = err_of(capsys, "fit", p, "-o", tmp_path / "r")
    assert str(p) in line and "BytesIO" not in line and "0x" not in line, line
