"""Shared by the benchmarks: the training step of `neurimg fit`, set up the way fit sets it up."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from neurimg import engine, parallel, sampler, train  # noqa: E402
from neurimg.config import WIDTH, Config  # noqa: E402
from neurimg.fit import STREAM_STEPS, _pad_tables  # noqa: E402
from neurimg.imageset import ImageSet  # noqa: E402


class Trainer:
    """`fit`'s training step for float images: `run(state, start, n)` draws the batches of steps
    start .. start+n-1 on the host, sends them and runs n steps (n <= `max_steps`)."""

    def __init__(self, cfg: Config, images: list[np.ndarray] | ImageSet, devices: int = 1,
                 chunk_points: int = train.CHUNK_POINTS, replicated: bool = False):
        if not isinstance(images, ImageSet):
            images = ImageSet.from_arrays([str(k) for k in range(len(images))], ["-"] * len(images), images)
        self.images = images
        # this trainer samples pixel centres, at fit's centre width unless one is given
        t = cfg.train if cfg.train.supersample is not None else dataclasses.replace(cfg.train, supersample=1)
        model = cfg.model if cfg.model.width is not None else dataclasses.replace(cfg.model, width=WIDTH)
        cfg = Config(model, t)
        plan = sampler.plan_batches(images.sizes, t.batch_pixels, t.batch_images)
        self.layout = parallel.make_layout(jax.local_devices()[:devices], plan.images)
        self.plan = sampler.plan_batches(images.sizes, t.batch_pixels, t.batch_images, point_multiple=self.layout.shape[1])
        cfg = Config(cfg.model, t.resolved(int(images.counts.sum()), len(images), self.plan.drawn))  # auto lr and steps as fit
        t = cfg.train
        self.cfg = cfg
        self.draw = sampler.Sampler(images, self.plan, len(images), t.seed, edge_share=t.edge_share)
        self.size = 1 if self.plan.static else STREAM_STEPS
        self.max_steps = engine.MAX_CHUNK if self.plan.static else STREAM_STEPS
        self.graphdef, st = train.init_state(cfg, len(images))
        # as fit: per-image tables split over "images" (or, to compare, replicated)
        self.fresh = _pad_tables(jax.device_get(st), self.layout.pad_rows(len(images)))
        self.sharding = None if replicated else self.layout.state_sharding(self.fresh)
        t0 = time.perf_counter()
        b = self._batches(0, 1)
        self.fn = train.make_runner(cfg, self.graphdef, self.layout, images.scale, chunk_points, self.sharding).lower(
            self.init(), b).compile()
        self.compile_seconds = time.perf_counter() - t0
        self._static = b if self.plan.static else None

    def init(self):
        if self.sharding is None:
            return self.layout.put_replicated(self.fresh)
        return self.layout.put(self.fresh, self.sharding)

    def _batches(self, start, n):
        return self.layout.put_batch(self.draw.batches(start, 1 if self.plan.static else n, self.size))

    @property
    def points_per_step(self) -> int:
        return self.plan.images * self.plan.drawn

    def run(self, state, start: int, n: int):
        b = self._static if self._static is not None else self._batches(start, n)
        return self.fn(state, b, jnp.int32(n))
