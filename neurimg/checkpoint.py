"""Single-file, pickle-free checkpoints (safetensors).

A checkpoint is one `.safetensors` file: raw little-endian arrays plus a string-to-string
metadata header. Loading parses a JSON header and copies bytes; no code can run, unlike pickle.
The metadata is checked before any tensor is read, then the tensors are read once from a
memory map (only those wanted are kept: rendering needs no optimizer state).

Nothing that is not finite is stored or used: `save` refuses a training state holding a NaN or
an infinity (so "the last good checkpoint" is good), and `load` refuses, as damaged, a file
whose floating tensors (all of them, kept or not), metadata numbers or stored config are not
finite, or whose config does not validate (a w0 past `config.MAX_W0` makes every output NaN).

Contents:
- tensors: every leaf of the training state {params, opt, step} (see `neurimg.train`), named by
  its pytree path (e.g. `params['layers'][0]['kernel']`, `opt['latent_mu']`);
- metadata: `format` ("neurimg-checkpoint"), `version`, `kind` (what trained it: "fit", a
  `Config`, or "blendgan", a `GanConfig`; absent means "fit"), `config` (the full config as JSON),
  `images` (JSON list of {name, source, width, height}), `step`, `seconds` (training time so far),
  and `x-KEY` for each entry of the caller's `extra` strings.

Files are written to a temporary file in the same folder and renamed into place, so a crash
or Ctrl-C while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from neurimg.config import Config, GanConfig
from neurimg.data import atomic_write_bytes
from neurimg.errors import NeurimgError, missing

FORMAT = "neurimg-checkpoint"
VERSION = 2  # 2: lazy-Adam latent state, no RNG key (host-side sampling); 1 still renders
READABLE_VERSIONS = (1, 2)
FILENAME = "checkpoint.safetensors"
EXTRA_PREFIX = "x-"
MAX_SIDE = 1 << 20  # widest or tallest image a checkpoint may describe
FLOAT_DTYPES = ("F16", "F32", "F64")  # the floating safetensors dtypes numpy reads: checked finite
# What trained a checkpoint: its config class, and how an error names it.
KINDS = {"fit": (Config, "a fitted run (neurimg fit)"), "blendgan": (GanConfig, "a GAN blender (neurimg blend-train)")}


def kind_of(config: Config | GanConfig) -> str:
    return next(k for k, (cls, _) in KINDS.items() if isinstance(config, cls))


@dataclass
class ImageInfo:
    name: str
    source: str
    width: int
    height: int


@dataclass
class Checkpoint:
    config: Config | GanConfig  # by `kind`
    images: list[ImageInfo]
    step: int
    seconds: float
    tensors: dict[str, np.ndarray]  # flat, by pytree path
    version: int = VERSION
    extra: dict[str, str] = field(default_factory=dict)  # the `extra` given to `save`
    kind: str = "fit"

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
    config: Config | GanConfig,
    images: list[ImageInfo],
    state: dict[str, Any],
    seconds: float,
    extra: dict[str, str] | None = None,
) -> None:
    """Write the training state and everything needed to continue or render, atomically.

    `extra` holds the caller's own strings (e.g. JSON), given back by `load` as `.extra`."""
    from safetensors.numpy import save as st_save

    host = jax.device_get(state)
    flat, _ = jax.tree_util.tree_flatten_with_path(host)
    tensors = {_key(p): np.array(v, order="C", copy=True) for p, v in flat}  # keeps 0-d shapes
    bad = next(((k, n) for k, a in tensors.items() if (n := _non_finite(a))), None)
    if bad is not None or not math.isfinite(seconds):
        what = f"tensor {bad[0]} has {bad[1]} non-finite values" if bad is not None else f"seconds {seconds}"
        raise NeurimgError(f"refusing to save a non-finite training state to {path} ({what})", exit_code=1)
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": kind_of(config),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "images": json.dumps([i.__dict__ for i in images]),
        "step": str(int(host["step"])),
        "seconds": repr(float(seconds)),
    }
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"checkpoint extra entries must be str -> str, got {k!r}: {type(v).__name__}")
        meta[EXTRA_PREFIX + k] = v
    try:
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
    except OSError as e:
        raise NeurimgError(f"{path}: cannot write checkpoint ({e.strerror or e})", exit_code=1) from e


def load(path: str | os.PathLike, only: str | None = None, kind: str = "fit") -> Checkpoint:
    """Read a checkpoint file, or a run folder holding one; validate what it claims to be,
    `kind` among it (see KINDS).

    `only` reads just the tensors whose key starts with it (e.g. "params")."""
    p = Path(path)
    if p.is_dir():
        p = p / FILENAME
        if not p.exists():
            raise NeurimgError(f"{path}: no checkpoint in this folder (expected {FILENAME})")
    elif not p.exists():
        raise missing(path, "run folder or checkpoint file")
    if not p.is_file():  # a FIFO would block, a device never end
        raise NeurimgError(f"{p}: is not a regular file")
    try:
        meta = _read_metadata(p)
    except OSError as e:
        raise NeurimgError(f"{p}: cannot read checkpoint ({e.strerror or e})") from e
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
    stored_kind = meta.get("kind", "fit")
    if stored_kind not in KINDS:
        raise NeurimgError(f"{p}: unknown checkpoint kind {stored_kind[:40]!r}")
    if stored_kind != kind:
        raise NeurimgError(f"{path}: is {KINDS[stored_kind][1]}, not {KINDS[kind][1]}")
    try:
        config = KINDS[kind][0].from_dict(_finite_json(meta["config"], "stored config")).validate()
        images = _image_infos(_finite_json(meta["images"], "image list"))
        step = int(meta["step"])
        seconds = float(meta.get("seconds", "0"))
        if step < 0 or not (math.isfinite(seconds) and seconds >= 0):
            raise NeurimgError(f"step {step} or seconds {seconds} out of range")
        tensors = _read_tensors(p, only, step)
    except OSError as e:
        raise NeurimgError(f"{p}: cannot read checkpoint ({e.strerror or e})") from e
    except SafetensorError as e:  # e.g. a header naming bytes past the end of the file
        raise NeurimgError(f"{p}: not a readable checkpoint (damaged tensors)") from e
    except NeurimgError as e:
        raise NeurimgError(f"{p}: damaged checkpoint ({e})") from e
    except Exception as e:
        raise NeurimgError(f"{p}: damaged checkpoint metadata ({type(e).__name__})") from e
    extra = {k[len(EXTRA_PREFIX) :]: v for k, v in meta.items() if k.startswith(EXTRA_PREFIX)}
    return Checkpoint(config, images, step, seconds, tensors, version, extra, kind)


def _read_metadata(p: Path) -> dict[str, str]:
    """The safetensors header's metadata (safetensors parses and checks the header; the tensors
    are not read). A file without metadata has none: {}."""
    with safe_open(p, framework="numpy") as f:
        return f.metadata() or {}


def _finite_json(text: str, what: str) -> Any:
    """`text` parsed as JSON, refusing the NaN and Infinity literals Python's json accepts and
    numbers too large for a float (1e400 would parse as infinity)."""

    def refuse(token: str):
        raise NeurimgError(f"{what} holds a non-finite number ({token[:20]})")

    def number(token: str) -> float:
        v = float(token)
        return v if math.isfinite(v) else refuse(token)

    return json.loads(text, parse_constant=refuse, parse_float=number)


def _non_finite(a: np.ndarray) -> int:
    """How many values of `a` are NaN or infinite (0 unless it is floating): one pass, a float64
    sum (no temporary array: finite float32 values cannot overflow it), and only if that sum is
    not finite, a count."""
    if a.dtype.kind != "f" or a.size == 0 or math.isfinite(np.sum(a, dtype=np.float64)):
        return 0
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def _image_infos(entries: Any) -> list[ImageInfo]:
    """Image entries, refused unless exactly typed: `render` writes a file per name, so a name
    must not reach outside the output folder (no separators, no '..') nor repeat."""
    if not isinstance(entries, list):
        raise NeurimgError("image list is not a list")
    infos, seen = [], set()
    for d in entries:
        if not isinstance(d, dict) or set(d) != {"name", "source", "width", "height"}:
            raise NeurimgError("image entry is not {name, source, width, height}")
        name, source, w, h = d["name"], d["source"], d["width"], d["height"]
        if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise NeurimgError(f"image name {name!r} is not a plain file name")
        if name in seen:
            raise NeurimgError(f"image name {name!r} appears twice")
        if not isinstance(source, str):
            raise NeurimgError(f"image {name!r}: source is not a string")
        if not all(type(v) is int and 1 <= v <= MAX_SIDE for v in (w, h)):  # bool and float refused
            raise NeurimgError(f"image {name!r}: size {w!r}x{h!r} is not two integers in [1, {MAX_SIDE}]")
        seen.add(name)
        infos.append(ImageInfo(name, source, w, h))
    return infos


def _read_tensors(p: Path, only: str | None, step: int) -> dict[str, np.ndarray]:
    """The tensors (those whose key starts with `only`), each copied once from a memory map;
    every floating tensor, kept or not, must be finite (one not kept is read, checked and
    dropped, one at a time); a stored step tensor must agree with the metadata's step."""
    tensors = {}
    with safe_open(p, framework="numpy") as f:
        keys = list(f.keys())
        for k in keys:
            keep = only is None or k.startswith(only)
            if not (keep or f.get_slice(k).get_dtype() in FLOAT_DTYPES):
                continue  # an integer tensor not kept (step: read below) needs no reading
            a = f.get_tensor(k)
            if n := _non_finite(a):
                raise NeurimgError(f"tensor {k} has {n} non-finite values")
            if keep:
                tensors[k] = a
        stored = f.get_tensor("step") if "step" in keys else None
    if stored is not None and not (stored.ndim == 0 and stored.dtype.kind in "iu" and int(stored) == step):
        raise NeurimgError(f"step tensor {stored.dtype} {stored.shape} disagrees with step {step}")
    return tensors
