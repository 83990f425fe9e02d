"""normdrop.probes: the instruments that measure what batch norm and dropout do during training.

Each probe is one class in its own file that declares what it needs from the trainer (``needs``: fields of
:class:`normdrop.train.HookContext`) and when it runs (``when``: every k steps, at the end, or once at step 0), and
returns tidy records: flat dicts of JSON values, one per (probe, step, layer / unit / step size / k ...), each with
``"probe"`` and ``"step"``. The trainer calls them as hooks and restores the model, optimizer and RNG around each
call, so a probed run trains exactly like an unprobed one.

A spec names probes by their registry name (``RunSpec(probes=("ics", "curvature"))``); the trainer builds each with
:func:`make_probe` ``(name, every=spec.probe_every)``. Presets name common sets; expand them with
:func:`expand_probes` before building the spec, so a run's identity lists exactly the probes it ran::

    RunSpec(probes=expand_probes(["bn_optimization"]))

Two instruments are not hooks, because they need several runs: :func:`largest_stable_lr` (a search over runs) and
:func:`explicit_ensemble_records` / :func:`ensemble_comparison` (independently trained networks). See
``docs/probes.md`` for every record field, formula, paper and measured overhead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from normdrop.probes.base import DEFAULT_EVERY, Probe, Record, When, measurement_mode, tidy_record
from normdrop.probes.coadaptation import CoadaptationProbe, coadaptation_stats
from normdrop.probes.curvature import CurvatureProbe, hessian_vector_product, hutchinson_trace, top_eigenvalue
from normdrop.probes.ensemble import (
    EnsembleProbe,
    ensemble_comparison,
    explicit_ensemble_records,
    mc_dropout_records,
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
"""Probe name (what ``RunSpec.probes`` lists) -> factory. ``curvature`` measures the loss with BN on batch
statistics, ``curvature_running`` with BN on running statistics; both record ``bn_mode``."""

PRESETS: dict[str, tuple[str, ...]] = {
    "stable_inputs": ("ics", "layer_inputs"),
    "smoothness": ("curvature", "landscape"),
    "bn_optimization": ("curvature", "ics", "landscape", "layer_inputs"),
    "regularization": ("coadaptation", "generalization"),
    "dropout_bn": ("coadaptation", "ensemble", "variance_shift"),
    "cheap": ("coadaptation", "generalization", "layer_inputs"),
    "all": tuple(sorted(REGISTRY)),
}
"""Preset name -> probe names: ``stable_inputs`` (claim bn-stable-inputs), ``smoothness`` (bn-smooth),
``bn_optimization`` (both), ``regularization`` (bn-regularizes, dropout-overfit, dropout-coadapt), ``dropout_bn``
(dropout-coadapt, dropout-ensemble, dropout-bn-shift), ``cheap`` (probes that cost about one forward pass), ``all``."""


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


def expand_probes(names: Iterable[str]) -> tuple[str, ...]:
    """Probe and preset names -> the sorted, unique probe names they stand for (what ``RunSpec.probes`` stores)."""
    expanded: set[str] = set()
    for name in names:
        if name in PRESETS:
            expanded.update(PRESETS[name])
        elif name in REGISTRY:
            expanded.add(name)
        else:
            raise ValueError(
                f"unknown probe or preset {name!r}; probes: {sorted(REGISTRY)}, presets: {sorted(PRESETS)}"
            )
    return tuple(sorted(expanded))


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
    "coadaptation_stats",
    "common_train_accuracy",
    "ensemble_comparison",
    "expand_probes",
    "explicit_ensemble_records",
    "gap_at_train_accuracy",
    "gap_records",
    "hessian_vector_product",
    "hutchinson_trace",
    "largest_stable_lr",
    "make_probe",
    "mc_dropout_records",
    "measurement_mode",
    "predicted_train_variance",
    "tidy_record",
    "top_eigenvalue",
    "weight_scaled_logits",
]
