"""Headless Chromium driven over the DevTools protocol, for netns tests of the web console.

Chromium runs inside a lab namespace (`ip netns exec`, through `Lab.spawn`, so it is killed by
PID with the lab) with `--remote-debugging-pipe`: the protocol's JSON messages, each ended by a
NUL byte, go over two pipes (its fd 3 in, fd 4 out). No websocket client and no TCP port are
needed, and nothing listens outside the namespace.
"""
from __future__ import annotations

import base64
import json
import os
import select
import time
from pathlib import Path
from typing import Any

from examples.lab.netns import Lab

CHROMIUM = "/usr/bin/chromium"


class CdpError(Exception):
    pass


class Browser:
    def __init__(self, lab: Lab, ns: str, url: str, profile: Path, *, width: int = 1400, height: int = 1000) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", "--disable-sync",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars", url]
        # bash (dash takes single-digit fds only) moves the pipe ends to fds 3 and 4, where chromium reads and
        # writes the protocol.
        command = f'exec {CHROMIUM} "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.log = profile / "chromium.log"
        with open(self.log, "ab") as log:
            self.proc = lab.spawn(ns, "/bin/bash", "-c", command, "bash", *flags, pass_fds=(to_chrome_r, from_chrome_w),
                                  stdout=log, stderr=log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.lab = lab
        self._buf = b""
        self._id = 0
        self.session = self._attach(url)

    def close(self) -> None:
        try:
            self.lab.stop(self.proc)
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the protocol -----------------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
             timeout_s: float = 30.0) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:  # events (no id) and other replies are skipped
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise CdpError(f"no answer from chromium in time (log: {self.log})")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise CdpError(f"chromium closed the pipe (exit {self.proc.poll()}, log: {self.log})")
            self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)  # type: ignore[no-any-return]

    def _attach(self, url: str) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            targets = self.call("Target.getTargets")["targetInfos"]
            pages = [t for t in targets if t["type"] == "page"]
            if pages:
                return str(self.call("Target.attachToTarget", {"targetId": pages[0]["targetId"],
                                                               "flatten": True})["sessionId"])
            time.sleep(0.1)
        raise CdpError(f"no page target for {url}")

    # ---- what tests use -----------------------------------------------------------------------------

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.session)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                         session=self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def wait_for(browser: Browser, expression: str, *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Evaluate `expression` until it is truthy (an exception counts as not yet); returns its value."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = browser.evaluate(expression)
        except CdpError as exc:  # the page is still loading: its elements are not there yet
            last = exc
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


__all__ = ["Browser", "CdpError", "wait_for"]
