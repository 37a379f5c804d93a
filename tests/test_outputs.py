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
