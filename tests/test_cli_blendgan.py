"""Issue 15: `neurimg blend-train` and `neurimg blend --method gan` through their real code
paths (tiny sizes: 16x16 images, 8 channels)."""

import csv
import itertools
import json
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image
from conftest import LOGOS, err_of, run_cli, write_png

from neurimg import checkpoint as ckpt
from neurimg.blender import Blender, train
from neurimg.config import GanConfig
from neurimg.data import read_image
from neurimg.errors import NeurimgError

TINY = ["--size", "16", "--channels", "8", "--batch", "8", "--log-every", "25", "--snapshots", "50"]
STEPS = 300


def _train_blender(root, *options):
    """A tiny blender trained on 6 bundled logos through the CLI: (folder, logos folder, stdout)."""
    import contextlib
    import io

    from neurimg.cli import main

    logos = root / "logos"
    logos.mkdir()
    for f in sorted(LOGOS.glob("*.png"))[:6]:
        shutil.copy(f, logos / f.name)
    out = root / "blender"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["blend-train", str(logos), "-o", str(out), *TINY, *options, "--quiet"]) == 0
    return out, logos, buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(folder, logos folder, JSON summary) of a blender of STEPS steps."""
    out, logos, text = _train_blender(tmp_path_factory.mktemp("gan"), "--steps", str(STEPS), "--json")
    return out, logos, json.loads(text)


@pytest.mark.learned
def test_blend_train_writes_a_blender(trained):
    out, logos, summary = trained
    assert summary["steps"] == STEPS and summary["images"] == 6 and summary["target"] == "mixed"
    assert summary["psnr"] > summary["naive_psnr"] + 1  # it learned something beyond (A + B) / 2
    assert summary["baseline_psnr"] == summary["naive_psnr"]
    assert 0 <= summary["p"] <= 1
    for name in ("checkpoint.safetensors", "config.json", "loss.csv", "loss.png", "metrics.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_000050.png", f"step_{STEPS:06d}.png"]
    grid = read_image(out / "snapshots" / "step_000050.png")
    assert grid.shape[0] >= 4 * 16 and grid.shape[1] >= 2 * 4 * 16  # 8 rows of A | B | target | generated, 2 per row
    rows = list(csv.reader(open(out / "loss.csv")))
    assert rows[0] == ["step", "loss", "d_loss", "g_adv", "l1", "p", "r_t", "psnr", "seconds", "lr"]
    assert [int(r[0]) for r in rows[1:]] == [1] + list(range(25, STEPS + 1, 25))
    assert all(np.isfinite(float(v)) for r in rows[1:] for v in r)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["psnr"] == pytest.approx(summary["psnr"], abs=1e-4) and metrics["pairs"] == 30
    assert (out / "checkpoint.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    stored = ckpt.load(out, kind="blendgan")
    assert stored.kind == "blendgan" and stored.step == STEPS and stored.config.size == 16
    assert [i.name for i in stored.images] == sorted(p.name for p in logos.iterdir())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _pair(logos, size=16):
    from neurimg.blender import to_square

    files = sorted(logos.iterdir())
    return [to_square(read_image(f), size) for f in files[:2]]


# What the levels test trains: the fixture's tiny blender (the same 6 logos and TINY), but
# every pair at random levels and 1000 steps (~5 s of training here, one more compile).
LEVELS_TRAIN = ["--steps", "1000", "--level-prob", "1"]


@pytest.fixture(scope="module")
def trained_levels(tmp_path_factory):
    """A tiny blender trained for the levels (LEVELS_TRAIN): (folder, logos folder)."""
    out, logos, _ = _train_blender(tmp_path_factory.mktemp("gan-levels"), *LEVELS_TRAIN)
    return out, logos


@pytest.mark.learned
def test_levels_move_the_blend_toward_a_and_b(trained_levels):
    """--levels 1,1,1 and 0,0,0 differ, the first is nearer A, the second nearer B, and the
    blend (0.5 each) lies between them: mean squared distances averaged over the 15 pairs of
    the 6 training logos, each ordering by 10% at least."""
    # Margins, (larger - smaller) / larger of each ordering, min over training seeds 0-9
    # (`--seed`), measured at the default ISA (AVX-512) / XLA_FLAGS=--xla_cpu_max_isa=AVX2:
    #   d(to_a, a) < d(mid, a) 0.612 / 0.610     d(mid, a) < d(to_b, a) 0.395 / 0.425
    #   d(to_b, b) < d(mid, b) 0.410 / 0.464     d(mid, b) < d(to_a, b) 0.539 / 0.537
    # (the first pair alone: 0.131 / 0.186 at the least). What the test was, one pair after the
    # `trained` fixture's 300 steps at level_prob 0.5, was within noise: its orderings failed
    # for 2 of the 10 seeds at either ISA (seed 0 itself failed on some AVX-512 machines:
    # d(to_a, a) 0.0378 > d(mid, a) 0.0349), and at 1000 steps one seed kept a 0.044 margin.
    out, logos = trained_levels
    blender = Blender.load(out)
    from neurimg.blender import to_square

    ims = [to_square(read_image(f), 16) for f in sorted(logos.iterdir())]

    def d(x, y):
        return float(np.mean((x - y) ** 2))

    acc = np.zeros(7)
    pairs = list(itertools.combinations(ims, 2))
    for a, b in pairs:
        to_a = blender.blend(a, b, (1.0, 1.0, 1.0))
        to_b = blender.blend(a, b, (0.0, 0.0, 0.0))
        mid = blender.blend(a, b)
        acc += np.array([d(to_a, a), d(mid, a), d(to_b, a), d(to_b, b), d(mid, b), d(to_a, b), d(to_a, to_b)]) / len(pairs)
    ta_a, mid_a, tb_a, tb_b, mid_b, ta_b, apart = acc
    assert apart > 1e-3, acc
    assert ta_a < 0.9 * mid_a and mid_a < 0.9 * tb_a, acc
    assert tb_b < 0.9 * mid_b and mid_b < 0.9 * ta_b, acc


def _exact_mixed(a: np.ndarray, b: np.ndarray):
    """The mixed-gradient target of A and B (at each pixel the forward differences of the
    image whose gradient there is the stronger, over all channels) and the least-squares image
    with those differences and the mean colour of (A + B) / 2: (gx (H, W-1, C), gy (H-1, W, C),
    u (H, W, C)), by dense least squares, independent of neurimg.poisson."""
    h, w, c = a.shape

    def diffs(u):  # forward differences, zero past the last column / row (as at the edges)
        dx, dy = np.zeros_like(u), np.zeros_like(u)
        dx[:, :-1], dy[:-1] = np.diff(u, axis=1), np.diff(u, axis=0)
        return dx, dy

    (ax, ay), (bx, by) = diffs(a), diffs(b)
    take_b = ((bx**2 + by**2).sum(-1) > (ax**2 + ay**2).sum(-1))[..., None]
    gx, gy = np.where(take_b, bx, ax)[:, :-1], np.where(take_b, by, ay)[:-1]
    idx = np.arange(h * w).reshape(h, w)
    rows = [(idx[:, 1:], idx[:, :-1]), (idx[1:], idx[:-1])]
    d = np.zeros((h * (w - 1) + (h - 1) * w, h * w))
    k = 0
    for hi, lo in rows:
        n = hi.size
        d[np.arange(k, k + n), hi.ravel()] = 1
        d[np.arange(k, k + n), lo.ravel()] = -1
        k += n
    rhs = np.concatenate([gx.reshape(-1, c), gy.reshape(-1, c)])
    u = np.linalg.lstsq(d, rhs, rcond=None)[0]  # the minimum-norm solution: zero mean (constants are the null space)
    u = u - u.mean(0) + ((a + b) / 2).reshape(-1, c).mean(0)
    return gx, gy, u.reshape(h, w, c)


def test_exact_mixed_solves_a_hand_made_case():
    """The test's own solver: where one image's gradient is everywhere the stronger (the other
    is flat), the solve is that image, its mean moved to that of (A + B) / 2."""
    yy, xx = np.mgrid[0:6, 0:7]
    ramp = np.stack([xx / 7, yy / 6, (xx + yy) / 13], -1) * 0.8
    flat = np.full_like(ramp, 0.3)
    for a, b in ((ramp, flat), (flat, ramp)):
        gx, gy, u = _exact_mixed(a, b)
        np.testing.assert_allclose(u, ramp - ramp.mean((0, 1)) + (a + b).mean((0, 1)) / 2, atol=1e-12)
        np.testing.assert_allclose(gx, np.diff(ramp, axis=1), atol=1e-15)
        np.testing.assert_allclose(gy, np.diff(ramp, axis=0), atol=1e-15)


def test_cli_blend_gan_round_trips_the_checkpoint(trained, capsys, tmp_path):
    """`blend --method gan` from the stored blender: the scores it reports are those of the PNG it
    wrote against the exact mixed-gradient solve; a 16x16 pair is not resized, a 40x30 pair is
    (padded to a square, resized, and back), and the JSON says so."""
    out, logos, _ = trained
    a, b = _pair(logos)
    pa, pb = write_png(tmp_path / "a.png", (a * 255 + 0.5).astype(np.uint8)), write_png(tmp_path / "b.png", (b * 255 + 0.5).astype(np.uint8))
    code, stdout, err = run_cli(capsys, "blend", pa, pb, "--method", "gan", "--model", out, "-o", tmp_path / "o.png", "--json", "--levels", "1,0.5,0")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == "gan" and rep["levels"] == [1.0, 0.5, 0.0] and rep["resized"] is False
    assert rep["target"] == "mixed"
    # the reported scores, recomputed from the written PNG and an exact mixed-gradient solve
    # done here (dense least squares), within 8-bit rounding
    got = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"), np.float64) / 255
    gx, gy, exact = _exact_mixed(read_image(pa).astype(np.float64), read_image(pb).astype(np.float64))
    assert rep["psnr_vs_exact"] == pytest.approx(-10 * np.log10(np.mean((got - np.clip(exact, 0, 1)) ** 2)), abs=0.02)
    fx, fy = np.diff(got, axis=1), np.diff(got, axis=0)
    f, g = np.concatenate([fx.ravel(), fy.ravel()]), np.concatenate([gx.ravel(), gy.ravel()])
    assert rep["gradient_cosine"] == pytest.approx(f @ g / (np.linalg.norm(f) * np.linalg.norm(g)), abs=0.005)
    # another size: resized in and out
    big = np.full((30, 40, 3), 255, np.uint8)
    big[5:25, 8:30] = (200, 30, 30)
    big2 = np.full((30, 40, 3), 255, np.uint8)
    big2[10:20, 2:38] = (20, 30, 200)
    code, stdout, err = run_cli(capsys, "blend", write_png(tmp_path / "c.png", big), write_png(tmp_path / "d.png", big2),
                                "--method", "gan", "--model", out / "checkpoint.safetensors", "-o", tmp_path / "cd.png", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["resized"] is True and (rep["width"], rep["height"]) == (40, 30) and rep["levels"] == [0.5, 0.5, 0.5]
    assert read_image(tmp_path / "cd.png").shape == (30, 40, 3)
    # the noise seed is honoured: the same seed gives the same bytes
    for name in ("n1.png", "n2.png"):
        assert run_cli(capsys, "blend", pa, pb, "--method", "gan", "--model", out, "-o", tmp_path / name, "--noise-seed", "7", "-q")[0] == 0
    assert (tmp_path / "n1.png").read_bytes() == (tmp_path / "n2.png").read_bytes()


def test_interrupted_then_resumed_matches_uninterrupted(tmp_path):
    """Ctrl-C saves a checkpoint; --resume continues to the same generator as a run that was
    never stopped (the state holds the RNG key and ADA's p), and loss.csv has each step once."""
    import jax

    from neurimg import engine

    logos = tmp_path / "logos"
    logos.mkdir()
    for f in sorted(LOGOS.glob("*.png"))[:6]:  # as the fixture: the same shapes, compiled once
        shutil.copy(f, logos / f.name)
    cfg = GanConfig(size=16, channels=8, batch=8, steps=40, log_every=10, snapshots=())  # the fixture's step: compiled once
    whole = train([str(logos)], tmp_path / "whole", cfg)

    class StopAt:
        def start(self, total, done): pass
        def update(self, step, loss, psnr, sps, detail=""):
            if step >= 25:  # the end of the guard's first window (`neurimg.guard.WINDOW`)
                os.kill(os.getpid(), signal.SIGINT)
        def message(self, text): pass
        def stop(self): pass

    with pytest.raises(engine.Interrupted) as exc:
        train([str(logos)], tmp_path / "cut", cfg, reporter=StopAt())
    stopped = ckpt.load(tmp_path / "cut", kind="blendgan").step
    assert stopped == 25 and "checkpoint saved" in str(exc.value)
    resumed = train([], tmp_path / "cut", resume=True)
    assert resumed.steps == 40 and resumed.resumed_from == stopped
    g1 = ckpt.load(tmp_path / "whole", kind="blendgan").tensors
    g2 = ckpt.load(tmp_path / "cut", kind="blendgan").tensors
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert resumed.psnr == pytest.approx(whole.psnr, abs=1e-3)
    steps = [int(r[0]) for r in list(csv.reader(open(tmp_path / "cut" / "loss.csv")))[1:]]
    assert steps == [1, 10, 20, 30, 40]
    # a new total continues from there
    more = train([], tmp_path / "cut", resume=True, steps=50)
    assert more.steps == 50 and more.resumed_from == 40
    del jax


def test_failures_are_reported_with_exit_1(tmp_path, monkeypatch, capsys):
    """A NaN reaching the losses stops training: exit code 1, one line, the step-0 checkpoint
    kept, no metrics.json. Blends no better than the naive average, or not finite, at the end
    are refused the same way (`check_result`, which `train` calls before writing metrics)."""
    from neurimg import blendgan as bg
    from neurimg import blender

    with pytest.raises(NeurimgError, match="no closer to the targets than the naive average") as e:
        blender.check_result(np.zeros((2, 4, 4, 3)), 18.0, 18.5, blender.MIN_STEPS_CHECKED, "the naive average")
    assert e.value.exit_code == 1
    blender.check_result(np.zeros((2, 4, 4, 3)), 18.0, 18.5, blender.MIN_STEPS_CHECKED - 1, "x")  # too short to judge
    with pytest.raises(NeurimgError, match="non-finite"):
        blender.check_result(np.full((2, 4, 4, 3), np.nan), 30.0, 18.5, 5, "x")

    logos = tmp_path / "logos"
    logos.mkdir()
    for f in sorted(LOGOS.glob("*.png"))[:2]:
        shutil.copy(f, logos / f.name)
    monkeypatch.setattr(bg, "target_of", lambda a, b, target, levels=None: a * np.nan)
    bg._runner.cache_clear()  # the step is traced again, with the poisoned target
    try:
        line = err_of(capsys, "blend-train", logos, "-o", tmp_path / "r2", "--size", "16", "--channels", "4", "--batch", "2",
                      "--steps", "5", "--snapshots", "none", "-q", code=1)
    finally:
        bg._runner.cache_clear()  # ... and not kept for the tests after this one
    assert "diverged in steps 1-5 (not finite), after 4 rollbacks" in line and (tmp_path / "r2" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "r2" / "metrics.json").exists()


def test_bad_inputs_exit_2(trained, capsys, tmp_path):
    out, logos, _ = trained
    a, b = sorted(logos.iterdir())[:2]
    gan = ["--method", "gan", "--model", out, "-o", tmp_path / "x.png"]
    assert "no such run folder" in err_of(capsys, "blend", a, b, "--method", "gan", "--model", tmp_path / "missing")
    assert "--method gan needs --model" in err_of(capsys, "blend", a, b, "--method", "gan")
    for bad in ("1,1", "2,0,0", "a,b,c", "nan,0,0", "-0.1,0,0"):
        assert "--levels" in err_of(capsys, "blend", a, b, *gan, "--levels", bad)
    assert "--levels need --method gan" in err_of(capsys, "blend", a, b, "--levels", "1,1,1")
    assert "--offset applies to --method poisson" in err_of(capsys, "blend", a, b, *gan, "--offset", "1,1")
    assert "--method" in err_of(capsys, "blend", a, b, "--method", "style")
    other = write_png(tmp_path / "other.png", np.zeros((20, 24, 3), np.uint8))
    assert "of one size" in err_of(capsys, "blend", a, other, *gan)
    # a fitted run is not a blender, and a blender is not a fitted run
    from neurimg.fit import fit
    from conftest import tiny_config

    fit([str(a), str(b)], tmp_path / "fitrun", tiny_config(steps=80, snapshots=()))
    assert "a fitted run (neurimg fit), not a GAN blender" in err_of(capsys, "blend", a, b, "--method", "gan", "--model", tmp_path / "fitrun")
    assert "a GAN blender (neurimg blend-train), not a fitted run" in err_of(capsys, "render", out)
    # training inputs
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(a, one / a.name)
    assert "at least two images" in err_of(capsys, "blend-train", one, "-o", tmp_path / "b1", *TINY)
    assert "no input given" in err_of(capsys, "blend-train")
    assert "multiple of 8" in err_of(capsys, "blend-train", logos, "-o", tmp_path / "b2", "--size", "20")
    assert "--level-prob" in err_of(capsys, "blend-train", logos, "-o", tmp_path / "b2", "--level-prob", "1.5")
    assert "already holds a run" in err_of(capsys, "blend-train", logos, "-o", out, *TINY)
    assert "only --steps may change" in err_of(capsys, "blend-train", "--resume", "-o", out, "--batch", "4")
    assert "give no images" in err_of(capsys, "blend-train", logos, "--resume", "-o", out)
    assert "cannot resume" in err_of(capsys, "blend-train", "--resume", "-o", tmp_path / "nothing")


def test_hostile_blender_checkpoints_exit_2(trained, capsys, tmp_path):
    """Odd metadata in a blender's checkpoint: an unknown kind, a config that is not a GAN's,
    training images that do not match the list."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    out, logos, _ = trained
    a, b = sorted(logos.iterdir())[:2]
    src = out / "checkpoint.safetensors"
    with safe_open(src, framework="numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors if "tensors" not in changes else changes.pop("tensors"), d / "checkpoint.safetensors", metadata={**meta, **changes})
        return d

    assert "unknown checkpoint kind" in err_of(capsys, "blend", a, b, "--method", "gan", "--model", variant("k", kind="pickle"))
    bad_cfg = json.dumps({**json.loads(meta["config"]), "size": "big"})
    assert "damaged checkpoint" in err_of(capsys, "blend", a, b, "--method", "gan", "--model", variant("c", config=bad_cfg))
    short = dict(tensors)
    short["images"] = short["images"][:2]
    assert "training images do not match" in err_of(capsys, "blend-train", "--resume", "-o", variant("i", tensors=short))


def test_gan_config_round_trips():
    cfg = GanConfig(target="naive", snapshots=(5, 9), level_prob=0.25)
    assert GanConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(NeurimgError, match="stored configuration"):
        GanConfig.from_dict({"colour": 1})


def test_compile_cache_location():
    from neurimg.blender import compile_cache_dir

    assert compile_cache_dir({"NEURIMG_CACHE_DIR": "off"}) is None
    assert compile_cache_dir({"NEURIMG_CACHE_DIR": "/c"}) == "/c/jax"
    assert compile_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/neurimg/jax"
    assert compile_cache_dir({}).endswith(os.path.join(".cache", "neurimg", "jax"))
    assert compile_cache_dir() is None  # the tests' own setting (conftest)
