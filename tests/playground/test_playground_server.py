"""The playground's server side, in-process: message validation, the training session (against solo runs and
closed forms), and the Starlette app over Starlette's TestClient (no socket): settings building the networks,
training advancing, bad, oversized and binary messages answered with an error frame, foreign Origins and
missing or wrong tokens refused; and the CLI started for real, stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import normdrop.nn as nd
from normdrop.playground import server
from normdrop.playground.messages import (
    MAX_MESSAGE_BYTES,
    MAX_NETWORKS,
    MessageError,
    NetworkSettings,
    Settings,
    parse_message,
)
from normdrop.playground.session import MASK_DROPPED, MASK_KEPT, Session
from normdrop.probes.variance_shift import predicted_train_variance

TOKEN = "test-token"
ORIGIN = "http://testserver"
PLAIN = NetworkSettings()
BN = NetworkSettings(norm="batch")


def settings_message(settings: Settings, message_id: int = 1) -> str:
    return json.dumps({"type": "settings", "id": message_id, "settings": settings.model_dump(mode="json")})


# ---------------------------------------------------------------------------------------------------------------
# Messages


def test_default_settings_are_two_networks_of_4x16_batch_32() -> None:
    settings = parse_message(json.dumps({"type": "settings", "settings": {}})).settings
    assert (settings.depth, settings.width, settings.batch_size, len(settings.networks)) == (4, 16, 32, 2)
    assert [n.norm for n in settings.networks] == ["none", "batch"]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"depth": 9}, "depth"),
        ({"width": 65}, "width"),
        ({"batch_size": 1}, "batch_size"),
        ({"grid": 500}, "grid"),
        ({"train_size": 1001}, "train_size=1001"),
        ({"train_size": 20, "batch_size": 32}, "batch_size=32"),
        ({"networks": []}, "networks"),
        ({"networks": [{}] * (MAX_NETWORKS + 1)}, "networks"),
        ({"networks": [{"norm": "ghost", "ghost_batch_size": 5}]}, "ghost_batch_size (5)"),
        ({"networks": [{"dropout": 0.95}]}, "dropout"),
        ({"networks": [{"lr": 100}]}, "lr"),
        ({"networks": [{"lr": -1}]}, "lr"),
        ({"dataset": "/etc/passwd"}, "dataset"),
        ({"networks": [{"optimizer": "__import__('os')"}]}, "optimizer"),
        ({"path": "x"}, "path"),
    ],
)
def test_bad_settings_are_refused_with_a_message_naming_the_field(settings: dict, named: str) -> None:
    with pytest.raises(MessageError, match="invalid message") as error:
        parse_message(json.dumps({"type": "settings", "settings": settings}))
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_mnist1d_takes_a_larger_training_set_than_the_2d_sets() -> None:
    assert Settings(dataset="mnist1d", train_size=3000).train_size == 3000


@pytest.mark.parametrize(
    "text",
    ["{bad", "[]", '{"type": "shutdown"}', '{"type": "control", "action": "exec"}', '{"type": "settings"}', "NaN"],
)
def test_malformed_messages_are_refused(text: str) -> None:
    with pytest.raises(MessageError):
        parse_message(text)


def test_an_oversized_message_is_refused_before_parsing() -> None:
    text = json.dumps({"type": "control", "action": "play", "pad": "x" * MAX_MESSAGE_BYTES})
    with pytest.raises(MessageError, match=f"at most {MAX_MESSAGE_BYTES} bytes"):
        parse_message(text)


# ---------------------------------------------------------------------------------------------------------------
# The session


def run_session(settings: Settings, steps: int) -> Session:
    session = Session(settings)
    for _ in range(steps):
        session.train_step()
    return session


def parameters(session: Session, index: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in session.networks[index].model.parameters()]


def test_a_network_trains_as_it_would_alone() -> None:
    """The oracle for lock-step training: network B beside A ends bitwise where B alone does (same batches, same
    init, its own dropout stream)."""
    with_dropout = NetworkSettings(norm="batch", dropout=0.3)
    side_by_side = run_session(Settings(networks=(PLAIN, with_dropout)), 25)
    alone = run_session(Settings(networks=(with_dropout,)), 25)
    for a, b in zip(parameters(side_by_side, 1), parameters(alone, 0), strict=True):
        assert torch.equal(a, b)
    assert side_by_side.networks[1].step == 25


def test_networks_start_from_the_same_weights_and_learn() -> None:
    session = Session(Settings(dataset="circles", networks=(PLAIN, NetworkSettings(dropout=0.2))))
    for a, b in zip(parameters(session, 0), parameters(session, 1), strict=True):
        assert torch.equal(a, b)
    before = session.frame()["networks"][0]["test"]["loss"]
    for _ in range(200):
        session.train_step()
    after = session.frame()["networks"][0]
    assert after["test"]["loss"] < 0.5 * before
    assert after["test"]["acc"] > 0.8


def test_switching_bn_changes_the_network() -> None:
    plain = Session(Settings(networks=(PLAIN,))).networks[0]
    ghost = Session(Settings(networks=(NetworkSettings(norm="ghost", ghost_batch_size=8),))).networks[0]
    assert plain.norms == [] and not any(isinstance(m, nd.BatchNorm1d) for m in plain.model.modules())
    assert len(ghost.norms) == 4 and all(isinstance(m, nd.GhostBatchNorm1d) for m in ghost.norms)
    assert all(m.ghost_batch_size == 8 for m in ghost.norms)


def test_captured_bn_statistics_follow_the_running_average_rule() -> None:
    """running_{t+1} = (1 - momentum) running_t + momentum * batch_{t+1} (mean; the variance with n / (n - 1))."""
    session = Session(Settings(networks=(BN,)))
    network = session.networks[0]
    session.train_step(capture=True)
    first = [dict(record) for record in network.captured["bn"]]
    session.train_step(capture=True)
    n = session.settings.batch_size
    for previous, record in zip(first, network.captured["bn"], strict=True):
        mean = 0.9 * previous["running_mean"] + 0.1 * record["batch_mean"]
        var = 0.9 * previous["running_var"] + 0.1 * record["batch_var"] * n / (n - 1)
        assert record["running_mean"] == pytest.approx(mean, abs=2e-5)
        assert record["running_var"] == pytest.approx(var, abs=2e-5)


def test_captured_masks_drop_about_p_of_the_units() -> None:
    p = 0.5
    settings = Settings(width=64, networks=(NetworkSettings(norm="batch", dropout=p, dropout_position="before_norm"),))
    session = Session(settings)
    session.train_step(capture=True)
    states = [state for mask in session.networks[0].captured["masks"] for state in mask]
    assert len(states) == 4 * 64
    dropped = sum(state == MASK_DROPPED for state in states) / len(states)
    assert states.count(MASK_KEPT) + states.count(MASK_DROPPED) == len(states)  # inputs before BN are never 0
    assert abs(dropped - p) < 5 * (p * (1 - p) / len(states)) ** 0.5


def test_activation_percentiles_are_ordered_per_layer() -> None:
    session = Session(Settings())
    session.train_step(capture=True)
    for network in session.networks:
        assert len(network.captured["activations"]) == 4
        for low, median, high in network.captured["activations"]:
            assert low <= median <= high


def test_variance_shift_matches_the_closed_form_and_vanishes_without_dropout() -> None:
    p = 0.3
    before_bn = NetworkSettings(norm="batch", dropout=p, dropout_position="before_norm")
    session = run_session(Settings(networks=(BN, before_bn)), 300)
    frame = session.frame()["networks"]
    for layer in frame[0]["shift"]:
        assert layer["train_var"] == layer["eval_var"]
        assert layer["running_var"] == pytest.approx(layer["eval_var"], rel=0.15)
    # The first BN's input is dropout(linear(x)): its variance with dropout on is (c^2 + v) / q - c^2 per unit.
    network = session.networks[1]
    with torch.no_grad():
        linear_out = network.model.hidden1.linear(session.data.x_train)
    predicted = predicted_train_variance(linear_out.mean(0), linear_out.var(0, unbiased=False), 1 - p).mean()
    assert frame[1]["shift"][0]["train_var"] == pytest.approx(float(predicted), rel=0.1)
    assert frame[1]["shift"][0]["eval_var"] == pytest.approx(float(linear_out.var(0, unbiased=False).mean()), 1e-3)
    assert all(layer["running_var"] > 1.2 * layer["eval_var"] for layer in frame[1]["shift"])


def test_frame_views_appear_only_where_they_apply() -> None:
    session = Session(Settings(networks=(PLAIN, NetworkSettings(norm="batch", dropout=0.2))))
    session.train_step(capture=True)
    plain, both = session.frame()["networks"]
    assert "mc" not in plain and "bn_eval" not in plain and "shift" not in plain and plain["masks"] == []
    assert set(both["mc"]) == {"weight_scaling", "mc", "samples"}
    assert 0 <= both["bn_eval"]["batch"] <= 1 and both["bn_eval"]["running"] == both["test"]["acc"]
    grid = session.settings.grid
    import base64

    assert len(base64.b64decode(plain["boundary"])) == grid * grid * session.data.num_classes


def test_batch_statistics_view_leaves_the_running_statistics_alone() -> None:
    session = run_session(Settings(networks=(BN,)), 5)
    buffers = [b.clone() for b in session.networks[0].model.buffers()]
    session.frame()
    assert all(torch.equal(a, b) for a, b in zip(buffers, session.networks[0].model.buffers(), strict=True))


def test_a_diverging_network_stops_while_the_others_go_on() -> None:
    wild = NetworkSettings(optimizer="adam", lr=1.0)
    session = run_session(Settings(networks=(wild, BN)), 60)
    stopped, going = session.networks
    assert stopped.diverged_at is not None and stopped.step == stopped.diverged_at
    assert going.diverged_at is None and going.step == 60
    json.dumps(session.frame(), allow_nan=False)  # no NaN reaches the page


def test_mnist1d_trains_without_a_map() -> None:
    session = run_session(Settings(dataset="mnist1d", train_size=500, networks=(BN,)), 3)
    frame = session.frame()["networks"][0]
    assert "boundary" not in frame and session.setup_message()["data"]["train"] == []
    assert session.data.x_train.shape == (500, 40)


# ---------------------------------------------------------------------------------------------------------------
# The app


@pytest.fixture
def client():
    with TestClient(server.create_app(TOKEN, {ORIGIN})) as test_client:
        yield test_client


def connect(client: TestClient, token: str | None = TOKEN, origin: str | None = ORIGIN):
    headers = {"origin": origin} if origin is not None else {}
    query = f"?token={token}" if token is not None else ""
    return client.websocket_connect(f"/ws{query}", headers=headers)


def receive(ws, kind: str, limit: int = 200) -> dict:
    for _ in range(limit):
        message = json.loads(ws.receive_text())
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind} message in {limit}")


def live_worker(client: TestClient):
    (worker,) = client.app.state.workers
    return worker


def test_the_page_is_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/static/../messages.py").status_code == 404


def test_a_session_advances_and_settings_rebuild_the_networks(client: TestClient) -> None:
    with connect(client) as ws:
        ws.send_text(settings_message(Settings(networks=(PLAIN,)), message_id=5))
        setup = receive(ws, "setup")
        assert setup["settings_id"] == 5 and setup["networks"][0]["bn_layers"] == 0
        assert live_worker(client).session.networks[0].norms == []
        ws.send_text(json.dumps({"type": "control", "action": "play"}))
        steps = [receive(ws, "frame")["step"] for _ in range(4)]
        assert steps == sorted(steps) and steps[-1] > steps[0]

        ws.send_text(settings_message(Settings(networks=(BN,)), message_id=6))
        setup = receive(ws, "setup")
        assert setup["settings_id"] == 6 and setup["networks"][0]["bn_layers"] == 4
        assert any("BatchNorm1d" in layer for layer in setup["networks"][0]["layers"])
        assert all(isinstance(m, nd.BatchNorm1d) for m in live_worker(client).session.networks[0].norms)
        frame = receive(ws, "frame")
        assert frame["settings_id"] == 6

        ws.send_text(json.dumps({"type": "control", "action": "pause"}))
        while receive(ws, "frame")["playing"]:
            pass
        ws.send_text(json.dumps({"type": "control", "action": "step"}))
        stepped = receive(ws, "frame")
        ws.send_text(json.dumps({"type": "control", "action": "reset"}))
        assert receive(ws, "setup")["settings_id"] == 6
        assert receive(ws, "frame")["step"] == 0 < stepped["step"]


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ("{not json", "Invalid JSON"),
        ('{"type": "settings", "settings": {"depth": 1000}}', "depth"),
        ('{"type": "control", "action": "delete"}', "action"),
        (json.dumps({"type": "control", "action": "play", "x": "y" * 9000}), "bytes"),
        (b"\x00\x01", "binary"),
    ],
)
def test_bad_messages_get_an_error_frame_and_change_nothing(client: TestClient, payload, says: str) -> None:
    with connect(client) as ws:
        ws.send_text(settings_message(Settings(networks=(PLAIN,)), message_id=3))
        receive(ws, "frame")
        if isinstance(payload, bytes):
            ws.send_bytes(payload)
        else:
            ws.send_text(payload)
        error = receive(ws, "error")
        assert says in error["message"]
        ws.send_text(json.dumps({"type": "control", "action": "step"}))
        frame = receive(ws, "frame")
        assert frame["settings_id"] == 3 and frame["step"] >= 1


@pytest.mark.parametrize(
    ("token", "origin"),
    [
        (TOKEN, "http://evil.example"),
        (TOKEN, "http://127.0.0.1:9"),
        (TOKEN, None),
        (None, ORIGIN),
        ("wrong", ORIGIN),
        ("", ORIGIN),
    ],
)
def test_foreign_origins_and_bad_tokens_are_refused_at_the_handshake(client: TestClient, token, origin) -> None:
    with pytest.raises(WebSocketDisconnect) as refused, connect(client, token, origin):
        pass
    assert refused.value.code == server.POLICY_VIOLATION
    assert client.app.state.workers == set()


def test_sessions_are_bounded_and_stop_with_their_page(client: TestClient) -> None:
    with connect(client) as first, connect(client) as second:
        for ws in (first, second):
            ws.send_text(json.dumps({"type": "control", "action": "step"}))
            receive(ws, "frame")
        workers = set(client.app.state.workers)
        assert len(workers) == server.MAX_SESSIONS
        with connect(client) as third:
            assert "at most" in receive(third, "error")["message"]
    deadline = time.monotonic() + 10
    while (client.app.state.workers or any(w.alive for w in workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.app.state.workers == set()
    assert not any(worker.alive for worker in workers)


def test_loopback_rules() -> None:
    assert server.is_loopback("127.0.0.1") and server.is_loopback("localhost") and server.is_loopback("::1")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("192.168.1.5")
    assert server.allowed_origins("127.0.0.1", 8000) == {
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
    }
    assert server.allowed_origins("192.168.1.5", 8000) == {"http://192.168.1.5:8000"}


def test_a_non_loopback_host_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() with --host 192.0.2.1 (a documentation address): warns, prints its URL; bound and served here on
    loopback by a stand-in server that returns at once, so nothing listens beyond 127.0.0.1."""
    real_bind = server._bind
    monkeypatch.setattr(server, "_bind", lambda host, port: real_bind("127.0.0.1", 0))

    class Returns:
        def __init__(self, app) -> None:
            self.app = app

        def run(self, sockets) -> None:
            sockets[0].close()

    monkeypatch.setattr(server, "_uvicorn_server", Returns)
    lines: list[str] = []
    server.serve(host="192.0.2.1", port=0, open_browser=False, echo=lines.append)
    assert lines[0].startswith("warning: --host 192.0.2.1 is not a loopback address")
    assert "http://192.0.2.1:" in lines[1] and "?token=" in lines[1]
    lines.clear()
    server.serve(host="127.0.0.1", port=0, open_browser=False, echo=lines.append)
    assert not any(line.startswith("warning") for line in lines)


@pytest.mark.slow  # a fresh process imports torch and numba: ~5 s idle, 20 s on a loaded machine
def test_the_cli_serves_and_stops_cleanly_on_ctrl_c() -> None:
    from websockets.sync.client import connect as ws_connect

    normdrop = Path(sys.executable).with_name("normdrop")
    process = subprocess.Popen(
        [str(normdrop), "playground", "--port", "0", "--no-open"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("normdrop playground: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].strip()
        base, token = url.split("/?token=")
        with ws_connect(f"{base.replace('http', 'ws')}/ws?token={token}", origin=base, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "control", "action": "play"}))
            frame = None
            while frame is None or frame["step"] < 3:
                message = json.loads(ws.recv(timeout=30))
                frame = message if message["type"] == "frame" else frame
            process.send_signal(signal.SIGINT)  # Ctrl-C while a page is connected and training
            stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "stopped" in stdout


def test_the_cli_lists_the_playground_and_checks_its_port() -> None:
    from typer.testing import CliRunner

    from normdrop.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["playground", "--help"])
    assert result.exit_code == 0
    assert all(option in result.output for option in ("--port", "--host", "--no-open"))
    assert runner.invoke(app, ["playground", "--port", "70000", "--no-open"]).exit_code == 2


def test_a_busy_port_is_a_one_line_error() -> None:
    import socket

    from typer.testing import CliRunner

    from normdrop.cli import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["playground", "--port", str(port), "--no-open"])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "pick another --port" in result.output
