"""Progress on stderr: a rich progress bar on a terminal, plain periodic lines otherwise.

stdout is reserved for data (JSON summaries, PNG bytes), so everything here writes to stderr.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True, highlight=False)


class RichReporter:
    """Training progress: step, loss, PSNR, steps/s and ETA."""

    def __init__(self, description: str = "fit", console: Console | None = None, plain_every: float = 10.0):
        self.console = console or stderr_console
        self.description = description
        self.progress: Progress | None = None
        self.task = None
        self.plain_every = plain_every
        self._last_plain = 0.0
        self.total = 0

    def start(self, total: int, done: int) -> None:
        self.total = total
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("PSNR {task.fields[psnr]}"),
                TextColumn("{task.fields[detail]}"),
                TextColumn("{task.fields[sps]} steps/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total, completed=done, loss="-", psnr="-", sps="-", detail="")
        else:
            self._last_plain = time.monotonic()

    def update(self, step: int, loss: float, psnr: float, steps_per_second: float, detail: str = "") -> None:
        """`detail`: more to show after the PSNR (e.g. a GAN's D loss and ADA probability)."""
        if self.progress is not None:
            self.progress.update(
                self.task, completed=step, loss=f"{loss:.3g}", psnr=f"{psnr:.2f}", sps=f"{steps_per_second:.1f}", detail=detail
            )
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_every or step >= self.total:
            self._last_plain = now
            eta = (self.total - step) / steps_per_second if steps_per_second > 0 else float("nan")
            self.console.print(
                f"{self.description}: step {step}/{self.total} loss {loss:.3g} PSNR {psnr:.2f} dB {detail + ' ' if detail else ''}"
                f"{steps_per_second:.1f} steps/s ETA {eta:.0f}s",
                soft_wrap=True,  # one line per report, whatever the width: logs are read by programs too
            )

    def message(self, text: str) -> None:
        self.console.print(text, markup=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class CountProgress:
    """Progress of work counted in items, as `progress(phase, done, total)` calls: a bar on a
    terminal, otherwise a line every `plain_every` seconds and at the end. Silent when there are
    fewer than `min_total` items (e.g. a folder of under 1000 images loads in about a second).
    `unit` names the items in plain lines ("images", "frames")."""

    def __init__(self, console: Console | None = None, min_total: int = 1000, plain_every: float = 10.0, unit: str = "images"):
        self.console = console or stderr_console
        self.min_total = min_total
        self.plain_every = plain_every
        self.unit = unit
        self.progress: Progress | None = None
        self.task = None
        self._last = time.monotonic()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if total < self.min_total:
            return
        if self.console.is_terminal:
            if self.progress is None:
                self.progress = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=self.console, transient=True,
                )
                self.progress.start()
                self.task = self.progress.add_task(phase, total=total)
            self.progress.update(self.task, completed=done, description=phase)
            if done >= total:
                self.progress.stop()
                self.progress = None
            return
        now = time.monotonic()
        if done >= total or now - self._last >= self.plain_every:
            self._last = now
            self.console.print(f"{phase}: {done}/{total} {self.unit}", markup=False)


def info(text: str, quiet: bool = False) -> None:
    """A line for people, on stderr (silenced by --quiet)."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)
