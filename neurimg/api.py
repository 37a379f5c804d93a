"""Importable entry points: load a fitted run and render from it.

    from neurimg.api import load_run
    m = load_run("runs/logos")
    img = m.render("vite-icon.png", scale=4)      # uint8 (H, W, 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from neurimg import checkpoint as ckpt
from neurimg import siren
from neurimg.config import Config
from neurimg.coords import output_size
from neurimg.errors import NeurimgError
from neurimg.render import Renderer


@dataclass
class FittedRun:
    config: Config
    images: list[ckpt.ImageInfo]
    step: int
    renderer: Renderer

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
            raise NeurimgError(f"image index {idx} is out of range (this run holds {len(names)} images)")
        return idx

    def render(self, key: str | int, scale=None, size=None, region=None) -> np.ndarray:
        i = self.find(key)
        info = self.images[i]
        ow, oh = output_size(info.width, info.height, region, scale, size)
        return self.renderer.render(i, (info.width, info.height), (ow, oh), region)


def _list(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def load_run(path: str) -> FittedRun:
    """Load a run folder or checkpoint file for rendering (parameters only)."""
    c = ckpt.load(path)
    cfg = c.config
    try:
        cfg.model.validate()
    except NeurimgError as e:
        raise NeurimgError(f"{path}: damaged checkpoint ({e})") from e
    n = len(c.images)
    if n < 1:
        raise NeurimgError(f"{path}: damaged checkpoint (no images)")
    graphdef, shapes = _graphdef_and_shapes(cfg, n)
    params = c.fill({"params": shapes})["params"]
    params = jax.tree.map(jax.numpy.asarray, params)
    return FittedRun(cfg, c.images, c.step, Renderer(cfg.model, graphdef, params))


def _graphdef_and_shapes(cfg: Config, n: int):
    from flax import nnx

    abstract_model = nnx.eval_shape(lambda: siren.ModulatedSiren(cfg.model, n, seed=0))
    graphdef, state = nnx.split(abstract_model)
    return graphdef, nnx.to_pure_dict(state)
