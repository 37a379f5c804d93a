"""A headless Chromium for the viewer's browser test and `bench/view_*.py`: Playwright driving
the system's Chromium (Debian's `chromium`, which `.ci/run` installs; no browser download).
WebGL runs on SwiftShader, Chromium's CPU renderer, so it works with no GPU and no display.

    with Browser() as b:
        b.open("file:///tmp/view.html?embed=1", 320, 240)
        b.wait_title("neurimg:ready", timeout=60)
        png = b.screenshot(320, 240)            # PNG bytes of the viewport's top-left W x H

It lives with the tests, not in the package: neurimg itself never starts a browser.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--use-angle=swiftshader",  # WebGL2 on the CPU
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--force-color-profile=srgb",  # screenshot pixels are the canvas's bytes
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable ($NEURIMG_CHROMIUM first), or None."""
    env = os.environ.get("NEURIMG_CHROMIUM")
    if env:
        return shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing() -> str | None:
    """Why no browser test can run here (None if one can)."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]')"
    if find_chromium() is None:
        return "no Chromium found (install Debian's 'chromium' or set NEURIMG_CHROMIUM)"
    return None


class Browser:
    """One headless Chromium; `open` replaces the page (see the module docstring). `console`
    collects the pages' console messages and uncaught exceptions."""

    def __init__(self, executable: str | None = None):
        from playwright.sync_api import sync_playwright

        exe = executable or find_chromium()
        if exe is None:
            raise RuntimeError(missing())
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=exe, args=list(FLAGS), headless=True)
        except BaseException:
            self._pw.stop()
            raise
        self._page = None
        self.console: list[str] = []

    def open(self, url: str, width: int, height: int) -> None:
        """Navigate a new page of width x height CSS pixels (device scale 1) to `url`."""
        if self._page is not None:
            self._page.close()
        self._page = self._browser.new_page(viewport={"width": int(width), "height": int(height)}, device_scale_factor=1)
        self._page.on("console", lambda m: self.console.append(m.text))
        self._page.on("pageerror", lambda e: self.console.append(str(e)))
        self._page.goto(url, wait_until="commit")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        return self._page.evaluate(expression)

    def wait_title(self, want: str, timeout: float = 60.0, fail_prefix: str = "neurimg:error") -> str:
        """Wait until document.title is `want`; a title starting with `fail_prefix` or the
        timeout raises with the page's console messages."""
        end = time.monotonic() + timeout
        title = ""
        while time.monotonic() < end:
            title = self.evaluate("document.title") or ""
            if title == want:
                return title
            if title.startswith(fail_prefix):
                break
            time.sleep(0.05)
        raise RuntimeError(f"page title {title!r} after waiting for {want!r}; console: {self.console[-5:]}")

    def screenshot(self, width: int, height: int) -> bytes:
        """PNG bytes of the viewport's top-left width x height CSS pixels."""
        return self._page.screenshot(clip={"x": 0, "y": 0, "width": int(width), "height": int(height)}, animations="allow")

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
