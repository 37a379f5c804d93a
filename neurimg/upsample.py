"""Arbitrary-scale upsampling: fit a SIREN to an image the way its pixels were formed, then
render the continuous function on a finer grid.

Forward model. A low-resolution pixel is taken to be the *area average* of a sharp underlying
image over the pixel's square (that is how box/area downsampling and camera sensors form
pixels). The network f(x, y) -> RGB represents the sharp image: for every input pixel it is
evaluated on an m x m stratified lattice of points inside the pixel's square (m = `supersample`,
by default max(3, ceil(scale)), at most 8), and the mean of those m^2 values is compared with the
pixel (MSE). Fitting pixel *averages* rather than pixel-centre values lets the network keep an
edge sharp inside a pixel instead of interpolating a blur between centres.

Prior. Averages alone leave the sub-pixel detail underdetermined, and a bare SIREN fills it
with ringing. Logos are mostly flat colour with sharp edges, which a total-variation prior
favours: the Charbonnier TV (sqrt(d^2 + eps^2) summed over RGB) of f between neighbouring
sub-points, including the pairs that cross into the next pixel, weighted by `tv_weight`, per
unit of input-pixel length so its weight does not depend on m (`neurimg.train.lattice_tv`).

Training. The fit is `fit`'s field trainer (`neurimg.fit.train_field`) with the observation
above (`TrainConfig.supersample`, `tv_weight`), the field started at the image's mean colour
and minibatches drawn without replacement; `UpsampleConfig.field_config` is the one place
where upsample's model and schedule become that trainer's config.

Output. Each output pixel of the round(sW) x round(sH) grid (pixel-centre convention of
`neurimg.coords`, the same rectangle as the input) is the mean of f over a q x q stratified grid
inside it (q = `output_supersample`), i.e. the output is area-sampled like the ground truth it
is compared with. Scale 1 thus reproduces the fitted input.

Shapes: input (H, W, 3) float32 in [0, 1]; output (H', W', 3) float32 in [0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurimg import fit, guard, siren
from neurimg.config import ModelConfig, UpsampleConfig
from neurimg.coords import output_size as coords_output_size
from neurimg.errors import NeurimgError
from neurimg.imageset import ImageSet
from neurimg.metrics import psnr
from neurimg.render import GridEvaluator, single_image_field

__all__ = ["UpsampleConfig", "UpsampleField", "UpsampleResult", "fit_field", "render", "upsample", "output_size"]


@dataclass
class UpsampleField:
    """A fitted upsampling field: f(x, y) over the input's rectangle (a one-image model of
    `neurimg.siren`, fitted by `fit.train_field`)."""

    cfg: UpsampleConfig
    params: Any  # the model's parameters on the host (latents (1, 1) included)
    width: int  # input size
    height: int
    m: int  # sub-points per input pixel per axis used in the fit
    steps: int = 0
    fit_psnr: float = 0.0  # PSNR of the model's pixel averages against the input
    seconds: float = 0.0
    compile_seconds: float = 0.0
    tally: guard.Tally = dataclasses.field(default_factory=guard.Tally)


@dataclass
class UpsampleResult:
    image: np.ndarray  # (H', W', 3): float32 in [0, 1], or uint8 if asked
    method: str  # "field", "internal", "mix" or "backproject"
    fit_psnr: float  # PSNR of the output averaged back onto the input grid, against the input
    seconds: float
    steps: int = 0
    field: UpsampleField | None = None  # the fitted SIREN (method "field")
    validation: dict[str, float] | None = None  # self-validation PSNR per candidate (method "auto")
    tally: guard.Tally = dataclasses.field(default_factory=guard.Tally)  # every training's rollbacks and restarts

    def report(self) -> dict[str, Any]:
        rep = {
            "width": int(self.image.shape[1]),
            "height": int(self.image.shape[0]),
            "method": self.method,
            "fit_psnr": round(self.fit_psnr, 4),
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            **self.tally.summary(),
        }
        if self.validation:
            rep["validation"] = {k: round(v, 3) for k, v in self.validation.items()}
        return rep


def fit_field(image: np.ndarray, scale: float, cfg: UpsampleConfig, reporter=None) -> UpsampleField:
    """Fit a SIREN to `image` (H, W, 3) under the area-average model (see the module doc)
    through the field trainer `fit` uses (`neurimg.fit.train_field`, config
    `UpsampleConfig.field_config`), under its failure policy: the trivial answer, which the fit
    must beat, is the image's mean colour, where the field starts.

    `reporter` gets the progress (see `neurimg.progress`) or is None."""
    cfg.validate()
    t0 = time.perf_counter()
    h, w = image.shape[:2]
    field_cfg = cfg.field_config(scale).validate()
    images = ImageSet.from_arrays(["image"], ["-"], [np.asarray(image, np.float32)], bits=16)
    trained = fit.train_field([], field_cfg, images=images, reporter=reporter, what="upsample fit")
    fitted = UpsampleField(cfg, trained.params(), w, h, field_cfg.train.supersample, trained.stats.steps,
                           float(trained.per_image[0]["psnr"]), tally=trained.tally)
    fitted.compile_seconds = trained.stats.compile_seconds
    fitted.seconds = time.perf_counter() - t0
    return fitted


@functools.lru_cache(maxsize=16)
def _evaluator(model: ModelConfig, clip: bool) -> GridEvaluator:
    return GridEvaluator(single_image_field(siren.init_params(model, 1, 0)[0]), chunk=1 << 15, clip=clip)


def render(fitted: UpsampleField, out_size: tuple[int, int], q: int = 2, region=None, clip: bool = True, dtype=np.float32) -> np.ndarray:
    """f over `region` (pixel units of the input; default all of it) on an out_size = (W', H')
    grid, each output pixel the mean of q x q stratified samples inside it (the one grid
    evaluator, `neurimg.render`): (H', W', 3) `dtype`, clipped to [0, 1] unless clip=False."""
    return _evaluator(fitted.cfg.model, clip).grid(fitted.params, (fitted.width, fitted.height), out_size, region, supersample=q, dtype=dtype)


def output_size(w: int, h: int, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    """round(scale * W) x round(scale * H), or `size`; refuses empty and over-large outputs."""
    if (scale is None) == (size is None):
        raise NeurimgError("give --scale or --size (one of them)")
    return coords_output_size(w, h, None, scale, size)


VALIDATION_MIN_SIDE = 8  # shortest side of the son self-validation upsamples, in pixels
VALIDATION_FIELD_STEPS = 0.5  # fraction of the field's steps in self-validation
FLAT_MARGIN_DB = 0.25  # the field must beat consistent bicubic by this much on the son: "flat"
CNN_MIN_SON = 32  # from this son side up the internal CNN has enough to learn from and is used


def _run(method: str, image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None,
         fraction: float = 1.0) -> UpsampleResult:
    """One method on image (H, W, 3) -> out_size (W', H'); `fraction` of its steps."""
    from neurimg import internal
    from neurimg.resample import area, backproject, consistent_bicubic

    t0 = time.perf_counter()
    h, w = image.shape[:2]
    if method == "field":
        scale = max(out_size[0] / w, out_size[1] / h)
        c = cfg if fraction == 1 else dataclasses.replace(cfg, steps=max(1, round(cfg.steps * fraction)))
        fitted = fit_field(image, scale, c, reporter)
        out = render(fitted, out_size, cfg.output_supersample, clip=False)
        steps, tally = fitted.steps, fitted.tally
    elif method == "internal":
        res = internal.upsample(image, out_size, cfg, reporter, steps=max(1, round(cfg.internal_steps * fraction)))
        out, fitted, steps, tally = res.image, None, res.steps, res.tally
    elif method == "mix":  # the mean of the two learned upsamplings, back-projected
        a = _run("internal", image, out_size, cfg, reporter, fraction)
        b = _run("field", image, out_size, cfg, reporter, fraction)
        out = backproject((a.image + b.image) / 2, image, cfg.backproject_iters)
        fitted, steps, tally = b.field, a.steps + b.steps, a.tally.add(b.tally)
    else:
        out, fitted, steps, tally = consistent_bicubic(image, out_size, cfg.backproject_iters), None, 0, guard.Tally()
    out = np.clip(out, 0, 1).astype(np.float32)
    fit = psnr(area(out, (w, h)), image)
    return UpsampleResult(out, method, fit, time.perf_counter() - t0, steps, fitted, tally=tally)


def choose(image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None) -> tuple[str, dict[str, float], float]:
    """Self-validation: which method suits this image, with no ground truth.

    The image's son is the image area-downsampled by the scale; it is what the internal CNN
    learns from (its largest training input).
    - Son at least CNN_MIN_SON pixels a side: the internal CNN, for every image (it won on
      every photo and logo measured with a 64 px son: x2 of 128 px inputs).
    - Son under VALIDATION_MIN_SIDE a side: too small to judge; such inputs are icons, and
      get the field.
    - Otherwise the son is upsampled back to the image's size by the field (the SIREN,
      VALIDATION_FIELD_STEPS of its steps) and by consistent bicubic, both scored against the
      image itself (PSNR). Where the field wins by more than FLAT_MARGIN_DB the image is
      flat-coloured (logos, icons, diagrams: the field's TV prior fits them) and gets the
      field; otherwise ("mix") the mean of the field and the CNN, which beat either alone on
      every photo measured with a 16 px son (x4 of 64 px inputs).

    Returns (method, {candidate: validation PSNR}, scale)."""
    from neurimg.resample import area, consistent_bicubic

    h, w = image.shape[:2]
    scale = max(out_size[0] / w, out_size[1] / h)
    son_size = (round(w / scale), round(h / scale))
    if scale <= 1:  # not an upsampling: the field, rendered area-sampled on the coarser grid
        return "field", {}, scale
    if min(son_size) >= CNN_MIN_SON:
        return "internal", {}, scale
    if min(son_size) < VALIDATION_MIN_SIDE:
        return "field", {}, scale
    son = area(image, son_size)
    scores = {
        "field": psnr(_run("field", son, (w, h), cfg, None, VALIDATION_FIELD_STEPS).image, image),
        "backproject": psnr(np.clip(consistent_bicubic(son, (w, h), cfg.backproject_iters), 0, 1), image),
    }
    best = "field" if scores["field"] > scores["backproject"] + FLAT_MARGIN_DB else "mix"
    if reporter is not None:
        told = ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items())
        reporter.message(f"self-validation ({son_size[0]}x{son_size[1]} -> {w}x{h}): {told}; using {best}")
    return best, scores, scale


def upsample(image: np.ndarray, out_size: tuple[int, int], cfg: UpsampleConfig, reporter=None, dtype=np.float32) -> UpsampleResult:
    """Upsample `image` (H, W, 3) to out_size = (W', H') with cfg.method ("auto": chosen by
    `choose`). The output is (H', W', 3) in [0, 1], `dtype` (uint8: rounded)."""
    cfg.validate()
    t0 = time.perf_counter()
    scores = None
    method = cfg.method
    if method == "auto":
        method, scores, _ = choose(image, out_size, cfg, reporter)
    res = _run(method, image, out_size, cfg, reporter)
    if dtype == np.uint8:
        res.image = np.round(res.image * 255).astype(np.uint8)
    res.validation = scores
    res.seconds = time.perf_counter() - t0
    return res
