"""One playground session: the networks side by side, their training, and what each frame shows of them.

A :class:`Session` builds one MLP per :class:`~normdrop.playground.messages.NetworkSettings` with
``normdrop.models.build_model`` (so the layers are normdrop's BatchNorm1d / GhostBatchNorm1d / Dropout), and trains
them in lock step: every step draws one batch (shuffled epochs of ``batch_size`` examples, the last partial batch
dropped so that BN and ghost BN always see full batches) and gives it to every network that has not diverged.
All networks start from the same seed; each has its own torch RNG state for its dropout masks, swapped in around
its step, so a network's numbers do not depend on which other networks train beside it.

A :class:`Worker` runs a session on a background thread: it applies the page's commands, trains while playing and
publishes a frame every ``FRAME_INTERVAL_S``. The step just before a frame is *captured*: forward hooks record the
activation inputs, BN's batch statistics and the dropout masks of that real training step. The frame then adds
evaluations that never touch training (eval mode, no gradient, a forked RNG): losses, accuracies, the decision
boundary on a grid, MC dropout against weight scaling, BN with batch statistics against running statistics, and
the variance shift of Li et al. (2019).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normdrop.models import build_model
from normdrop.nn.dropout_variants import DROPOUT_LAYER_TYPES
from normdrop.nn.mc import mc_dropout_mode, mc_predict
from normdrop.playground.datasets import PlaygroundData, grid_points, make_data
from normdrop.playground.messages import ControlMessage, NetworkSettings, Settings, SettingsMessage, error_frame
from normdrop.seeds import derive_seed
from normdrop.spec import RunSpec
from normdrop.train import make_optimizer

FRAME_INTERVAL_S = 1 / 15
"""Time between frames while playing (15 frames/s)."""
SLOW_VIEWS_EVERY = 4
"""MC dropout, BN with batch statistics and the variance shift (most of a frame's cost, and slow to change) are
measured every this many frames and repeated in between."""
MC_SAMPLES = 16
"""Dropout masks averaged by the MC-dropout prediction."""
PERCENTILES = (0.15, 0.50, 0.85)
"""Of the activation inputs, as in Ioffe & Szegedy (2015), figure 1."""
DIVERGE_LOSS = RunSpec.model_fields["diverge_loss"].default
"""A batch loss above this (or not finite) stops a network, as in the trainer."""
COMMAND_QUEUE_SIZE = 32
IDLE_POLL_S = 0.5
NETWORK_LABELS = "ABCD"
MASK_DROPPED, MASK_KEPT, MASK_SILENT = 0, 1, 2
"""A unit's state in the mask view: dropped, kept, or silent (its input was 0, so the mask cannot be seen)."""


def _number(value: float, digits: int = 5) -> float | None:
    """A JSON-safe float: rounded, and None when not finite (JSON has no NaN)."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def network_spec(settings: Settings, network: NetworkSettings) -> RunSpec:
    """The RunSpec that ``build_model`` and ``make_optimizer`` read (architecture and optimizer fields only)."""
    optimizer, momentum = ("sgd", 0.9) if network.optimizer == "momentum" else (network.optimizer, 0.0)
    return RunSpec(
        model="mlp",
        depth=settings.depth,
        width=settings.width,
        activation=settings.activation,
        init=network.init,
        norm=network.norm,
        norm_options={"ghost_batch_size": network.ghost_batch_size} if network.norm == "ghost" else {},
        norm_position=network.norm_position,
        dropout=network.dropout,
        dropout_position=network.dropout_position,
        optimizer=optimizer,
        momentum=momentum,
        lr=network.lr,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )


def describe(network: NetworkSettings) -> str:
    """One line naming what the network chose, for the page."""
    parts = []
    if network.norm == "none":
        parts.append("no BN")
    else:
        kind = "BN" if network.norm == "batch" else f"ghost BN ({network.ghost_batch_size})"
        parts.append(f"{kind} {network.norm_position.replace('_', ' ')}")
    if network.dropout > 0:
        parts.append(f"dropout {network.dropout:g} {network.dropout_position.replace('_', ' ')}")
    else:
        parts.append("no dropout")
    parts.append(f"{network.optimizer} lr {network.lr:g}")
    if network.init != "default":
        parts.append(f"{network.init} init")
    return ", ".join(parts)


@dataclass(eq=False)
class Network:
    """One of the networks side by side, with its optimizer, its RNG state and what its last capture saw."""

    label: str
    settings: NetworkSettings
    spec: RunSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rng_state: Tensor
    norms: list[nn.Module]
    activations: list[nn.Module]
    dropouts: list[nn.Module]
    step: int = 0
    diverged_at: int | None = None
    batch_loss: float = math.nan
    captured: dict[str, Any] = field(default_factory=dict)
    slow_views: dict[str, Any] = field(default_factory=dict)

    def train_step(self, inputs: Tensor, labels: Tensor, capture: bool) -> None:
        """One optimizer step on one batch; marks the network diverged (and skips the update) on a bad loss."""
        hooks = self._capture_hooks() if capture else []
        saved_rng = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        try:
            if not self.model.training:
                self.model.train()
            loss = F.cross_entropy(self.model(inputs), labels)
            self.batch_loss = float(loss.detach())
            if not math.isfinite(self.batch_loss) or self.batch_loss > DIVERGE_LOSS:
                self.diverged_at = self.step
                return
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(saved_rng)
            for hook in hooks:
                hook.remove()
        if capture:
            for record, norm in zip(self.captured["bn"], self.norms, strict=True):
                record["running_mean"] = _number(norm.running_mean[0])
                record["running_var"] = _number(norm.running_var[0])

    def _capture_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that record this step's activation inputs, BN batch statistics and dropout masks."""
        self.captured = {"activations": [], "bn": [], "masks": []}

        def on_activation(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
            quantiles = torch.quantile(args[0].detach().flatten().float(), torch.tensor(PERCENTILES))
            self.captured["activations"].append([_number(q) for q in quantiles])

        def on_norm(_module: nn.Module, args: tuple[Tensor, ...], _output: Tensor) -> None:
            unit = args[0].detach()[:, 0]
            batch_var = unit.var(unbiased=False)
            self.captured["bn"].append({"batch_mean": _number(unit.mean()), "batch_var": _number(batch_var)})

        def on_dropout(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            before, after = args[0].detach()[0], output.detach()[0]
            state = torch.where(after != 0, MASK_KEPT, MASK_DROPPED)
            state = torch.where(before == 0, MASK_SILENT, state)
            self.captured["masks"].append(state.tolist())

        hooks = [m.register_forward_hook(on_activation) for m in self.activations]
        hooks += [m.register_forward_hook(on_norm) for m in self.norms]
        return hooks + [m.register_forward_hook(on_dropout) for m in self.dropouts]


def build_network(settings: Settings, index: int, input_dim: int, num_classes: int) -> Network:
    """Network ``index`` of ``settings``: normdrop's MLP builder, the trainer's optimizer, a seeded RNG state."""
    network = settings.networks[index]
    spec = network_spec(settings, network)
    model = build_model(spec, (input_dim,), num_classes)
    hidden = [module for name, module in model.named_children() if name.startswith("hidden")]
    norms = [block.norm for block in hidden if hasattr(block, "norm")]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(settings.seed, "dropout"))
        rng_state = torch.get_rng_state()
    optimizer = make_optimizer(spec, list(model.parameters()))
    for group in optimizer.param_groups:
        group["foreach"] = True  # the multi-tensor step: the same update in a few calls instead of one per parameter
    return Network(
        label=NETWORK_LABELS[index],
        settings=network,
        spec=spec,
        model=model,
        optimizer=optimizer,
        rng_state=rng_state,
        norms=norms,
        activations=[block.act for block in hidden],
        dropouts=[m for m in model.modules() if isinstance(m, DROPOUT_LAYER_TYPES)],
    )


@contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """No gradient, the global RNG forked and fixed (MC masks repeat), and the model's modes restored after."""
    modes = {module: module.training for module in model.modules()}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            yield
        finally:
            for module, training in modes.items():
                module.training = training


def _loss_and_accuracy(logits: Tensor, labels: Tensor) -> dict[str, float | None]:
    return {
        "loss": _number(F.cross_entropy(logits, labels)),
        "acc": _number((logits.argmax(1) == labels).float().mean(), 4),
    }


def _norm_inputs(network: Network, inputs: Tensor) -> list[Tensor]:
    """The input of every BN layer in one forward pass of ``inputs``, in the model's current modes."""
    seen: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for m in network.norms]
    try:
        network.model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _batch_statistics_accuracy(network: Network, inputs: Tensor, labels: Tensor, batch_size: int) -> float | None:
    """Test accuracy with BN normalizing by each batch's own statistics (as in training; dropout off).

    The running statistics are saved and restored, so this look at "train mode" does not change the network.
    """
    buffers = {name: buffer.clone() for name, buffer in network.model.named_buffers()}
    network.model.eval()
    for norm in network.norms:
        norm.train()
    usable = len(labels) - len(labels) % batch_size
    try:
        correct = sum(
            int((network.model(inputs[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
            for i in range(0, usable, batch_size)
        )
    finally:
        for name, buffer in network.model.named_buffers():
            buffer.copy_(buffers[name])
    return _number(correct / usable, 4) if usable else None


class Session:
    """The data and the networks of one :class:`Settings`, trained in lock step."""

    def __init__(self, settings: Settings, settings_id: int = 0) -> None:
        self.settings = settings
        self.settings_id = settings_id
        self.data: PlaygroundData = make_data(settings)
        input_dim = self.data.x_train.shape[1]
        self.networks = [
            build_network(settings, index, input_dim, self.data.num_classes) for index in range(len(settings.networks))
        ]
        self.grid = grid_points(self.data.extent, settings.grid) if self.data.two_d else None
        self.step = 0
        self._frames = 0
        self._batch_generator = torch.Generator().manual_seed(derive_seed(settings.seed, "batch_order"))
        self._epoch: list[Tensor] = []

    def _next_batch(self) -> Tensor:
        if not self._epoch:
            order = torch.randperm(len(self.data.y_train), generator=self._batch_generator)
            full = len(order) - len(order) % self.settings.batch_size
            self._epoch = list(order[:full].split(self.settings.batch_size))[::-1]
        return self._epoch.pop()

    @property
    def live_networks(self) -> list[Network]:
        return [network for network in self.networks if network.diverged_at is None]

    def train_step(self, capture: bool = False) -> bool:
        """One step of every live network on the next batch; False (and nothing done) if all have diverged."""
        live = self.live_networks
        if not live:
            return False
        batch = self._next_batch()
        inputs, labels = self.data.x_train[batch], self.data.y_train[batch]
        for network in live:
            network.train_step(inputs, labels, capture)
        self.step += 1
        return True

    def setup_message(self) -> dict[str, Any]:
        """What the page draws once per settings: the points, the map's extent, each network's layers."""
        data = self.data

        def points(x: Tensor, y: Tensor) -> list[list[float]]:
            return [[round(a, 3), round(b, 3), c] for (a, b), c in zip(x.tolist(), y.tolist(), strict=True)]

        return {
            "type": "setup",
            "settings_id": self.settings_id,
            "settings": self.settings.model_dump(mode="json"),
            "data": {
                "two_d": data.two_d,
                "extent": data.extent,
                "num_classes": data.num_classes,
                "description": data.description,
                "train": points(data.x_train, data.y_train) if data.two_d else [],
                "test": points(data.x_test, data.y_test) if data.two_d else [],
            },
            "networks": [
                {
                    "label": network.label,
                    "description": describe(network.settings),
                    "layers": [str(module) for module in network.model.children()],
                    "bn_layers": len(network.norms),
                    "dropout_layers": len(network.dropouts),
                }
                for network in self.networks
            ],
        }

    def frame(self, fresh: bool = False) -> dict[str, Any]:
        """What the page draws now: every network's curves, map, statistics and masks (see the module doc).

        The slow views are measured on every ``SLOW_VIEWS_EVERY``-th frame, or now if ``fresh``."""
        slow = fresh or self._frames % SLOW_VIEWS_EVERY == 0
        self._frames += 1
        networks = [self._network_frame(network, slow) for network in self.networks]
        return {"type": "frame", "settings_id": self.settings_id, "step": self.step, "networks": networks}

    def _network_frame(self, network: Network, slow: bool) -> dict[str, Any]:
        data, model = self.data, network.model
        frame: dict[str, Any] = {
            "step": network.step,
            "diverged_at": network.diverged_at,
            "batch_loss": _number(network.batch_loss),
            **network.captured,
        }
        with _measuring(model):
            model.eval()
            frame["train"] = _loss_and_accuracy(model(data.x_train), data.y_train)
            frame["test"] = _loss_and_accuracy(model(data.x_test), data.y_test)
            if self.grid is not None and network.diverged_at is None:
                probs = torch.softmax(model(self.grid), dim=1)
                frame["boundary"] = base64.b64encode((probs * 255).round().to(torch.uint8).numpy().tobytes()).decode()
            if slow or not network.slow_views:
                network.slow_views = self._slow_views(network, frame["test"]["acc"])
        return {**frame, **network.slow_views}

    def _slow_views(self, network: Network, test_accuracy: float | None) -> dict[str, Any]:
        """MC dropout against weight scaling, BN's two modes, the variance shift (where the network has them)."""
        data, views = self.data, {}
        if network.dropouts:
            mc = mc_predict(network.model, data.x_test, k=MC_SAMPLES)
            views["mc"] = {
                "weight_scaling": test_accuracy,
                "mc": _number((mc.mean.argmax(1) == data.y_test).float().mean(), 4),
                "samples": MC_SAMPLES,
            }
        if network.norms:
            views["bn_eval"] = {
                "running": test_accuracy,
                "batch": _batch_statistics_accuracy(network, data.x_test, data.y_test, self.settings.batch_size),
            }
            views["shift"] = self._variance_shift(network)
        return views

    def _variance_shift(self, network: Network) -> list[dict[str, float | None]]:
        """Per BN layer, the mean over units of its input's variance on the training set at inference (eval mode),
        with dropout sampling (what training showed it), and its running variance (Li et al. 2019)."""
        network.model.eval()
        at_inference = _norm_inputs(network, self.data.x_train)
        if network.dropouts:
            with mc_dropout_mode(network.model):
                with_dropout = _norm_inputs(network, self.data.x_train)
        else:
            with_dropout = at_inference
        return [
            {
                "eval_var": _number(eval_input.var(0, unbiased=False).mean()),
                "train_var": _number(train_input.var(0, unbiased=False).mean()),
                "running_var": _number(norm.running_var.mean()),
            }
            for eval_input, train_input, norm in zip(at_inference, with_dropout, network.norms, strict=True)
        ]


Publish = Callable[[str, str], None]
"""(kind, JSON text) -> None, kind one of "setup", "frame", "error"; called from the worker thread."""
_STOP = object()


class Worker:
    """Runs one session on a background thread; commands come in through :meth:`submit`.

    While playing it trains as fast as it can and publishes a frame every ``FRAME_INTERVAL_S``; between steps it
    checks for commands, so a change takes effect after at most one step of every network. A failing command or
    step publishes an error frame and pauses; the thread itself only ends on :meth:`stop`.
    """

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self._commands: queue.Queue[object] = queue.Queue(maxsize=COMMAND_QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="normdrop-playground-worker", daemon=True)
        self.session: Session | None = None
        self.playing = False
        self._rate_mark = (time.perf_counter(), 0)
        self.steps_per_s = 0.0
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, message: SettingsMessage | ControlMessage) -> bool:
        """Queue a validated message; False if the queue is full (the page is sending faster than it is served)."""
        try:
            self._commands.put_nowait(message)
        except queue.Full:
            return False
        return True

    def request_stop(self) -> None:
        """Ask the thread to end after its current step (returns at once; pending commands are dropped)."""
        self._stopping = True
        while True:
            try:
                self._commands.put_nowait(_STOP)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._commands.get_nowait()

    def join(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to end and wait for it."""
        self.request_stop()
        self.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        # Per thread (OpenMP's setting is thread-local): the networks' ops run on this one thread, and torch's
        # thread pool does not fight the event loop and the other sessions for the cores over layers this small.
        torch.set_num_threads(1)
        next_frame = time.perf_counter()
        while True:
            try:
                command = self._commands.get(block=not self.playing, timeout=IDLE_POLL_S)
            except queue.Empty:
                command = None
            if command is _STOP:
                return
            if command is not None:
                self._safely(self._handle, command)
                continue
            if self.playing and self.session is not None:
                session = self.session
                while time.perf_counter() < next_frame and self._commands.empty() and self.playing:
                    if self._stopping:
                        return
                    if not self._safely(session.train_step):
                        break
                if self._commands.empty() and self.playing:
                    started = time.perf_counter()
                    if not self._safely(session.train_step, True):
                        self.playing = False  # every network diverged: nothing left to train
                    self._safely(self._publish_frame)
                    # Frames are due at a fixed rate (building one counts towards the next), but training always
                    # gets at least as much time as the frame took: a slow machine shows fewer frames, not no steps.
                    finished = time.perf_counter()
                    next_frame = max(started + FRAME_INTERVAL_S, 2 * finished - started)

    def _safely(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except Exception as error:  # a failure is reported to the page; the worker keeps serving
            self.playing = False
            self._publish("error", error_frame(f"{type(error).__name__}: {error}"))
            return False

    def _handle(self, command: object) -> None:
        if isinstance(command, SettingsMessage):
            self._build(command.settings, command.id)
            return
        assert isinstance(command, ControlMessage)
        if self.session is None:
            self._build(Settings(), 0)
        assert self.session is not None
        if command.action == "play":
            self.playing = True
        elif command.action == "pause":
            self.playing = False
        elif command.action == "step":
            self.playing = False
            self.session.train_step(capture=True)
        elif command.action == "reset":
            self._build(self.session.settings, self.session.settings_id)
            return
        self._publish_frame(fresh=True)

    def _build(self, settings: Settings, settings_id: int) -> None:
        self.session = Session(settings, settings_id)
        self._rate_mark = (time.perf_counter(), 0)
        self.steps_per_s = 0.0
        self._publish("setup", json.dumps(self.session.setup_message(), allow_nan=False))
        self._publish_frame()

    def _publish_frame(self, fresh: bool = False) -> None:
        assert self.session is not None
        now, step = time.perf_counter(), self.session.step
        mark_time, mark_step = self._rate_mark
        if now - mark_time >= 1.0 or step < mark_step:
            self.steps_per_s = (step - mark_step) / (now - mark_time) if step >= mark_step else 0.0
            self._rate_mark = (now, step)
        frame = self.session.frame(fresh)
        frame["playing"] = self.playing
        frame["steps_per_s"] = round(self.steps_per_s, 1)
        self._publish("frame", json.dumps(frame, allow_nan=False))
