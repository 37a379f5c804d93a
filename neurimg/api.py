"""Importable entry points: load a fitted run and render from it.

    from neurimg.api import load_run
    run = load_run("runs/logos")
    img = run.render("vite-icon.png", scale=4)      # uint8 (H, W, 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from neurimg import checkpoint as ckpt
from neurimg import siren
from neurimg.config import Config
from neurimg.coords import output_size
from neurimg.errors import NeurimgError, count
from neurimg.render import GridEvaluator, siren_field


@dataclass
class StoredRun:
    """A fitted run loaded for rendering (parameters only)."""

    config: Config
    images: list[ckpt.ImageInfo]
    step: int
    params: Any
    evaluator: GridEvaluator

    def find(self, key: str | int) -> int:
        """Index of a stored image given its name (with or without suffix) or its index."""
        names = [i.name for i in self.images]
        k = str(key)
        if k in names:
            return names.index(k)
        stems = [n.rsplit(".", 1)[0] for n in names]
        if k in stems:
            return stems.index(k)
        try:
            idx = int(k)
        except ValueError:
            raise NeurimgError(f"no image named {k!r} in this run (it holds {_list(names)})") from None
        if not 0 <= idx < len(names):
            raise NeurimgError(f"image index {idx} is out of range (this run holds {count(len(names), 'image')})")
        return idx

    def find_pair(self, text: str, option: str = "--mix") -> tuple[int, int]:
        """Two stored images from 'A,B' (names or indices; a name may itself hold commas: the
        first split at which both sides name stored images wins)."""
        parts = text.split(",")
        for cut in range(1, len(parts)):
            a, b = ",".join(parts[:cut]), ",".join(parts[cut:])
            try:
                return self.find(a), self.find(b)
            except NeurimgError:
                continue
        if len(parts) == 2:
            self.find(parts[0]), self.find(parts[1])  # names the one that is missing
        raise NeurimgError(f"{option} must name two stored images as A,B, got {text!r}")

    def output_size(self, index: int, scale=None, size=None, region=None) -> tuple[int, int]:
        info = self.images[index]
        return output_size(info.width, info.height, region, scale, size)

    def render_index(self, index: int, out_size: tuple[int, int] | None = None, region=None, dtype=np.uint8) -> np.ndarray:
        """Image `index` over `region` (pixel units of the original; default all of it) on an
        out_size = (W', H') grid (default the original size): (H', W', 3) `dtype`."""
        info = self.images[index]
        return self.evaluator.grid(self.params, (info.width, info.height), out_size, region, image_id=index, dtype=dtype)

    def render_latent(self, z: np.ndarray, src_size: tuple[int, int], out_size=None, region=None, dtype=np.uint8) -> np.ndarray:
        """The field at latent z (latent_dim,), e.g. `fieldnet.mix_latents` of two stored
        images, on the grid of a `src_size` = (W, H) image, as `render_index`."""
        params = {**self.params, "latents": jax.numpy.asarray(np.asarray(z, np.float32).reshape(1, -1))}
        return self.evaluator.grid(params, src_size, out_size, region, image_id=0, dtype=dtype)

    def latent(self, index: int) -> np.ndarray:
        """Stored image `index`'s latent (latent_dim,) float32."""
        return np.asarray(self.params["latents"][index], np.float32)

    def render(self, key: str | int, scale=None, size=None, region=None) -> np.ndarray:
        """Stored image `key` (name or index) at `scale` or `size`, optionally cropped: uint8."""
        i = self.find(key)
        return self.render_index(i, self.output_size(i, scale, size, region), region)


def _list(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_run(path: str) -> StoredRun:
    """Load a run folder or checkpoint file for rendering: only its parameters are read."""
    c = ckpt.load(path, only="params")
    n = len(c.images)
    if n < 1:
        raise NeurimgError(f"{path}: damaged checkpoint (no images)")
    graphdef, shapes = _graphdef_and_shapes(c.config, n)
    params = jax.tree.map(jax.numpy.asarray, c.fill({"params": shapes})["params"])
    return StoredRun(c.config, c.images, c.step, params, GridEvaluator(siren_field(graphdef), supersample=c.config.train.supersample))


def _graphdef_and_shapes(cfg: Config, n: int):
    from flax import nnx

    abstract_model = nnx.eval_shape(lambda: siren.ModulatedSiren(cfg.model, n, seed=0))
    graphdef, state = nnx.split(abstract_model)
    return graphdef, nnx.to_pure_dict(state)
