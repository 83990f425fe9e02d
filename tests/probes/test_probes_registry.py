"""The probe registry, presets, the Probe base class, and probes inside real runs: tidy JSON records, schedules,
and a probed run that trains exactly like an unprobed one."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import normdrop.nn as nd
from normdrop.lab import run_spec
from normdrop.probe_catalog import DEFAULT_EVERY, PROBES
from normdrop.probes import PRESETS, REGISTRY, Probe, expand_probes, make_probe, measurement_mode
from normdrop.probes.base import ONCE_EVERY, tidy_record
from normdrop.spec import RunSpec
from normdrop.train import HookContext

SMALL = {
    "dataset": "blobs",
    "width": 16,
    "norm": "batch",
    "dropout": 0.2,
    "dropout_position": "before_norm",
    "batch_size": 50,
    "steps": 20,
    "eval_every": 10,
    "probe_every": 10,
    "probe_batch_size": 64,
}


def test_every_registered_name_builds_a_probe_with_its_schedule() -> None:
    for name in REGISTRY:
        probe = make_probe(name, every=7)
        assert isinstance(probe, Probe) and probe.name in name
        if probe.when == "every":
            assert probe.every == 7
    assert make_probe("ensemble", every=7).every == 0
    assert make_probe("ics").every == DEFAULT_EVERY
    assert make_probe("curvature", when="once").every == ONCE_EVERY
    assert make_probe("curvature_running").bn_modes == ("running",)
    assert make_probe("landscape", every=3, etas=[0.5]).etas == (0.5,)


def test_the_registry_builds_exactly_the_catalogue_with_its_cadences() -> None:
    """The spec validates names against plain data (normdrop.probe_catalog); the registry must build every one of
    them, each running when the catalogue says."""
    assert set(REGISTRY) == set(PROBES)
    for name, when in PROBES.items():
        assert make_probe(name, every=7).when == when, name


def test_presets_expand_to_registered_probes_and_are_not_probes() -> None:
    assert not set(PRESETS) & set(REGISTRY)
    for members in PRESETS.values():
        assert set(members) <= set(REGISTRY)
    assert expand_probes(["smoothness", "ics", "curvature"]) == ("curvature", "ics", "landscape")
    assert expand_probes(["all"]) == tuple(sorted(REGISTRY))
    with pytest.raises(ValueError, match="expand it with"):
        make_probe("bn_optimization")
    with pytest.raises(ValueError, match="unknown probe 'nope'"):
        make_probe("nope")
    with pytest.raises(ValueError, match="unknown probe or preset"):
        expand_probes(["nope"])
    with pytest.raises(ValueError, match="positive int"):
        make_probe("ics", every=0)
    with pytest.raises(ValueError, match="when"):
        make_probe("ics", when="sometimes")  # type: ignore[arg-type]


class Needy(Probe):
    name = "needy"
    needs = frozenset({"model", "dataset"})

    def measure(self, ctx: HookContext) -> list[dict[str, Any]]:
        return [{"value": torch.tensor(2.5), "count": torch.tensor(3), "tag": "x"}]


def test_base_class_checks_needs_and_tidies_records() -> None:
    model = nn.Linear(2, 2)
    ctx = HookContext(RunSpec(), 4, 0.1, model, None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs dataset"):
        Needy()(ctx)
    ctx = HookContext(RunSpec(), 4, 0.1, model, None, None, None, object())  # type: ignore[arg-type]
    assert Needy()(ctx) == [{"probe": "needy", "step": 4, "value": 2.5, "count": 3, "tag": "x"}]
    with pytest.raises(TypeError, match="JSON scalar"):
        tidy_record("p", 0, {"values": [1, 2]})


def test_measurement_mode_restores_modes_and_running_statistics() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nd.BatchNorm1d(4), nd.Dropout(0.5))
    model.eval()
    model[2].train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with measurement_mode(model, "batch", dropout=False):
        assert model[1].training and not model[2].training and not model[0].training
        model(torch.randn(8, 3) * 5 + 2)
    assert [m.training for m in model] == [False, False, True]
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def _deterministic(result) -> tuple:
    metrics = [(step, name, value) for step, name, value in result.metrics if name != "train_time"]
    summary = {key: value for key, value in result.summary.items() if key != "train_time"}
    return result.status, metrics, summary


def test_probed_run_trains_like_an_unprobed_one_and_records_are_tidy_json() -> None:
    spec = RunSpec(**SMALL, probes=expand_probes(["all"]))
    plain = run_spec(RunSpec(**SMALL))
    probed = run_spec(spec)
    assert probed.status == "finished", probed.error
    assert _deterministic(probed) == _deterministic(plain)
    json.dumps(probed.probe_records, allow_nan=False)
    for record in probed.probe_records:
        assert list(record)[:2] == ["probe", "step"]
        assert all(value is None or isinstance(value, bool | int | float | str) for value in record.values())
    by_probe: dict[str, set[int]] = {}
    for record in probed.probe_records:
        by_probe.setdefault(record["probe"], set()).add(record["step"])
    expected = {"curvature", "ics", "landscape", "layer_inputs", "generalization", "coadaptation", "variance_shift"}
    assert {name for name, steps in by_probe.items() if steps == {0, 10, 20}} == expected
    assert by_probe["ensemble"] == {20}


def test_a_once_probe_runs_at_step_zero_only() -> None:
    probe = make_probe("coadaptation", when="once")
    result = run_spec(RunSpec(**SMALL), hooks=[probe])
    assert {record["step"] for record in result.probe_records} == {0}
