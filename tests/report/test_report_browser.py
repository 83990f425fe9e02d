"""The study's HTML report opened in headless Chromium: no console errors or failed loads, every claim section
present with a verdict and its figures decoded, nothing fetched from outside the file. A full-page screenshot is
kept in ``test-artifacts/``.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON messages separated by NUL
bytes on file descriptors 3 and 4), so the test needs nothing beyond the standard library. Chromium missing is a
failure, not a skip: CI installs it (``.ci/run``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from normdrop.claims import CLAIM_IDS
from normdrop.scope import OVERALL

CHROMIUM = os.environ.get("NORMDROP_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1200,900",
)
TIMEOUT_S = 60.0

PAGE_CHECKS = """
(() => {
  const sections = [...document.querySelectorAll('section.claim')].map(s => ({
    id: s.dataset.claimId,
    verdict: s.dataset.verdict,
    badge: (s.querySelector('h2 .verdict') || {}).textContent || null,
    images: [...s.querySelectorAll('figure img')].map(img => ({
      complete: img.complete, width: img.naturalWidth, height: img.naturalHeight})),
  }));
  const external = [...document.querySelectorAll('[src],[href]')]
    .map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => !u.startsWith('data:') && !u.startsWith('#'));
  const fetched = performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:'));
  return {sections, external, fetched, title: document.title};
})()
"""


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, user_data_dir: Path, log_path: Path) -> None:
        to_chromium_r, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. A small launcher moves the pipe ends there
        # (from copies on fds >= 10, so that the two moves cannot clobber each other) and execs Chromium.
        read_end = fcntl.fcntl(to_chromium_r, fcntl.F_DUPFD_CLOEXEC, 10)
        write_end = fcntl.fcntl(from_chromium_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_chromium_r, from_chromium_w):
            os.close(fd)
        self._log = log_path.open("wb")
        launcher = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"]
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(read_end), str(write_end), *command],
            pass_fds=(read_end, write_end),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        os.close(read_end)
        os.close(write_end)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_chromium, self._from_chromium):
            os.close(fd)
        self._log.close()

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from Chromium in time")
            ready, _, _ = select.select([self._from_chromium], [], [], remaining)
            if ready:
                chunk = os.read(self._from_chromium, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit code {self.process.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._to_chromium, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> dict[str, Any]:
        """The first event named ``method`` (already received or arriving within the timeout)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read_message(deadline))


def console_errors(events: list[dict[str, Any]]) -> list[str]:
    """Uncaught exceptions, console.error/assert calls and error log entries (failed loads among them)."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(json.dumps(params.get("args", []))[:500])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(json.dumps(params["entry"])[:500])
    return errors


def open_report(html: Path, user_data_dir: Path, screenshot: Path) -> tuple[dict[str, Any], list[str]]:
    """Load the report, run :data:`PAGE_CHECKS`, save a full-page screenshot; returns (checks, console errors)."""
    browser = DevTools(user_data_dir, ARTIFACTS / "chromium.log")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        checks = browser.send("Runtime.evaluate", {"expression": PAGE_CHECKS, "returnByValue": True}, session=session)[
            "result"
        ]["value"]
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = browser.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
            },
            session=session,
        )
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return checks, console_errors(browser.events)
    finally:
        browser.close()


@pytest.mark.slow
def test_report_opens_in_headless_chromium(quick_study: Path, tmp_path: Path) -> None:
    chromium = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    assert chromium, (
        f"Chromium not found at {CHROMIUM}: install Debian's `chromium` package (.ci/run does) or point "
        "$NORMDROP_CHROMIUM at a Chromium binary; the report's browser test cannot run without it"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "study-report.png"
    html = quick_study / "report" / "report.html"
    checks, errors = open_report(html, tmp_path / "chromium-profile", screenshot)

    assert errors == [], f"console errors or failed loads: {errors}"
    assert checks["external"] == [] and checks["fetched"] == [], "the report must not reference other files"
    sections = {section["id"]: section for section in checks["sections"]}
    assert list(sections) == list(CLAIM_IDS), "one section per claim of docs/claims.md, in its order"
    for claim_id, section in sections.items():
        assert section["verdict"] in OVERALL and section["badge"] == section["verdict"], claim_id
        assert section["images"], f"{claim_id}: no figure"
        for image in section["images"]:
            assert image["complete"] and image["width"] > 0 and image["height"] > 0, f"{claim_id}: figure not loaded"
    assert screenshot.stat().st_size > 10_000
