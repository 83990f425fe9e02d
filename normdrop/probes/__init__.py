"""normdrop.probes: the instruments that measure what batch norm and dropout do during training.

Each probe is one class in its own file that declares what it needs from the trainer (``needs``: fields of
:class:`normdrop.train.HookContext`) and when it runs (``when``: every k steps, at the end, or once at step 0), and
returns tidy records: flat dicts of JSON values, one per (probe, step, layer / unit / step size / k ...), each with
``"probe"`` and ``"step"``. The trainer calls them as hooks and restores the model, optimizer and RNG around each
call, so a probed run trains exactly like an unprobed one.

A spec names probes by their registry name (``RunSpec(probes=("ics", "curvature"))``; the names, presets and
default cadences are plain data in :mod:`normdrop.probe_catalog`, which the spec validates against);
:func:`make_probes` builds a spec's probes (:func:`make_probe` ``(name, every=spec.probe_every)`` each) and
:func:`normdrop.lab.run_spec` hands them to the trainer. Presets name common sets and expand to their probes when
the spec is built, so a run's identity lists exactly the probes it ran::

    RunSpec(probes=["bn_optimization"]).probes == ("curvature", "ics", "landscape", "layer_inputs")

Two instruments are not hooks, because they need several runs: :func:`largest_stable_lr` (a search over runs) and
:func:`explicit_ensemble_records` / :func:`ensemble_comparison` (independently trained networks). See
``docs/probes.md`` for every record field, formula, paper and measured overhead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from normdrop.probe_catalog import DEFAULT_EVERY, PRESETS, When, expand_probes
from normdrop.probes.base import Probe, Record, measurement_mode, tidy_record
from normdrop.probes.coadaptation import (
    CoadaptationProbe,
    ablation_drops,
    coadaptation_stats,
    single_unit_probe_accuracy,
)
from normdrop.probes.curvature import CurvatureProbe, hessian_vector_product, hutchinson_trace, top_eigenvalue
from normdrop.probes.ensemble import (
    EnsembleProbe,
    ensemble_comparison,
    expected_calibration_error,
    explicit_ensemble_records,
    mc_dropout_records,
    negative_log_likelihood,
    weight_scaled_logits,
)
from normdrop.probes.generalization import (
    GeneralizationProbe,
    common_train_accuracy,
    gap_at_train_accuracy,
    gap_records,
)
from normdrop.probes.ics import ICSProbe
from normdrop.probes.landscape import LandscapeProbe
from normdrop.probes.layer_inputs import LayerInputsProbe
from normdrop.probes.stable_lr import StableLRResult, largest_stable_lr
from normdrop.probes.variance_shift import VarianceShiftProbe, predicted_train_variance
from normdrop.spec import RunSpec

ProbeFactory = Callable[..., Probe]
"""Builds a probe: ``factory(every=..., when=None, **options)``."""

REGISTRY: dict[str, ProbeFactory] = {
    "layer_inputs": LayerInputsProbe,
    "ics": ICSProbe,
    "landscape": LandscapeProbe,
    "curvature": CurvatureProbe,
    "curvature_running": functools.partial(CurvatureProbe, bn_modes=("running",)),
    "generalization": GeneralizationProbe,
    "coadaptation": CoadaptationProbe,
    "ensemble": EnsembleProbe,
    "variance_shift": VarianceShiftProbe,
}
"""Probe name (what ``RunSpec.probes`` lists) -> factory; exactly the names of :data:`normdrop.probe_catalog.PROBES`
(a test holds the two together)."""


def make_probe(name: str, every: int = DEFAULT_EVERY, when: When | None = None, **options: Any) -> Probe:
    """The probe registered as ``name``, running every ``every`` steps unless its ``when`` (given, or the probe's
    default: ``ensemble`` runs at the end) says otherwise; ``options`` go to its constructor."""
    if name in PRESETS:
        raise ValueError(
            f"{name!r} is a preset of several probes ({', '.join(PRESETS[name])}); expand it with "
            "normdrop.probes.expand_probes before building the spec"
        )
    if name not in REGISTRY:
        raise ValueError(f"unknown probe {name!r}; expected one of {sorted(REGISTRY)} (presets: {sorted(PRESETS)})")
    return REGISTRY[name](every=every, when=when, **options)


def make_probes(spec: RunSpec) -> list[Probe]:
    """The hooks of ``spec.probes``, in the spec's order, each running every ``spec.probe_every`` steps (or when
    the probe's cadence says)."""
    return [make_probe(name, every=spec.probe_every) for name in spec.probes]


__all__ = [
    "DEFAULT_EVERY",
    "PRESETS",
    "REGISTRY",
    "CoadaptationProbe",
    "CurvatureProbe",
    "EnsembleProbe",
    "GeneralizationProbe",
    "ICSProbe",
    "LandscapeProbe",
    "LayerInputsProbe",
    "Probe",
    "ProbeFactory",
    "Record",
    "StableLRResult",
    "VarianceShiftProbe",
    "When",
    "ablation_drops",
    "coadaptation_stats",
    "common_train_accuracy",
    "ensemble_comparison",
    "expand_probes",
    "expected_calibration_error",
    "explicit_ensemble_records",
    "gap_at_train_accuracy",
    "gap_records",
    "hessian_vector_product",
    "hutchinson_trace",
    "largest_stable_lr",
    "make_probe",
    "make_probes",
    "mc_dropout_records",
    "measurement_mode",
    "negative_log_likelihood",
    "predicted_train_variance",
    "single_unit_probe_accuracy",
    "tidy_record",
    "top_eigenvalue",
    "weight_scaled_logits",
]
