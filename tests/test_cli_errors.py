"""Every bad input: one line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from neurimg.cli import main

from conftest import err_of

TINY = ["--width", "16", "--hidden-layers", "1", "--latent-dim", "4"]


@pytest.fixture
def run_dir(tmp_path_factory, logos4):
    run = tmp_path_factory.mktemp("r") / "run"
    assert main(["fit", str(logos4), "-o", str(run), "--steps", "100", *TINY, "-q"]) == 0
    return run


def test_fit_input_errors(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no such file" in err_of(capsys, "fit", tmp_path / "missing", "-o", tmp_path / "r")
    assert "holds no images" in err_of(capsys, "fit", tmp_path / "empty", "-o", tmp_path / "r")
    (tmp_path / "text.png").write_text("not a png")
    assert "text.png" in err_of(capsys, "fit", tmp_path / "text.png", "-o", tmp_path / "r")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    d = tmp_path / "folder"
    d.mkdir()
    (d / "good.png").write_bytes(data)
    (d / "broken.png").write_bytes(data[:60])
    assert "broken.png" in err_of(capsys, "fit", d, "-o", tmp_path / "r")
    assert "no input" in err_of(capsys, "fit", "-o", tmp_path / "r")


@pytest.mark.parametrize(
    "opts,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "-5"], "--steps"),
        (["--steps", "abc"], "--steps"),
        (["--width", "0"], "--width"),
        (["--width", "-3"], "--width"),
        (["--width", "100000"], "--width"),
        (["--hidden-layers", "-1"], "--hidden-layers"),
        (["--latent-dim", "0"], "--latent-dim"),
        (["--grid", "1"], "--grid"),
        (["--grid", "-2"], "--grid"),
        (["--grid", "5000"], "--grid"),
        (["--grid", "5", "--grid-channels", "0"], "--grid-channels"),
        (["--grid", "5", "--grid-channels", "5000"], "--grid-channels"),
        (["--w0", "nan"], "--w0"),
        (["--w0", "-30"], "--w0"),
        (["--lr", "0"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--batch-pixels", "0"], "--batch-pixels"),
        (["--batch-pixels", "lots"], "--batch-pixels"),
        (["--snapshots", "1,x"], "--snapshots"),
        (["--snapshots", "0"], "--snapshots"),
        (["--background", "purple-ish"], "--background"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_fit_bad_options(capsys, tmp_path, logos4, opts, needle):
    assert needle in err_of(capsys, "fit", logos4, "-o", tmp_path / "r", *opts)


def test_resume_errors(capsys, tmp_path, logos4):
    assert "does not exist" in err_of(capsys, "fit", logos4, "--resume", "-o", tmp_path / "none")
    assert "needs -o" in err_of(capsys, "fit", logos4, "--resume")


def test_render_errors(capsys, tmp_path, run_dir):
    assert "no such run" in err_of(capsys, "render", tmp_path / "nothing")
    (tmp_path / "emptyrun").mkdir()
    assert "no checkpoint" in err_of(capsys, "render", tmp_path / "emptyrun")
    for bad in ("0", "-1", "nan", "inf"):
        assert "--scale" in err_of(capsys, "render", run_dir, "--scale", bad, "-o", tmp_path / "o")
    assert "too large" in err_of(capsys, "render", run_dir, "--scale", "100000", "-o", tmp_path / "o")
    assert "--size" in err_of(capsys, "render", run_dir, "--size", "12", "-o", tmp_path / "o")
    assert "not both" in err_of(capsys, "render", run_dir, "--size", "8x8", "--scale", "2", "-o", tmp_path / "o")
    assert "--region" in err_of(capsys, "render", run_dir, "--region", "5,5,1,1", "-o", tmp_path / "o")
    assert "no image named" in err_of(capsys, "render", run_dir, "--image", "nope.png", "-o", tmp_path / "o.png")
    assert "out of range" in err_of(capsys, "render", run_dir, "--image", "99", "-o", tmp_path / "o.png")
    assert "takes one image" in err_of(capsys, "render", run_dir, "-o", "-")


def test_damaged_checkpoints(capsys, tmp_path, run_dir):
    ck = run_dir / "checkpoint.safetensors"
    data = ck.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.safetensors").write_bytes(data[: len(data) - 100])
    assert "checkpoint" in err_of(capsys, "render", bad)
    (bad / "checkpoint.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle
    assert "not a readable checkpoint" in err_of(capsys, "render", bad)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(bad / "checkpoint.safetensors"))
    assert "not a neurimg checkpoint" in err_of(capsys, "render", bad)
    assert "checkpoint" in err_of(capsys, "fit", "--resume", "-o", bad)


def test_traceback_only_with_debug(tmp_path):
    base = [sys.executable, "-m", "neurimg.cli", "render", str(tmp_path / "nothing")]
    p = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = subprocess.run(base, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "NEURIMG_DEBUG": "1"})
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_help_documents_every_option(capsys):
    """Every option and argument of every command appears in its --help with a help text, and
    every option with a default shows it."""
    import typer

    from neurimg.cli import app

    group = typer.main.get_command(app)
    assert set(group.commands) == {"fit", "render", "blend", "blend-train", "upsample", "view", "export", "morph"}
    for name, cmd in group.commands.items():
        assert main([name, "--help"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        for p in cmd.params:
            assert p.help, (name, p.name)
            if p.param_type_name == "option":
                assert any(o in out for o in p.opts), (name, p.opts)
                if p.default not in (None, False) and not p.is_flag:
                    assert "[default:" in " ".join(p.help.split()) or p.show_default, (name, p.opts)
            assert " ".join(p.help.split())[:40] in out, (name, p.name)


def test_fit_precision_option_is_checked(capsys, tmp_path, logos4):
    assert "--precision" in err_of(capsys, "fit", logos4, "-o", tmp_path / "r", "--precision", "fp8")


def test_fit_edge_share_option_is_checked(capsys, tmp_path, logos4):
    for bad in ("1", "-0.1", "1.5"):
        assert "--edge-share" in err_of(capsys, "fit", logos4, "-o", tmp_path / "r", "--edge-share", bad)
    assert not (tmp_path / "r").exists()


def test_fit_grad_clip_option_is_checked(capsys, tmp_path, logos4):
    for bad in ("-1", "0.5", "1000", "nan", "inf"):
        assert "--grad-clip" in err_of(capsys, "fit", logos4, "-o", tmp_path / "r", "--grad-clip", bad)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_range_is_a_usage_error_in_every_command(capsys, tmp_path, seed):
    """Before: fit, upsample and blend said "internal error: ValueError: expected non-negative
    integer" (exit 1) and blend-train accepted -1."""
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    for args in (["fit", img, "-o", tmp_path / "r"], ["upsample", img, "--scale", "2", "-o", tmp_path / "u.png"],
                 ["blend", img, img, "-o", tmp_path / "b.png"], ["blend-train", img, img, "-o", tmp_path / "g"]):
        line = err_of(capsys, *args, "--seed", seed)
        assert "--seed must be an integer from 0 to 4294967295" in line and "internal error" not in line, (args, line)


def _render_to_stdout(run_dir, shell_tail):
    """`neurimg render RUN --image 0 --size 4096x4096 -o -` (a PNG of megabytes, past any pipe buffer) with stdout as the shell makes it."""
    cmd = f"{sys.executable} -m neurimg.cli render {run_dir} --image 0 --size 4096x4096 -o - {shell_tail}"
    return subprocess.run(["bash", "-c", cmd + "; echo \"rc=${PIPESTATUS[0]}\" >&2"], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("tail, code, says", [
    # the reader is gone before the PNG comes (`| head -c 10` is the same once the pipe's
    # buffer is full; how large that is depends on the kernel, so the test does not rely on it)
    ("| true", 141, "broken pipe"),
    ("> /dev/full", 1, "stdout: cannot write (No space left on device)"),
    (">&-", 1, "stdout is closed"),
])
def test_stdout_that_cannot_take_the_output_is_an_error_with_one_line(run_dir, tail, code, says):
    """Before: `| head -c 10` exited 0 and reported the image as written; /dev/full and a closed
    stdout were "internal error" (AttributeError/OSError)."""
    p = _render_to_stdout(run_dir, tail)
    lines = p.stderr.strip().splitlines()
    assert lines[-1] == f"rc={code}", p.stderr
    errors = [l for l in lines[:-1] if l.startswith("neurimg:")]
    assert len(errors) == 1 and says in errors[0] and "internal error" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert "->" not in p.stderr  # no success line


def test_an_output_file_that_cannot_be_written_is_exit_1_with_the_path(capsys, run_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "sub" / "out.png"  # a folder under a regular file cannot be made
    line = err_of(capsys, "render", run_dir, "--image", "0", "-o", out, code=1)
    assert str(out) in line and "cannot write" in line


def test_tv_weight_needs_supersample(capsys, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(img)
    assert "--supersample 2 or more" in err_of(capsys, "fit", img, "-o", tmp_path / "r", "--tv-weight", "1e-3", "--supersample", "1")
    big = tmp_path / "big.png"  # more pixels than 128 x 128: fitted at pixel centres by default, so no prior inside pixels
    Image.new("RGB", (130, 130), (10, 200, 30)).save(big)
    assert "--supersample 2 or more" in err_of(capsys, "fit", big, "-o", tmp_path / "r2", "--tv-weight", "1e-3")
    assert "--supersample must be an integer from 1 to 8" in err_of(capsys, "fit", img, "-o", tmp_path / "r", "--supersample", "9")
    assert "--area-pixels must be one of all, detail" in err_of(capsys, "fit", img, "-o", tmp_path / "r", "--area-pixels", "edges")
