"""Every setting of a run, with its default, in one place.

A run's `Config` is written to `RUN/config.json` and into every checkpoint. Resuming compares
the stored `ModelConfig` with the requested one and refuses a mismatch: weights of one shape
cannot continue as another.

The defaults were chosen by measurement (see `bench/RESULTS.md`): `neurimg fit` of 48 logos at
64x64 on a 2-core laptop-class CPU finishes within 300 s and reaches a mean PSNR above 33 dB.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from neurimg.errors import NeurimgError

FORMAT_VERSION = 1
MAX_W0 = 1e4  # largest SIREN frequency factor a config may hold


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the modulated SIREN (see `neurimg.siren`)."""

    width: int | None = None  # units in every sine layer; None: `auto_width`
    hidden_layers: int = 3  # hidden->hidden sine layers; the network has 1 + this many sine layers
    latent_dim: int | None = None  # per-image latent code, mapped linearly to per-layer shifts; None: `auto_latent_dim`
    w0: float = 30.0  # frequency factor of every sine layer (Sitzmann et al. 2020 use 30)
    out_channels: int = 3  # RGB
    # A latent grid per image (`neurimg.siren`, "Latent grid"): grid x grid_rows nodes of
    # grid_channels values, interpolated at each point and mapped to per-point shifts; 0 = none.
    grid: int | None = None  # nodes across the width (x in [-1, 1]); 0: no grid; None: `auto_grid`
    grid_rows: int | None = None  # nodes down; None: from the images' aspect (`for_input`)
    grid_channels: int = 32  # values per node

    @property
    def grid_size(self) -> int:
        """Latent-grid values per image (0 without a grid)."""
        return self.grid * (self.grid_rows or 0) * self.grid_channels if self.grid else 0  # None (unresolved): none

    @property
    def row_dim(self) -> int:
        """Each image's row of the latent table: its latent (latent_dim), then its grid
        (grid_rows, grid, grid_channels) row-major."""
        return int(self.latent_dim) + self.grid_size

    def for_images(self, images: int) -> "ModelConfig":
        """This config with its automatic latent size (None) chosen for `images` images."""
        if self.latent_dim is not None:
            return self
        return dataclasses.replace(self, latent_dim=auto_latent_dim(images))

    def for_input(self, sizes, area: bool = False) -> "ModelConfig":
        """This config with its automatic settings chosen for images of `sizes` ((width,
        height) each), fitted as areas (`area`: supersample > 1) or at pixel centres: the latent
        size (`for_images`), the grid (`auto_grid`) and its rows (`grid_rows_for`), the width
        (`auto_width`)."""
        cfg = self.for_images(len(sizes))
        if cfg.grid is None:
            cfg = dataclasses.replace(cfg, grid=auto_grid(sizes, cfg.grid_channels, area))
        if cfg.grid and cfg.grid_rows is None:
            cfg = dataclasses.replace(cfg, grid_rows=grid_rows_for(cfg.grid, sizes))
        if cfg.width is None:
            cfg = dataclasses.replace(cfg, width=auto_width(area, cfg.grid))
        return cfg

    def validate(self) -> None:
        if self.width is not None:
            _positive_int("width", self.width)
        if self.latent_dim is not None:
            _positive_int("latent-dim", self.latent_dim)
        if not isinstance(self.hidden_layers, int) or self.hidden_layers < 0:
            raise NeurimgError(f"--hidden-layers must be an integer >= 0, got {self.hidden_layers}")
        if (self.width or 0) > 8192:
            raise NeurimgError(f"--width {self.width} is absurdly large (at most 8192)")
        if self.hidden_layers > 64:
            raise NeurimgError(f"--hidden-layers {self.hidden_layers} is absurdly deep (at most 64)")
        if (self.latent_dim or 0) > 65536:
            raise NeurimgError(f"--latent-dim {self.latent_dim} is absurdly large (at most 65536)")
        _positive_float("w0", self.w0)
        if self.w0 > MAX_W0:
            raise NeurimgError(f"--w0 {self.w0:g} is too large (at most {MAX_W0:g}: sin(w0 x) would alias at every pixel)")
        if self.grid is not None and (not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 0 or self.grid == 1 or self.grid > MAX_GRID):
            raise NeurimgError(f"--grid must be 0 (none) or from 2 to {MAX_GRID} nodes, got {self.grid}")
        _positive_int("grid-channels", self.grid_channels)
        if self.grid_rows is not None and (not isinstance(self.grid_rows, int) or isinstance(self.grid_rows, bool) or not 2 <= self.grid_rows <= MAX_GRID):
            raise NeurimgError(f"grid_rows must be from 2 to {MAX_GRID}, got {self.grid_rows!r}")
        if self.grid_channels > 1024:
            raise NeurimgError(f"--grid-channels {self.grid_channels} is absurdly large (at most 1024)")
        if self.out_channels != 3 or isinstance(self.out_channels, bool):
            raise NeurimgError(f"out_channels must be 3 (RGB), got {self.out_channels!r}")


MAX_GRID = 4096  # latent-grid nodes along either axis


def grid_rows_for(cols: int, sizes) -> int:
    """Rows of a latent grid of `cols` nodes across the width, spaced d = 2 / (cols - 1) in both
    axes and centred on y = 0, enough to cover the tallest image (y within +-height/width):
    ceil(max height/width x (cols - 1)) + 1, at least 2."""
    aspect = max((float(h) / float(w) for w, h in sizes), default=1.0)
    return max(2, int(math.ceil(aspect * (cols - 1) - 1e-6)) + 1)


GRID_SPACING = 4  # pixels between a latent grid's nodes (`auto_grid`); AREA_GRID_SPACING for an area fit...
GRID_MAX_VALUES = 1 << 24  # ...unless the run's grids would hold more values than this (64 MB, and as much for each Adam moment)
GRID_FROM_IMAGES = 64  # a grid for more images than this (the latent alone then grows, `auto_latent_dim`)...
GRID_FROM_PIXELS = 1 << 14  # ...or for images of more pixels than this (128 x 128)


def auto_grid(sizes, channels: int, area: bool = False) -> int:
    """`fit`'s default latent grid for images of `sizes` ((width, height) each), fitted as areas
    (`area`) or at pixel centres. Fitted at centres: none for up to 64 images of up to 128 x 128
    pixels, where the shared network and the latents hold the pixels (48 logos: 46.97 dB with a
    grid at the time 46.83 takes without); otherwise nodes across the width

        round(widest width / 4) + 1, at least 2

    (17 for 64 px logos, 65 for a 256 px photo, 257 for a megapixel), fewer where the run's
    grids would hold more than GRID_MAX_VALUES values (20,000 logos of 64 px: 5). Each image then
    owns about one latent vector per 4 x 4 pixels, so its capacity grows with its pixels: 300
    distinct icons 38.5 dB against 30.7 without a grid, a 256 px photo +7 dB (bench/RESULTS.md,
    "A latent grid").

    Fitted as areas, always a grid, with a node every AREA_GRID_SPACING (2) pixels: 33 for 64 px
    icons. An edge inside a pixel needs capacity where it is, and the grid holds it there: 48
    logos as areas reach 45.1 dB with it against 41.7 with a node every 4 pixels
    (bench/RESULTS.md, "Icon folders as areas")."""
    sizes = list(sizes)
    if not sizes:
        return 0
    if not area and icon_folder(sizes):
        return 0
    widest = max(int(w) for w, _ in sizes)
    cols = max(2, int(round(widest / (AREA_GRID_SPACING if area else GRID_SPACING))) + 1)
    while cols > 2 and len(sizes) * cols * grid_rows_for(cols, sizes) * channels > GRID_MAX_VALUES:
        cols = max(2, int(cols * 0.9))
    return cols


# An icon folder (at most GRID_FROM_IMAGES images of at most GRID_FROM_PIXELS pixels each: logos,
# icons, emoji) is fitted as area averages by default, so that it renders sharp at any zoom
# (`auto_supersample`), with what an area fit needs: a latent-grid node every AREA_GRID_SPACING
# pixels (`auto_grid`), a narrow shared network (`auto_width`) and AREA_STEPS_FACTOR x the steps
# (`auto_steps`). bench/RESULTS.md, "Icon folders as areas".
AREA_SUPERSAMPLE = 2
AREA_GRID_SPACING = 2
AREA_WIDTH = 64
AREA_STEPS_FACTOR = 2
WIDTH = 192  # the width of every other field (`auto_width`)


def icon_folder(sizes) -> bool:
    """Whether images of `sizes` ((width, height) each) are an icon folder: at most
    GRID_FROM_IMAGES (64) images of at most GRID_FROM_PIXELS (128 x 128) pixels each."""
    sizes = list(sizes)
    return 0 < len(sizes) <= GRID_FROM_IMAGES and max(int(w) * int(h) for w, h in sizes) <= GRID_FROM_PIXELS


def auto_supersample(sizes) -> int:
    """`fit`'s default observation for images of `sizes`: an icon folder (`icon_folder`) as area
    averages over 2 x 2 sub-squares (on its detail pixels, `TrainConfig.area_pixels`), anything
    else at pixel centres (1). Rendered at 4x, 48 unseen flat-color icons gain +5.4 dB over
    bicubic against +2.0 at centres, 48 twemoji +4.0 against +1.4, four brand logos +7.2 against
    +1.7, and at 1:1 each mean is as good or better (bench/RESULTS.md, "Icon folders as areas").
    A larger folder loses as areas (300 icons: 35.8 dB against 39.4 at centres); photos are
    not measured as areas yet."""
    return AREA_SUPERSAMPLE if icon_folder(sizes) else 1


def auto_width(area: bool, grid: int) -> int:
    """`fit`'s default width: AREA_WIDTH (64) for an area fit with a latent grid, whose nodes
    hold the image (48 logos as areas: 45.1 dB at width 64, 45.3 at 128, in half the time),
    WIDTH (192) otherwise."""
    return AREA_WIDTH if area and grid else WIDTH


AUTO_LATENT = 128  # latent size for up to AUTO_LATENT_IMAGES images...
AUTO_LATENT_IMAGES = 64
AUTO_LATENT_MAX = 512  # ...then growing with their number up to this, reached at 256 images


def auto_latent_dim(images: int) -> int:
    """`fit`'s default latent size for a run of `images` images:

        128 x (images / 64), within [128, 512], in multiples of 64

    128 up to 64 images (the 48-logo case is unchanged), 256 for 128, 512 from 256 on. A
    latent is all an image owns, and a large folder needs more of it: at 512 instead of 128, 300
    distinct icons gain 1.7 dB (fluent-emoji-flat) and 1.3 dB (noto), 1024 logos 2.0 dB, for
    9-18% more time (bench/RESULTS.md, "A latent that grows with the folder")."""
    factor = min(AUTO_LATENT_MAX / AUTO_LATENT, max(1.0, max(int(images), 1) / AUTO_LATENT_IMAGES))
    return int(64 * round(AUTO_LATENT * factor / 64))


MAX_SUPERSAMPLE = 8  # m x m points per pixel: 64 at most
AREA_PIXELS = ("all", "detail")  # `TrainConfig.area_pixels`


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained."""

    steps: int | None = None  # optimizer steps in total (a resumed run continues up to this); None: `auto_steps`
    lr: float | None = None  # peak Adam learning rate of the shared weights; None: `auto_lr`
    latent_lr: float = 1e-2  # peak Adam learning rate of the per-image latents (and latent grids)
    warmup_steps: int = 100  # linear warm-up, then cosine decay
    final_lr_fraction: float = 0.05  # lr at the last step, as a fraction of the peak
    batch_pixels: int | None = None  # pixels per step across all images; 0 means full batch ("all"); None: `auto_batch_pixels`
    batch_images: int = 0  # images per step; 0 = automatic (all, unless that leaves < 64 pixels each), -1 = all
    edge_share: float = 0.5  # share of a minibatch's pixels drawn by the target's edges, re-weighted (`neurimg.sampler`); 0 = uniform
    # Each pixel is the mean of the field over an m x m stratified grid of points in its square
    # (the pixel as an area average, `neurimg.sampler`), and renders average m x m points per
    # output pixel to match; 1 = the pixel's centre value.
    supersample: int | None = None  # None: `auto_supersample` (2 for an icon folder, else 1)
    # With supersample > 1, which pixels are observed as areas: "all", or "detail": only those
    # that differ from a neighbour (`sampler.detail_mask`); a flat pixel's value is the same all
    # over it, so it is observed at one point drawn in its square, and a step's points go further
    # (`neurimg.sampler`; bench/RESULTS.md, "Areas on detail pixels").
    area_pixels: str = "detail"
    tv_weight: float = 0.0  # with supersample > 1: weight of a total-variation prior on the field between neighbouring points (`train.lattice_tv`)
    # Where the field starts: False at grey (0.5) plus the fresh network's output; True at the
    # images' mean colour (the output bias), which helps one image (upsample's field) but not
    # folders reliably (bench/RESULTS.md, "Start at the mean colour").
    mean_start: bool = False
    adam_b2: float = 0.99  # Adam's second-moment decay, for the weights and the latents
    # The weights' gradient is scaled down to at most this many times the running mean of its
    # norm (`train.relative_clip`) before Adam; 0 = off. It stops a spike from growing into a
    # collapse (bench/RESULTS.md, "Relative gradient clipping").
    grad_clip: float = 1.5
    seed: int = 0
    snapshots: tuple[int, ...] = (1, 300, 600)  # plus the last step, always
    log_every: int = 50  # steps between rows of loss.csv
    checkpoint_seconds: float = 60.0  # periodic checkpoint interval
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # alpha is composited onto this
    precision: str = "float32"  # hidden matmuls when training: float32 | tf32 | bf16 (GPU speed-ups)
    # How the run was extended: ((0, first total), (resumed at, new total), ...); () if never.
    # From each resume the lr decays from where it was to its final value (`engine.schedule`).
    segments: tuple[tuple[int, int], ...] = ()

    def validate(self) -> None:
        if self.steps is not None:
            _positive_int("steps", self.steps)
        _seed(self.seed)
        if self.steps is not None and self.steps > 100_000_000:
            raise NeurimgError(f"--steps {self.steps} is absurdly large")
        if self.lr is not None:
            _positive_float("lr", self.lr)
        _positive_float("latent-lr", self.latent_lr)
        if (self.lr or 0) > 10 or self.latent_lr > 100:
            raise NeurimgError("learning rate is absurdly large")
        if self.batch_pixels is not None and (not isinstance(self.batch_pixels, int) or isinstance(self.batch_pixels, bool) or self.batch_pixels < 0):
            raise NeurimgError(f"--batch-pixels must be a positive integer or 'all', got {self.batch_pixels}")
        if not isinstance(self.batch_images, int) or self.batch_images < -1:
            raise NeurimgError(f"--batch-images must be a positive integer or 'auto', got {self.batch_images}")
        if self.supersample is not None and (not isinstance(self.supersample, int) or isinstance(self.supersample, bool) or not 1 <= self.supersample <= MAX_SUPERSAMPLE):
            raise NeurimgError(f"--supersample must be an integer from 1 to {MAX_SUPERSAMPLE}, got {self.supersample}")
        if not isinstance(self.tv_weight, (int, float)) or not math.isfinite(self.tv_weight) or self.tv_weight < 0:
            raise NeurimgError(f"--tv-weight must be a finite number >= 0, got {self.tv_weight}")
        if self.tv_weight > 0 and self.supersample == 1:
            raise NeurimgError("--tv-weight is a prior between the points inside each pixel: it needs --supersample 2 or more")
        if self.area_pixels not in AREA_PIXELS:
            raise NeurimgError(f"--area-pixels must be one of {', '.join(AREA_PIXELS)}, got {self.area_pixels!r}")
        if not isinstance(self.mean_start, bool):
            raise NeurimgError(f"mean_start must be true or false, got {self.mean_start!r}")
        if not 0 <= self.edge_share < 1:
            raise NeurimgError(f"--edge-share must be within [0, 1), got {self.edge_share}")
        if not isinstance(self.grad_clip, (int, float)) or isinstance(self.grad_clip, bool) or not (self.grad_clip == 0 or 1 <= self.grad_clip <= 100):
            raise NeurimgError(f"--grad-clip must be 0 (off) or a factor from 1 to 100, got {self.grad_clip}")
        if not 0 < self.adam_b2 < 1:
            raise NeurimgError(f"adam_b2 must be within (0, 1), got {self.adam_b2}")
        if self.warmup_steps < 0:
            raise NeurimgError("warmup steps must be >= 0")
        if not 0 <= self.final_lr_fraction <= 1:
            raise NeurimgError("final lr fraction must be within [0, 1]")
        _check_logging(self.snapshots, self.log_every, self.checkpoint_seconds)
        if self.precision not in ("float32", "tf32", "bf16"):
            raise NeurimgError(f"--precision must be float32, tf32 or bf16, got {self.precision!r}")
        if len(self.background) != 3 or not all(0 <= c <= 1 for c in self.background):
            raise NeurimgError("background must be three values within [0, 1]")
        prev = 0
        for seg in self.segments:
            if len(seg) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in seg) or not prev <= seg[0] < seg[1]:
                raise NeurimgError(f"schedule segments must be increasing (start, end) steps, got {self.segments}")
            prev = seg[0]
        if self.segments and (len(self.segments) < 2 or self.segments[0][0] != 0):
            raise NeurimgError(f"schedule segments must start at step 0, got {self.segments}")

    def for_input(self, sizes) -> "TrainConfig":
        """This config with its automatic observation (supersample None) chosen for images of
        `sizes` ((width, height) each): `auto_supersample`."""
        if self.supersample is not None:
            return self
        return dataclasses.replace(self, supersample=auto_supersample(sizes))

    def batched(self, pixels: int, images: int) -> "TrainConfig":
        """This config with its automatic points per step (None) chosen for `images` images of
        `pixels` pixels in all (`auto_batch_pixels`): as many field evaluations a step whatever
        the observation, so m x m fewer batch entries (pixels) with `supersample` m."""
        if self.batch_pixels is not None:
            return self
        m = self.supersample or 1
        return dataclasses.replace(self, batch_pixels=max(1, auto_batch_pixels(pixels, images) // (m * m)))

    def resolved(self, pixels: int, images: int, points_per_image: int, grid_step_pixels: int = 0) -> "TrainConfig":
        """This config with its automatic settings (None) chosen for `images` images of `pixels`
        pixels in all, trained on `points_per_image` points of each image a step: steps by
        `auto_steps` (`grid_step_pixels`: the pixels a step sees, where the model has a latent
        grid; 0 without; an area fit's steps when supersample > 1), lr by `auto_lr`."""
        t, area = self, (self.supersample or 1) > 1
        if t.steps is None:
            t = dataclasses.replace(t, steps=auto_steps(pixels, images, grid_step_pixels, area))
        if t.lr is None:
            t = dataclasses.replace(t, lr=auto_lr(points_per_image, area))
        return t

    def extended(self, at: int, steps: int) -> "TrainConfig":
        """This config, resumed at step `at` to train up to `steps` in total: a new decay
        segment when the total changes (see `neurimg.engine.schedule`)."""
        if steps == self.steps:
            return self
        if not self.segments and at < min(self.warmup_steps, steps - 1, self.steps - 1):
            return dataclasses.replace(self, steps=steps)  # still warming up: the same warm-up, a new decay
        first = self.segments or ((0, self.steps),)
        return dataclasses.replace(self, steps=steps, segments=first + ((at, steps),))


AUTO_STEPS_BASE = 900  # steps of an input of up to AUTO_STEPS_PIXELS pixels of 64x64 images
AUTO_STEPS_PER_DOUBLING = 25  # more for each doubling of the pixels per image above 64x64
AUTO_STEPS_PIXELS = 1 << 18  # 48 logos of 64x64 hold 196,608 pixels, a 256x256 photo 65,536
AUTO_STEPS_MAX = 10_000
GRID_EPOCHS = 20  # with a latent grid, steps for each pixel to be seen this many times...
GRID_EPOCHS_STEPS = 3000  # ...up to this many (where the square root rule takes over: about 700 icons)


def auto_steps(pixels: int, images: int = 1, grid_step_pixels: int = 0, area: bool = False) -> int:
    """`fit`'s default number of steps for `images` images of `pixels` pixels in all:

        (900 + 25 log2(pixels per image / 4096)) x max(1, sqrt(pixels / 2^18))

    (the first factor at least 900), in fifties, at most 10,000: 900 for up to 64 64x64 logos,
    1000 for one 256x256 photo, 2200 for a megapixel photo, 3550 for 1000 logos of 64x64.
    Larger images hold more detail each, and larger inputs more pixels to see; the square root
    keeps them within minutes on a CPU. Measured in bench/RESULTS.md ("time to quality").

    With a latent grid (`grid_step_pixels` > 0, the pixels each step sees), at least enough
    steps for each pixel to be seen GRID_EPOCHS times, up to GRID_EPOCHS_STEPS: a node learns
    only from the pixels around it, not from every step as the shared weights do. 300 icons of
    64 px then get 3000 steps instead of 1950 (noto, held out: 36.2 -> 39.4 dB); a photo, a
    megapixel and 1000 logos keep theirs (bench/RESULTS.md, "Steps for a latent grid").

    An area fit (`area`) takes AREA_STEPS_FACTOR (2) x the first rule's steps: a sharp edge
    inside a pixel takes longer to learn than a smooth pass through its centre (48 logos as
    areas: 42.2 dB at 1200 steps, 45.1 at 1800; four logos 58.5 at 900, 64.4 at 1800), and
    the narrow network of an icon folder's area fit (`auto_width`) makes its steps about twice
    as fast (bench/RESULTS.md, "Icon folders as areas")."""
    pixels, images = max(int(pixels), 1), max(int(images), 1)
    per = max(pixels / images, 4096.0)
    base = AUTO_STEPS_BASE + AUTO_STEPS_PER_DOUBLING * math.log2(per / 4096.0)
    grow = max(1.0, math.sqrt(pixels / AUTO_STEPS_PIXELS))
    steps = base * grow * (AREA_STEPS_FACTOR if area else 1)
    if grid_step_pixels > 0:
        steps = max(steps, min(GRID_EPOCHS_STEPS, GRID_EPOCHS * pixels / grid_step_pixels))
    return int(min(AUTO_STEPS_MAX, 50 * round(steps / 50)))


AUTO_BATCH = 8192  # pixels a step for images of up to AUTO_BATCH_FROM pixels each (logos, icons)
AUTO_BATCH_FROM = 1 << 14  # 128x128; above, the points grow as sqrt(pixels per image / this)...
AUTO_BATCH_MAX = 1 << 14  # ...up to this, reached at 256x256


def auto_batch_pixels(pixels: int, images: int = 1) -> int:
    """`fit`'s default pixels per step for `images` images of `pixels` pixels in all:

        8192 x sqrt(pixels per image / 128^2), within [8192, 16384], in multiples of 1024

    8192 for 64 px logos, whatever their number, 11,264 for 181x181 images, 16,384 from
    256x256 on. A larger image holds more detail each step must see: at 8192 points a textured
    256 px photo stalls at the default lr (grass 32.9 dB, 48.2 with 16,384), and every photo
    measured gains 0.4-2 dB from 16,384 points, for 1.9x the time (bench/RESULTS.md, "Points
    per step")."""
    per = max(int(pixels), 1) / max(int(images), 1)
    factor = min(AUTO_BATCH_MAX / AUTO_BATCH, max(1.0, math.sqrt(per / AUTO_BATCH_FROM)))
    return int(1024 * round(AUTO_BATCH * factor / 1024))


AUTO_LR = 1.5e-3  # peak lr when each image gives a step at least AUTO_LR_POINTS points
AUTO_LR_POINTS = 128
AUTO_LR_POWER = 1.6  # below that, the lr falls as (points / AUTO_LR_POINTS)^1.6: 5e-4 at 64
AUTO_LR_MIN = 1e-4


AUTO_LR_AREA = 1e-3  # the peak of an area fit (`auto_lr`)


def auto_lr(points_per_image: int, area: bool = False) -> float:
    """`fit`'s default peak learning rate of the shared weights for steps of `points_per_image`
    points of each image: 1.5e-3 from 128 points on (48 logos in 8192 points: 170 each; one
    photo: 8192), less below, where each image's share of the gradient is noisier: 5e-4 at 64
    points (128 or more logos per step; 1.5e-3 there fell to 35.0 dB against 39.0, and a
    1024-logo run collapsed), at least 1e-4. bench/RESULTS.md, "time to quality".

    An area fit (`area`) peaks at AUTO_LR_AREA (1e-3) instead: at 1.5e-3 the bundled 12 logos
    rolled back once at seed 0, at 1e-3 at no seed measured (bench/RESULTS.md, "Icon folders as
    areas")."""
    ratio = min(1.0, max(int(points_per_image), 1) / AUTO_LR_POINTS)
    return float(max(AUTO_LR_MIN, (AUTO_LR_AREA if area else AUTO_LR) * ratio**AUTO_LR_POWER))


class _Stored:
    """A config written to config.json and into checkpoints: its fields as JSON, plus the
    format version."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_logging(snapshots, log_every, checkpoint_seconds) -> None:
    """The run-folder settings that `fit` and `blend-train` share."""
    for s in snapshots:
        if not isinstance(s, int) or s < 1:
            raise NeurimgError(f"--snapshots steps must be >= 1, got {s}")
    _positive_int("log-every", log_every)
    _positive_float("checkpoint seconds", checkpoint_seconds)


@dataclass(frozen=True)
class Config(_Stored):
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.train.validate()
        return self

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Config":
        try:
            model = ModelConfig(**{"grid": 0, **d["model"]})  # runs stored before grids had none
            if not isinstance(model.latent_dim, int):  # a stored run holds the size it chose
                raise ValueError(f"latent_dim must be an integer, got {model.latent_dim!r}")
            if not isinstance(model.grid, int):
                raise ValueError(f"grid must be an integer, got {model.grid!r}")
            if not isinstance(model.width, int):
                raise ValueError(f"width must be an integer, got {model.width!r}")
            if model.grid and not isinstance(model.grid_rows, int):
                raise ValueError(f"grid_rows must be an integer, got {model.grid_rows!r}")
            t = dict(d["train"])
            t["snapshots"] = tuple(int(s) for s in t.get("snapshots", ()))
            t["background"] = tuple(float(c) for c in t.get("background", (1.0, 1.0, 1.0)))
            t["segments"] = tuple(tuple(s) for s in t.get("segments", ()))
            # runs stored before these settings existed trained with uniform sampling, b2 0.999
            # and unclipped gradients
            t.setdefault("edge_share", 0.0)
            t.setdefault("adam_b2", 0.999)
            t.setdefault("grad_clip", 0.0)
            t.setdefault("area_pixels", "all")  # every pixel of an area fit was an area before the choice
            t.setdefault("supersample", 1)  # runs stored before area fits fitted pixel centres
            train = TrainConfig(**t)
            if not isinstance(train.supersample, int):  # a stored run holds the observation it chose
                raise ValueError(f"supersample must be an integer, got {train.supersample!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise NeurimgError(f"stored configuration is not valid: {e}") from e
        return Config(model=model, train=train)


# --------------------------------------------------------------------------------------------
# the single-image commands: one config each, defaults chosen by measurement (bench/RESULTS.md)

BLEND_MODES = ("sum", "mean", "mixed", "replace")
BLEND_SOLVERS = ("siren", "exact")
UPSAMPLE_METHODS = ("auto", "internal", "field", "mix", "backproject")


@dataclass(frozen=True)
class BlendConfig:
    """Every setting of `neurimg blend` (see `neurimg.blend`). The SIREN is fitted by the field
    trainer `fit` uses: None means that trainer's automatic setting (`TrainConfig.resolved`),
    the other model and training settings are `fit`'s defaults (`field_config`)."""

    mode: str = "sum"  # target gradient: sum | mean | mixed | replace
    color_weight: float = 0.0  # weight of |u - N|^2 against the gradient term (pixel units)
    solver: str = "siren"  # or "exact": the DCT Poisson solve on the pixel grid
    width: int | None = None  # units per sine layer; None: fit's
    hidden_layers: int | None = None  # None: fit's
    w0: float | None = None  # None: fit's
    steps: int | None = None  # None: fit's rule for one image of this size (`auto_steps`)
    lr: float | None = None  # peak lr of the shared weights; None: fit's rule (`auto_lr`)
    batch_pixels: int | None = None  # pixels per step; None: fit's
    seed: int = 0

    def field_config(self) -> "Config":
        """The field trainer's config for this blend: fit's defaults with the given settings."""
        given = {"width": self.width, "hidden_layers": self.hidden_layers, "w0": None if self.w0 is None else float(self.w0)}
        model = dataclasses.replace(ModelConfig(), **{k: v for k, v in given.items() if v is not None})
        batch = {} if self.batch_pixels is None else {"batch_pixels": self.batch_pixels}
        # E's values at points: the pixel centres of the exact solution, not areas
        train = TrainConfig(steps=self.steps, lr=self.lr, seed=self.seed, snapshots=(), supersample=1, **batch)
        return Config(model=model, train=train)

    def validate(self) -> "BlendConfig":
        _seed(self.seed)
        _one_of("mode", self.mode, BLEND_MODES)
        _one_of("solver", self.solver, BLEND_SOLVERS)
        v = self.color_weight
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise NeurimgError(f"--color-weight must be a finite number >= 0, got {v}")
        if self.batch_pixels is not None:
            _positive_int("batch-pixels", self.batch_pixels)
        self.field_config().validate()
        return self


GAN_TARGETS = ("mixed", "naive")


@dataclass(frozen=True)
class GanConfig(_Stored):
    """Every setting of `neurimg blend-train`, the conditional GAN blender (`neurimg.blendgan`,
    `neurimg.blender`). Measured in bench/RESULTS.md ("GAN blender"): the defaults train on
    the 32 logos of logos64 within 20 minutes on the 2-core CPU."""

    target: str = "mixed"  # what real tuples combine: the exact mixed-gradient blend, or (A+B)/2
    size: int = 64  # training resolution (square)
    channels: int = 16  # base channels; doubled at each downsampling, at most 4x
    style_dim: int = 64  # each image's style code
    steps: int = 3000
    batch: int = 16
    lr_g: float = 1e-3  # Adam (b1 0.5, b2 0.99) of the generator
    lr_d: float = 1e-3  # ... and of the discriminator
    l1_weight: float = 100.0  # weight of |G(A, B) - target| in G's loss
    adv_weight: float = 1.0  # weight of the adversarial term in G's loss (0: an L1-trained U-Net)
    symmetries: bool = True  # train on pairs turned, flipped and recoloured (channels permuted), targets recomputed
    level_prob: float = 0.5  # share of pairs trained at random levels (A's share per level, `blendgan.target_of`); the rest at 0.5
    ada_target: float = 0.6  # ADA: E[sign(D(real))] is steered to this (Karras et al. 2020)
    ada_kimg: float = 20.0  # ADA: thousands of real images over which p may move by 1
    seed: int = 0
    snapshots: tuple[int, ...] = (1, 500)  # steps with a grid A | B | target | generated, plus the last
    log_every: int = 50  # steps between rows of loss.csv
    checkpoint_seconds: float = 60.0  # periodic checkpoint interval

    def validate(self) -> "GanConfig":
        _seed(self.seed)
        _one_of("target", self.target, GAN_TARGETS)
        for name in ("size", "channels", "style_dim", "steps", "batch"):
            _positive_int(name.replace("_", "-"), getattr(self, name))
        if self.size % 8 or self.size < 16:
            raise NeurimgError(f"the GAN's size must be a multiple of 8 and at least 16, got {self.size}")
        _lr("lr-g", self.lr_g)
        _lr("lr-d", self.lr_d)
        for name in ("l1_weight", "ada_kimg"):
            _positive_float(name.replace("_", "-"), getattr(self, name))
        if not isinstance(self.adv_weight, (int, float)) or not math.isfinite(self.adv_weight) or self.adv_weight < 0:
            raise NeurimgError(f"--adv-weight must be a finite number >= 0, got {self.adv_weight}")
        if not 0 < self.ada_target < 1:
            raise NeurimgError(f"ada target must be within (0, 1), got {self.ada_target}")
        if not isinstance(self.level_prob, (int, float)) or not 0 <= self.level_prob <= 1:
            raise NeurimgError(f"--level-prob must be within [0, 1], got {self.level_prob}")
        if not isinstance(self.symmetries, bool):
            raise NeurimgError(f"symmetries must be true or false, got {self.symmetries!r}")
        _check_logging(self.snapshots, self.log_every, self.checkpoint_seconds)
        if self.steps > 100_000_000 or self.size > 1024 or self.channels > 1024 or self.batch > 65536:
            raise NeurimgError("the GAN's steps, size (at most 1024), channels (1024) or batch (65536) are absurdly large")
        return self

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "GanConfig":
        try:
            d = {k: v for k, v in dict(d).items() if k != "format_version"}
            d["snapshots"] = tuple(int(s) for s in d.get("snapshots", ()))
            return GanConfig(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise NeurimgError(f"stored configuration is not valid: {e}") from e


@dataclass(frozen=True)
class UpsampleConfig:
    """Every setting of `neurimg upsample` (see `neurimg.upsample`)."""

    width: int = 64  # units per sine layer
    hidden_layers: int = 3  # hidden sine layers after the first
    w0: float = 45.0  # SIREN frequency factor (higher than fit's 30: sharper edges between pixels)
    steps: int = 600  # Adam steps
    lr: float = 1e-3  # peak learning rate (warm-up then cosine decay)
    warmup_steps: int = 50
    final_lr_fraction: float = 0.05
    batch_pixels: int = 512  # input pixels per step (all of them if the image has fewer)
    supersample: int = 0  # m: sub-points per input pixel per axis; 0 = auto: max(3, ceil(scale)), at most 8
    output_supersample: int = 2  # q: samples per output pixel per axis (area-sampled output)
    tv_weight: float = 1e-3  # weight of the TV prior; 0 disables it
    seed: int = 0
    # How to upsample: "auto" chooses per image by self-validation (neurimg.upsample.choose);
    # "field" is the SIREN fit above; "internal" a CNN trained on the image's own smaller
    # copies (neurimg.internal); "mix" the mean of both; "backproject" consistent bicubic.
    method: str = "auto"
    internal_steps: int = 500  # Adam steps of the internal CNN
    internal_width: int = 32  # its channels
    internal_layers: int = 6  # its 3x3 convolutions
    internal_lr: float = 1e-3
    internal_patch: int = 32  # training crop side (smaller if the image is)
    internal_batch: int = 8  # crops per step
    backproject_iters: int = 5  # back-projection passes (internal, backproject)

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(width=self.width, hidden_layers=self.hidden_layers, latent_dim=1, w0=float(self.w0), grid=0)

    def validate(self) -> "UpsampleConfig":
        _seed(self.seed)
        self.model.validate()
        for name in ("steps", "batch_pixels", "output_supersample"):
            _positive_int(name.replace("_", "-"), getattr(self, name))
        if self.steps > 1_000_000:
            raise NeurimgError(f"--steps {self.steps} is absurdly large")
        if not isinstance(self.supersample, int) or isinstance(self.supersample, bool) or not 0 <= self.supersample <= MAX_SUPERSAMPLE:
            raise NeurimgError(f"--supersample must be an integer from 0 to {MAX_SUPERSAMPLE} (0 = auto), got {self.supersample}")
        if self.output_supersample > 8:
            raise NeurimgError(f"output supersampling must be at most 8, got {self.output_supersample}")
        _lr("lr", self.lr)
        if not math.isfinite(self.tv_weight) or self.tv_weight < 0:
            raise NeurimgError(f"--tv-weight must be a finite number >= 0, got {self.tv_weight}")
        _one_of("method", self.method, UPSAMPLE_METHODS)
        for name in ("internal_steps", "internal_width", "internal_layers", "internal_patch", "internal_batch"):
            _positive_int(name.replace("_", "-"), getattr(self, name))
        if self.internal_steps > 1_000_000:
            raise NeurimgError(f"--internal-steps {self.internal_steps} is absurdly large")
        if self.internal_layers > 64 or self.internal_width > 1024:
            raise NeurimgError("--internal-layers must be at most 64 and --internal-width at most 1024")
        _lr("internal-lr", self.internal_lr)
        if not isinstance(self.backproject_iters, int) or not 0 <= self.backproject_iters <= 100:
            raise NeurimgError(f"back-projection passes must be an integer in [0, 100], got {self.backproject_iters}")
        _warmup(self.warmup_steps)
        return self

    def sub(self, scale: float) -> int:
        """m for a given scale: at least one sub-point per output pixel along each axis."""
        if self.supersample:
            return self.supersample
        return min(MAX_SUPERSAMPLE, max(3, math.ceil(scale - 1e-9)))

    def field_config(self, scale: float) -> Config:
        """The field trainer's config (`neurimg.fit.train_field`) for an upsampling by `scale`:
        this model and schedule, pixels as area averages over m x m points (`sub`) with the TV
        prior, uniform draws without replacement (no edge sampling), every step on the one
        image, the field started at its mean colour, Adam's b2 0.999 (measured with these
        settings, bench/RESULTS.md "upsample"). The one image's latent learns at the weights'
        rate: it is one more parameter of the same field, and `--lr` governs all of them."""
        train = TrainConfig(steps=self.steps, lr=self.lr, latent_lr=self.lr, warmup_steps=self.warmup_steps, final_lr_fraction=self.final_lr_fraction,
                            batch_pixels=self.batch_pixels, batch_images=-1, edge_share=0.0, supersample=self.sub(scale), area_pixels="all",
                            tv_weight=self.tv_weight, mean_start=True, adam_b2=0.999, seed=self.seed, snapshots=())
        return Config(self.model, train)


MAX_SEED = 2**32 - 1  # NumPy's generators take seeds in [0, 2^32)


def _seed(v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SEED:
        raise NeurimgError(f"--seed must be an integer from 0 to {MAX_SEED}, got {v!r}")


def _one_of(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise NeurimgError(f"--{name} must be one of {', '.join(allowed)}, got {v!r}")


def _lr(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 or v > 10:
        raise NeurimgError(f"--{name} must be a positive number (at most 10), got {v}")


def _warmup(v: Any) -> None:
    if not isinstance(v, int) or v < 0:
        raise NeurimgError(f"warmup steps must be an integer >= 0, got {v}")


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise NeurimgError(f"--{name} must be a positive integer, got {v}")


def _positive_float(name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise NeurimgError(f"--{name} must be a positive finite number, got {v}")
