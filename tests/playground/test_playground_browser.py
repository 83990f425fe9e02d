"""The playground in a real browser: Playwright's Python package drives Debian's Chromium (``executable_path``;
nothing is downloaded) against a uvicorn server this test starts on 127.0.0.1.

Checked: the page loads with no console error, no failed request and no request beyond the server; the settings
in the URL are the ones the server builds; training advances; moving a dropout slider changes the server-side
network (its Dropout modules' ``p``) and the URL; the decision-boundary canvas is painted in both class colours.
Screenshots are kept in ``test-artifacts/``. Chromium missing is a failure, not a skip: CI installs it
(``.ci/run``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from normdrop.playground.server import serving_in_thread

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is a dev dependency")

CHROMIUM = os.environ.get("NORMDROP_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_S = 30.0

# Network B starts with dropout 0.1 and BN: the URL's settings must be what the server builds.
URL_SETTINGS = {
    "dataset": "circles",
    "noise": 0.1,
    "train_size": 200,
    "depth": 3,
    "width": 16,
    "batch_size": 32,
    "seed": 3,
    "networks": [{"norm": "none"}, {"norm": "batch", "dropout": 0.1}],
}

BOUNDARY_PIXELS = """
() => {
  const canvas = document.getElementById('boundary-A');
  const {data} = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
  let orange = 0, blue = 0, white = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
    if (r > 245 && g > 245 && b > 245) white += 1;
    else if (r > b + 40) orange += 1;
    else if (b > r + 40) blue += 1;
  }
  return {orange, blue, white, total: data.length / 4};
}
"""


def wait_until(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT_S) -> object:
    """Poll from Python: the page's Content-Security-Policy forbids the eval that wait_for_function needs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def the_session(app):
    workers = list(app.state.workers)
    return workers[0].session if len(workers) == 1 and workers[0].session is not None else None


def test_the_page_trains_live_and_drives_the_server_side_network() -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    ARTIFACTS.mkdir(exist_ok=True)
    console_errors: list[str] = []
    requests: list[str] = []
    failed: list[str] = []
    with serving_in_thread() as (url, app), playwright_api.sync_playwright() as playwright:
        base = url.split("/?")[0]
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: console_errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.on("websocket", lambda socket: requests.append(socket.url))
            page.goto(f"{url}#{urllib.parse.quote(json.dumps(URL_SETTINGS))}")

            # The URL's settings reach the server.
            session = wait_until(
                lambda: (s := the_session(app)) is not None and s.settings.seed == 3 and s, "the URL's settings"
            )
            assert session.settings.dataset == "circles" and session.settings.depth == 3
            assert [m.p for m in session.networks[1].dropouts] == [0.1] * 3
            assert session.networks[0].dropouts == [] and len(session.networks[1].norms) == 3

            # Training advances, and the page draws it.
            read_step = "() => playground.frame ? playground.frame.step : -1"
            first = wait_until(lambda: (step := page.evaluate(read_step)) > 20 and step, "training to start")
            wait_until(lambda: page.evaluate(read_step) > first + 20, "training to advance")
            assert int(page.inner_text("#step-count")) > first

            pixels = page.evaluate(BOUNDARY_PIXELS)
            assert pixels["orange"] > 0.1 * pixels["total"] and pixels["blue"] > 0.1 * pixels["total"], pixels
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

            # The dropout slider of network B changes the network the server trains.
            sent_before = page.evaluate("() => playground.settingsId")
            page.locator('fieldset.network[data-index="1"] input.dropout').fill("0.3")
            wait_until(
                lambda: (s := the_session(app)) is not None and [m.p for m in s.networks[1].dropouts] == [0.3] * 3,
                "the server-side network to take the new dropout",
            )
            assert page.evaluate("() => playground.settingsId") > sent_before
            hash_settings = json.loads(urllib.parse.unquote(page.evaluate("() => location.hash").lstrip("#")))
            assert hash_settings["networks"][1]["dropout"] == 0.3
            wait_until(
                lambda: page.evaluate("() => playground.acceptedId === playground.settingsId && !!playground.frame"),
                "the page to show the new settings",
            )
            wait_until(lambda: page.evaluate(read_step) > 20, "training under the new settings")
            masks = page.evaluate("() => playground.frame.networks[1].masks")
            assert len(masks) == 3 and all(len(mask) == 16 for mask in masks)
            page.screenshot(path=str(ARTIFACTS / "playground-dropout.png"), full_page=True)

            # Pause, one step, reset, one more network: each reaches the server.
            page.click("#play")
            wait_until(lambda: page.evaluate("() => !playground.frame.playing"), "the pause")
            paused_at = page.evaluate(read_step)
            page.click("#step")
            wait_until(lambda: page.evaluate(read_step) == paused_at + 1, "one step")
            page.click("#reset")
            wait_until(lambda: page.evaluate(read_step) == 0, "the reset")
            page.click("#add-network")
            wait_until(lambda: (s := the_session(app)) is not None and len(s.networks) == 3, "a third network")
            assert page.evaluate("() => playground.errors") == []
        finally:
            browser.close()
    assert console_errors == []
    assert failed == []
    ours = (base, base.replace("http://", "ws://", 1), "data:")
    assert requests and all(r.startswith(ours) for r in requests), requests
    assert any(r.startswith(ours[1]) for r in requests)  # the live stream was opened, to this server
