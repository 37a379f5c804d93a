"""Ctrl-C and SIGTERM in every command that trains: one line, exit 130 (SIGINT) or 143
(SIGTERM), and a resumable checkpoint where the command keeps one. Real subprocesses, signalled
once their training loop reports progress."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from neurimg import checkpoint as ckpt

from conftest import LOGOS

TINY_FIT = ["--width", "16", "--hidden-layers", "1", "--latent-dim", "4", "--steps", "1000000", "--checkpoint-every", "0.2"]


def _signal_when_training(args, sig, timeout=180):
    """Start `neurimg ARGS`, wait for its first progress line ("steps/s"), send `sig`; returns
    (exit code, stderr lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NEURIMG_CACHE_DIR="")
    p = subprocess.Popen([sys.executable, "-m", "neurimg.cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True)
    lines, seen = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line.rstrip("\n"))
            if "steps/s" in line:
                seen.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        assert seen.wait(timeout), lines
        time.sleep(0.5)
        p.send_signal(sig)
        p.wait(timeout=60)
        t.join(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, lines


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        img = (rng.uniform(0, 1, (1, 1, 3)) * 255 * np.ones((16, 16, 3))).astype(np.uint8)
        img[4:12, 4 + k : 10 + k] = (30 * k, 200, 90)
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_fit_keeps_a_checkpoint_on_ctrl_c_and_on_sigterm(tmp_path, sig, code, word):
    run = tmp_path / "run"
    imgs = sorted(LOGOS.glob("*.png"))[:2]
    rc, lines = _signal_when_training(["fit", *imgs, "-o", run, *TINY_FIT], sig)
    assert rc == code, lines
    assert lines[-1].startswith(f"neurimg: {word} at step ") and "resume with: neurimg fit --resume" in lines[-1], lines
    stopped = int(lines[-1].split("at step ")[1].split(";")[0])
    assert ckpt.load(run).step == stopped > 0


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_blend_and_upsample_stop_with_one_line(tmp_path, pair, sig, code, word):
    a, b = pair
    for args in (["blend", a, b, "-o", tmp_path / "b.png", "--width", "16", "--steps", "1000000"],
                 ["upsample", a, "--scale", "2", "--method", "field", "--steps", "1000000", "-o", tmp_path / "u.png"]):
        rc, lines = _signal_when_training(args, sig)
        assert rc == code, lines
        assert lines[-1].startswith(f"neurimg: {word} at step ") and "internal error" not in "\n".join(lines), lines
        assert not (tmp_path / "b.png").exists() and not (tmp_path / "u.png").exists()


def test_blend_train_keeps_a_checkpoint_on_sigterm(tmp_path):
    run = tmp_path / "blender"
    imgs = sorted(LOGOS.glob("*.png"))[:3]
    args = ["blend-train", *imgs, "-o", run, "--size", "16", "--channels", "8", "--batch", "4", "--steps", "1000000",
            "--checkpoint-every", "0.2", "--snapshots", "none"]
    rc, lines = _signal_when_training(args, signal.SIGTERM)
    assert rc == 143 and "resume with: neurimg blend-train --resume" in lines[-1], lines
    stopped = int(lines[-1].split("at step ")[1].split(";")[0])
    assert ckpt.load(run, kind="blendgan").step == stopped > 0
