"""The one failure policy of every trainer: what counts as a failed training, and what is done.

Every command that trains (fit, blend's SIREN, blend-train, upsample's field and its CNN) runs
through `neurimg.engine.Loop` with a `Guard`; each supplies only a `Policy`: its warm-up, its
thresholds where they differ from the defaults, and its *trivial answer* (each image's mean
colour, the naive blend, the interpolant it starts from), as a loss or as a per-step metric.

Judged, always at the end of a fixed window of WINDOW steps (steps k*WINDOW+1 .. (k+1)*WINDOW,
by step index, and the last step), on that window's per-step values, so that how many steps one
jitted call runs never changes a decision:

- **not finite**: a loss or the state after a step is NaN or infinite;
- **collapse**: past the warm-up, the window's mean loss is above `collapse_factor` x the best
  window mean so far (a SIREN trained too fast can fall back to a flat image in a few steps),
  or, having been below RELAPSE x the trivial answer's, it is back at the trivial answer (a
  *relapse*: a fall from not far above it, which the factor misses); or a *regression*:
  `regress_windows` windows in a row above `regress_factor` x the best (a slow climb away from
  it, which the factor misses: a 300-icon fit at 2x the rate climbed to 2.5x its best over 500
  steps and ended at 21 dB; a bump that passes, as the bundled logos' does over 5 windows
  around step 325, is let be: rolled back at half the rate there they end 3 dB lower than left
  alone, 52.0 instead of 55.0 dB);
- **not learning**: from `learn_after` of the steps on (and not before the warm-up ends), the
  window's mean loss is not below `learn_margin` x the trivial answer's.

One recovery:

- not finite or collapse: **roll back** to the last good state and redo from there with the
  learning rate x ROLLBACK_LR_FACTOR for the rest of the attempt (state["lr_scale"], see
  `engine.lr_scaled`), at most MAX_ROLLBACKS times. The last good state is the one before the
  window *preceding* the bad one: a collapse that starts late in a window may only show in the
  next one, so a window is committed (logged, checkpointed) only once the next one is judged
  good too;
- rollbacks used up, a relapse (a slow fall: the window before it has fallen too, and redoing
  it at a lower rate was measured to crawl, 24.5 dB instead of 44 on 32 logos at 2x the
  rate), not learning, or a final result no better than the trivial answer (each command's own
  check): the attempt fails (`TrainingFailed`). A fresh run then **starts
  again** (`attempts`) with a new seed and its learning rates x RESTART_LR_FACTOR, at most
  MAX_RESTARTS times; then exit code 1 with one line, and no metrics are written.

`--json` reports `rollbacks` and `restarts` the same way for every command (`Tally`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from neurimg.errors import NeurimgError

WINDOW = 25  # steps per judged window
COLLAPSE_FACTOR = 10.0  # a window mean this many times the best one (a 10 dB fall) is a collapse
COLLAPSE_FLOOR = 1e-6  # ... unless its mean loss is below this (noise on a fit at over 60 dB)
REGRESS_FACTOR = 2.0  # REGRESS_WINDOWS windows in a row this many times the best one (3 dB)...
REGRESS_WINDOWS = 8  # ... (200 steps) are a collapse
RELAPSE = 0.5  # a run that had reached this fraction of the trivial loss and is back at it collapsed
LEARN_AFTER = 0.5  # from this fraction of the steps on, a window must beat the trivial answer
LEARN_MARGIN = 1.0  # ... by having a mean loss below this times the trivial answer's
MAX_ROLLBACKS = 4  # per attempt
ROLLBACK_LR_FACTOR = 0.5  # the lr after each rollback, relative to before it
MAX_RESTARTS = 2  # fresh starts of a failed run
RESTART_LR_FACTOR = 0.5  # the lr of each fresh start, relative to the attempt before


class TrainingFailed(NeurimgError):
    """An attempt failed (exit code 1). `reason` is the short cause ("collapsed by step 240
    (loss 68x its best)"); `restartable` is False where starting again cannot help or is not
    ours to do (a resumed run keeps its checkpoint)."""

    def __init__(self, reason: str, hint: str = "try a lower --lr", restartable: bool = True):
        super().__init__(f"{reason}; {hint}" if hint else reason, exit_code=1)
        self.reason = reason
        self.hint = hint
        self.restartable = restartable


@dataclass(frozen=True)
class Policy:
    """A trainer's thresholds and trivial answer.

    trivial       the trivial answer's loss (same units as `metric`), or the name of a per-step
                  metric that holds it (its window mean is compared); inf: not judged
    trivial_name  how messages name it ("each image's mean colour")
    metric        the per-step metric judged (default "loss")
    warmup        no collapse is judged in windows ending at or before this step
    hint          what the failure's message suggests (the options that trainer has)
    """

    warmup: int = 0
    trivial: float | str = math.inf
    trivial_name: str = "the trivial answer"
    metric: str = "loss"
    collapse_factor: float = COLLAPSE_FACTOR
    regress_factor: float = REGRESS_FACTOR
    regress_windows: int = REGRESS_WINDOWS
    learn_after: float = LEARN_AFTER
    learn_margin: float = LEARN_MARGIN
    max_rollbacks: int = MAX_ROLLBACKS
    window: int = WINDOW
    floor: float = COLLAPSE_FLOOR
    hint: str = "try a lower --lr"


@dataclass
class Verdict:
    """What the guard decided about a window: "ok", "rollback" or "fail", and why."""

    action: str
    reason: str = ""


class Guard:
    """Judges the windows of one attempt (see the module docstring); `engine.Loop` feeds it.

    `see(start, metrics)` takes a chunk's per-step values (steps start+1 ..); `judge(end,
    total, finite)` decides on the window ending at `end`. Rollbacks are counted here."""

    def __init__(self, policy: Policy, what: str = "training"):
        self.policy = policy
        self.what = what
        self.best = math.inf  # the best mean of the committed windows
        self.held: float | None = None  # the mean of the window judged good but not committed
        self.regressed = 0  # windows in a row, up to the held one, above regress_factor x the best
        self.rollbacks = 0
        self.last_mean = math.nan
        self._values: list[np.ndarray] = []
        self._trivial: list[np.ndarray] = []

    def boundary(self, step: int, total: int) -> int:
        """The end of the window that holds step + 1."""
        w = self.policy.window
        return min(total, (step // w + 1) * w)

    def see(self, metrics: dict[str, np.ndarray]) -> None:
        p = self.policy
        self._values.append(np.asarray(metrics[p.metric], np.float64))
        if isinstance(p.trivial, str):
            self._trivial.append(np.asarray(metrics[p.trivial], np.float64))

    def discard(self) -> None:
        """Forget the current window's values (it is being redone)."""
        self._values.clear()
        self._trivial.clear()

    def judge(self, end: int, total: int, finite: bool) -> Verdict:
        """The verdict on the window ending at `end` (of `total` steps); `finite`: every loss
        and the state after it are finite."""
        p = self.policy
        values = np.concatenate(self._values) if self._values else np.zeros(0)
        trivial = float(np.mean(np.concatenate(self._trivial))) if self._trivial else p.trivial
        self.discard()
        if not finite or not np.all(np.isfinite(values)):  # named by its window: the same for any chunking
            first = (end - 1) // p.window * p.window
            return self._rollback(f"{self.what} diverged in steps {first + 1}-{self.boundary(first, total)} (not finite)")
        mean = float(values.mean()) if values.size else math.nan
        best = min(self.best, self.held if self.held is not None else math.inf)
        if end > p.warmup and best < math.inf and mean > max(p.collapse_factor * best, p.floor):
            return self._rollback(f"{self.what} collapsed by step {end} (loss {mean / best:.0f}x its best, {mean:.4g})")
        regressed = end > p.warmup and best < math.inf and mean > max(p.regress_factor * best, p.floor)
        if regressed and self.regressed + 1 >= p.regress_windows:
            return self._rollback(f"{self.what} collapsed by step {end} (loss above {p.regress_factor:g}x its best for "
                                  f"{p.regress_windows} windows, {mean / best:.1f}x now, {mean:.4g})")
        fell = 0 < trivial < math.inf and best <= RELAPSE * trivial and not mean < p.learn_margin * trivial
        if end > p.warmup and fell:  # a slow fall: two windows back is already part of it, so start again
            return Verdict("fail", f"{self.what} collapsed by step {end} (back at {p.trivial_name}: loss {mean:.4g}, its best {best:.4g})")
        judged = end >= max(p.learn_after * total, min(p.warmup, total))  # never inside the warm-up
        if judged and 0 < trivial < math.inf and not mean < p.learn_margin * trivial:
            return Verdict("fail", f"{self.what} is not learning: at step {end} its loss ({mean:.4g}) is no better than "
                                   f"{p.trivial_name} ({trivial:.4g})")
        if self.held is not None:  # the window before is committed now
            self.best = min(self.best, self.held)
        self.held = mean
        self.regressed = self.regressed + 1 if regressed else 0
        self.last_mean = mean
        return Verdict("ok")

    def _rollback(self, reason: str) -> Verdict:
        self.held = None  # the held window is redone too
        self.regressed = 0
        if self.rollbacks >= self.policy.max_rollbacks:
            return Verdict("fail", f"{reason}, after {self.rollbacks} rollbacks")
        self.rollbacks += 1
        return Verdict("rollback", reason)


@dataclass
class Tally:
    """Rollbacks and restarts of a command's trainings, as `--json` reports them."""

    rollbacks: int = 0
    restarts: int = 0

    def add(self, other: "Tally") -> "Tally":
        return Tally(self.rollbacks + other.rollbacks, self.restarts + other.restarts)

    def summary(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks, "restarts": self.restarts}


def restart_rate(given: float, default: float, factor: float) -> float:
    """The learning rate of a fresh start: `factor` (from `attempts`) times the rate asked for,
    or the command's default where that is lower (an absurd --lr is not halved into another
    absurd one)."""
    return given if factor == 1 else min(given, default) * factor


def attempts(
    run: Callable[[int, float], Any],
    reporter=None,
    what: str = "training",
    max_restarts: int = MAX_RESTARTS,
    tally: Optional[Tally] = None,
) -> Any:
    """`run(attempt, lr_factor)` until it succeeds: attempt 0 at lr_factor 1, each fresh start
    after a restartable `TrainingFailed` at RESTART_LR_FACTOR x the one before (with a new seed:
    the caller's seed + attempt; rates by `restart_rate`), at most `max_restarts` times. The last failure is raised with
    the number of restarts in its message. `tally.restarts` counts the fresh starts."""
    tally = tally if tally is not None else Tally()
    attempt = 0
    while True:
        factor = RESTART_LR_FACTOR**attempt
        try:
            return run(attempt, factor)
        except TrainingFailed as e:
            if not e.restartable or attempt >= max_restarts:
                after = f" (after {attempt} restarts at lower learning rates)" if attempt else ""
                raise TrainingFailed(e.reason + after, e.hint, restartable=False) from None
            attempt += 1
            tally.restarts = attempt
            if reporter is not None:
                reporter.message(f"{what}: {e.reason}; starting again with the learning rates x {RESTART_LR_FACTOR**attempt:g} "
                                 f"(of the default where that is lower) and a new seed (restart {attempt} of at most {max_restarts})")
