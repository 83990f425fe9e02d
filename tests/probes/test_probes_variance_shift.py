"""Variance-shift probe (Li et al. 2019): synthetic inputs with chosen mean c, variance v and keep probability q match
the closed form (c^2 + v) / q - c^2 within sampling error; re-estimating BN removes the shift."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normdrop.nn as nd
from normdrop.data import Dataset
from normdrop.lab import run_spec
from normdrop.probes import VarianceShiftProbe, predicted_train_variance
from normdrop.spec import RunSpec
from normdrop.train import HookContext

N = 40000


def gaussian_inputs(means: list[float], variances: list[float], n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(means), torch.tensor(variances).sqrt()
    return mean + std * torch.randn(n, len(means), generator=generator)


def dataset(x_train: torch.Tensor, x_test: torch.Tensor) -> Dataset:
    zeros = torch.zeros(len(x_train), dtype=torch.long)
    test_labels = torch.zeros(len(x_test), dtype=torch.long)
    shape = tuple(x_train.shape[1:])
    return Dataset("synthetic", x_train, zeros, x_test, test_labels, 2, shape, "gaussian channels")


def context(model: nn.Module, data: Dataset) -> HookContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return HookContext(RunSpec(), 100, 0.1, model, optimizer, None, (data.x_train[:8], data.y_train[:8]), data)  # type: ignore[arg-type]


def variance_standard_error(values: torch.Tensor) -> torch.Tensor:
    """Standard error of the sample variance per column: sqrt((mu4 - sigma^4) / n)."""
    centered = values.double() - values.double().mean(0)
    return ((centered.pow(4).mean(0) - centered.pow(2).mean(0).pow(2)) / len(values)).sqrt()


@pytest.mark.parametrize(
    ("means", "variances", "keep_prob"),
    [([0.0, 1.0, 2.0], [1.0, 1.0, 0.5], 0.5), ([3.0, -1.0, 0.5], [2.0, 0.25, 1.0], 0.8)],
)
def test_dropout_before_bn_matches_the_closed_form(
    means: list[float], variances: list[float], keep_prob: float
) -> None:
    channels = len(means)
    model = nn.Sequential(nd.Dropout(1 - keep_prob), nd.BatchNorm1d(channels, momentum=None))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():  # training: BN accumulates its running variance from dropout's output
        for batch in gaussian_inputs(means, variances, N, seed=1).split(500):
            model(batch)
    x = gaussian_inputs(means, variances, N, seed=2)
    records = VarianceShiftProbe(max_examples=N, recalibrate=False)(context(model, dataset(x, x[:10])))
    (record,) = records
    assert (
        record["layer"] == "1" and record["dropout_before"] == "0" and record["keep_prob"] == pytest.approx(keep_prob)
    )
    c, v = torch.tensor(means, dtype=torch.float64), torch.tensor(variances, dtype=torch.float64)
    train_var = (c**2 + v) / keep_prob - c**2
    # eval mode: BN sees the inputs themselves, variance v
    se_eval = variance_standard_error(x)
    assert abs(record["eval_var"] - float(v.mean())) < 5 * float(se_eval.pow(2).mean().sqrt())
    # train mode: the closed form holds per channel for an independent dropout sample, and on average in the probe
    with torch.no_grad():
        torch.manual_seed(3)
        dropped = nn.functional.dropout(x, 1 - keep_prob)
    se_train = variance_standard_error(dropped)
    assert torch.all((dropped.double().var(0) - train_var).abs() < 5 * se_train)
    assert abs(record["train_var"] - float(train_var.mean())) < 5 * float(se_train.pow(2).sum().sqrt() / channels)
    assert abs(record["running_var"] - float(train_var.mean())) < 5 * float(se_train.pow(2).sum().sqrt() / channels)
    expected_ratio = float((train_var / v).mean())
    assert record["predicted_ratio"] == pytest.approx(expected_ratio, rel=0.02)
    assert record["running_to_eval"] == pytest.approx(expected_ratio, rel=0.03)
    assert record["train_to_eval"] == pytest.approx(expected_ratio, rel=0.03)
    assert record["predicted_train_var"] == pytest.approx(float(train_var.mean()), rel=0.02)


def test_closed_form_helper() -> None:
    assert float(predicted_train_variance(torch.tensor(2.0), torch.tensor(0.5), 0.5)) == pytest.approx(5.0)
    assert float(predicted_train_variance(torch.tensor(0.0), torch.tensor(1.0), 1.0)) == pytest.approx(1.0)


def test_recalibration_removes_the_shift_and_dropout_after_bn_has_none() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nd.Dropout(0.5), nd.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = gaussian_inputs([1.0, 2.0, -1.0], [1.0, 1.0, 1.0], 4000, seed=4)
    model.train()
    with torch.no_grad():
        for batch in x.split(100):
            model(batch)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    records = VarianceShiftProbe(max_examples=4000)(context(model, dataset(x, x[:500])))
    layer, summary = records
    assert layer["running_to_eval"] > 1.5 and layer["predicted_ratio"] > 1.5
    assert summary["layer"] is None
    assert summary["running_to_eval_recalibrated"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and 0.0 <= summary["test_accuracy_recalibrated"] <= 1.0
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items()), "probe changed the model"

    after_bn = nn.Sequential(nn.Linear(3, 4), nd.BatchNorm1d(4), nn.ReLU(), nd.Dropout(0.5), nn.Linear(4, 2))
    after_bn.train()
    with torch.no_grad():
        for batch in x.split(100):
            after_bn(batch)
    (row, _summary) = VarianceShiftProbe(max_examples=4000)(context(after_bn, dataset(x, x[:500])))
    assert row["dropout_before"] is None and row["predicted_ratio"] is None
    assert row["running_to_eval"] == pytest.approx(1.0, abs=0.1)


def test_in_a_run_with_dropout_before_bn() -> None:
    spec = RunSpec(
        dataset="blobs",
        width=16,
        norm="batch",
        dropout=0.3,
        dropout_position="before_norm",
        steps=40,
        eval_every=40,
        probes=("variance_shift",),
        probe_every=40,
    )
    result = run_spec(spec)
    assert result.status == "finished"
    final = [r for r in result.probe_records if r["step"] == 40]
    layers = [r for r in final if r["layer"] is not None]
    assert [r["layer"] for r in layers] == ["hidden1.norm", "hidden2.norm"]
    assert all(r["dropout_before"] is not None and r["keep_prob"] == pytest.approx(0.7) for r in layers)
    # the first BN follows a bias-free linear layer fed by standardized inputs: c ~ 0, so the ratio is about 1/q
    assert layers[0]["predicted_ratio"] == pytest.approx(1 / 0.7, rel=0.1)
    assert layers[0]["running_to_eval"] == pytest.approx(layers[0]["train_to_eval"], rel=0.15)
