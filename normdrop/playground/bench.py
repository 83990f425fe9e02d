"""How fast the playground trains and how often the page is updated: ``python -m normdrop.playground.bench``.

Four measurements, all on the default settings (two networks of 4 hidden layers x 16 units, batch 32, spirals; one
without BN, one with), in one process:

1. ``reference``: the session stepping alone on one thread (no server, no frames): steps/s per network.
2. ``socket``: a real uvicorn server on 127.0.0.1 and a WebSocket client that only counts frames: steps/s per
   network while frames are built and sent, frames/s received, and the server process's resident memory at the
   start and the end (bounded: it must not grow with the run's length).
3. ``latency``: a settings change sent while training, until the first frame trained under it arrives
   (median and worst of several changes).
4. ``browser`` (when Playwright and ``/usr/bin/chromium`` are there): the real page in headless Chromium: frames
   drawn per second by the page and steps/s per network.

Steps/s "per network" is the shared step counter's rate: every step trains each network once on the same batch.
The machine's load is printed with the numbers; timings on a shared machine move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from normdrop.playground.messages import NetworkSettings, Settings
from normdrop.playground.server import serving_in_thread

CHROMIUM = os.environ.get("NORMDROP_CHROMIUM", "/usr/bin/chromium")


def _rss_mib() -> float:
    """Resident memory of this process (MiB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference(seconds: float) -> dict[str, float]:
    """Steps/s of the default session on one thread with one torch thread, nothing else running."""
    import threading

    from normdrop.playground.session import Session

    result: dict[str, float] = {}

    def run() -> None:
        import torch

        torch.set_num_threads(1)
        session = Session(Settings())
        for _ in range(50):
            session.train_step()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            session.train_step()
            steps += 1
        result["steps_per_s"] = steps / (time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


def _ws_url(page_url: str) -> tuple[str, str]:
    base, token = page_url.split("/?token=")
    return base.replace("http://", "ws://") + f"/ws?token={token}", base


def socket_client(seconds: float, changes: int) -> dict[str, Any]:
    """Frames/s, steps/s and memory with a WebSocket client; then the latency of ``changes`` settings changes."""
    from websockets.sync.client import connect

    with serving_in_thread() as (url, _app):
        ws_url, origin = _ws_url(url)
        with connect(ws_url, origin=origin, max_size=None) as ws:  # type: ignore[arg-type]
            ws.send(json.dumps({"type": "settings", "id": 1, "settings": Settings().model_dump(mode="json")}))
            ws.send(json.dumps({"type": "control", "action": "play"}))
            frames, first, last, rss_start = 0, None, None, None
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                message = json.loads(ws.recv())
                if message["type"] != "frame" or not message["playing"]:
                    continue
                now = time.perf_counter()
                if first is None:
                    first, rss_start = (now, message["step"]), _rss_mib()
                last = (now, message["step"])
                frames += 1
            assert first is not None and last is not None
            elapsed = last[0] - first[0]
            live = {
                "frames_per_s": (frames - 1) / elapsed,
                "steps_per_s": (last[1] - first[1]) / elapsed,
                "rss_mib_start": rss_start,
                "rss_mib_end": _rss_mib(),
            }
            latencies = []
            for change in range(changes):
                dropout = 0.1 if change % 2 == 0 else 0.2
                settings = Settings(networks=(NetworkSettings(), NetworkSettings(norm="batch", dropout=dropout)))
                sent = time.perf_counter()
                ws.send(json.dumps({"type": "settings", "id": 100 + change, "settings": settings.model_dump()}))
                while True:
                    message = json.loads(ws.recv())
                    if message["type"] == "frame" and message["settings_id"] == 100 + change:
                        latencies.append(time.perf_counter() - sent)
                        break
                time.sleep(0.3)
    return {
        **live,
        "change_latency_ms_median": 1e3 * statistics.median(latencies),
        "change_latency_ms_max": 1e3 * max(latencies),
    }


def browser(seconds: float) -> dict[str, float] | None:
    """Frames drawn per second by the real page, and steps/s, in headless Chromium; None without one."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not Path(CHROMIUM).exists():
        return None
    with serving_in_thread() as (url, _app), sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = chromium.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(url)
            deadline = time.monotonic() + 60  # polled from here: the page's CSP forbids wait_for_function's eval
            while not page.evaluate("() => Boolean(playground.frame && playground.frame.step > 20)"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the page did not start training within 60 s")
                time.sleep(0.1)
            read = "() => [performance.now(), playground.framesDrawn, playground.frame.step]"
            t0, drawn0, step0 = page.evaluate(read)
            time.sleep(seconds)
            t1, drawn1, step1 = page.evaluate(read)
        finally:
            chromium.close()
    elapsed = (t1 - t0) / 1e3
    return {"frames_drawn_per_s": (drawn1 - drawn0) / elapsed, "steps_per_s": (step1 - step0) / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each timed phase")
    parser.add_argument("--changes", type=int, default=8, help="settings changes timed for the latency")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.changes < 1:
        parser.error("--seconds must be positive and --changes at least 1")
    results: dict[str, Any] = {"load_average": os.getloadavg()}
    results["reference"] = reference(args.seconds)
    results["socket"] = socket_client(args.seconds, args.changes)
    results["browser"] = browser(args.seconds)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    load = ", ".join(f"{x:.2f}" for x in results["load_average"])
    ref, sock, page = results["reference"], results["socket"], results["browser"]
    print(f"load average {load} (cores: {os.cpu_count()})")
    print(f"reference (session alone, one thread): {ref['steps_per_s']:.0f} steps/s per network")
    print(
        f"live, WebSocket client: {sock['steps_per_s']:.0f} steps/s per network "
        f"({sock['steps_per_s'] / ref['steps_per_s']:.2f}x the reference), {sock['frames_per_s']:.1f} frames/s, "
        f"memory {sock['rss_mib_start']:.0f} -> {sock['rss_mib_end']:.0f} MiB"
    )
    print(
        f"settings change -> first frame under it: median {sock['change_latency_ms_median']:.0f} ms, "
        f"worst {sock['change_latency_ms_max']:.0f} ms"
    )
    if page is None:
        print("browser: skipped (no Playwright or no Chromium)")
    else:
        print(
            f"live, real page in Chromium: {page['steps_per_s']:.0f} steps/s per network "
            f"({page['steps_per_s'] / ref['steps_per_s']:.2f}x the reference), "
            f"{page['frames_drawn_per_s']:.1f} frames drawn/s"
        )


if __name__ == "__main__":
    main()
