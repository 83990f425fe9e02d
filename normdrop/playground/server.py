"""The playground's web server: a Starlette app (the page, its static files, one WebSocket stream) run by uvicorn.

Security, as for Jupyter: the server binds loopback unless told otherwise (:func:`serve` warns for any other
host); the WebSocket is refused unless its ``Origin`` is the playground's own and the URL carries the per-launch
``token`` (compared in constant time), so another web page open in the same browser can neither connect nor drive
it. Every message is validated (``messages.parse_message``): bounded in size (``MAX_MESSAGE_BYTES`` in the app,
``TRANSPORT_MAX_BYTES`` in uvicorn) and in value; a refused one gets an error frame. No code or file path is ever
taken from the page. Every HTTP response carries a Content-Security-Policy that lets the page load and connect to
nothing but this server. At most ``MAX_SESSIONS`` pages train at once; each has its own worker thread, stopped
when the page goes away or the server shuts down (Ctrl-C).

Frames flow through an :class:`Outbox` per connection: the latest frame replaces an unsent one (a slow page skips
frames instead of queueing them), so memory stays bounded however long the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import threading
import time
import webbrowser
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from normdrop.playground import DEFAULT_HOST, DEFAULT_PORT
from normdrop.playground.messages import MessageError, error_frame, parse_message
from normdrop.playground.session import Worker

MAX_SESSIONS = 2
TRANSPORT_MAX_BYTES = 64 * 1024
"""uvicorn closes a connection whose message exceeds this; smaller ones above MAX_MESSAGE_BYTES get an error."""
MAX_PENDING_ERRORS = 16
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC_DIR = Path(str(resources.files("normdrop.playground") / "static"))


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_origins(host: str, port: int) -> frozenset[str]:
    """The Origins the WebSocket accepts: this server's own, under the names a browser may use for it."""
    names = {"127.0.0.1", "localhost", "[::1]"} if is_loopback(host) else {_url_host(host)}
    return frozenset(f"http://{name}:{port}" for name in names)


class Outbox:
    """What the worker thread hands the connection's sender: error frames (a few, in order), the latest setup and
    the latest frame. Publishing a setup drops the unsent frame, which belonged to the settings it replaces."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._errors: deque[str] = deque()
        self._setup: str | None = None
        self._frame: str | None = None

    def publish(self, kind: str, text: str) -> None:
        """Called from any thread; kind is "error", "setup" or "frame"."""
        with self._lock:
            if kind == "frame":
                self._frame = text
            elif kind == "setup":
                self._setup, self._frame = text, None
            elif len(self._errors) < MAX_PENDING_ERRORS:
                self._errors.append(text)
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is left to read it
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[str]:
        """Wait for something to send, then take all of it in order: errors, setup, frame."""
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            items = [*self._errors, *(t for t in (self._setup, self._frame) if t is not None)]
            self._errors.clear()
            self._setup = self._frame = None
        return items


class SecurityHeaders:
    """ASGI middleware: every HTTP response gets the Content-Security-Policy and no-sniff / no-referrer headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [
                    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _origin_allowed(websocket: WebSocket, origins: Collection[str] | None) -> bool:
    origin = websocket.headers.get("origin")
    if origin is None:
        return False
    if origins is not None:
        return origin in origins
    # A wildcard bind (0.0.0.0, ::) has no fixed name: the Origin must name the host the page was served from.
    return origin == f"http://{websocket.headers.get('host', '')}"


def create_app(token: str, origins: Collection[str] | None, max_sessions: int = MAX_SESSIONS) -> Starlette:
    """The playground app. ``token`` must be in the WebSocket's URL (``/ws?token=...``); ``origins`` are the
    accepted Origins (None: the page's own Host, for wildcard binds). ``app.state.workers`` holds the live
    sessions' workers (tests look at their networks)."""
    if not token:
        raise ValueError("the playground needs a non-empty token")
    workers: set[Worker] = set()

    async def index(_request: object) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def stream(websocket: WebSocket) -> None:
        given = websocket.query_params.get("token", "")
        if not _origin_allowed(websocket, origins) or not secrets.compare_digest(given.encode(), token.encode()):
            await websocket.close(code=POLICY_VIOLATION)  # before accept: the handshake is refused (HTTP 403)
            return
        await websocket.accept()
        if len(workers) >= max_sessions:
            await websocket.send_text(error_frame(f"at most {max_sessions} pages can train at once; close one"))
            await websocket.close(code=TRY_AGAIN_LATER)
            return
        outbox = Outbox(asyncio.get_running_loop())
        worker = Worker(outbox.publish)
        workers.add(worker)
        worker.start()
        sender = asyncio.create_task(_send_loop(websocket, outbox))
        try:
            await _receive_loop(websocket, worker, outbox)
        finally:
            # Bookkeeping first and without awaiting: a cancelled handler (server shutdown) must still let go.
            sender.cancel()
            workers.discard(worker)
            worker.request_stop()
            await asyncio.to_thread(worker.join)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        stopping = list(workers)
        for worker in stopping:
            worker.request_stop()
        for worker in stopping:
            await asyncio.to_thread(worker.join)

    app = Starlette(
        routes=[
            Route("/", index),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
            WebSocketRoute("/ws", stream),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(SecurityHeaders)
    app.state.workers = workers
    return app


async def _receive_loop(websocket: WebSocket, worker: Worker, outbox: Outbox) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            outbox.publish("error", error_frame("binary frames are refused: send JSON text"))
            continue
        try:
            parsed = parse_message(text)
        except MessageError as error:
            outbox.publish("error", error_frame(str(error)))
            continue
        if not worker.submit(parsed):
            outbox.publish("error", error_frame("too many messages at once: this one was dropped"))


async def _send_loop(websocket: WebSocket, outbox: Outbox) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while True:
            for text in await outbox.take():
                await websocket.send_text(text)


def _open_when_started(server: object, url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not getattr(server, "started", False) and time.monotonic() < deadline:
        time.sleep(0.05)
    webbrowser.open(url)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)  # connections wait in the backlog until uvicorn starts accepting
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}; pick another --port") from None
    return sock


def _uvicorn_server(app: Starlette) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", ws_max_size=TRANSPORT_MAX_BYTES, timeout_graceful_shutdown=5, lifespan="on"
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def serving_in_thread(host: str = DEFAULT_HOST) -> Iterator[tuple[str, Starlette]]:
    """A playground on a free port of ``host``, served by uvicorn on a background thread of this process (for the
    browser test and the benchmark): yields (URL with token, app); shuts the server down on exit."""
    sock = _bind(host, 0)
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    app = create_app(token, allowed_origins(host, port))
    server = _uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="playground-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the playground server did not start within 30 s")
    try:
        yield f"http://{_url_host(host)}:{port}/?token={token}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    open_browser: bool = True,
    echo: Callable[[str], None] = print,
) -> None:
    """Run the playground until Ctrl-C: bind, print the URL (with its token), open the browser, serve.

    ``port=0`` picks a free port (the printed URL names it).
    """
    if not is_loopback(host):
        echo(
            f"warning: --host {host} is not a loopback address: other machines on the network can reach this "
            "server; only the token in the URL keeps them from training on it"
        )
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    wildcard = host.strip("[]") in ("0.0.0.0", "::")
    token = secrets.token_urlsafe(24)
    app = create_app(token, None if wildcard else allowed_origins(host, port))
    server = _uvicorn_server(app)
    shown_host = "127.0.0.1" if wildcard or host == "localhost" else _url_host(host)
    url = f"http://{shown_host}:{port}/?token={token}"
    echo(f"normdrop playground: {url}")
    echo("press Ctrl-C to stop")
    if open_browser:
        threading.Thread(target=_open_when_started, args=(server, url), daemon=True).start()
    # uvicorn shuts down gracefully on Ctrl-C (closing each WebSocket, whose worker then stops; the lifespan stops
    # any left), then re-raises the signal: that KeyboardInterrupt is the expected end, not an error.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    echo("normdrop playground stopped")
