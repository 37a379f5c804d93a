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
from dataclasses import dataclass, field
from typing import Any

from neurimg.errors import NeurimgError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the modulated SIREN (see `neurimg.siren`)."""

    width: int = 256  # units in every sine layer
    hidden_layers: int = 3  # hidden->hidden sine layers; the network has 1 + this many sine layers
    latent_dim: int = 128  # per-image latent code, mapped linearly to per-layer shifts
    w0: float = 30.0  # frequency factor of every sine layer (Sitzmann et al. 2020 use 30)
    out_channels: int = 3  # RGB

    def validate(self) -> None:
        _positive_int("width", self.width)
        _positive_int("latent-dim", self.latent_dim)
        if not isinstance(self.hidden_layers, int) or self.hidden_layers < 0:
            raise NeurimgError(f"--hidden-layers must be an integer >= 0, got {self.hidden_layers}")
        if self.width > 8192:
            raise NeurimgError(f"--width {self.width} is absurdly large (at most 8192)")
        if self.hidden_layers > 64:
            raise NeurimgError(f"--hidden-layers {self.hidden_layers} is absurdly deep (at most 64)")
        if self.latent_dim > 65536:
            raise NeurimgError(f"--latent-dim {self.latent_dim} is absurdly large (at most 65536)")
        _positive_float("w0", self.w0)


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained."""

    steps: int = 1800  # optimizer steps in total (a resumed run continues up to this)
    lr: float = 5e-4  # peak Adam learning rate of the shared weights
    latent_lr: float = 1e-2  # peak Adam learning rate of the per-image latents
    warmup_steps: int = 100  # linear warm-up, then cosine decay
    final_lr_fraction: float = 0.05  # lr at the last step, as a fraction of the peak
    batch_pixels: int = 8192  # pixels per step across all images; 0 means full batch ("all")
    batch_images: int = 0  # images per step; 0 = automatic (all, unless that leaves < 64 pixels each), -1 = all
    seed: int = 0
    snapshots: tuple[int, ...] = (1, 500, 1000)  # plus the last step, always
    log_every: int = 50  # steps between rows of loss.csv
    checkpoint_seconds: float = 60.0  # periodic checkpoint interval
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # alpha is composited onto this
    precision: str = "float32"  # hidden matmuls when training: float32 | tf32 | bf16 (GPU speed-ups)

    def validate(self) -> None:
        _positive_int("steps", self.steps)
        if self.steps > 100_000_000:
            raise NeurimgError(f"--steps {self.steps} is absurdly large")
        _positive_float("lr", self.lr)
        _positive_float("latent-lr", self.latent_lr)
        if self.lr > 10 or self.latent_lr > 100:
            raise NeurimgError("learning rate is absurdly large")
        if not isinstance(self.batch_pixels, int) or self.batch_pixels < 0:
            raise NeurimgError(f"--batch-pixels must be a positive integer or 'all', got {self.batch_pixels}")
        if not isinstance(self.batch_images, int) or self.batch_images < -1:
            raise NeurimgError(f"--batch-images must be a positive integer or 'auto', got {self.batch_images}")
        if self.warmup_steps < 0:
            raise NeurimgError("warmup steps must be >= 0")
        if not 0 <= self.final_lr_fraction <= 1:
            raise NeurimgError("final lr fraction must be within [0, 1]")
        for s in self.snapshots:
            if s < 1:
                raise NeurimgError(f"--snapshots steps must be >= 1, got {s}")
        _positive_int("log-every", self.log_every)
        _positive_float("checkpoint seconds", self.checkpoint_seconds)
        if self.precision not in ("float32", "tf32", "bf16"):
            raise NeurimgError(f"--precision must be float32, tf32 or bf16, got {self.precision!r}")
        if len(self.background) != 3 or not all(0 <= c <= 1 for c in self.background):
            raise NeurimgError("background must be three values within [0, 1]")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Config":
        try:
            model = ModelConfig(**d["model"])
            t = dict(d["train"])
            t["snapshots"] = tuple(int(s) for s in t.get("snapshots", ()))
            t["background"] = tuple(float(c) for c in t.get("background", (1.0, 1.0, 1.0)))
            train = TrainConfig(**t)
        except (KeyError, TypeError, ValueError) as e:
            raise NeurimgError(f"stored configuration is not valid: {e}") from e
        return Config(model=model, train=train)


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise NeurimgError(f"--{name} must be a positive integer, got {v}")


def _positive_float(name: str, v: Any) -> None:
    import math

    if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise NeurimgError(f"--{name} must be a positive finite number, got {v}")
