"""Layer-input probe: percentiles of a known distribution, zero drift on a stationary input, |delta| drift on an input
shifted by delta, and BN's standardized inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import normdrop.nn as nd
from normdrop.lab import run_spec
from normdrop.probes import LayerInputsProbe
from normdrop.spec import RunSpec
from normdrop.train import HookContext

STANDARD_NORMAL = torch.distributions.Normal(0.0, 1.0)


def context(model: nn.Module, inputs: torch.Tensor, step: int) -> HookContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    labels = torch.zeros(len(inputs), dtype=torch.long)
    return HookContext(RunSpec(), step, 0.1, model, optimizer, None, (inputs, labels), None)  # type: ignore[arg-type]


def identity_layer(width: int) -> nn.Sequential:
    linear = nn.Linear(width, width)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(width))
        linear.bias.zero_()
    return nn.Sequential(linear, nn.ReLU())


def layer_rows(records: list[dict]) -> list[dict]:
    return [r for r in records if r["unit"] is None]


def test_percentiles_of_a_standard_normal_input() -> None:
    n = 20000
    inputs = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    records = LayerInputsProbe(max_units=3)(context(identity_layer(3), inputs, 0))
    units = [r for r in records if r["unit"] is not None]
    assert [r["unit"] for r in units] == [0, 1, 2] and all(r["layer"] == "1" for r in records)
    for q in (15, 50, 85):
        # standard error of a sample quantile: sqrt(p (1 - p) / n) / density at the quantile
        p = q / 100
        quantile = STANDARD_NORMAL.icdf(torch.tensor(p))
        se = (p * (1 - p) / n) ** 0.5 / float(STANDARD_NORMAL.log_prob(quantile).exp())
        for row in units:
            assert row[f"p{q}"] == pytest.approx(float(quantile), abs=4 * se)
    for row in units:
        assert row["mean"] == pytest.approx(0.0, abs=4 / n**0.5)
        assert row["var"] == pytest.approx(1.0, abs=4 * (2 / n) ** 0.5)
    assert records[0]["w1_prev"] is None and records[0]["w1_init"] == 0.0 and records[0]["prev_step"] is None


def test_stationary_input_has_no_drift_and_a_shifted_one_drifts_by_the_shift() -> None:
    model = identity_layer(4)
    inputs = torch.randn(512, 4, generator=torch.Generator().manual_seed(1))
    probe = LayerInputsProbe(max_units=4)
    first = probe(context(model, inputs, 0))
    stationary = probe(context(model, inputs, 10))
    for row in stationary:
        assert row["w1_prev"] == 0.0 and row["w1_init"] == 0.0 and row["prev_step"] == 0
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        model[0].bias.add_(shift)
    shifted = probe(context(model, inputs, 20))
    units = [r for r in shifted if r["unit"] is not None]
    for unit, row in enumerate(units):
        # a translation by delta: W1 = |delta|, every percentile and the mean move by delta, the variance does not
        assert row["w1_prev"] == pytest.approx(abs(float(shift[unit])), abs=1e-6)
        assert row["p50"] - first[unit + 1]["p50"] == pytest.approx(float(shift[unit]), abs=1e-6)
        assert row["mean"] - first[unit + 1]["mean"] == pytest.approx(float(shift[unit]), abs=1e-6)
        assert row["var"] == pytest.approx(first[unit + 1]["var"], rel=1e-6)
    assert layer_rows(shifted)[0]["w1_prev"] == pytest.approx(float(shift.abs().mean()), abs=1e-6)
    with torch.no_grad():
        model[0].bias.sub_(shift)
    back = probe(context(model, inputs, 30))
    assert layer_rows(back)[0]["w1_prev"] == pytest.approx(float(shift.abs().mean()), abs=1e-6)
    assert layer_rows(back)[0]["w1_init"] == pytest.approx(0.0, abs=1e-12)


def test_inputs_after_batch_norm_are_standardized_in_batch_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nd.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU())
    inputs = 3 * torch.randn(256, 5) + 1
    state = {key: value.clone() for key, value in model.state_dict().items()}
    records = LayerInputsProbe(max_units=6)(context(model, inputs, 0))
    after_bn = [r for r in records if r["layer"] == "2" and r["unit"] is not None]
    assert len(after_bn) == 6 and {r["bn_mode"] for r in records} == {"batch"}
    for row in after_bn:
        assert row["mean"] == pytest.approx(0.0, abs=1e-6) and row["var"] == pytest.approx(1.0, abs=1e-4)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items()), "running stats changed"
    running = LayerInputsProbe(bn_mode="running")(context(model, inputs, 0))
    assert layer_rows(running)[0]["var"] > 2, "running statistics (mean 0, var 1) do not standardize this input"


def test_conv_units_are_channels_and_a_new_run_resets_the_reference() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU())
    inputs = torch.randn(8, 2, 10)
    probe = LayerInputsProbe(max_units=1)
    records = probe(context(model, inputs, 0))
    assert records[0]["units"] == 3 and len(records) == 2
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert layer_rows(probe(context(model, inputs, 5)))[0]["w1_prev"] == pytest.approx(1.0, abs=1e-6)
    restarted = probe(context(model, inputs, 0))  # step 0 again: a new run, so no drift to report
    assert restarted[0]["w1_prev"] is None and restarted[0]["w1_init"] == 0.0 and restarted[0]["prev_step"] is None
    with pytest.raises(ValueError, match="no ReLU"):
        LayerInputsProbe(module_types=(nn.ReLU,))(context(nn.Sequential(nn.Linear(2, 2)), torch.randn(4, 2), 0))


def test_in_a_run_drift_grows_from_zero_and_records_are_json() -> None:
    spec = RunSpec(
        dataset="blobs", width=16, norm="batch", steps=30, eval_every=30, probes=("layer_inputs",), probe_every=10
    )
    result = run_spec(spec)
    assert result.status == "finished"
    rows = [r for r in result.probe_records if r["unit"] is None and r["layer"] == "hidden1.act"]
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert rows[0]["w1_init"] == 0.0 and all(r["w1_prev"] > 0 for r in rows[1:])
    json.dumps(result.probe_records, allow_nan=False)
