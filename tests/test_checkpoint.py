import json
import os
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

from neurimg import checkpoint as ckpt
from neurimg import train
from neurimg.errors import NeurimgError

from conftest import tiny_config


def _state():
    cfg = tiny_config()
    g, st = train.init_state(cfg, 3)
    st = jax.tree.map(lambda a: a + 1 if a.dtype == np.float32 else a, st)
    return cfg, st


def _infos(n):
    return [ckpt.ImageInfo(f"i{k}.png", f"/x/i{k}.png", 4, 4) for k in range(n)]


def test_roundtrip(tmp_path):
    cfg, st = _state()
    infos = [ckpt.ImageInfo(f"i{k}.png", f"/x/i{k}.png", 64, 32) for k in range(3)]
    p = tmp_path / "c.safetensors"
    ckpt.save(p, cfg, infos, st, 12.5)
    c = ckpt.load(p)
    assert c.config == cfg and c.images == infos and c.step == 0 and c.seconds == 12.5
    back = c.fill(jax.device_get(train.init_state(cfg, 3)[1]))
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)
        assert np.shape(a) == np.shape(b)
    # a folder holding the checkpoint loads too
    ckpt.save(tmp_path / ckpt.FILENAME, cfg, infos, st, 0)
    assert ckpt.load(tmp_path).config == cfg


def test_damaged_files(tmp_path):
    cfg, st = _state()
    p = tmp_path / "c.safetensors"
    ckpt.save(p, cfg, _infos(3), st, 0)
    data = p.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00\x01garbage" * 10,
        "empty": b"",
        "header-only": data[:20],
        "pickle": pickle.dumps({"params": np.zeros(3)}),
    }
    for name, blob in cases.items():
        q = tmp_path / f"{name}.safetensors"
        q.write_bytes(blob)
        with pytest.raises(NeurimgError, match=name):
            ckpt.load(q)


def test_foreign_safetensors_and_version(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(NeurimgError, match="not a neurimg checkpoint"):
        ckpt.load(tmp_path / "foreign.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "v9.safetensors"), metadata={"format": ckpt.FORMAT, "version": "9"})
    with pytest.raises(NeurimgError, match="version 9"):
        ckpt.load(tmp_path / "v9.safetensors")
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "meta.safetensors"), metadata={"format": ckpt.FORMAT, "version": "1", "config": "{"})
    with pytest.raises(NeurimgError, match="damaged"):
        ckpt.load(tmp_path / "meta.safetensors")


def test_missing_tensor_and_wrong_shape(tmp_path):
    cfg, st = _state()
    p = tmp_path / "c.safetensors"
    ckpt.save(p, cfg, _infos(3), st, 0)
    c = ckpt.load(p)
    other = jax.device_get(train.init_state(cfg, 5)[1])  # 5 images: latents differ in shape
    with pytest.raises(NeurimgError, match="shape"):
        c.fill(other)
    del c.tensors["params['out_bias']"]
    with pytest.raises(NeurimgError, match="missing"):
        c.fill(jax.device_get(train.init_state(cfg, 3)[1]))


def test_atomic_write_leaves_no_temp(tmp_path):
    cfg, st = _state()
    ckpt.save(tmp_path / "c.safetensors", cfg, [], st, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_extra_strings_round_trip(tmp_path):
    cfg, st = _state()
    extra = {"loss": json.dumps({"sum": 1.5, "count": 3}), "note": "x"}
    ckpt.save(tmp_path / "c.safetensors", cfg, _infos(3), st, 0, extra=extra)
    assert ckpt.load(tmp_path / "c.safetensors").extra == extra
    ckpt.save(tmp_path / "plain.safetensors", cfg, _infos(3), st, 0)
    assert ckpt.load(tmp_path / "plain.safetensors").extra == {}
    with pytest.raises(TypeError):
        ckpt.save(tmp_path / "bad.safetensors", cfg, _infos(3), st, 0, extra={"n": 3})


def test_only_params_and_one_read(tmp_path, monkeypatch):
    cfg, st = _state()
    p = tmp_path / "c.safetensors"
    ckpt.save(p, cfg, _infos(3), st, 0)
    full = ckpt.load(p)
    assert any(k.startswith("opt") for k in full.tensors)

    def no_slurp(self):
        raise AssertionError(f"{self} read whole into memory")

    monkeypatch.setattr(Path, "read_bytes", no_slurp)  # tensors come from a memory map instead
    c = ckpt.load(p, only="params")
    assert c.tensors and all(k.startswith("params") for k in c.tensors)
    assert c.tensors.keys() == {k for k in full.tensors if k.startswith("params")}
    template = {"params": jax.device_get(train.init_state(cfg, 3)[1])["params"]}
    back = c.fill(template)["params"]
    for a, b in zip(jax.tree.leaves(st["params"]), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_checkpoint_mode_follows_umask(tmp_path):
    cfg, st = _state()
    old = os.umask(0o022)
    try:
        ckpt.save(tmp_path / "c.safetensors", cfg, _infos(3), st, 0)
    finally:
        os.umask(old)
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "where, what",
    [(("params", "latents"), "tensor params['latents'] has 1 non-finite values"),
     (("opt", "latent_nu"), "tensor opt['latent_nu'] has 1 non-finite values"),
     (None, "seconds nan")],
)
def test_save_refuses_a_non_finite_state(tmp_path, where, what):
    cfg, st = _state()
    p = tmp_path / "c.safetensors"
    ckpt.save(p, cfg, _infos(3), st, 5.0)  # the last good checkpoint
    good = p.read_bytes()
    bad = jax.tree.map(np.array, jax.device_get(st))  # writable host copies
    seconds = 6.0
    if where is None:
        seconds = float("nan")
    else:
        bad[where[0]][where[1]][1, 2] = np.nan
    with pytest.raises(NeurimgError) as e:
        ckpt.save(p, cfg, _infos(3), bad, seconds)
    assert e.value.exit_code == 1
    assert str(e.value) == f"refusing to save a non-finite training state to {p} ({what})"
    assert p.read_bytes() == good and [q.name for q in tmp_path.iterdir()] == ["c.safetensors"]
    assert ckpt.load(p).seconds == 5.0
