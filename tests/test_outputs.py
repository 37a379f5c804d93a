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
