"""Headless Chromium driven over the Chrome DevTools protocol (CDP), for the web-page tests (the chat page, the
studio). Needs Debian's `chromium` and the `websockets` package: `CHROMIUM` is None without the browser, and
`require_chromium()` skips (or, under CI=true, fails) a test module then."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium():
    """The websockets client module; skips the calling module without Chromium (fails under CI=true)."""
    if not CHROMIUM and os.environ.get("CI") == "true":
        pytest.fail("CI=true but headless Chromium is missing: .ci/run should have installed it", pytrace=False)
    if not CHROMIUM:
        pytest.skip("headless Chromium not installed (apt-get install -y chromium)", allow_module_level=True)
    return pytest.importorskip("websockets.sync.client", reason="the websockets package is needed to drive Chromium")


class CDP:
    """A minimal Chrome DevTools protocol session on one page target."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """Poll until `expression` is truthy (an exception, e.g. while the page still loads, counts as false)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()")
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for: {expression}")

    def screenshot(self, path: Path) -> Path:
        """The page as PNG (what the viewport shows)."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def browser(url: str, tmp_path, ready: str = "document.getElementById('send') !== null",
            size: tuple[int, int] | None = None):
    """Chromium on `url`; yields a CDP session on its page once the page has loaded and `ready` holds."""
    ws_client = require_chromium()
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={tmp_path}",
                             "--remote-debugging-port=0",
                             *([f"--window-size={size[0]},{size[1]}"] if size else []), url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.time() + 60
        while port is None:
            assert time.time() < deadline and proc.poll() is None, "chromium did not start"
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", proc.stderr.readline())
            port = m and int(m.group(1))
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
        while True:
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
            if pages and pages[0]["url"].startswith(url):
                break
            assert time.time() < deadline, "no page target"
            time.sleep(0.1)
        with ws_client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            cdp = CDP(ws)
            cdp.wait_for(f"document.readyState === 'complete' && ({ready})")
            yield cdp
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
