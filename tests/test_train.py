"""The spec and the trainer: validation, run ids, schedules, recording, divergence, determinism, hooks, baselines."""

from __future__ import annotations

import hashlib
import io
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from normdrop import probes
from normdrop.lab import run_spec
from normdrop.models import build_model
from normdrop.probes import expand_probes
from normdrop.seeds import derive_seed
from normdrop.spec import TRAINING_SEMANTICS_VERSION, RunResult, RunSpec
from normdrop.train import HookContext, evaluate, learning_rate, load_run_dataset, run

# A small, fast run: an MLP with batch norm and dropout on Gaussian blobs (1000 train / 1000 test, 4 classes).
FAST = {
    "dataset": "blobs",
    "model": "mlp",
    "depth": 2,
    "width": 32,
    "norm": "batch",
    "dropout": 0.2,
    "batch_size": 50,
    "steps": 50,
    "eval_every": 20,
}


def fast_spec(**fields: Any) -> RunSpec:
    return RunSpec(**{**FAST, **fields})


def by_name(result: RunResult, name: str) -> dict[int, float]:
    return {step: value for step, metric, value in result.metrics if metric == name}


# --------------------------------------------------------------------------------------------------------------
# spec


def test_spec_defaults_are_valid_and_frozen() -> None:
    spec = RunSpec()
    assert (spec.dataset, spec.model, spec.depth, spec.width, spec.optimizer, spec.lr, spec.batch_size) == (
        "mnist1d",
        "mlp",
        2,
        100,
        "adam",
        0.01,
        100,
    )
    with pytest.raises(ValidationError, match="frozen"):
        spec.lr = 0.1  # type: ignore[misc]
    assert hash(spec) == hash(RunSpec())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "greater than 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"label_noise": -0.1}, "label_noise"),
        ({"model": "transformer"}, "'mlp', 'cnn1d', 'cnn2d' or 'resnet'"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; expected one of mnist1d, digits"),
        ({"norm": "layer"}, "unknown norm 'layer'; expected one of \\['batch', 'frozen', 'ghost'"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "exponential"}, "schedule"),
        ({"depth": 0}, "depth"),
        ({"batch_size": 0}, "batch_size"),
        ({"steps": 0}, "steps"),
        ({"learning_rate": 0.1}, "Extra inputs are not permitted"),
        ({"optimizer": "adam", "nesterov": True, "momentum": 0.9}, "nesterov=True needs optimizer='sgd'"),
        ({"optimizer": "sgd", "nesterov": True}, "momentum > 0"),
        ({"model": "mlp", "dropout_kind": "channel"}, "needs a conv model"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps=10 must be smaller than steps=10"),
        ({"schedule": "cosine", "lr": 0.1, "lr_min": 0.2}, "lr_min"),
        ({"probes": ("Bad Name",)}, "lower_snake_case"),
        ({"dataset_options": (("noise", 1.0), ("noise", 2.0))}, "unique"),
    ],
)
def test_bad_spec_values_raise_errors_that_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RunSpec(**fields)


def test_spec_canonicalizes_probes_and_dataset_options() -> None:
    assert RunSpec(probes=("landscape", "ics", "landscape")).probes == ("ics", "landscape")
    assert RunSpec(probes=("landscape", "ics")).run_id == RunSpec(probes=("ics", "landscape")).run_id
    assert RunSpec(probes=("smoothness",)).probes == RunSpec(probes=expand_probes(["smoothness"])).probes
    with pytest.raises(ValidationError, match="unknown probe or preset 'nope'"):
        RunSpec(probes=("nope",))
    spec = RunSpec(dataset="blobs", dataset_options={"noise": 0.5, "n_train": 200})
    assert spec.dataset_options == (("n_train", 200), ("noise", 0.5))
    assert spec == RunSpec(dataset="blobs", dataset_options=(("noise", 0.5), ("n_train", 200)))


def test_run_id_is_a_stable_hash_of_every_field() -> None:
    spec = fast_spec()
    fields = {name: value for name, value in spec.model_dump(mode="json").items() if name != "keep"}
    canonical = json.dumps(
        {"training_semantics_version": TRAINING_SEMANTICS_VERSION, "spec": fields},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert spec.run_id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert spec.run_id == fast_spec().run_id
    assert spec.run_id == RunSpec.model_validate_json(spec.model_dump_json()).run_id
    assert spec.run_id != fast_spec(seed=1).run_id
    assert spec.run_id != fast_spec(lr=0.0100001).run_id
    code = f"from normdrop.spec import RunSpec; print(RunSpec.model_validate_json({spec.model_dump_json()!r}).run_id)"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == spec.run_id


def test_run_id_depends_on_the_training_semantics_version(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fast_spec()
    before = spec.run_id
    monkeypatch.setattr("normdrop.spec.TRAINING_SEMANTICS_VERSION", TRAINING_SEMANTICS_VERSION + 1)
    assert spec.run_id != before


def test_keep_enters_the_run_id_only_when_it_differs_from_the_probes_default() -> None:
    """Specs written before ``keep`` existed keep their ids: the default (what the probes need) is not hashed."""
    assert RunSpec().keep == () and RunSpec(probes=("ensemble",)).keep == ("final_weights",)
    assert RunSpec(probes=("ensemble",), keep=("final_weights",)).run_id == RunSpec(probes=("ensemble",)).run_id
    assert RunSpec(keep=("final_weights",)).run_id != RunSpec().run_id
    assert RunSpec(probes=("ensemble",), keep=()).run_id != RunSpec(probes=("ensemble",)).run_id
    stored = RunSpec(probes=("ensemble",)).model_dump(mode="json")
    del stored["keep"]  # a spec as stores written before the field hold it
    assert RunSpec.model_validate(stored) == RunSpec(probes=("ensemble",))
    with pytest.raises(ValidationError, match="keep"):
        RunSpec(keep=("everything",))


def test_a_run_keeps_its_final_weights_when_its_spec_says_so() -> None:
    """The kept state dict is the trained network: rebuilt from it, the model evaluates to the run's final loss."""
    spec = fast_spec(steps=12, eval_every=6, keep=("final_weights",))
    result = run(spec)
    assert result.status == "finished", result.error
    assert run(fast_spec(steps=12, eval_every=6)).artifacts == {}
    data = load_run_dataset(spec)
    model = build_model(spec, data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(io.BytesIO(result.artifacts["final_weights"]), weights_only=True))
    assert evaluate(model, data.x_test, data.y_test)[0] == result.summary["test_loss"]


def test_derived_seeds_are_distinct_per_stream() -> None:
    seeds = {derive_seed(0, stream) for stream in ("init", "batch_order", "dropout")} | {derive_seed(1, "init")}
    assert len(seeds) == 4 and all(0 <= seed < 2**63 for seed in seeds)


def test_run_result_round_trips_through_json() -> None:
    result = run(fast_spec(steps=5, eval_every=5, keep=("final_weights",)))
    assert result.status == "finished" and result.artifacts["final_weights"], result.error
    data = json.loads(json.dumps(result.to_dict()))
    again = RunResult.from_dict(data)
    assert again == result


# --------------------------------------------------------------------------------------------------------------
# learning-rate schedules (closed form)


def test_constant_schedule_with_warmup() -> None:
    spec = RunSpec(lr=0.1, steps=100, warmup_steps=10)
    assert learning_rate(spec, 0) == pytest.approx(0.01)
    assert learning_rate(spec, 4) == pytest.approx(0.05)
    assert learning_rate(spec, 9) == pytest.approx(0.1)
    assert learning_rate(spec, 10) == learning_rate(spec, 99) == 0.1


def test_step_schedule() -> None:
    spec = RunSpec(lr=1.0, steps=1000, schedule="step", lr_step_size=300, lr_gamma=0.5, warmup_steps=100)
    assert learning_rate(spec, 99) == pytest.approx(1.0)
    assert learning_rate(spec, 100) == 1.0
    assert learning_rate(spec, 399) == 1.0
    assert learning_rate(spec, 400) == 0.5
    assert learning_rate(spec, 700) == 0.25
    assert learning_rate(spec, 999) == 0.25


def test_cosine_schedule() -> None:
    spec = RunSpec(lr=0.2, lr_min=0.02, steps=1100, schedule="cosine", warmup_steps=100)
    assert learning_rate(spec, 100) == pytest.approx(0.2)
    assert learning_rate(spec, 600) == pytest.approx(0.02 + 0.18 * 0.5)
    assert learning_rate(spec, 350) == pytest.approx(0.02 + 0.18 * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate(spec, 1099) == pytest.approx(0.02 + 0.18 * (1 + math.cos(math.pi * 999 / 1000)) / 2)


def test_the_optimizer_uses_the_scheduled_learning_rate() -> None:
    spec = fast_spec(optimizer="sgd", lr=0.5, schedule="step", lr_step_size=10, lr_gamma=0.1, eval_every=10)
    recorded = by_name(run(spec), "lr")
    assert recorded == pytest.approx({0: 0.5, 10: 0.05, 20: 0.005, 30: 5e-4, 40: 5e-5}, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# what a run records


def test_a_run_records_losses_evaluations_and_diagnostics() -> None:
    spec = fast_spec(steps=50, eval_every=20)
    result = run(spec)
    assert result.status == "finished" and result.error is None and result.diverged_step is None
    assert result.run_id == spec.run_id and result.spec == spec
    assert sorted(by_name(result, "batch_loss")) == list(range(50))
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_time"):
        assert sorted(by_name(result, name)) == [0, 20, 40, 50], name
    for name in ("lr", "grad_norm", "weight_norm", "update_ratio"):
        assert sorted(by_name(result, name)) == [0, 20, 40], name
    assert all(0 <= value <= 1 for value in by_name(result, "test_accuracy").values())
    assert all(value > 0 for value in by_name(result, "update_ratio").values())
    assert by_name(result, "test_accuracy")[50] > 0.5  # blobs are easy
    summary = result.summary
    assert summary["diverged"] is False and summary["steps_completed"] == 50
    assert summary["test_accuracy"] == by_name(result, "test_accuracy")[50]
    assert summary["train_loss"] == by_name(result, "train_loss")[50]
    assert 0 < summary["train_time"] <= result.wall_time


def test_grad_norm_and_update_ratio_match_a_hand_computation() -> None:
    """With plain SGD, ||w_1 - w_0|| = lr ||g_0||."""
    spec = fast_spec(optimizer="sgd", lr=0.1, dropout=0.0, steps=1, eval_every=1)
    result = run(spec)
    grad_norm, weight_norm = by_name(result, "grad_norm")[0], by_name(result, "weight_norm")[0]
    assert by_name(result, "update_ratio")[0] == pytest.approx(0.1 * grad_norm / weight_norm, rel=1e-5)


def test_training_subset_and_dataset_options_reach_the_data() -> None:
    seen = []

    @dataclass
    class Spy:
        every: int = 0

        def __call__(self, ctx: HookContext) -> list[dict[str, Any]]:
            seen.append((len(ctx.dataset.y_train), ctx.dataset.input_shape, ctx.dataset.num_classes))
            return []

    run(fast_spec(train_size=120, dataset_options={"n_features": 3, "n_classes": 5}), hooks=[Spy()])
    assert seen == [(120, (3,), 5)]


# --------------------------------------------------------------------------------------------------------------
# divergence and failure


def test_a_diverging_run_is_recorded_not_raised() -> None:
    spec = fast_spec(optimizer="sgd", lr=1e4, norm="none", dropout=0.0, steps=200)
    result = run(spec)
    assert result.status == "diverged" and result.error is None
    step = result.diverged_step
    assert isinstance(step, int) and 0 < step < 200
    last_loss = by_name(result, "batch_loss")[step]
    assert not math.isfinite(last_loss) or last_loss > spec.diverge_loss
    assert max(by_name(result, "batch_loss")) == step
    assert result.summary["diverged"] is True and result.summary["steps_completed"] == step
    assert result.summary["test_accuracy"] is None


def test_the_divergence_bound_applies_to_finite_losses() -> None:
    result = run(fast_spec(diverge_loss=0.01))
    assert result.status == "diverged" and result.diverged_step == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 5000}, "batch_size=5000 exceeds the 1000 training examples"),
        ({"dataset_options": {"noise": -1.0}}, "noise"),
        ({"model": "cnn2d"}, "needs inputs of shape"),
    ],
)
def test_a_failing_run_returns_the_error(fields: dict[str, Any], message: str) -> None:
    result = run(fast_spec(**fields))
    assert result.status == "failed"
    assert message in (result.error or "")
    assert result.summary == {"diverged": False}


# --------------------------------------------------------------------------------------------------------------
# determinism


def _deterministic_part(result: RunResult) -> list[tuple[int, str, float]]:
    """Every metric except the timings, which are measured."""
    return [row for row in result.metrics if row[1] != "train_time"]


def test_same_spec_same_metrics_bitwise() -> None:
    spec = fast_spec(dropout=0.3)
    first, second = run(spec), run(spec)
    assert first.status == second.status == "finished", (first.error, second.error)
    assert _deterministic_part(first) == _deterministic_part(second)
    assert first.summary["test_loss"] == second.summary["test_loss"]
    other = run(fast_spec(dropout=0.3, seed=1))
    assert other.status == "finished", other.error
    assert _deterministic_part(other) != _deterministic_part(first)


def test_same_spec_same_metrics_in_another_process() -> None:
    spec = fast_spec(dropout=0.3, steps=30)
    code = (
        "import json, sys\n"
        "from normdrop.spec import RunSpec\n"
        "from normdrop.train import run\n"
        f"result = run(RunSpec.model_validate_json({spec.model_dump_json()!r}))\n"
        "json.dump([row for row in result.metrics if row[1] != 'train_time'], sys.stdout)\n"
    )
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # JSON floats round-trip exactly (repr), so equality here is bitwise.
    theirs = [tuple(row) for row in json.loads(other_process.stdout)]
    ours = run(spec)
    assert ours.status == "finished", ours.error
    assert len(theirs) > spec.steps and theirs == _deterministic_part(ours)


def test_a_run_leaves_global_torch_state_as_it_found_it() -> None:
    torch.manual_seed(99)
    rng = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    run(fast_spec(steps=5))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_global_rng_state_does_not_change_a_run() -> None:
    spec = fast_spec(steps=20)
    torch.manual_seed(1)
    first = run(spec)
    torch.manual_seed(2)
    second = run(spec)
    assert first.status == second.status == "finished", (first.error, second.error)
    assert _deterministic_part(second) == _deterministic_part(first)


def test_torch_and_normdrop_layers_train_alike() -> None:
    """Same init; batch norm without dropout, so only floating-point rounding can separate the two."""
    ours = run(fast_spec(dropout=0.0, layers="normdrop", steps=30))
    theirs = run(fast_spec(dropout=0.0, layers="torch", steps=30))
    assert by_name(ours, "batch_loss")[0] == pytest.approx(by_name(theirs, "batch_loss")[0], rel=1e-6)
    for name in ("batch_loss", "test_loss", "test_accuracy"):
        a, b = by_name(ours, name), by_name(theirs, name)
        assert a.keys() == b.keys()
        assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-3, abs=1e-3), name


# --------------------------------------------------------------------------------------------------------------
# hooks


@dataclass
class RecordingHook:
    every: int
    name: str = "recorder"
    calls: list[HookContext] = field(default_factory=list)

    def __call__(self, ctx: HookContext) -> list[dict[str, Any]]:
        self.calls.append(ctx)
        return [{"value": float(ctx.step)}]


def test_hooks_run_at_their_steps_and_their_records_are_kept() -> None:
    every7, at_end = RecordingHook(every=7), RecordingHook(every=0, name="final")
    spec = fast_spec(steps=30, probe_batch_size=64, schedule="cosine", lr=0.02)
    result = run(spec, hooks=[every7, at_end])
    assert [ctx.step for ctx in every7.calls] == [0, 7, 14, 21, 28]
    assert [ctx.step for ctx in at_end.calls] == [30]
    assert result.probe_records == [
        *({"probe": "recorder", "step": step, "value": float(step)} for step in (0, 7, 14, 21)),
        {"probe": "recorder", "step": 28, "value": 28.0},
        {"probe": "final", "step": 30, "value": 30.0},
    ]
    ctx = every7.calls[1]
    assert ctx.spec == spec and ctx.lr == learning_rate(spec, 7)
    assert ctx.probe_batch[0].shape == (64, 10) and ctx.probe_batch[1].shape == (64,)
    assert ctx.loss_fn(torch.zeros(2, 4), torch.tensor([0, 1])).item() == pytest.approx(math.log(4))
    assert isinstance(ctx.optimizer, torch.optim.Adam)


def test_hooks_cannot_change_the_run() -> None:
    """A hook that scrambles weights, running statistics, optimizer state and the RNG leaves training unchanged."""

    class Vandal:
        every = 3

        def __call__(self, ctx: HookContext) -> list[dict[str, Any]]:
            with torch.no_grad():
                for parameter in ctx.model.parameters():
                    parameter.add_(1.0)
            ctx.model.eval()
            ctx.model(ctx.probe_batch[0]).sum().backward()
            ctx.model.train()
            ctx.model(ctx.probe_batch[0])  # updates BN running statistics and consumes dropout randomness
            ctx.optimizer.step()
            torch.rand(1000)
            return [{"scrambled": True}]

    spec = fast_spec(steps=20, eval_every=5, dropout=0.3)
    plain = run(spec)
    watched = run(spec, hooks=[Vandal()])
    assert _deterministic_part(watched) == _deterministic_part(plain)
    assert [record["step"] for record in watched.probe_records] == [0, 3, 6, 9, 12, 15, 18]
    assert watched.probe_records[0]["probe"] == "Vandal"


def test_spec_probes_become_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """lab.run_spec builds the spec's probes from the registry, in the spec's (sorted) order, at its cadence."""
    made: list[tuple[str, int]] = []

    def factory(name: str) -> Callable[..., RecordingHook]:
        def make(every: int, when: str | None = None) -> RecordingHook:
            made.append((name, every))
            return RecordingHook(every=every, name=name)

        return make

    for name in ("ics", "landscape"):
        monkeypatch.setitem(probes.REGISTRY, name, factory(name))
    result = run_spec(fast_spec(steps=10, probes=("landscape", "ics"), probe_every=5))
    assert result.status == "finished", result.error
    assert made == [("ics", 5), ("landscape", 5)]
    assert [(record["probe"], record["step"]) for record in result.probe_records] == [
        ("ics", 0),
        ("landscape", 0),
        ("ics", 5),
        ("landscape", 5),
        ("ics", 10),
        ("landscape", 10),
    ]


def test_the_trainer_refuses_a_probed_spec_without_its_probes() -> None:
    """The trainer knows no probe registry: a spec with probes and no probe hooks is refused, not run bare."""
    with pytest.raises(ValueError, match=r"needs the probes' hooks: run it with normdrop.lab.run_spec"):
        run(fast_spec(steps=2, probes=("ics",)))


def test_a_hook_with_a_bad_schedule_fails_the_run() -> None:
    result = run(fast_spec(), hooks=[RecordingHook(every=-1)])
    assert result.status == "failed" and "every must be an integer >= 0" in (result.error or "")


def test_the_progress_bar_does_not_change_the_run() -> None:
    spec = fast_spec(steps=20)
    shown, hidden = run(spec, progress=True), run(spec)
    assert shown.status == hidden.status == "finished", (shown.error, hidden.error)
    assert _deterministic_part(shown) == _deterministic_part(hidden)


def test_a_failing_hook_fails_the_run_with_its_error() -> None:
    class Broken:
        every = 1

        def __call__(self, ctx: HookContext) -> list[dict[str, Any]]:
            raise RuntimeError("probe exploded")

    result = run(fast_spec(), hooks=[Broken()])
    assert result.status == "failed" and "probe exploded" in (result.error or "")


# --------------------------------------------------------------------------------------------------------------
# MNIST-1D baselines (Greydanus 2020, "Scaling down deep learning", Table / README: MLP 68%, CNN 94% test accuracy;
# Adam, learning rate 1e-2, batches of 100). Called as a user would: a spec and run().


def _baseline(**fields: Any) -> tuple[float, float]:
    spec = RunSpec(dataset="mnist1d", optimizer="adam", lr=1e-2, batch_size=100, eval_every=1000, **fields)
    start = time.perf_counter()
    result = run(spec)
    assert result.status == "finished", result.error
    return float(result.summary["test_accuracy"]), time.perf_counter() - start


@pytest.mark.slow
def test_mnist1d_mlp_baseline() -> None:
    accuracy, seconds = _baseline(model="mlp", depth=2, width=100, steps=6000)
    print(f"MNIST-1D MLP: test accuracy {accuracy:.3f} in {seconds:.1f} s")
    assert 0.63 <= accuracy <= 0.73


@pytest.mark.slow
def test_mnist1d_cnn_baseline() -> None:
    accuracy, seconds = _baseline(model="cnn1d", depth=3, width=25, steps=6000)
    print(f"MNIST-1D CNN: test accuracy {accuracy:.3f} in {seconds:.1f} s")
    assert 0.90 <= accuracy <= 0.98
