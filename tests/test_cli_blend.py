"""`neurimg blend` end to end: success paths and every bad input (one line, exit 2)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from neurimg.cli import main

from conftest import err_of

TINY = ["--width", "16", "--steps", "20"]


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "a.png"
    b = tmp_path / "b.png"
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(a)
    rgba = (rng.random((8, 8, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(b)
    return a, b


def test_blend_siren_json(capsys, tmp_path, pair):
    a, b = pair
    out = tmp_path / "o" / "out.png"
    rc = main(["blend", str(a), str(b), "-o", str(out), "--json", "-q", *TINY, "--mode", "mixed", "--offset", "4,2"])
    o, e = capsys.readouterr()
    assert rc == 0, e
    assert e == ""
    s = json.loads(o)
    for k in ("gradient_mse", "gradient_cosine", "psnr_vs_exact", "mean_color_error", "seconds"):
        assert k in s and np.isfinite(s[k])
    assert s["mode"] == "mixed" and s["output"] == str(out)
    assert Image.open(out).size == (16, 16)


def test_blend_exact_scale_mask_and_default_output(capsys, tmp_path, pair, monkeypatch):
    a, b = pair
    mask = tmp_path / "m.png"
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 255
    Image.fromarray(m).save(mask)
    monkeypatch.chdir(tmp_path)
    assert main(["blend", str(a), str(b), "--solver", "exact", "--mask", str(mask), "--json", "-q"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["psnr_vs_exact"] == 100.0 and s["output"] == "a+b.png"
    assert Image.open(tmp_path / "a+b.png").size == (16, 16)
    assert main(["blend", str(a), str(b), "-o", "big.png", "--scale", "2", *TINY]) == 0
    o, e = capsys.readouterr()
    assert o == "" and "PSNR vs exact" in e
    assert Image.open(tmp_path / "big.png").size == (32, 32)


def test_blend_stdin_to_stdout_subprocess(pair):
    a, b = pair
    p = subprocess.run(
        [sys.executable, "-m", "neurimg.cli", "blend", "-", str(b), "--solver", "exact", "-o", "-", "-q"],
        input=a.read_bytes(), capture_output=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout[:8] == b"\x89PNG\r\n\x1a\n" and p.stderr == b""


def test_blend_errors(capsys, tmp_path, pair):
    a, b = pair
    (tmp_path / "text.png").write_text("not a png")
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(wrong)
    ex = ["--solver", "exact"]
    assert "no such file" in err_of(capsys, "blend", tmp_path / "missing.png", b, *ex)
    assert "missing.png" in err_of(capsys, "blend", a, tmp_path / "missing.png", *ex)
    assert "text.png" in err_of(capsys, "blend", a, tmp_path / "text.png", *ex)
    assert "is a folder" in err_of(capsys, "blend", a, tmp_path, *ex)
    assert "--mask" in err_of(capsys, "blend", a, b, "--mask", wrong, *ex)
    assert "no such file" in err_of(capsys, "blend", a, b, "--mask", tmp_path / "nomask.png", *ex)
    assert "outside" in err_of(capsys, "blend", a, b, "--offset", "16,0", *ex)
    assert "outside" in err_of(capsys, "blend", a, b, "--offset", "-8,-8", *ex)
    assert "--offset" in err_of(capsys, "blend", a, b, "--offset", "1;2", *ex)
    assert "--mode" in err_of(capsys, "blend", a, b, "--mode", "median", *ex)
    assert "--order" in err_of(capsys, "blend", a, b, "--order", "3", *ex)
    assert "--order" in err_of(capsys, "blend", a, b, "--order", "x", *ex)
    assert "--solver" in err_of(capsys, "blend", a, b, "--solver", "magic")
    assert "--color-weight" in err_of(capsys, "blend", a, b, "--color-weight", "-1", *ex)
    assert "--color-weight" in err_of(capsys, "blend", a, b, "--color-weight", "inf", *ex)
    assert "--steps" in err_of(capsys, "blend", a, b, "--steps", "0")
    assert "--width" in err_of(capsys, "blend", a, b, "--width", "-2")
    assert "--lr" in err_of(capsys, "blend", a, b, "--lr", "0")
    assert "--w0" in err_of(capsys, "blend", a, b, "--w0", "nan")
    assert "--scale" in err_of(capsys, "blend", a, b, "--scale", "0")
    assert "pixel grid" in err_of(capsys, "blend", a, b, "--scale", "2", *ex)
    assert "--background" in err_of(capsys, "blend", a, b, "--background", "mauve", *ex)
    assert "stdin" in err_of(capsys, "blend", "-", "-", *ex)
    assert "--json" in err_of(capsys, "blend", a, b, "-o", "-", "--json", *ex)
    assert "Missing argument" in err_of(capsys, "blend", a)
