"""One training run from a :class:`~normdrop.spec.RunSpec`: :func:`run` returns a :class:`~normdrop.spec.RunResult`.

Steps and what is recorded
--------------------------
Step ``t`` names the parameters ``w_t`` after ``t`` optimizer updates (``t = 0`` is the initialization). Every
update ``t -> t+1`` draws a batch, computes the cross-entropy loss at ``w_t`` and takes one optimizer step with the
learning rate :func:`learning_rate` ``(spec, t)``. The run records, in long format ``(step, name, value)``:

- ``batch_loss`` at every ``t < steps``: the training loss of the batch of update ``t -> t+1``, at ``w_t``;
- every ``eval_every`` steps and at the end, in eval mode (running BN statistics, no dropout) on the full
  training and test sets: ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy`` (accuracies are
  fractions in [0, 1]; the training labels are the noisy ones when ``label_noise > 0``) and ``train_time``
  (seconds spent in training steps so far, evaluation and hooks excluded);
- every ``eval_every`` steps, for update ``t -> t+1`` on its batch: ``lr``, ``grad_norm`` = ||g_t||,
  ``weight_norm`` = ||w_t|| and ``update_ratio`` = ||w_{t+1} - w_t|| / ||w_t||, the norms taken over all
  parameters together.

Divergence: if a batch loss is non-finite or above ``spec.diverge_loss`` at step ``t``, training stops there and the
run is ``"diverged"`` with ``diverged_step = t``. Any exception makes the run ``"failed"`` with its traceback as the
error; :func:`run` never raises for a bad run (the sweep counts it instead).

Reproducibility: weights are drawn from ``derive_seed(seed, "init")``, the batch order from ``"batch_order"`` (a
private ``torch.Generator``: epochs are random permutations, the last incomplete batch of an epoch is dropped) and
dropout masks from ``"dropout"`` (torch's default generator, forked so the caller's RNG state is untouched).
``torch.use_deterministic_algorithms`` is on during the run. The same spec therefore gives bitwise-identical
metrics in one process and across processes with the same torch build and the same number of torch threads (one by
default, see :func:`run`).

Hooks
-----
A hook is any object with an ``every: int`` attribute and ``__call__(ctx: HookContext) -> list[dict]``. It is
called at steps ``t = 0, every, 2 every, ...`` up to ``steps`` (``every = 0``: once, at the final step), after that
step's evaluation. Its records go to ``RunResult.probe_records`` with ``"probe"`` (the hook's ``name`` attribute,
else its class name) and ``"step"`` filled in unless the hook set them. Hooks observe and never steer: the
model's parameters and buffers, the optimizer state, train mode and the global RNG are restored after each call, so
a run with hooks trains exactly like one without.

The trainer knows no probe registry: the hooks of ``spec.probes`` come in as ``probe_hooks`` (built by
:func:`normdrop.lab.run_spec`, which is how a spec with probes is run); a spec that lists probes and gets no probe
hooks is refused before training, rather than run without its instruments.

What a run keeps: with ``"final_weights"`` in ``spec.keep``, a finished run's ``RunResult.artifacts`` holds
``torch.save`` of the trained network's state dict under that name (the store saves it among the run's artifacts).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normdrop.data import Dataset, load_dataset
from normdrop.models import build_model
from normdrop.seeds import derive_seed
from normdrop.spec import RunResult, RunSpec
from normdrop.tensors import global_norm

EVAL_CHUNK = 4096  # examples per forward pass during evaluation, to bound memory on large test sets
DATASET_CACHE_SIZE = 4  # datasets kept in memory per process; runs of a sweep mostly share a few


@dataclass(frozen=True)
class HookContext:
    """What a hook sees at step ``step``: the live model and optimizer, a fixed probe batch, the data and loss.

    ``lr`` is the learning rate of the next update (of the last one at the final step); ``probe_batch`` is the first
    ``spec.probe_batch_size`` training examples, the same at every step; ``loss_fn(logits, labels)`` is the mean
    cross-entropy the run minimizes; ``metrics`` is the run's list of ``(step, name, value)`` recorded so far (the
    trainer's own list: read it, never change it).
    """

    spec: RunSpec
    step: int
    lr: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    probe_batch: tuple[Tensor, Tensor]
    dataset: Dataset
    metrics: Sequence[tuple[int, str, float]] = ()


class Hook(Protocol):
    """An instrument called during training (see the module docstring)."""

    every: int

    def __call__(self, ctx: HookContext) -> list[dict[str, Any]]: ...


def learning_rate(spec: RunSpec, step: int) -> float:
    r"""The learning rate of update ``step -> step + 1`` (``0 <= step < spec.steps``).

    With peak rate :math:`\eta`, :math:`W` warmup steps, :math:`u = t - W` and :math:`T = \mathrm{steps} - W`:

    - warmup, :math:`t < W`: :math:`\eta\,(t + 1) / W`;
    - ``constant``: :math:`\eta`;
    - ``step``: :math:`\eta\,\gamma^{\lfloor u / s \rfloor}` with :math:`s` = ``lr_step_size``, :math:`\gamma` =
      ``lr_gamma``;
    - ``cosine`` (Loshchilov & Hutter 2017, one cycle):
      :math:`\eta_{min} + (\eta - \eta_{min})\,(1 + \cos(\pi u / T)) / 2`.
    """
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    since_warmup = step - spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    if spec.schedule == "step":
        return spec.lr * spec.lr_gamma ** (since_warmup // spec.lr_step_size)
    if spec.schedule == "cosine":
        cosine = 0.5 * (1.0 + math.cos(math.pi * since_warmup / (spec.steps - spec.warmup_steps)))
        return spec.lr_min + (spec.lr - spec.lr_min) * cosine
    raise ValueError(f"unknown schedule {spec.schedule!r}")


def make_optimizer(spec: RunSpec, parameters: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (with momentum / Nesterov), Adam or AdamW; weight decay applies to every parameter."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, weight_decay=spec.weight_decay
        )
    if spec.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


@functools.lru_cache(maxsize=DATASET_CACHE_SIZE)
def _cached_dataset(
    name: str,
    train_size: int | None,
    label_noise: float,
    standardize: bool,
    seed: int,
    options: tuple[tuple[str, int | float], ...],
    root: str | None,
) -> Dataset:
    return load_dataset(
        name,
        root=root,
        train_size=train_size,
        label_noise=label_noise,
        standardize=standardize,
        seed=seed,
        **dict(options),
    )


def load_run_dataset(spec: RunSpec, data_root: str | None = None) -> Dataset:
    """The dataset a spec trains on (cached per process; the tensors are shared, so do not modify them)."""
    return _cached_dataset(
        spec.dataset,
        spec.train_size,
        spec.label_noise,
        spec.standardize,
        spec.data_seed,
        spec.dataset_options,
        None if data_root is None else str(data_root),
    )


def _batch_indices(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless mini-batches: each epoch a fresh random permutation, its last incomplete batch dropped."""
    while True:
        permutation = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield permutation[start : start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode; the model's train/eval mode is left as found."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), EVAL_CHUNK):
        logits = model(inputs[start : start + EVAL_CHUNK])
        chunk_labels = labels[start : start + EVAL_CHUNK]
        total_loss += F.cross_entropy(logits, chunk_labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == chunk_labels).sum())
    model.train(was_training)
    return total_loss / len(labels), correct / len(labels)


@contextmanager
def _reproducible(seed: int, num_threads: int | None) -> Iterator[None]:
    """Deterministic algorithms on, the thread count fixed, the default RNG forked and seeded; all restored."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "dropout"))
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        torch.set_num_threads(previous_threads)


def _due(hook: Hook, step: int, final_step: int) -> bool:
    return step == final_step if hook.every == 0 else step % hook.every == 0


def _call_hook(hook: Hook, ctx: HookContext) -> list[dict[str, Any]]:
    """Run one hook and undo whatever it did to the model, the optimizer or the RNG."""
    model_state = {key: value.clone() for key, value in ctx.model.state_dict().items()}
    optimizer_state = copy.deepcopy(ctx.optimizer.state_dict())
    with torch.random.fork_rng(devices=[]):
        records = hook(ctx)
    ctx.model.load_state_dict(model_state)
    ctx.optimizer.load_state_dict(optimizer_state)
    ctx.model.train()
    ctx.model.zero_grad(set_to_none=True)
    name = getattr(hook, "name", type(hook).__name__)
    return [{"probe": name, "step": ctx.step, **record} for record in records]


class _ProgressBar:
    """A rich progress bar on stderr with ETA, refreshed about 100 times per run to keep its cost negligible."""

    def __init__(self, spec: RunSpec, enabled: bool):
        self._enabled = enabled
        self._every = max(1, spec.steps // 100)
        self._last = 0
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task(f"{spec.model} on {spec.dataset}", total=spec.steps)

    def __enter__(self) -> _ProgressBar:
        if self._enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._enabled:
            # The last frame shows the last step reached (N/N for a finished run), not the last refreshed one.
            self._progress.update(self._task, completed=self._last)
            self._progress.stop()

    def update(self, step: int, description: str | None = None) -> None:
        self._last = step
        if self._enabled and (step % self._every == 0 or description is not None):
            self._progress.update(self._task, completed=step, description=description)


def run(
    spec: RunSpec,
    *,
    hooks: Sequence[Hook] | None = None,
    progress: bool = False,
    data_root: str | None = None,
    num_threads: int | None = 1,
    probe_hooks: Sequence[Hook] | None = None,
) -> RunResult:
    """Train the model a spec describes and return everything recorded (see the module docstring).

    Args:
        spec: the run.
        hooks: instruments called during training, besides those of ``spec.probes``.
        progress: show a progress bar with ETA on stderr.
        data_root: directory of real dataset files (MNIST, CIFAR-10); not part of the run's identity.
        num_threads: torch threads during the run (restored after). One thread is fastest for the lab's small
            models and makes results identical across machines with different core counts; None keeps the
            current setting.
        probe_hooks: the hooks of ``spec.probes`` (:func:`normdrop.lab.run_spec` builds them); required when the
            spec lists probes, called after ``hooks``.

    Raises:
        ValueError: the spec lists probes and no ``probe_hooks`` came with it.
    """
    if spec.probes and probe_hooks is None:
        raise ValueError(
            f"spec.probes={list(spec.probes)} needs the probes' hooks: run it with normdrop.lab.run_spec "
            "(or pass probe_hooks=normdrop.probes.make_probes(spec))"
        )
    start = time.perf_counter()
    metrics: list[tuple[int, str, float]] = []
    probe_records: list[dict[str, Any]] = []
    artifacts: dict[str, bytes] = {}
    try:
        with _reproducible(spec.seed, num_threads), _ProgressBar(spec, progress) as bar:
            all_hooks = [*(hooks or []), *(probe_hooks or [])]
            diverged_step, summary = _train(spec, all_hooks, data_root, metrics, probe_records, artifacts, bar)
    except Exception:
        # the whole traceback: `normdrop runs show RUN_ID` prints it
        return _result(spec, start, metrics, probe_records, error=traceback.format_exc().strip())
    return _result(
        spec, start, metrics, probe_records, diverged_step=diverged_step, summary=summary, artifacts=artifacts
    )


def _result(
    spec: Any,
    start: float,
    metrics: list[tuple[int, str, float]],
    probe_records: list[dict[str, Any]],
    *,
    diverged_step: int | None = None,
    summary: dict[str, float | bool | None] | None = None,
    artifacts: dict[str, bytes] | None = None,
    error: str | None = None,
) -> RunResult:
    """The result of a run that started at ``start`` (``time.perf_counter``): failed with ``error`` when one is
    given (what it recorded before kept), else finished or diverged at ``diverged_step``. Shared by :func:`run`
    and :func:`fit`."""
    if error is not None:
        status, summary = "failed", {"diverged": False}
    else:
        status = "finished" if diverged_step is None else "diverged"
    return RunResult(
        run_id=spec.run_id,
        spec=spec,
        status=status,
        diverged_step=diverged_step,
        error=error,
        metrics=metrics,
        probe_records=probe_records,
        summary=summary or {},
        wall_time=time.perf_counter() - start,
        artifacts=artifacts or {},
    )


def _train(
    spec: RunSpec,
    hooks: list[Hook],
    data_root: str | None,
    metrics: list[tuple[int, str, float]],
    probe_records: list[dict[str, Any]],
    artifacts: dict[str, bytes],
    bar: _ProgressBar,
) -> tuple[int | None, dict[str, float | bool | None]]:
    """The training loop; appends to ``metrics`` and ``probe_records``, fills ``artifacts`` with what
    ``spec.keep`` names, returns (diverged_step, summary)."""
    title = f"{spec.model} on {spec.dataset}"
    bar.update(0, f"{title}: loading the data")  # the first seconds of a run: say what they are spent on
    data = load_run_dataset(spec, data_root)
    x_train, y_train = data.x_train, data.y_train
    if spec.batch_size > len(y_train):
        raise ValueError(f"batch_size={spec.batch_size} exceeds the {len(y_train)} training examples")
    bar.update(0, f"{title}: building the model")
    model = build_model(spec, data.input_shape, data.num_classes)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = make_optimizer(spec, parameters)
    batches = _batch_indices(
        len(y_train), spec.batch_size, torch.Generator().manual_seed(derive_seed(spec.seed, "batch_order"))
    )
    for hook in hooks:
        if not isinstance(hook.every, int) or hook.every < 0:
            raise ValueError(f"hook {hook!r}: every must be an integer >= 0, got {hook.every!r}")
    probe_batch = (x_train[: spec.probe_batch_size], y_train[: spec.probe_batch_size])
    train_time = 0.0
    summary: dict[str, float | bool | None] = {}

    def evaluate_at(step: int) -> None:
        train_eval, test_eval = evaluate(model, x_train, y_train), evaluate(model, data.x_test, data.y_test)
        record_evaluation(step, train_eval, test_eval, train_time, summary, metrics)
        bar.update(step, f"{spec.model} on {spec.dataset}: test accuracy {test_eval[1]:.3f}")

    def call_hooks_at(step: int) -> None:
        for hook in hooks:
            if _due(hook, step, spec.steps):
                lr = learning_rate(spec, min(step, spec.steps - 1))
                ctx = HookContext(spec, step, lr, model, optimizer, F.cross_entropy, probe_batch, data, metrics)
                probe_records.extend(_call_hook(hook, ctx))

    model.train()
    bar.update(0, f"{title}: first evaluation (and, once per machine, building the C++ fast path)")
    evaluate_at(0)
    call_hooks_at(0)
    for step in range(spec.steps):
        step_start = time.perf_counter()
        indices = next(batches)
        updated = _update(spec, step, model, optimizer, parameters, x_train[indices], y_train[indices], metrics)
        train_time += time.perf_counter() - step_start
        if not updated:
            return step, _diverged_summary(step, train_time)
        done = step + 1
        if done % spec.eval_every == 0 or done == spec.steps:
            evaluate_at(done)
        else:
            bar.update(done)
        call_hooks_at(done)
    summary.update(diverged=False, steps_completed=spec.steps, train_time=train_time)
    if "final_weights" in spec.keep:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        artifacts["final_weights"] = buffer.getvalue()
    return None, summary


def record_evaluation(
    step: int,
    train_eval: tuple[float, float],
    test_eval: tuple[float, float],
    train_time: float,
    summary: dict[str, float | bool | None],
    metrics: list[tuple[int, str, float]],
) -> None:
    """Record one evaluation at ``step``: (loss, accuracy) on the training and test sets and the training time so
    far, into ``summary`` (the latest) and ``metrics`` (long format, in this order). Shared by :func:`run`,
    :func:`fit` and the fleet's members, so every path stores the same rows."""
    evaluation = {
        "train_loss": train_eval[0],
        "train_accuracy": train_eval[1],
        "test_loss": test_eval[0],
        "test_accuracy": test_eval[1],
        "train_time": train_time,
    }
    summary.update(evaluation)
    metrics.extend((step, name, value) for name, value in evaluation.items())


def _update(
    spec: Any,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    metrics: list[tuple[int, str, float]],
) -> bool:
    """One optimizer update at ``step``: the scheduled learning rate, the cross-entropy of the batch (recorded as
    ``batch_loss``), backward and the step (with the gradient diagnostics every ``eval_every`` steps). False, with
    nothing updated, when the loss is not finite or above ``spec.diverge_loss`` (the run diverged at ``step``).
    Shared by :func:`run` and :func:`fit`, so both train by the same rule."""
    lr = learning_rate(spec, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(model(inputs), targets)
    loss_value = loss.item()
    metrics.append((step, "batch_loss", loss_value))
    if not math.isfinite(loss_value) or loss_value > spec.diverge_loss:
        return False
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if step % spec.eval_every == 0:
        metrics.append((step, "lr", lr))
        _step_with_diagnostics(step, optimizer, parameters, metrics)
    else:
        optimizer.step()
    return True


def _step_with_diagnostics(
    step: int, optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], metrics: list[tuple[int, str, float]]
) -> None:
    """One optimizer step that also records ||g_t||, ||w_t|| and ||w_{t+1} - w_t|| / ||w_t||."""
    before = [parameter.detach().clone() for parameter in parameters]
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    grad_norm = float(global_norm(grads))
    optimizer.step()
    weight_norm = float(global_norm(before))
    update_norm = float(global_norm(torch._foreach_sub([p.detach() for p in parameters], before)))
    metrics.extend(
        [
            (step, "grad_norm", grad_norm),
            (step, "weight_norm", weight_norm),
            (step, "update_ratio", update_norm / weight_norm if weight_norm > 0 else math.inf),
        ]
    )


def _diverged_summary(step: int, train_time: float) -> dict[str, float | bool | None]:
    """A diverged run has no final metrics: its weights are non-finite or meaningless."""
    return {
        "diverged": True,
        "steps_completed": step,
        "train_time": train_time,
        "train_loss": None,
        "train_accuracy": None,
        "test_loss": None,
        "test_accuracy": None,
    }


# ---- a given model on given data (normdrop ablate) -------------------------------------------------------------

Batches = tuple[Tensor, Tensor] | Iterable[Any]
"""Data of :func:`fit`: ``(inputs, labels)`` tensors, or an iterable of ``(inputs, labels, ...)`` batches (a
DataLoader)."""


def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def _loader_batches(loader: Iterable[Any]) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(inputs, labels)`` batches from a DataLoader: one pass over it per epoch."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch[0], batch[1]
        if empty:
            raise ValueError("the training DataLoader yielded no batch")


@torch.no_grad()
def evaluate_batches(model: nn.Module, data: Batches) -> tuple[float, float]:
    """:func:`evaluate` on tensors or on every batch of a DataLoader (mean cross-entropy, accuracy; eval mode)."""
    if _is_tensor_pair(data):
        return evaluate(model, data[0], data[1])
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in data:
        logits, labels = model(batch[0]), batch[1]
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
        count += len(labels)
    model.train(was_training)
    if count == 0:
        raise ValueError("an evaluation DataLoader yielded no example")
    return total_loss / count, correct / count


def fit(
    spec: Any,
    model: nn.Module,
    train: Batches,
    test: Batches,
    *,
    hooks: Sequence[Hook] | None = None,
    num_threads: int | None = 1,
) -> RunResult:
    """Train a given ``model`` on given data with the training fields of ``spec`` and return what :func:`run`
    returns, recorded the same way (see the module docstring): the same metrics, divergence rule, hooks and
    reproducibility (the batch order from ``derive_seed(spec.seed, "batch_order")``, dropout masks from
    ``"dropout"``).

    ``spec`` is a :class:`~normdrop.spec.UserRunSpec` (any object with RunSpec's training fields and a
    ``run_id``). ``train`` and ``test`` are ``(inputs, labels)`` tensors, batched by ``spec.batch_size`` as in
    :func:`run`, or DataLoaders (anything yielding ``(inputs, labels, ...)`` batches), used as they come: one
    pass per epoch, their own batch size; torch's generator is seeded, so a shuffling DataLoader without a generator
    of its own shuffles reproducibly. Evaluation is on the whole of ``train`` and ``test``. Hooks get a
    :class:`HookContext` whose ``dataset`` is None. The model is trained in place.
    """
    start = time.perf_counter()
    metrics: list[tuple[int, str, float]] = []
    probe_records: list[dict[str, Any]] = []
    try:
        with _reproducible(spec.seed, num_threads):
            diverged_step, summary = _fit(spec, model, train, test, list(hooks or []), metrics, probe_records)
    except Exception as error:
        return _result(
            spec, start, metrics, probe_records, error="".join(traceback.format_exception_only(error)).strip()
        )
    return _result(spec, start, metrics, probe_records, diverged_step=diverged_step, summary=summary)


def _fit(
    spec: Any,
    model: nn.Module,
    train: Batches,
    test: Batches,
    hooks: list[Hook],
    metrics: list[tuple[int, str, float]],
    probe_records: list[dict[str, Any]],
) -> tuple[int | None, dict[str, float | bool | None]]:
    """The loop of :func:`_train` for a given model and data."""
    if _is_tensor_pair(train):
        x_train, y_train = train
        if spec.batch_size is None or spec.batch_size > len(y_train):
            raise ValueError(f"batch_size={spec.batch_size} must be set and at most the {len(y_train)} examples")
        order = torch.Generator().manual_seed(derive_seed(spec.seed, "batch_order"))
        batches = ((x_train[i], y_train[i]) for i in _batch_indices(len(y_train), spec.batch_size, order))
    else:
        batches = _loader_batches(train)
    for hook in hooks:
        if not isinstance(hook.every, int) or hook.every < 0:
            raise ValueError(f"hook {hook!r}: every must be an integer >= 0, got {hook.every!r}")
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = make_optimizer(spec, parameters)
    train_time = 0.0
    summary: dict[str, float | bool | None] = {}
    first_batch = next(batches)

    def evaluate_at(step: int) -> None:
        record_evaluation(
            step, evaluate_batches(model, train), evaluate_batches(model, test), train_time, summary, metrics
        )

    def call_hooks_at(step: int) -> None:
        for hook in hooks:
            if _due(hook, step, spec.steps):
                lr = learning_rate(spec, min(step, spec.steps - 1))
                ctx = HookContext(spec, step, lr, model, optimizer, F.cross_entropy, first_batch, None)  # type: ignore[arg-type]
                probe_records.extend(_call_hook(hook, ctx))

    model.train()
    evaluate_at(0)
    call_hooks_at(0)
    batch = first_batch
    for step in range(spec.steps):
        step_start = time.perf_counter()
        if step > 0:
            batch = next(batches)
        updated = _update(spec, step, model, optimizer, parameters, batch[0], batch[1], metrics)
        train_time += time.perf_counter() - step_start
        if not updated:
            return step, _diverged_summary(step, train_time)
        done = step + 1
        if done % spec.eval_every == 0 or done == spec.steps:
            evaluate_at(done)
        call_hooks_at(done)
    summary.update(diverged=False, steps_completed=spec.steps, train_time=train_time)
    return None, summary
