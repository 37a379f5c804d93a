"""Training batches, drawn on the host from an `ImageSet` and sent to the devices.

A step trains on K image slots with P points each. This process fills `slots` of them
(K / process count) from its own images; padded slots and points carry zero weight. One step's
batch, as NumPy arrays:

    slot    (slots,)       int32   the image's index in the run (its latent row); `num_images`
                                   (out of range) for a padding slot
    coords  (slots, P, 2)  float32 pixel-centre coordinates (`neurimg.coords` convention)
    colors  (slots, P, 3)  uint8 | uint16, the store's integers (divide by `ImageSet.scale`)
    weight  (slots, P)     float32 1 for a real point, 0 for padding
    denom   (slots,)       float32 3 x the image's real points in this batch (MSE denominator)
    valid   (slots,)       float32 1 for a real slot, 0 for padding

`Sampler.batches(start, n, size)` stacks the batches of steps start .. start+n-1 along a new
leading axis of length `size` (steps beyond n are zeros, never used).

Which pixels: with `batch_pixels` = 0 ("all") every pixel of each chosen image; otherwise
P = batch_pixels / K pixels per image, uniformly at random with replacement, so every image in
the step weighs the same. Which images: every image every step when K covers them all;
otherwise the images go round in epochs of a random order, so each is seen equally often.
Draws depend only on (seed, step, process), so a resumed run draws what the uninterrupted one
would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurimg.imageset import ImageSet

# Batch sizes chosen when --batch-images is automatic:
MIN_POINTS_PER_IMAGE = 64  # a minibatch gives each image at least this many pixels
FULL_BATCH_POINTS = 1 << 20  # a full batch holds at most this many points (unless one image is larger)


@dataclass(frozen=True)
class Plan:
    """The shape of every step's batch (global, over all processes)."""

    images: int  # K: image slots per step, a multiple of the process count
    points: int  # P: points per slot (padded to a multiple of `point_multiple`)
    drawn: int  # points per slot before that padding (a minibatch draws this many per image)
    full: bool  # every pixel of each image
    every_image: bool  # every image is in every step

    @property
    def static(self) -> bool:
        """The same batch every step: it is sent to the devices once."""
        return self.full and self.every_image


def plan_batches(
    sizes: np.ndarray,
    batch_pixels: int,
    batch_images: int,
    processes: int = 1,
    local_counts: list[int] | None = None,
    point_multiple: int = 1,
) -> Plan:
    """Choose K and P for a run of images of `sizes` ((N, 2) width, height, all processes).

    `batch_images` -1 means all images, 0 automatic: all images if that leaves at least
    MIN_POINTS_PER_IMAGE pixels each (or, for a full batch, at most FULL_BATCH_POINTS points),
    else as many as do. `local_counts` are the images each process holds."""
    n = len(sizes)
    counts = sizes[:, 0].astype(np.int64) * sizes[:, 1]
    pmax = int(counts.max())
    full = batch_pixels == 0
    if batch_images < 0:
        batch_images = n
    elif batch_images == 0:
        per = pmax if full else MIN_POINTS_PER_IMAGE
        budget = FULL_BATCH_POINTS if full else batch_pixels
        batch_images = max(1, min(n, budget // per))
    k = min(batch_images, n)
    local_counts = local_counts or [n]
    slots = -(-k // processes)  # per process
    slots = min(slots, max(local_counts))
    every = all(slots >= c for c in local_counts)
    if full:
        p = pmax
    else:
        p = max(1, batch_pixels // (slots * processes))
        if p >= pmax and every:  # asked for more pixels than there are: all of them
            full, p = True, pmax
    padded = -(-p // point_multiple) * point_multiple
    return Plan(images=slots * processes, points=padded, drawn=p, full=full, every_image=every)


class Sampler:
    """Draws this process's part of each step's batch (see the module docstring)."""

    def __init__(self, images: ImageSet, plan: Plan, num_images: int, seed: int, process: tuple[int, int] = (0, 1)):
        self.images = images
        self.plan = plan
        self.num_images = num_images
        self.seed = int(seed)
        self.process_index, self.process_count = process
        self.slots = plan.images // self.process_count
        self.counts = images.counts
        self.widths = images.sizes[:, 0]
        self._epoch = (-1, None)
        self._static = self._draw(0) if plan.static else None

    # -- which images -------------------------------------------------------------------------
    def _images_of(self, step: int) -> np.ndarray:
        """Local indices of the images in `step` (at most `slots`)."""
        n = len(self.images)
        if self.plan.every_image:
            return np.arange(n)
        per_epoch = -(-n // self.slots)  # steps per epoch; the last may be short
        epoch, pos = divmod(step, per_epoch)
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, 1, epoch, self.process_index])
            self._epoch = (epoch, rng.permutation(n))
        return self._epoch[1][pos * self.slots : (pos + 1) * self.slots]

    # -- one step ----------------------------------------------------------------------------
    def _draw(self, step: int) -> dict[str, np.ndarray]:
        k, p = self.slots, self.plan.points
        local = self._images_of(step)
        m = len(local)
        counts = self.counts[local]
        out = {
            "slot": np.full((k,), self.num_images, np.int32),
            "coords": np.zeros((k, p, 2), np.float32),
            "colors": np.zeros((k, p, 3), self.images.store.dtype),
            "weight": np.zeros((k, p), np.float32),
            "denom": np.full((k,), 3.0, np.float32),
            "valid": np.zeros((k,), np.float32),
        }
        out["slot"][:m] = local + self.images.first_id
        out["valid"][:m] = 1.0
        if self.plan.full:
            idx = np.broadcast_to(np.arange(p), (m, p))
            real = idx < counts[:, None]
            idx = np.where(real, idx, 0)
            out["weight"][:m] = real
            out["denom"][:m] = 3.0 * counts
        else:
            real_p = self.plan.drawn  # the rest, up to p, is padding of zero weight
            rng = np.random.default_rng([self.seed, 2, step, self.process_index])
            u = rng.random((m, real_p))
            idx = np.minimum((u * counts[:, None]).astype(np.int64), counts[:, None] - 1)
            out["weight"][:m, :real_p] = 1.0
            out["denom"][:m] = 3.0 * real_p
            idx = np.pad(idx, ((0, 0), (0, p - real_p)))
        w = self.widths[local][:, None]
        h = counts[:, None] // w
        row, col = np.divmod(idx, w)  # integer division: much faster than on floats
        wf = w.astype(np.float64)
        out["coords"][:m, :, 0] = (2 * col + 1 - w) / wf
        out["coords"][:m, :, 1] = (2 * row + 1 - h) / wf
        out["colors"][:m] = self.images.store[self.images.offsets[local][:, None] + idx]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self._static if self._static is not None else self._draw(step)

    def batches(self, start: int, n: int, size: int) -> dict[str, np.ndarray]:
        """Steps start .. start+n-1 stacked on a leading axis of length `size` >= n."""
        first = self.batch(start)
        out = {k: np.zeros((size,) + v.shape, v.dtype) for k, v in first.items()}
        for i in range(n):
            b = first if i == 0 else self.batch(start + i)
            for k, v in b.items():
                out[k][i] = v
        return out
