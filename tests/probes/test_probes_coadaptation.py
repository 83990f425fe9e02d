"""Co-adaptation probe: independent units have correlations near 0, duplicated units exactly 1; DeCov and sparsity
of ReLU(N(0, 1)) units have closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normdrop.nn as nd
from normdrop.probes import CoadaptationProbe, coadaptation_stats
from normdrop.spec import RunSpec
from normdrop.train import HookContext

N = 8192
RELU_MEAN = 1 / math.sqrt(2 * math.pi)  # E[max(z, 0)] for z ~ N(0, 1)
RELU_VAR = 0.5 - 1 / (2 * math.pi)  # Var[max(z, 0)]


def context(model: nn.Module, inputs: torch.Tensor) -> HookContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.zeros(len(inputs), dtype=torch.long)
    return HookContext(RunSpec(), 50, 0.1, model, optimizer, None, (inputs, labels), None)  # type: ignore[arg-type]


def relu_layer(weight: torch.Tensor) -> nn.Sequential:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return nn.Sequential(linear, nn.ReLU())


def standard_normal(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_independent_units_are_uncorrelated_and_half_active() -> None:
    units = 10
    (record,) = CoadaptationProbe()(context(relu_layer(torch.eye(units)), standard_normal(N, units)))
    # sampling alone gives |r| of about sqrt(2 / (pi N)) = 0.009 for independent units
    assert record["mean_abs_correlation"] < 3 * math.sqrt(2 / (math.pi * N))
    assert record["active_fraction"] == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / (N * units)))
    assert record["mean_activation"] == pytest.approx(RELU_MEAN, abs=4 * math.sqrt(RELU_VAR / (N * units)))
    # DeCov sums squared off-diagonal covariances, each of sampling size about RELU_VAR^2 / N
    assert record["decov"] < 0.5 * units * (units - 1) * 9 * RELU_VAR**2 / N
    assert record["units"] == units and record["samples"] == N and record["constant_units"] == 0
    assert (record["probe"], record["step"], record["layer"], record["unit"]) == ("coadaptation", 50, "1", None)


def test_duplicated_units_are_perfectly_correlated() -> None:
    units = 6
    weight = torch.ones(units, 1)  # every unit computes ReLU of the same input
    (record,) = CoadaptationProbe()(context(relu_layer(weight), standard_normal(N, 1)))
    assert record["mean_abs_correlation"] == pytest.approx(1.0, abs=1e-9)
    # every covariance is the common variance s^2: DeCov = (U^2 - U) s^4 / 2
    variance = float(torch.relu(standard_normal(N, 1)).double().var(unbiased=False))
    assert record["decov"] == pytest.approx(0.5 * (units**2 - units) * variance**2, rel=1e-5)


def test_half_duplicated_units_give_the_expected_mixture() -> None:
    k = 5  # units z_1..z_k, then the same k again: k pairs at 1 among k (2k - 1) pairs
    weight = torch.cat([torch.eye(k), torch.eye(k)])
    (record,) = CoadaptationProbe()(context(relu_layer(weight), standard_normal(N, k)))
    assert record["mean_abs_correlation"] == pytest.approx(1 / (2 * k - 1), abs=0.01)


def test_dead_units_are_counted_and_left_out_of_the_correlation() -> None:
    weight = torch.cat([torch.eye(3), torch.zeros(2, 3)])  # two units always 0
    records = CoadaptationProbe(per_unit=True)(context(relu_layer(weight), standard_normal(N, 3)))
    layer, units = records[0], records[1:]
    assert layer["constant_units"] == 2 and layer["mean_abs_correlation"] < 0.05
    assert [u["unit"] for u in units] == [0, 1, 2, 3, 4]
    assert [u["active_fraction"] for u in units[3:]] == [0.0, 0.0] and units[0]["active_fraction"] > 0.4
    stats = coadaptation_stats(torch.zeros(10, 3))
    assert math.isnan(stats["mean_abs_correlation"]) and stats["constant_units"] == 3


def test_conv_channels_and_running_bn_mode() -> None:
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nd.BatchNorm1d(4), nn.ReLU())
    inputs = torch.randn(32, 1, 20)
    (record,) = CoadaptationProbe()(context(model, inputs))
    assert record["units"] == 4 and record["samples"] == 32 * 20 and record["bn_mode"] == "running"
    assert record["threshold"] == 0.0
