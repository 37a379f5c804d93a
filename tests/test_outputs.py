"""The promises of every output (issue 24): two outputs never share a path, an animation's memory
is bounded, the viewer's page holds whatever the run's names are and embeds only the run's own
snapshots, and the CLI's small promises (--version, help, messages that say what happened)."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurimg.data import output_names, output_paths

from conftest import LOGOS, err_of, run_cli

TINY = ["--width", "32", "--hidden-layers", "1", "--latent-dim", "8", "--steps", "150", "-q"]


# --- 1. no two outputs share a path -----------------------------------------------------------


def test_output_names_are_distinct_and_predictable():
    assert output_names(["a.png", "b.jpg"]) == ["a.png", "b.png"]  # a unique stem: STEM.png
    # a shared stem: the .png keeps it, whichever comes first; the others keep their suffix
    assert output_names(["logo.png", "logo.jpg"]) == ["logo.png", "logo.jpg.png"]
    assert output_names(["logo.jpg", "logo.png"]) == ["logo.jpg.png", "logo.png"]
    assert output_names(["a.jpg", "a.webp"]) == ["a.png", "a.webp.png"]
    # case-insensitive file systems: Logo.png and logo.PNG are one file there
    assert output_names(["Logo.png", "logo.PNG"]) == ["Logo.png", "logo.PNG.png"]
    # even the suffixed name taken: -N, never a name another image wants
    assert output_names(["a.png", "a.jpg", "a.jpg.png"]) == ["a.png", "a.jpg.png", "a.jpg-1.png"]
    assert output_names(["a.png", "a-1.png", "a.jpg", "a-1.jpg"]) == ["a.png", "a-1.png", "a.jpg.png", "a-1.jpg.png"]
    many = [f"x.{s}" for s in ("png", "jpg", "gif", "bmp", "webp", "tif")] + ["X.jpg.png", "x.JPG"]
    got = output_names(many)
    assert len({g.casefold() for g in got}) == len(many) and all(g.endswith(".png") for g in got)
    assert output_paths(["logo.png", "logo.jpg"], "out", default_file=None, default_folder="d") == ["out/logo.png", "out/logo.jpg.png"]


@pytest.fixture
def same_stem(tmp_path):
    """A folder of logo.png and logo.jpg (different pictures, one stem)."""
    d = tmp_path / "same"
    d.mkdir()
    a, b = sorted(LOGOS.glob("*.png"))[:2]
    Image.open(a).convert("RGB").save(d / "logo.png")
    Image.open(b).convert("RGB").save(d / "logo.jpg", quality=95)
    return d


def test_render_and_upsample_never_write_two_images_to_one_path(capsys, tmp_path, same_stem):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "fit", same_stem, "-o", run, *TINY)
    assert code == 0, err
    for args in (["render", run, "-o", tmp_path / "r"],
                 ["upsample", same_stem, "--scale", "2", "--method", "backproject", "-o", tmp_path / "u"],
                 ["upsample", "--from", run, "--scale", "2", "-o", tmp_path / "f"]):
        code, out, err = run_cli(capsys, *args, "--json", "-q")
        assert code == 0, err
        paths = [o["path"] for o in json.loads(out)["outputs"]]
        assert len(paths) == 2 and len(set(paths)) == 2, paths
        assert sorted(Path(p).name for p in paths) == ["logo.jpg.png", "logo.png"]
        assert sorted(p.name for p in Path(paths[0]).parent.iterdir()) == ["logo.jpg.png", "logo.png"]
        # each file is its own image: the two differ
        x, y = (np.asarray(Image.open(p)) for p in paths)
        assert np.abs(x.astype(int) - y).mean() > 10


# --- 2. an animation's memory is bounded ------------------------------------------------------


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    from neurimg.cli import main

    d = tmp_path_factory.mktemp("run2")
    src = d / "imgs"
    src.mkdir()
    for f in sorted(LOGOS.glob("*.png"))[:2]:
        Image.open(f).convert("RGB").resize((20, 16)).save(src / f.name)
    assert main(["fit", str(src), "-o", str(d / "run"), *TINY]) == 0
    return d / "run"


def test_morph_refuses_a_gif_it_cannot_hold_before_rendering(capsys, tmp_path, run2, monkeypatch):
    from neurimg import morph as mo

    # the case: 30 frames of 16384x16384, refused at once (not 18 GB later)
    line = err_of(capsys, "morph", run2, "0", "1", "--size", "16384x16384", "-o", tmp_path / "m.gif")
    assert "megapixels" in line and ".mp4" in line and not (tmp_path / "m.gif").exists()
    # the bound is frames x pixels, loop included: 5 frames of 20x16 fit a cap of 1600, 6 do not
    monkeypatch.setattr(mo, "MAX_GIF_PIXELS", 5 * 20 * 16)
    code, _, err = run_cli(capsys, "morph", run2, "0", "1", "--frames", "5", "-o", tmp_path / "ok.gif", "-q")
    assert code == 0, err
    assert "6 frames" in err_of(capsys, "morph", run2, "0", "1", "--frames", "4", "--loop", "-o", tmp_path / "no.gif")
    assert not (tmp_path / "no.gif").exists()


def test_morph_streams_mp4_frames_and_renders_each_gif_frame_once(tmp_path, monkeypatch):
    """Frames are rendered as they are written: a GIF renders each mixing weight once (the loop's
    way back is copied), an MP4 over the GIF bound renders the way back again instead of keeping
    frames; progress hears of every frame shown."""
    pytest.importorskip("imageio_ffmpeg")
    import warnings

    from neurimg import morph as mo

    calls, ticks = [], []

    def render(t):
        calls.append(t)
        return np.full((9, 11, 3), int(255 * t), np.uint8)

    n = mo.write(str(tmp_path / "a.gif"), render, 4, ".gif", 10.0, True, progress=lambda *a: ticks.append(a))
    assert n == (tmp_path / "a.gif").stat().st_size and len(calls) == 4
    assert ticks == [("morph", i, 6) for i in range(1, 7)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        calls.clear()
        mo.write(str(tmp_path / "kept.mp4"), render, 4, ".mp4", 10.0, True)
        assert len(calls) == 4  # small: kept for the way back
        monkeypatch.setattr(mo, "MAX_GIF_PIXELS", 9 * 11)
        calls.clear()
        mo.write(str(tmp_path / "big.mp4"), render, 4, ".mp4", 10.0, True)
        assert calls == [0.0, 1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]  # large: rendered again, one frame held
        import imageio.v2 as iio2

        vid = iio2.mimread(tmp_path / "big.mp4")
    assert len(vid) == 6 and vid[0].shape == (10, 12, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "big.mp4", "kept.mp4"]  # no temporaries


def test_morph_shows_progress_on_stderr(capsys, tmp_path, run2):
    code, _, err = run_cli(capsys, "morph", run2, "0", "1", "--frames", "3", "-o", tmp_path / "m.gif")
    assert code == 0, err
    assert "morph: 3/3 frames" in err


# --- 8. what users expect of a CLI ------------------------------------------------------------


def test_version_and_bare_neurimg(capsys):
    import importlib.metadata

    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"neurimg {importlib.metadata.version('neurimg')}" and err == ""
    code, out, err = run_cli(capsys)  # bare: the help, not an error
    assert code == 0 and out.startswith("Usage: neurimg") and "fit" in out and "upsample" in out and "error" not in err


def test_every_command_has_examples_that_use_its_own_options(capsys):
    import re

    import typer

    from neurimg.cli import app

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0 and "Examples:" in out, name
        lines = [ln.strip() for ln in out.split("Examples:", 1)[1].splitlines() if ln.strip()]
        assert lines and all(ln.startswith(("neurimg " + name + " ", "cat ")) for ln in lines), (name, lines)
        known = {o for p in cmd.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
        for ln in lines:
            used = set(re.findall(r"(?<!\S)(--?[a-z][a-z0-9-]*)", ln.split("#")[0]))
            assert used <= known, (name, used - known)


def test_fit_says_what_next_and_counts_in_words(capsys, tmp_path):
    img = tmp_path / "one.png"
    Image.open(sorted(LOGOS.glob("*.png"))[0]).convert("RGB").resize((16, 16)).save(img)
    run = tmp_path / "my run"
    code, _, err = run_cli(capsys, "fit", img, "-o", run, "--steps", "100", "--width", "16", "--hidden-layers", "1", "--latent-dim", "4")
    assert code == 0, err
    assert "1 image, 100 steps" in err and "1 images" not in err
    assert f"next: neurimg render '{run}'" in err and f"neurimg view '{run}'" in err
    code, _, err = run_cli(capsys, "fit", "-o", run, "--resume", "--steps", "100")  # nothing to train
    assert code == 0, err
    assert "nothing to train" in err and "0.0 steps/s" not in err and "nothing trained" in err
    # --resume and --overwrite together: refused, the run untouched
    before = (run / "checkpoint.safetensors").read_bytes()
    assert "--overwrite" in err_of(capsys, "fit", img, "-o", run, "--resume", "--overwrite")
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert "--overwrite" in err_of(capsys, "blend-train", tmp_path, "-o", tmp_path / "b", "--resume", "--overwrite")


def test_messages_say_what_happened(capsys, tmp_path, run2):
    line = err_of(capsys, "render", run2, "-i", "0", "--region", "0,0,1e-9,1e-9", "-o", tmp_path / "x.png")
    assert "None" not in line and "smaller than a pixel" in line and "--size" in line
    # resuming with an image of another size names it and both sizes
    src = tmp_path / "imgs"
    src.mkdir()
    for i in load_run_images(run2):
        Image.new("RGB", (i.width, i.height) if i.name != load_run_images(run2)[1].name else (24, 16)).save(src / i.name)
    line = err_of(capsys, "fit", src, "-o", run2, "--resume", "--steps", "300")
    assert f"{load_run_images(run2)[1].name} is 24x16, but the checkpoint's is 20x16" in line
    # a link that leads nowhere (a loop): said so, not "no such file"
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for args in (["fit", tmp_path / "loop1", "-o", tmp_path / "r"], ["render", tmp_path / "loop1"],
                 ["upsample", tmp_path / "loop1", "--scale", "2"]):
        assert "symbolic link that leads nowhere" in err_of(capsys, *args)


def load_run_images(run):
    from neurimg.api import load_run

    return load_run(str(run)).images


def test_upsample_refuses_options_it_would_ignore(capsys, tmp_path, run2):
    img = tmp_path / "a.png"
    Image.open(sorted(LOGOS.glob("*.png"))[0]).convert("RGB").resize((16, 16)).save(img)
    o = ["--scale", "2", "-o", tmp_path / "o.png"]
    assert "--tv-weight: not used by --method internal" in err_of(capsys, "upsample", img, "--method", "internal", "--tv-weight", "0", *o)
    assert "--steps, --internal-width: not used by --method backproject" in err_of(
        capsys, "upsample", img, "--method", "backproject", "--steps", "10", "--internal-width", "8", *o)
    assert "--internal-steps: not used by --method field" in err_of(capsys, "upsample", img, "--method", "field", "--internal-steps", "5", *o)
    assert "not used with --from RUN" in err_of(capsys, "upsample", "--from", run2, "--steps", "10", *o)
    assert "--background" in err_of(capsys, "upsample", "--from", run2, "--background", "black", *o)
    assert not (tmp_path / "o.png").exists()
    # 'auto' may use either method: both kinds of option are taken
    code, _, err = run_cli(capsys, "upsample", img, "--scale", "2", "--tv-weight", "1e-3", "--internal-width", "8", "--steps", "60",
                           "--internal-steps", "60", "-o", tmp_path / "auto.png", "-q")
    assert code in (0, 1), err  # (a 60-step fit may fail its checks: that is exit 1, not a usage error)


def test_inputs_read_partly_are_said_so(capsys, tmp_path):
    """An animation: its first frame only; 16-bit: read at full precision, written as 8-bit.
    Said once per file on stderr (at most a few lines), in upsample, blend and fit; -q is silent."""
    import png

    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 120, 240)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    ramp = (np.linspace(0, 65535, 16 * 48) % 65536).astype(np.uint16).reshape(16, 48)
    png.from_array(ramp.tolist(), "RGB;16").save(tmp_path / "deep.png")
    code, _, err = run_cli(capsys, "upsample", tmp_path / "anim.gif", tmp_path / "deep.png", "--scale", "2",
                           "--method", "backproject", "-o", tmp_path / "up")
    assert code == 0, err
    assert "anim.gif: an animation of 3 frames; only the first is used" in err
    assert "deep.png: 16-bit, read at full precision; the PNGs written are 8-bit" in err
    code, _, err = run_cli(capsys, "blend", tmp_path / "anim.gif", tmp_path / "deep.png", "--solver", "exact", "-o", tmp_path / "b.png")
    assert code == 0, err
    assert "only the first is used" in err and "16-bit" in err
    code, _, err = run_cli(capsys, "upsample", tmp_path / "anim.gif", "--scale", "2", "--method", "backproject", "-o", tmp_path / "q.png", "-q")
    assert code == 0 and err == ""
    # fit: a folder of many such files gives a few lines, then a count
    many = tmp_path / "many"
    many.mkdir()
    for k in range(6):
        frames[0].save(many / f"a{k}.gif", save_all=True, append_images=frames[1:])
    code, _, err = run_cli(capsys, "fit", many, "-o", tmp_path / "run", "--steps", "50", "--width", "8", "--hidden-layers", "1",
                           "--latent-dim", "2")
    assert err.count("only the first is used") == 2 and "... and 4 more like these" in err, err

