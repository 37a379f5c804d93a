"""Training batches, drawn on the host from an `ImageSet` and sent to the devices.

A step trains on K image slots with P points each. This process fills `slots` of them
(K / process count) from its own images; padded slots and points carry zero weight. One step's
batch, as NumPy arrays:

    slot    (slots,)       int32   the image's index in the run (its latent row); `num_images`
                                   (out of range) for a padding slot
    coords  (slots, P, S, 2) float32 where the field is evaluated (`neurimg.coords` convention):
                                   S points per entry (see "Observation" below)
    colors  (slots, P, S, 3) uint8 | uint16, the store's integers (divide by `ImageSet.scale`):
                                   an area entry's pixel at [..., 0, :], a point entry's S pixels
    weight  (slots, P, S)  float32 an area entry's weight at [..., 0], a point entry's per point;
                                   0 for padding
    area    (slots, P)     float32 1 where the entry's S points observe one pixel as their mean,
                                   0 where they are S flat pixels, one point each
    denom   (slots,)       float32 3 x the image's pixel observations in this batch (MSE denominator)
    valid   (slots,)       float32 1 for a real slot, 0 for padding

`Sampler.batches(start, n, size)` stacks the batches of steps start .. start+n-1 along a new
leading axis of length `size` (steps beyond n are zeros, never used).

Which pixels: with `batch_pixels` = 0 ("all") every pixel of each chosen image; otherwise
P = batch_pixels / K pixels per image, so every image in the step weighs the same. Uniform draws
(`edge_share` 0, or edge sampling's fallback) are without replacement: no pixel twice in a
step, or when P exceeds an image's n pixels each of them floor(P / n) or ceil(P / n) times
(on a constructed sharp image, draws with replacement cost upsample's area fit 1.2-1.6 dB at 4x;
bench/RESULTS.md, "One trainer"). With `edge_share` s > 0 (the default,
`TrainConfig.edge_share`) pixel i of an image of n pixels is drawn, with replacement, with
probability

    q_i = (1 - s) / n + s * g_i / sum(g)       g: the target's gradient magnitude (`edge_map`)

and weighs 1 / (n q_i) in the loss (importance sampling: the expected loss is still the
image's MSE, and a weight is at most 1 / (1 - s)). Edges, where a field's error concentrates,
get more of the points; flat areas are still drawn. s = 0 is uniform sampling.

Observation: with `supersample` m = 1 a pixel is its centre's value (S = 1); with m > 1 it is
the average of the field over its square (how pixels are formed), estimated by an m x m
lattice of points, one at the centre of each sub-square: point (a, b) at ((a + 0.5) / m,
(b + 0.5) / m) of the pixel, the same every step. The loss compares their mean with the pixel,
so the field learns the sharp image whose pixel averages are the input. The lattice is not
jittered: a fresh random offset per step makes the m^2-point mean a noisy estimate, and its
variance, part of the expected loss, penalises any edge inside a sub-square, which blurs the
sharp image (4 unseen icons at 4x: +6.4 dB over bicubic jittered, +10.4 fixed;
bench/RESULTS.md, "upsample through the field trainer"). With `boundary`, the lattice
goes on one step into the next pixel to the right (m points, a = m) and below (m points,
b = m), so a prior on neighbouring points also sees the pairs across the pixel's edges:
S = m^2 + 2m, laid out as the m x m lattice (row-major), then the right column (b = 0..m-1),
then the bottom row (a = 0..m-1).

Detail pixels (`area_pixels` "detail", with m > 1): only pixels that differ from one of their
8 neighbours (`detail_mask`) are observed as areas. Elsewhere the sharp image is flat across the
pixel, so its value at any point of the pixel is the pixel's, and one entry holds S such pixels,
each at a point drawn uniformly in its square afresh every step (area 0; so a full batch is
drawn every step too, `Plan.redrawn`), instead of one pixel's S sub-points. The
draw is exact there, and it pins the field between pixel centres too (observed at centres
only, a flat area was free to ripple between them: 48 logos lost 6-18 dB each, rendered as
areas). On logos, where a fifth to a third of the pixels have
detail, a step's points cover 2-3x the pixels. A minibatch gives each image's detail pixels
P_d = P S d / (S d + f) of its P entries (d detail and f flat pixels: each pixel equally likely to
be seen), each stratum drawn uniformly without replacement, and weights each stratum by its share
of the image (d / n, f / n), so the expected loss is still the image's MSE. A full batch holds
every pixel once.

Which images: every image every step when K covers them all; otherwise the images go round in
epochs of a random order, so each is seen equally often.
Draws depend only on (seed, step, process), so a resumed run draws what the uninterrupted one
would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurimg.imageset import ImageSet

# Edge sampling keeps a float64 cumulative table of all this process's pixels (8 bytes each);
# above this many pixels it falls back to uniform sampling (bench/RESULTS.md, "time to quality").
EDGE_MAX_PIXELS = 1 << 24

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
    redrawn: bool = False  # drawn afresh every step even when full (area_pixels "detail": the flat pixels' points)

    @property
    def static(self) -> bool:
        """The same batch every step: it is sent to the devices once."""
        return self.full and self.every_image and not self.redrawn


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


def edge_map(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) colours -> (H, W) float64 gradient magnitude: the Euclidean norm over channels
    of the central differences (one-sided at the borders; zero along an axis of length 1)."""
    x = np.asarray(rgb, np.float64)
    sq = np.zeros(x.shape[:2])
    for axis in (0, 1):
        if x.shape[axis] > 1:
            sq += np.square(np.gradient(x, axis=axis)).sum(-1)
    return np.sqrt(sq)


DETAIL_LEVEL = 1.5 / 255  # a pixel has detail where a neighbour differs by more than this (`detail_mask`)


def detail_mask(rgb: np.ndarray, level: float = DETAIL_LEVEL) -> np.ndarray:
    """(H, W, 3) colours -> (H, W) bool: the pixels that differ from at least one of their 8
    neighbours by more than `level` in some channel (uint8 rounding alone never does). The others
    sit in a flat patch of at least 3 x 3 pixels, where the sharp image is flat across the pixel."""
    x = np.asarray(rgb, np.float32)
    h, w = x.shape[:2]
    pad = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                out |= np.abs(pad[dy : dy + h, dx : dx + w] - x).max(-1) > level
    return out


def detail_split(entries: int, s: int, nd: int, nf: int) -> tuple[int, int]:
    """(area entries, point entries) of a minibatch slot of `entries` entries of S = `s`
    points, for an image of `nd` detail and `nf` flat pixels: each pixel equally likely to be
    seen (P_d = P S d / (S d + f), rounded), at least one entry for a stratum that has pixels.
    It observes pd + S pf pixels."""
    pd = int(round(entries * s * nd / max(s * nd + nf, 1)))
    pd = min(max(pd, 1 if nd else 0), entries - (1 if nf and entries > 1 else 0))
    return pd, (entries - pd if nf else 0)


def edge_table(images: ImageSet, share: float) -> np.ndarray | None:
    """The cumulative sampling table of edge sampling (see the module docstring): float64, one
    entry per pixel of `images` in store order, image k's entries rising from k to k + 1; None
    when there is nothing to gain (share 0) or the table would be too large (EDGE_MAX_PIXELS)."""
    total = int(images.counts.sum())
    if share <= 0 or total > EDGE_MAX_PIXELS or total == 0:
        return None
    table = np.empty(total, np.float64)
    for k in range(len(images)):
        g = edge_map(images.image(k)).reshape(-1)
        n = g.size
        s = g.sum()
        q = np.full(n, 1.0 / n) if s <= 0 else (1.0 - share) / n + share * g / s
        off = int(images.offsets[k])
        np.cumsum(q, out=table[off : off + n])
        table[off : off + n] *= 1.0 / table[off + n - 1]  # exactly 1 at the end
        table[off : off + n] += k
    return table


def _distinct(rng: np.random.Generator, n: int, p: int) -> np.ndarray:
    """p indices into n pixels without replacement, (p,) int64; for p > n, whole permutations
    one after another (each pixel floor(p / n) or ceil(p / n) times)."""
    if p <= n:
        return rng.choice(n, p, replace=False)
    return np.concatenate([rng.permutation(n) for _ in range(-(-p // n))])[:p]


class Sampler:
    """Draws this process's part of each step's batch (see the module docstring)."""

    def __init__(
        self,
        images: ImageSet,
        plan: Plan,
        num_images: int,
        seed: int,
        process: tuple[int, int] = (0, 1),
        edge_share: float = 0.0,
        supersample: int = 1,
        boundary: bool = False,
        detail: bool = False,
    ):
        self.images = images
        self.plan = plan
        self.m = int(supersample)
        self.boundary = bool(boundary) and self.m > 1
        self.detail = detail and self.m > 1
        self.points_per_pixel = self.m * self.m + (2 * self.m if self.boundary else 0)
        self.num_images = num_images
        self.seed = int(seed)
        self.process_index, self.process_count = process
        self.slots = plan.images // self.process_count
        self.counts = images.counts
        self.widths = images.sizes[:, 0]
        self._epoch = (-1, None)
        # 32-bit draws where they are exact: float32 has 24 bits, enough to pick any pixel
        # uniformly in images of fewer than 2^24 pixels
        small = int(self.counts.max()) < (1 << 24)
        self._float = np.float32 if small else np.float64
        self._int = np.int32 if small else np.int64
        self._offsets = self._subpoints() if self.m > 1 else None  # the same every step: made once
        self._static = None
        self.edges = None if plan.full or self.detail else edge_table(images, edge_share)
        self._strata = self._detail_strata() if self.detail else None
        if plan.static and not self.detail:  # (a detail fit redraws its flat points: `Plan.redrawn`)
            self._static = self.batch(0)

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

    # -- steps -------------------------------------------------------------------------------
    def _empty(self, size: int) -> dict[str, np.ndarray]:
        k, p = self.slots, self.plan.points
        return {
            "slot": np.full((size, k), self.num_images, np.int32),
            "coords": np.zeros((size, k, p, self.points_per_pixel, 2), np.float32),
            "colors": np.zeros((size, k, p, self.points_per_pixel, 3), self.images.store.dtype),
            "weight": np.zeros((size, k, p, self.points_per_pixel), np.float32),
            "area": np.zeros((size, k, p), np.float32),
            "denom": np.full((size, k), 3.0, np.float32),
            "valid": np.zeros((size, k), np.float32),
        }

    def _draw(self, step: int, out: dict[str, np.ndarray]) -> None:
        """Write the batch of `step` into `out` (views of one step, as `_empty` made them).

        Step by step rather than a call's steps at once: the temporaries then stay in cache
        (drawing 32 steps at once was slower), and 32-bit arithmetic halves their traffic."""
        p = self.plan.points
        local = self._images_of(step)
        m = len(local)
        counts = self.counts[local][:, None]
        w = self.widths[local][:, None]
        out["slot"][:m] = local + self.images.first_id
        out["valid"][:m] = 1.0
        if self.detail:
            self._draw_detail(step, local, out)
            return
        if self.plan.full:
            idx = np.broadcast_to(np.arange(p, dtype=self._int), (m, p))
            real = idx < counts
            idx = np.where(real, idx, 0)
            out["weight"][:m, :, 0] = real
            out["denom"][:m] = 3.0 * counts[:, 0]
        else:
            real_p = self.plan.drawn  # the rest, up to p, is padding of zero weight
            rng = np.random.default_rng([self.seed, 2, step, self.process_index])
            if self.edges is None:
                idx = np.stack([_distinct(rng, int(n), real_p) for n in counts[:, 0]]).astype(self._int)
                out["weight"][:m, :real_p, 0] = 1.0
            else:
                idx, out["weight"][:m, :real_p, 0] = self._draw_edges(local, rng.random((m, real_p), dtype=self._float))
            out["denom"][:m] = 3.0 * real_p
            if p > real_p:
                idx = np.pad(idx, ((0, 0), (0, p - real_p)))
        out["area"][:m] = 1.0
        row, col = np.divmod(idx, w)
        inv = (1.0 / w).astype(self._float)
        if self.m == 1:  # the pixel centre
            out["coords"][:m, :, 0, 0] = (2 * col + 1 - w) * inv
            out["coords"][:m, :, 0, 1] = (2 * row + 1 - counts // w) * inv
        else:
            su, sv = self._offsets  # (1, 1, S) offsets in [0, 1) of a pixel
            out["coords"][:m, :, :, 0] = (2 * (col[..., None] + su) - w[..., None]) * inv[..., None]
            out["coords"][:m, :, :, 1] = (2 * (row[..., None] + sv) - (counts // w)[..., None]) * inv[..., None]
        out["colors"][:m, :, 0] = self.images.store[self.images.offsets[local][:, None] + idx]

    def _detail_strata(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per local image, its detail and its flat pixels' indices (`detail_mask`)."""
        out = []
        for k in range(len(self.images)):
            mask = detail_mask(self.images.image(k)).reshape(-1)
            out.append((np.flatnonzero(mask).astype(self._int), np.flatnonzero(~mask).astype(self._int)))
        return out

    def detail_counts(self) -> np.ndarray:
        """(N, 2) int64: each local image's detail and flat pixels (`detail_mask`); a detail
        sampler only."""
        return np.array([(len(d), len(f)) for d, f in self._strata], np.int64).reshape(-1, 2)

    def _draw_detail(self, step: int, local: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """`_draw` with area observation on detail pixels only (see the module docstring)."""
        s = self.points_per_pixel
        su, sv = self._offsets[0][0, 0], self._offsets[1][0, 0]  # (S,) a pixel's sub-points
        rng = np.random.default_rng([self.seed, 2, step, self.process_index])
        for i, k in enumerate(local):
            det, flat = self._strata[k]
            nd, nf = len(det), len(flat)
            if self.plan.full:
                pd, pf = nd, -(-nf // s)
                f_idx = np.pad(flat, (0, pf * s - nf))
                wa, wc = 1.0, (np.arange(pf * s) < nf).astype(np.float32)
                obs = nd + nf
                d_idx = det
            else:
                q = self.plan.drawn
                pd, pf = detail_split(q, s, nd, nf)
                d_idx = det[_distinct(rng, nd, pd)] if pd else det[:0]
                f_idx = flat[_distinct(rng, nf, pf * s)] if pf else flat[:0]
                obs = pd + pf * s
                n = nd + nf
                wa = nd / n * obs / max(pd, 1)
                wc = nf / n * obs / max(pf * s, 1)
            pix = np.empty((pd + pf, s), self._int)
            pix[:pd] = d_idx[:, None]
            pix[pd:] = f_idx.reshape(pf, s)
            u = np.empty((pd + pf, s), self._float)
            v = np.empty((pd + pf, s), self._float)
            u[:pd], v[:pd] = su, sv
            u[pd:], v[pd:] = rng.random((2, pf, s), dtype=self._float)  # anywhere in a flat pixel: its value is the same
            width = int(self.widths[k])
            height = int(self.counts[k]) // width
            row, col = np.divmod(pix, width)
            inv = np.float32(1.0 / width)
            e = pd + pf
            out["coords"][i, :e, :, 0] = (2 * (col + u) - width) * inv
            out["coords"][i, :e, :, 1] = (2 * (row + v) - height) * inv
            store = self.images.store[int(self.images.offsets[k]) :]
            out["colors"][i, :pd, 0] = store[d_idx]
            out["colors"][i, pd:e] = store[pix[pd:]]
            out["weight"][i, :pd, 0] = wa
            out["weight"][i, pd:e] = np.reshape(wc, (-1, s)) if np.ndim(wc) else wc
            out["area"][i, :pd] = 1.0
            out["denom"][i] = 3.0 * obs

    def _subpoints(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (u across, v down) of a pixel's S observation points in [0, 1) of the pixel
        (the next pixel's for the boundary), (1, 1, S): the sub-squares' centres (see the
        module docstring)."""
        k = self.m
        a, b = np.arange(k * k) % k, np.arange(k * k) // k  # the lattice, row-major
        if self.boundary:
            a = np.concatenate([a, np.full(k, k), np.arange(k)])  # then the right column, the bottom row
            b = np.concatenate([b, np.arange(k), np.full(k, k)])
        return ((a + 0.5) / k)[None, None].astype(self._float), ((b + 0.5) / k)[None, None].astype(self._float)

    def _draw_edges(self, local: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel indices within each image (m, P) and their importance weights 1 / (n q)."""
        t = self.edges
        offsets = self.images.offsets[local].astype(np.int64)[:, None]
        counts = self.counts[local].astype(np.int64)[:, None]
        u = np.sort(u, axis=1)  # the draws are iid: sorted keys make the table lookups cache-friendly
        key = local[:, None] + u.astype(np.float64)
        g = np.searchsorted(t, key, side="right")
        np.clip(g, offsets, offsets + counts - 1, out=g)
        below = np.where(g > offsets, t[np.maximum(g - 1, 0)], local[:, None].astype(np.float64))
        q = t[g] - below
        w = 1.0 / np.maximum(q * counts, 1e-12)
        return (g - offsets).astype(self._int), w

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """One step's batch (see the module docstring)."""
        if self._static is not None:
            return self._static
        return {key: v[0] for key, v in self.batches(step, 1, 1).items()}

    def batches(self, start: int, n: int, size: int) -> dict[str, np.ndarray]:
        """Steps start .. start+n-1 stacked on a leading axis of length `size` >= n."""
        out = self._empty(size)
        for i in range(n):
            if self._static is not None:
                for key, v in self._static.items():
                    out[key][i] = v
            else:
                self._draw(start + i, {key: v[i] for key, v in out.items()})
        return out
