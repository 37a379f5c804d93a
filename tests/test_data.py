import os

import numpy as np
import pytest
from PIL import Image

from neurimg.data import atomic_write_bytes, list_image_files, load_images, read_image, to_rgb, unique_names, write_png
from neurimg.errors import NeurimgError


def test_grayscale_png(tmp_path):
    a = np.array([[0, 255], [128, 64]], np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (2, 2, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img[..., 0], a / 255.0, atol=1e-7)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])


def test_16bit_png(tmp_path):
    a = np.array([[0, 65535], [32768, 1000]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")  # mode I;16
    img = read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(img[..., 1], a / 65535.0, atol=1e-6)


def _png16(path, arr):
    """Write a 16-bit RGB(A) PNG by hand (Pillow cannot write 48/64-bit PNGs)."""
    import struct
    import zlib

    h, w, c = arr.shape
    ctype = {3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_rgb_and_rgba_png(tmp_path):
    a = np.zeros((3, 4, 3), np.uint16)
    a[0, 0] = (65535, 0, 30000)
    a[2, 3] = (1000, 65535, 65535)
    _png16(tmp_path / "c16.png", a)
    img = read_image(tmp_path / "c16.png")
    assert img.shape == (3, 4, 3)
    np.testing.assert_allclose(img, a / 65535.0, atol=0.5 / 255)
    b = np.zeros((2, 2, 4), np.uint16)
    b[..., 0] = 65535
    b[0, 0, 3] = 65535  # opaque red; the rest transparent
    _png16(tmp_path / "c16a.png", b)
    img = read_image(tmp_path / "c16a.png")
    np.testing.assert_allclose(img[0, 0], [1, 0, 0], atol=1e-3)
    np.testing.assert_allclose(img[1, 1], [1, 1, 1], atol=1e-3)


def test_rgba_composited_on_background(tmp_path):
    a = np.zeros((1, 2, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (255, 0, 0, 0)  # fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    white = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(white[0, 0], [1, 0, 0])
    np.testing.assert_allclose(white[0, 1], [1, 1, 1])
    black = read_image(tmp_path / "a.png", background=(0, 0, 0))
    np.testing.assert_allclose(black[0, 1], [0, 0, 0])
    # half alpha: colour * a + bg * (1 - a)
    half = to_rgb(np.array([[[0, 0, 0, 128]]], np.uint8), background=(1, 1, 1))
    np.testing.assert_allclose(half[0, 0], [1 - 128 / 255] * 3, atol=1e-6)


def test_gray_alpha_and_palette(tmp_path):
    Image.fromarray(np.array([[[0, 255], [255, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png")[0], [[0, 0, 0], [1, 1, 1]])
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    np.testing.assert_allclose(read_image(tmp_path / "p.png")[0], [[1, 0, 0], [0, 0, 1]])


def test_truncated_png_names_file(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 7).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(NeurimgError, match="cut.png"):
        read_image(tmp_path / "cut.png")


def test_non_image_and_empty_files(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(NeurimgError, match="notes.png: not a readable image"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(NeurimgError, match="empty"):
        read_image(tmp_path / "empty.png")


def test_folder_listing(tmp_path):
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.PNG").write_bytes(b"x")
    (tmp_path / "README.md").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    files = list_image_files([str(tmp_path)])
    assert [f.split("/")[-1] for f in files] == ["a.PNG", "b.png"]


def test_empty_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeurimgError, match="holds no images"):
        list_image_files([str(tmp_path / "empty")])
    with pytest.raises(NeurimgError, match="no such file"):
        list_image_files([str(tmp_path / "nope")])
    with pytest.raises(NeurimgError):
        list_image_files([])


def test_unique_names():
    assert unique_names(["x/a.png", "y/a.png", "a.png", "-"]) == ["a.png", "a-1.png", "a-2.png", "stdin.png"]


def test_load_mixed_sizes_and_write_roundtrip(tmp_path):
    Image.fromarray(np.full((3, 5, 3), 200, np.uint8)).save(tmp_path / "w.png")
    Image.fromarray(np.full((6, 2), 10, np.uint8), "L").save(tmp_path / "t.png")
    imgs = load_images([str(tmp_path)])
    assert [(i.name, i.width, i.height) for i in imgs] == [("t.png", 2, 6), ("w.png", 5, 3)]
    write_png(tmp_path / "out" / "o.png", imgs[1].pixels)
    back = read_image(tmp_path / "out" / "o.png")
    np.testing.assert_allclose(back, imgs[1].pixels, atol=1 / 255)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["o.png"]  # no temporary left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"data")
        write_png(tmp_path / "o.png", np.zeros((2, 2, 3), np.float32))
    finally:
        os.umask(old)
    for name in ("a.bin", "o.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "o.png"]


def test_failed_write_leaves_no_temp(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "a.bin", 12345)  # not bytes: fails while writing
    assert list(tmp_path.iterdir()) == []


def test_backslash_in_file_names_is_replaced():
    assert unique_names(["x/a\\b.png", "a_b.png"]) == ["a_b.png", "a_b-1.png"]


def test_every_imported_package_is_a_dependency():
    """A package imported by neurimg but declared only for tests breaks a plain install
    (scipy, imported by `blend`, once was)."""
    import ast
    import re
    import sys
    from importlib.metadata import packages_distributions
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in deps}
    modules = set()
    for f in (root / "neurimg").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    dists = packages_distributions()
    for m in sorted(modules - set(sys.stdlib_module_names) - {"neurimg"}):
        assert {d.lower() for d in dists.get(m, [m])} & declared, f"{m} is imported but not a dependency"
