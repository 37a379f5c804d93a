"""Single-file, pickle-free checkpoints (safetensors).

A checkpoint is one `.safetensors` file: raw little-endian arrays plus a string-to-string
metadata header. Loading parses a JSON header and copies bytes; no code can run, unlike pickle.

Contents:
- tensors: every leaf of the training state {params, opt, step} (see `neurimg.train`), named by
  its pytree path (e.g. `params['layers'][0]['kernel']`, `opt['latent_mu']`);
- metadata: `format` ("neurimg-checkpoint"), `version`, `config` (the full Config as JSON),
  `images` (JSON list of {name, source, width, height}), `step`, `seconds` (training time so far).

Files are written to a temporary file in the same folder and renamed into place, so a crash
or Ctrl-C while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from neurimg.config import Config
from neurimg.data import atomic_write_bytes
from neurimg.errors import NeurimgError

FORMAT = "neurimg-checkpoint"
VERSION = 2  # 2: lazy-Adam latent state, no RNG key (host-side sampling); 1 still renders
READABLE_VERSIONS = (1, 2)
FILENAME = "checkpoint.safetensors"


@dataclass
class ImageInfo:
    name: str
    source: str
    width: int
    height: int


@dataclass
class Checkpoint:
    config: Config
    images: list[ImageInfo]
    step: int
    seconds: float
    tensors: dict[str, np.ndarray]  # flat, by pytree path
    version: int = VERSION

    def fill(self, template: dict[str, Any]) -> dict[str, Any]:
        """Return `template` (a dict pytree such as {"params": ...} with the right structure and
        shapes, e.g. from `jax.eval_shape`) filled with the stored arrays."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = []
        for path, leaf in flat:
            key = _key(path)
            if key not in self.tensors:
                raise NeurimgError(f"checkpoint is missing tensor {key} (damaged or from another version)")
            arr = self.tensors[key]
            shape, dtype = tuple(np.shape(leaf)), np.dtype(leaf.dtype)
            if arr.shape != shape or arr.dtype != dtype:
                raise NeurimgError(
                    f"checkpoint tensor {key} has shape {arr.shape} {arr.dtype}, expected {shape} {dtype}"
                )
            leaves.append(arr)
        return jax.tree_util.tree_unflatten(treedef, leaves)


def _key(path) -> str:
    # First element is the top-level dict key ('params', 'opt', ...): write it bare.
    first, rest = path[0], path[1:]
    return str(getattr(first, "key", first)) + jax.tree_util.keystr(rest)


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / FILENAME


def save(
    path: str | os.PathLike,
    config: Config,
    images: list[ImageInfo],
    state: dict[str, Any],
    seconds: float,
) -> None:
    """Write the training state and everything needed to continue or render, atomically."""
    from safetensors.numpy import save as st_save

    host = jax.device_get(state)
    flat, _ = jax.tree_util.tree_flatten_with_path(host)
    tensors = {_key(p): np.array(v, order="C", copy=True) for p, v in flat}  # keeps 0-d shapes
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "images": json.dumps([i.__dict__ for i in images]),
        "step": str(int(host["step"])),
        "seconds": repr(float(seconds)),
    }
    try:
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
    except OSError as e:
        raise NeurimgError(f"{path}: cannot write checkpoint ({e.strerror or e})", exit_code=1) from e


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file, or a run folder holding one; validate what it claims to be."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
        if not p.exists():
            raise NeurimgError(f"{path}: no checkpoint in this folder (expected {FILENAME})")
    elif not p.exists():
        raise NeurimgError(f"{path}: no such run folder or checkpoint file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise NeurimgError(f"{p}: cannot read checkpoint ({e.strerror or e})") from e
    from safetensors.numpy import load as st_load

    try:
        meta = _read_metadata(data)
        tensors = st_load(data)
    except Exception as e:
        raise NeurimgError(f"{p}: not a readable checkpoint (damaged or not a safetensors file)") from e
    if meta.get("format") != FORMAT:
        raise NeurimgError(f"{p}: not a neurimg checkpoint")
    try:
        version = int(meta.get("version", "0"))
    except ValueError:
        version = -1
    if version not in READABLE_VERSIONS:
        raise NeurimgError(f"{p}: checkpoint format version {meta.get('version')} is not supported (expected {VERSION})")
    try:
        config = Config.from_dict(json.loads(meta["config"]))
        images = [ImageInfo(**d) for d in json.loads(meta["images"])]
        step = int(meta["step"])
        seconds = float(meta.get("seconds", "0"))
    except NeurimgError as e:
        raise NeurimgError(f"{p}: damaged checkpoint ({e})") from e
    except Exception as e:
        raise NeurimgError(f"{p}: damaged checkpoint metadata ({type(e).__name__})") from e
    return Checkpoint(config, images, step, seconds, dict(tensors), version)


def _read_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise NeurimgError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data) or n > 100_000_000:
        raise NeurimgError("bad header length")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise NeurimgError("bad metadata")
    return meta
