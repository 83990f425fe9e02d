"""Reading one run, as a claim's analysis does: its metric curves, final and initial values, probe records and kept
weights (the network rebuilt)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from normdrop.models import build_model
from normdrop.probes.coadaptation import unit_probe_example_scores
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


# test-set predictions (dropgen) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predictions:
    """A trained network's outputs on its run's test set, in the dataset's order (the same examples for every run
    on one dataset): ``logits`` (N, classes) float64, ``labels`` (N,) int64. ``correct`` is what
    :func:`normdrop.significance.paired_example_bootstrap` resamples; its mean is the run's final
    ``test_accuracy``."""

    logits: np.ndarray
    labels: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """1.0 where the arg-max class is the label, else 0.0 (ties go to the lower class, as ``argmax`` does)."""
        return (self.logits.argmax(axis=1) == self.labels).astype(np.float64)


_PREDICTIONS_CACHE: dict[str, Predictions] = {}
_PREDICTIONS_CACHE_SIZE = 1024
"""Predictions per run id (the claims of one study read the same runs; 1024 MNIST-1D runs hold ~80 MB)."""


def final_predictions(result: RunResult | None) -> Predictions | None:
    """The eval-mode logits and labels of a finished run's final network on the test set; None if the run is
    missing, did not finish, or kept no final weights (``"final_weights"`` in ``spec.keep``). Cached per run id (a
    run id fixes the spec, hence the weights)."""
    if result is None or result.status != "finished" or kept_weights(result) is None:
        return None  # checked before the cache: a run cut to a smaller budget has dropped its weights
    cached = _PREDICTIONS_CACHE.get(result.run_id)
    if cached is not None:
        return cached
    model = final_model(result)
    if model is None:
        return None
    data = load_run_dataset(result.spec)
    with torch.no_grad():
        logits = torch.cat([model(data.x_test[i : i + 1024]) for i in range(0, len(data.y_test), 1024)])
    predictions = Predictions(logits.double().numpy(), data.y_test.numpy().astype(np.int64))
    if len(_PREDICTIONS_CACHE) >= _PREDICTIONS_CACHE_SIZE:
        _PREDICTIONS_CACHE.pop(next(iter(_PREDICTIONS_CACHE)))
    _PREDICTIONS_CACHE[result.run_id] = predictions
    return predictions


def final_correctness(runs: Mapping[int, RunResult | None]) -> dict[int, np.ndarray]:
    """Seed -> per-test-example correctness of each run that has :func:`final_predictions` (others left out)."""
    out = {}
    for seed, result in runs.items():
        predictions = final_predictions(result)
        if predictions is not None:
            out[seed] = predictions.correct
    return out


_UNIT_SCORES_CACHE: dict[str, np.ndarray] = {}


def final_unit_probe_scores(result: RunResult | None) -> np.ndarray | None:
    """Per probe test example, the share of the final network's hidden units whose single-unit probe classifies it
    right (:func:`normdrop.probes.coadaptation.unit_probe_example_scores`, fitted on the run's own training
    examples as the ``coadaptation`` probe does); its mean is the run's unit-weighted mean ``unit_probe_accuracy``.
    None if the run is missing, did not finish, or kept no final weights. Cached per run id."""
    if result is None or result.status != "finished" or kept_weights(result) is None:
        return None
    cached = _UNIT_SCORES_CACHE.get(result.run_id)
    if cached is not None:
        return cached
    model = final_model(result)
    if model is None:
        return None
    scores = unit_probe_example_scores(model, load_run_dataset(result.spec)).numpy()
    if len(_UNIT_SCORES_CACHE) >= _PREDICTIONS_CACHE_SIZE:
        _UNIT_SCORES_CACHE.pop(next(iter(_UNIT_SCORES_CACHE)))
    _UNIT_SCORES_CACHE[result.run_id] = scores
    return scores
