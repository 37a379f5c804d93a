"""Drive a headless Chromium over the DevTools protocol: open a page, wait for its title, take a
screenshot, evaluate JavaScript. The viewer's browser test and `bench/view_speed.py` use it.

It talks to Chromium through `--remote-debugging-pipe` (file descriptors 3 and 4, messages of
JSON ended by NUL), so it needs no WebSocket library and no port. WebGL runs on SwiftShader,
Chromium's CPU renderer, so it works on machines with no GPU and no display.

    with Browser() as b:
        b.open("file:///tmp/view.html?embed=1", 320, 240)
        b.wait_title("neurimg:ready", timeout=60)
        png = b.screenshot(320, 240)            # PNG bytes of the viewport's top-left W x H
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import warnings
from typing import Any

from neurimg.errors import NeurimgError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--use-angle=swiftshader",  # WebGL2 on the CPU
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--force-color-profile=srgb",  # screenshot pixels are the canvas's bytes
    "--hide-scrollbars",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable ($NEURIMG_CHROMIUM first), or None."""
    env = os.environ.get("NEURIMG_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _high(pair: tuple[int, int]) -> tuple[int, int]:
    """The two descriptors moved to numbers above 9."""
    out = []
    for fd in pair:
        out.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(fd)
    return out[0], out[1]


class Browser:
    """One headless Chromium with one page (see the module docstring)."""

    def __init__(self, executable: str | None = None):
        exe = executable or find_chromium()
        if exe is None:
            raise NeurimgError("no Chromium found (install Debian's 'chromium' or set NEURIMG_CHROMIUM)")
        self._profile = tempfile.mkdtemp(prefix="neurimg-chromium-")
        # Our ends and the child's ends, all above 9 so that placing the child's at 3 and 4
        # (in the child, after fork) cannot clobber one another.
        to_child_r, self._to_child = _high(os.pipe())
        self._from_child, from_child_w = _high(os.pipe())

        def fds():  # the child's 3 reads our commands, its 4 writes the replies
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        with warnings.catch_warnings():  # JAX warns of any fork; the child execs at once
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            self._proc = subprocess.Popen(
                [exe, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=fds, close_fds=True, pass_fds=(3, 4),
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.console: list[str] = []  # the page's console messages and exceptions
        self._session: str | None = None

    # --- protocol ---------------------------------------------------------------------------
    def _send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self._session:
            msg["sessionId"] = self._session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _read(self, timeout: float = 300.0) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            if not select.select([self._from_child], [], [], max(0.0, end - time.monotonic()))[0]:
                raise RuntimeError(f"Chromium did not answer within {timeout:g} s")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        method = msg.get("method", "")
        if method == "Runtime.consoleAPICalled":
            args = msg["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            d = msg["params"]["exceptionDetails"]
            self.console.append(d.get("exception", {}).get("description", d.get("text", "")))
        return msg

    # --- page -------------------------------------------------------------------------------
    def open(self, url: str, width: int, height: int) -> None:
        """Navigate a new page of width x height CSS pixels (device scale 1) to `url`."""
        target = self._send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self._send("Runtime.enable")
        self._send("Page.enable")
        self._send("Emulation.setDeviceMetricsOverride", {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False})
        self._send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        r = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page: {r['exceptionDetails'].get('exception', {}).get('description', r['exceptionDetails'])}")
        return r.get("result", {}).get("value")

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
        clip = {"x": 0, "y": 0, "width": int(width), "height": int(height), "scale": 1}
        r = self._send("Page.captureScreenshot", {"format": "png", "clip": clip})
        return base64.b64decode(r["data"])

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                try:
                    self._session = None
                    self._send("Browser.close", session=False)
                except (RuntimeError, OSError):
                    pass
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            for fd in (self._to_child, self._from_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
