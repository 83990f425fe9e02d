"""Generalization probe: gaps from a run's metrics, interpolation at matched training accuracy, and the hook on a
classifier whose train and test accuracies are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normdrop.data import Dataset
from normdrop.lab import run_spec
from normdrop.probes import GeneralizationProbe, common_train_accuracy, gap_at_train_accuracy, gap_records
from normdrop.spec import RunSpec
from normdrop.train import HookContext


def metrics_from(curve: dict[int, tuple[float, float, float, float]]) -> list[tuple[int, str, float]]:
    """Long-format metrics for evaluations (train_loss, train_accuracy, test_loss, test_accuracy) at each step."""
    rows = [(0, "batch_loss", 9.9)]
    for step, values in curve.items():
        names = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
        rows += [(step, name, value) for name, value in zip(names, values, strict=True)]
    return rows


CURVE = {0: (2.0, 0.1, 2.0, 0.1), 100: (1.0, 0.6, 1.2, 0.5), 200: (0.2, 0.9, 0.8, 0.7)}


def test_gap_records_from_metrics() -> None:
    records = gap_records(metrics_from(CURVE))
    assert [r["step"] for r in records] == [0, 100, 200]
    assert records[1]["loss_gap"] == pytest.approx(0.2) and records[1]["accuracy_gap"] == pytest.approx(0.1)
    assert records[2]["loss_gap"] == pytest.approx(0.6) and records[2]["accuracy_gap"] == pytest.approx(0.2)
    assert all(r["probe"] == "generalization" for r in records)


def test_gap_at_matched_training_accuracy_interpolates_linearly() -> None:
    record = gap_at_train_accuracy(metrics_from(CURVE), target=0.8)
    assert record is not None
    # 0.8 lies 2/3 of the way from 0.6 (step 100) to 0.9 (step 200)
    assert record["step"] == pytest.approx(100 + 200 / 3)
    assert record["train_accuracy"] == pytest.approx(0.8)
    assert record["test_accuracy"] == pytest.approx(0.5 + (2 / 3) * 0.2)
    assert record["accuracy_gap"] == pytest.approx(0.8 - (0.5 + (2 / 3) * 0.2))
    assert record["loss_gap"] == pytest.approx((1.2 - (2 / 3) * 0.4) - (1.0 - (2 / 3) * 0.8))
    assert record["matched_train_accuracy"] == 0.8
    at_first = gap_at_train_accuracy(metrics_from(CURVE), target=0.05)
    assert at_first is not None and at_first["step"] == 0
    assert gap_at_train_accuracy(metrics_from(CURVE), target=0.95) is None


def test_common_training_accuracy_is_the_lowest_best() -> None:
    other = {0: (2.0, 0.1, 2.0, 0.1), 100: (0.5, 0.75, 0.9, 0.6)}
    assert common_train_accuracy([metrics_from(CURVE), metrics_from(other)]) == pytest.approx(0.75)
    assert common_train_accuracy([[]]) == -math.inf
    with pytest.raises(ValueError, match="at least one run"):
        common_train_accuracy([])


class Threshold(nn.Module):
    """Predicts class 1 iff the first feature is positive, with logits (0, 10 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros(len(x)), 10 * x[:, 0]], dim=1)


def test_probe_on_a_classifier_with_known_accuracies() -> None:
    x_train = torch.tensor([[1.0], [2.0], [-1.0], [-2.0]])
    y_train = torch.tensor([1, 1, 0, 0])  # all right
    x_test = torch.tensor([[1.0], [2.0], [-3.0], [-1.0]])
    y_test = torch.tensor([0, 0, 0, 0])  # the first two wrong, the last two right
    data = Dataset("toy", x_train, y_train, x_test, y_test, 2, (1,), "toy")
    model = Threshold()
    ctx = HookContext(RunSpec(), 4, 0.1, model, None, None, (x_train, y_train), data)  # type: ignore[arg-type]
    (record,) = GeneralizationProbe()(ctx)
    assert record["train_accuracy"] == 1.0 and record["test_accuracy"] == 0.5 and record["accuracy_gap"] == 0.5
    train_loss = float(nn.functional.cross_entropy(model(x_train), y_train))
    test_loss = float(nn.functional.cross_entropy(model(x_test), y_test))
    assert record["loss_gap"] == pytest.approx(test_loss - train_loss, rel=1e-6)
    (subset,) = GeneralizationProbe(max_examples=2)(ctx)
    assert subset["train_examples"] == 2 and subset["test_accuracy"] == 0.0


def test_probe_agrees_with_the_trainers_evaluation() -> None:
    spec = RunSpec(dataset="blobs", width=16, steps=20, eval_every=10, probes=("generalization",), probe_every=10)
    result = run_spec(spec)
    assert result.status == "finished", result.error
    from_metrics = {r["step"]: r for r in gap_records(result.metrics)}
    assert [record["step"] for record in result.probe_records] == [0, 10, 20]
    for record in result.probe_records:
        expected = from_metrics[record["step"]]
        for field in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "loss_gap", "accuracy_gap"):
            assert record[field] == pytest.approx(expected[field], rel=1e-12, abs=1e-12), field
