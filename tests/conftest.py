import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from neurimg.config import Config, ModelConfig, TrainConfig

# Tests leave the user's cache alone: no persistent JAX compilation cache (blend --method gan).
os.environ["NEURIMG_CACHE_DIR"] = "off"

ROOT = Path(__file__).resolve().parent.parent
LOGOS = ROOT / "examples" / "logos"


@pytest.fixture
def logos4(tmp_path) -> Path:
    """A folder of 4 real 64x64 logos."""
    d = tmp_path / "logos4"
    d.mkdir()
    for f in sorted(LOGOS.glob("*.png"))[:4]:
        shutil.copy(f, d / f.name)
    return d


def tiny_config(**train) -> Config:
    # pixel centres: the mechanism tests' thresholds were measured there (area fits have their own tests)
    t = dict(steps=200, batch_pixels=4096, snapshots=(1, 100), log_every=20, warmup_steps=20, lr=2e-3, latent_lr=2e-2, supersample=1)
    t.update(train)
    return Config(ModelConfig(width=32, hidden_layers=2, latent_dim=16, grid=0), TrainConfig(**t))


def write_png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def run_cli(capsys, *args):
    """Run `neurimg ARGS` in-process: (exit code, stdout, stderr)."""
    from neurimg.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def err_of(capsys, *args, code=2):
    """Run a command that must fail: one `neurimg: error:` line on stderr, nothing on stdout,
    no traceback, the given exit code. Returns the line."""
    rc, out, err = run_cli(capsys, *args)
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurimg: error:"), err
    assert "Traceback" not in err and out == ""
    return lines[0]
