"""Headless Chromium for the HTML page tests: load a page, collect its console errors, check that
every image decodes, keep a screenshot.

Debian's `chromium` package; when it is missing and the tests run as root with apt-get (the
development machines and CI do), `ensure_chromium` installs it once, and skips the test with the
reason only when that fails. The page is driven over the DevTools protocol (websocket-client):
the browser's own verdict on console errors and image decoding, which no HTML parser gives.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"  # screenshots kept after the run


def _binary() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def ensure_chromium() -> str:
    """The Chromium binary, installed with apt-get when missing (root only); pytest.skip if impossible."""
    path = _binary()
    if path:
        return path
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed, and installing it needs root and apt-get: apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    tail = ""
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        tail = (proc.stdout + proc.stderr)[-500:]
        if cmd[1] == "install" and proc.returncode == 0:
            break
    path = _binary()
    if not path:
        pytest.skip(f"installing chromium with apt-get failed: {tail}")
    return path


@dataclass
class PageCheck:
    """What the browser saw on one page."""

    title: str
    console_errors: list[str]  # console.error calls, uncaught exceptions, failed loads
    images: int
    broken_images: list[str]  # alt text (or source head) of images that did not decode
    screenshot: Path
    height_px: int


class _DevTools:
    """A minimal DevTools-protocol session on one page target."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(url, timeout=120, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout_s:.0f} s")
            self.events.append(json.loads(self.ws.recv()))

    def close(self) -> None:
        self.ws.close()


def render(page: Path, name: str, width_px: int = 1280) -> PageCheck:
    """Open `page` (a local HTML file) in headless Chromium and report; the full-page screenshot is
    kept as ARTIFACTS/<name>.png."""
    binary = ensure_chromium()
    # Chromium's helper processes may still write to the profile for a moment after being killed.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        log = Path(profile) / "chromium.log"  # a file, not a pipe: a full pipe would stall the browser
        with open(log, "w") as err:
            proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                                     "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-port=0",
                                     "--remote-allow-origins=*", f"--user-data-dir={profile}",
                                     f"--window-size={width_px},900", "about:blank"],
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            port = _devtools_port(proc, log)
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
            tools = _DevTools(next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"))
            try:
                return _inspect(tools, page, name)
            finally:
                tools.close()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the browser and its renderer / zygote helpers
            proc.wait()


def _devtools_port(proc: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", text)
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"chromium did not start its DevTools endpoint (exit {proc.poll()}): {text[-800:]}")


_IMAGES_JS = """
Promise.all(Array.from(document.images).map(i => i.decode().then(
    () => (i.naturalWidth > 0 ? null : (i.alt || i.src.slice(0, 80))),
    () => (i.alt || i.src.slice(0, 80)))))
  .then(r => JSON.stringify({n: document.images.length, broken: r.filter(x => x !== null),
                             title: document.title, height: document.documentElement.scrollHeight}))
"""


def _inspect(tools: _DevTools, page: Path, name: str) -> PageCheck:
    for domain in ("Page", "Runtime", "Log"):
        tools.call(f"{domain}.enable")
    tools.call("Page.navigate", url=page.resolve().as_uri())
    tools.wait_for("Page.loadEventFired")
    result = tools.call("Runtime.evaluate", expression=_IMAGES_JS, awaitPromise=True, returnByValue=True)
    info = json.loads(result["result"]["value"])
    height = min(int(info["height"]), 16000)
    shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    errors = []
    for e in tools.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(f"{details.get('text', 'exception')} {details.get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", ""))
    return PageCheck(title=info["title"], console_errors=errors, images=int(info["n"]),
                     broken_images=list(info["broken"]), screenshot=path, height_px=height)
