"""Reading one run, as a claim's analysis does: its metric curves, final and initial values, probe records and kept
weights (the network rebuilt)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from normdrop.models import build_model
from normdrop.spec import RunResult
from normdrop.stats import paired_log_ratio
from normdrop.train import load_run_dataset

# ---- reading a run -----------------------------------------------------------------------------------------


def curve(result: RunResult, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one metric of a run, by step."""
    points = sorted((step, value) for step, metric, value in result.metrics if metric == name)
    if not points:
        return np.empty(0), np.empty(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def final(result: RunResult | None, name: str) -> float | None:
    """The last recorded value of a metric (None for a missing run, or a run that never recorded it)."""
    if result is None:
        return None
    _, values = curve(result, name)
    if result.status != "finished" or not len(values):
        return None
    return float(values[-1])


def initial(result: RunResult | None, name: str) -> float | None:
    """The value of a metric at step 0."""
    if result is None:
        return None
    steps, values = curve(result, name)
    return float(values[0]) if len(values) and steps[0] == 0 else None


def steps_to_reach(result: RunResult | None, name: str, target: float) -> float | None:
    """The first (fractional) step at which ``name`` reaches ``target`` from below, interpolated linearly between
    evaluations; None if it never does (or the run is missing or failed)."""
    if result is None or result.status == "failed":
        return None
    steps, values = curve(result, name)
    for index, (step, value) in enumerate(zip(steps, values, strict=True)):
        if value >= target:
            if index == 0:
                return float(step)
            before_step, before = steps[index - 1], values[index - 1]
            return float(before_step + (target - before) / (value - before) * (step - before_step))
    return None


def records(result: RunResult | None, probe: str, **match: Any) -> list[dict[str, Any]]:
    """A run's records of one probe whose fields equal ``match``."""
    if result is None:
        return []
    return [r for r in result.probe_records if r.get("probe") == probe and all(r.get(k) == v for k, v in match.items())]


def paired_log2(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> dict[int, float]:
    """Per seed, log2(a / b) where both are finite and positive (1 = a is twice b)."""
    return paired_log_ratio(a, b, base=2.0)


def mean_of(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values, None if there are none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else None


LEGACY_WEIGHTS_RECORD = "final_state"
"""Probe name under which stores written before ``RunSpec.keep`` existed hold a run's final weights (``torch.save``
of the state dict, base64, field ``state``); same run ids, so such stores stay readable."""


def kept_weights(result: RunResult) -> bytes | None:
    """The ``torch.save`` bytes of a run's final state dict, if the run kept them."""
    if "final_weights" in result.artifacts:
        return result.artifacts["final_weights"]
    legacy = records(result, LEGACY_WEIGHTS_RECORD)
    return base64.b64decode(legacy[-1]["state"]) if legacy else None


def final_model(result: RunResult | None) -> Any:
    """The trained network of a finished run that kept its weights (``"final_weights"`` in ``spec.keep``), in eval
    mode; None otherwise."""
    weights = None if result is None or result.status != "finished" else kept_weights(result)
    if weights is None:
        return None
    data = load_run_dataset(result.spec)
    model = build_model(result.spec, data.input_shape, data.num_classes)
    state = torch.load(io.BytesIO(weights), weights_only=True)
    model.load_state_dict(state)
    return model.eval()
