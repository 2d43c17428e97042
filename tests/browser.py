"""A minimal headless-Chromium driver over the DevTools protocol (``--remote-debugging-pipe``).

Standard library only: Chromium reads protocol commands from fd 3 and writes
responses and events to fd 4, each a JSON message terminated by a NUL byte.
Used by ``tests/test_report.py`` to open the HTML reports, collect JavaScript
exceptions and console/log errors, check that images decoded, and take a
screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    """Path of Debian's ``chromium`` (or another Chromium/Chrome), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


#: Switches for WebGL without a GPU: ANGLE on SwiftShader (CPU), which recent Chromium
#: only allows for WebGL when told to (--enable-unsafe-swiftshader).
WEBGL_ARGS = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page attached (flattened session)."""

    def __init__(self, exe: str, profile_dir: Path, width: int = 1280, height: int = 900,
                 extra_args: tuple[str, ...] | list[str] = ()):
        """``extra_args``: more Chromium switches, e.g. :data:`WEBGL_ARGS` for a page that
        draws with WebGL."""
        r_cmd, self._w = os.pipe()
        self._r, w_resp = os.pipe()
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
                "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
                *extra_args]
        # bash puts the pipe ends on the fd numbers Chromium expects (3: in, 4: out).
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{r_cmd} 4>&{w_resp}', *args],
            pass_fds=(r_cmd, w_resp), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        os.close(r_cmd)
        os.close(w_resp)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        att = self.call("Target.attachToTarget",
                        {"targetId": target["targetId"], "flatten": True}, session=False)
        self.session = att["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # ---------------------------------------------------------------- transport

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for Chromium")
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrowserError(f"Chromium closed the pipe (exit {self.proc.poll()}): "
                                   f"{err[-2000:]}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: bool = True,
             timeout: float = 60.0) -> dict:
        """Send one command and return its result (events seen meanwhile are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise BrowserError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        for i, e in enumerate(self.events):
            if e["method"] == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method:
                return m
            if "method" in m:
                self.events.append(m)

    # ---------------------------------------------------------------- page helpers

    def open(self, url: str, timeout: float = 60.0) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", timeout)
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """Value of a JavaScript expression (promises awaited); JS errors raise."""
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            raise BrowserError(f"JavaScript error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def errors(self) -> list[str]:
        """JavaScript exceptions, console errors and log errors seen so far."""
        self.call("Runtime.evaluate", {"expression": "1"})  # flush pending events
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                desc = d.get("exception", {}).get("description", "")
                out.append(f"exception: {d.get('text')} {desc}")
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                ent = p["entry"]
                out.append(f"log error ({ent.get('source')}): {ent.get('text')} "
                           f"{ent.get('url', '')}")
        return out

    def screenshot(self, path: Path, full_page: bool = True, max_height: int = 8000) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            m = self.call("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m.get("contentSize")
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"],
                "height": min(size["height"], max_height), "scale": 1})
        data = self.call("Page.captureScreenshot", params, timeout=120)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=10)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: JavaScript: wait for every <img> to finish, then describe them.
IMAGES_JS = """
(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  await Promise.all(imgs.map(i => i.decode ? i.decode().catch(() => null) : null));
  return imgs.map(i => ({file: i.dataset.file || i.alt || i.src.slice(0, 40),
                         width: i.naturalWidth, height: i.naturalHeight,
                         shown: i.getBoundingClientRect().width}));
})()
"""

#: JavaScript for Snakemake's report: show every image result in the content
#: pane (as its "eye" button does) and report its decoded size.
SNAKEMAKE_IMAGES_JS = """
(async () => {
  const out = [];
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (const [path, res] of Object.entries(results)) {
    if (!res.mime_type || !res.mime_type.startsWith('image/')) continue;
    app.setView({content: 'img', contentPath: res.data_uri, resultPath: path});
    let img = null;
    for (let k = 0; k < 100 && !img; k++) {
      await sleep(20);
      img = Array.from(document.images).find(i => i.getAttribute('src') === res.data_uri);
    }
    if (img && !img.complete) await new Promise(r => { img.onload = r; img.onerror = r; });
    if (img && img.decode) await img.decode().catch(() => null);
    out.push({file: path, mime: res.mime_type, width: img ? img.naturalWidth : -1,
              height: img ? img.naturalHeight : -1});
  }
  return out;
})()
"""
