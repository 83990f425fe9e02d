"""Largest-stable-LR search: against a runner whose divergence threshold is known, and on real (tiny) runs."""

from __future__ import annotations

import math

import pytest

from normdrop.probes import largest_stable_lr
from normdrop.spec import RunResult, RunSpec
from normdrop.train import run


class ThresholdRunner:
    """A fake trainer: a run diverges iff its learning rate exceeds ``threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.specs: list[RunSpec] = []

    def __call__(self, spec: RunSpec) -> RunResult:
        self.specs.append(spec)
        diverged = spec.lr > self.threshold
        return RunResult(
            run_id=spec.run_id,
            spec=spec,
            status="diverged" if diverged else "finished",
            diverged_step=3 if diverged else None,
            summary={"train_loss": None if diverged else 0.5},
        )


BASE = RunSpec(dataset="blobs", lr=0.01, steps=500, probes=("curvature",))


@pytest.mark.parametrize("threshold", [0.37, 0.0123, 4e-4, 0.01])
def test_search_brackets_the_known_threshold_within_tolerance(threshold: float) -> None:
    runner = ThresholdRunner(threshold)
    result = largest_stable_lr(BASE, steps=50, rel_tol=0.05, run_fn=runner)
    assert result.bracketed
    assert result.largest_stable <= threshold < result.smallest_diverging
    assert result.smallest_diverging / result.largest_stable <= 1.05
    # log-scale: a few bracketing runs plus log2(log(factor) / log(1 + tol)) bisections
    assert len(runner.specs) <= 4 + math.ceil(math.log2(math.log(4) / math.log(1.05))) + 2
    assert all(s.steps == 50 and s.probes == () and s.eval_every == 50 for s in runner.specs)
    assert all(s.seed == BASE.seed and s.dataset == BASE.dataset for s in runner.specs)
    records = result.records()
    assert [r["lr"] for r in records[:-1]] == [s.lr for s in runner.specs]
    assert all(r["diverged"] == (r["lr"] > threshold) for r in records[:-1])
    assert {r["phase"] for r in records[:-1]} <= {"bracket", "bisect"}
    summary = records[-1]
    assert summary["phase"] == "result" and summary["largest_stable_lr"] == result.largest_stable
    assert summary["runs"] == len(runner.specs) and all(r["probe"] == "stable_lr" for r in records)


def test_search_range_ends_are_reported_unbracketed() -> None:
    always_stable = largest_stable_lr(BASE, steps=5, lr_max=1.0, run_fn=ThresholdRunner(math.inf))
    assert not always_stable.bracketed and always_stable.largest_stable == 1.0
    assert always_stable.smallest_diverging is None
    never_stable = largest_stable_lr(BASE, steps=5, lr_min=1e-4, run_fn=ThresholdRunner(0.0))
    assert not never_stable.bracketed and never_stable.largest_stable is None
    assert never_stable.smallest_diverging == pytest.approx(1e-4)


def test_max_runs_caps_the_search_and_failures_raise() -> None:
    runner = ThresholdRunner(0.3)
    result = largest_stable_lr(BASE, steps=5, rel_tol=1e-6, max_runs=6, run_fn=runner)
    assert len(runner.specs) == 6 and result.bracketed

    def failing(spec: RunSpec) -> RunResult:
        return RunResult(run_id=spec.run_id, spec=spec, status="failed", error="boom")

    with pytest.raises(RuntimeError, match="boom"):
        largest_stable_lr(BASE, steps=5, run_fn=failing)
    with pytest.raises(ValueError, match="lr_min"):
        largest_stable_lr(BASE, lr_min=1.0, lr_max=0.1)


def test_loss_ratio_criterion_counts_runs_that_got_worse() -> None:
    def runner(spec: RunSpec) -> RunResult:
        final = 2.0 if spec.lr > 0.05 else 0.5  # never stopped by the trainer, but worse than at the start above 0.05
        return RunResult(
            run_id=spec.run_id,
            spec=spec,
            status="finished",
            metrics=[(0, "train_loss", 1.0)],
            summary={"train_loss": final},
        )

    plain = largest_stable_lr(BASE, steps=5, lr_max=10.0, run_fn=runner)
    assert plain.largest_stable == 10.0 and not plain.bracketed
    strict = largest_stable_lr(BASE, steps=5, max_loss_ratio=1.0, rel_tol=0.05, run_fn=runner)
    assert strict.bracketed and strict.largest_stable <= 0.05 < strict.smallest_diverging


def test_real_runs_of_a_plain_sgd_mlp() -> None:
    base = RunSpec(dataset="blobs", width=16, optimizer="sgd", lr=0.1, batch_size=50, steps=100, diverge_loss=10.0)
    result = largest_stable_lr(base, steps=15, rel_tol=0.25, lr_max=1e4, run_fn=run)
    assert result.bracketed, result.trials
    trials = {r["lr"]: r for r in result.trials}
    assert trials[result.largest_stable]["status"] == "finished"
    assert trials[result.smallest_diverging]["status"] == "diverged"
    assert trials[result.smallest_diverging]["diverged_step"] < 15
    assert 0.1 < result.largest_stable < 1e4
