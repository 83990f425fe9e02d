"""Generalization gap: train vs test loss and accuracy, over training and at matched training accuracy.

    loss_gap = test_loss - train_loss,        accuracy_gap = train_accuracy - test_accuracy

both measured in eval mode (running BN statistics, no dropout), so they compare the function the network computes
at inference on the two sets. Comparing BN with no BN, or dropout with none, at the same step mixes the
regularizing effect with the speed-up; comparing them where each first reaches the same training accuracy
(:func:`gap_at_train_accuracy`) separates the two (claims bn-regularizes, dropout-overfit in docs/claims.md).

The trainer already evaluates on the full sets every ``eval_every`` steps, so :func:`gap_records` derives the gaps
from a run's metrics at no cost; :class:`GeneralizationProbe` measures the same at the probe cadence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import Probe, Record, tidy_record
from normdrop.train import HookContext, evaluate

NAME = "generalization"
EVALUATION_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def gap_fields(train_loss: float, train_accuracy: float, test_loss: float, test_accuracy: float) -> Record:
    """The four measurements and the two gaps, as record fields."""
    return {
        "train_loss": train_loss,
        "test_loss": test_loss,
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "loss_gap": test_loss - train_loss,
        "accuracy_gap": train_accuracy - test_accuracy,
    }


def evaluation_curve(metrics: Iterable[tuple[int, str, float]]) -> list[tuple[int, dict[str, float]]]:
    """The evaluations in a run's long-format metrics: ``[(step, {train_loss, ..., test_accuracy}), ...]`` by step."""
    by_step: dict[int, dict[str, float]] = {}
    for step, name, value in metrics:
        if name in EVALUATION_METRICS:
            by_step.setdefault(int(step), {})[name] = float(value)
    return [(step, values) for step, values in sorted(by_step.items()) if len(values) == len(EVALUATION_METRICS)]


def gap_records(metrics: Iterable[tuple[int, str, float]]) -> list[Record]:
    """One generalization record per evaluation of a run, from its metrics (``RunResult.metrics``)."""
    return [tidy_record(NAME, step, gap_fields(**values)) for step, values in evaluation_curve(metrics)]


def gap_at_train_accuracy(metrics: Iterable[tuple[int, str, float]], target: float) -> Record | None:
    """The gaps where the training accuracy first reaches ``target``, linearly interpolated between evaluations.

    Between the last evaluation below the target (step s0) and the first at or above it (s1), every quantity is
    interpolated at the fraction f = (target - acc(s0)) / (acc(s1) - acc(s0)); the record's ``step`` is the
    interpolated (fractional) step s0 + f (s1 - s0), and ``matched_train_accuracy`` the target. None if the run never
    reaches it.
    """
    curve = evaluation_curve(metrics)
    for index, (step, values) in enumerate(curve):
        if values["train_accuracy"] < target:
            continue
        if index == 0:
            fraction, (step0, before) = 1.0, (step, values)
        else:
            step0, before = curve[index - 1]
            fraction = (target - before["train_accuracy"]) / (values["train_accuracy"] - before["train_accuracy"])
        mixed = {name: before[name] + fraction * (values[name] - before[name]) for name in EVALUATION_METRICS}
        return {
            "probe": NAME,
            "step": step0 + fraction * (step - step0),
            "matched_train_accuracy": target,
            **gap_fields(**mixed),
        }
    return None


def common_train_accuracy(runs: Iterable[Iterable[tuple[int, str, float]]]) -> float:
    """The highest training accuracy every run reaches (the minimum over runs of their best): a fair target for
    :func:`gap_at_train_accuracy` across configurations."""
    best = [max((v["train_accuracy"] for _, v in evaluation_curve(metrics)), default=-math.inf) for metrics in runs]
    if not best:
        raise ValueError("common_train_accuracy needs at least one run")
    return min(best)


class GeneralizationProbe(Probe):
    """Train and test loss and accuracy in eval mode, and their gaps, at the probe cadence.

    Uses the full splits, or the first ``max_examples`` of each (so a frequent probe stays cheap; the subset is the
    same at every step). Records: ``train_loss``, ``test_loss``, ``train_accuracy``, ``test_accuracy``,
    ``loss_gap``, ``accuracy_gap``, ``train_examples``, ``test_examples``.
    """

    name = NAME
    needs = frozenset({"model", "dataset"})

    def __init__(self, every: int = DEFAULT_EVERY, when: When | None = None, *, max_examples: int | None = None):
        super().__init__(every, when)
        self.max_examples = max_examples

    def measure(self, ctx: HookContext) -> list[Record]:
        data = ctx.dataset
        limit = self.max_examples
        with torch.no_grad():
            # the trainer's own evaluation, so the numbers agree with its metrics
            train_loss, train_accuracy = evaluate(ctx.model, data.x_train[:limit], data.y_train[:limit])
            test_loss, test_accuracy = evaluate(ctx.model, data.x_test[:limit], data.y_test[:limit])
        return [
            {
                **gap_fields(train_loss, train_accuracy, test_loss, test_accuracy),
                "train_examples": len(data.y_train[:limit]),
                "test_examples": len(data.y_test[:limit]),
            }
        ]
