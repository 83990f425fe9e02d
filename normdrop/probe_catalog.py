"""The probes a spec may name, as plain data: names, default cadences, presets and what a probed run keeps.

:mod:`normdrop.spec` validates ``RunSpec.probes`` against this table without importing any probe;
:mod:`normdrop.probes` builds the instruments; its registry holds exactly these names, each running when this table
says (``tests/probes/test_probes_registry.py`` checks both). Add a probe here and in ``normdrop.probes.REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

When = Literal["every", "end", "once"]
"""When a probe runs: every ``every`` steps, once at the final step, or once at step 0 (the initialization)."""

DEFAULT_EVERY: int = 100
"""A probe's cadence in steps when none is given (``RunSpec.probe_every``'s default)."""

PROBES: dict[str, When] = {
    "layer_inputs": "every",
    "ics": "every",
    "landscape": "every",
    "curvature": "every",
    "curvature_running": "every",
    "generalization": "every",
    "coadaptation": "every",
    "ensemble": "end",
    "variance_shift": "every",
}
"""Probe name (what ``RunSpec.probes`` lists) -> when it runs by default. ``curvature`` measures the loss with BN
on batch statistics, ``curvature_running`` with BN on running statistics; both record ``bn_mode``."""

PRESETS: dict[str, tuple[str, ...]] = {
    "stable_inputs": ("ics", "layer_inputs"),
    "smoothness": ("curvature", "landscape"),
    "bn_optimization": ("curvature", "ics", "landscape", "layer_inputs"),
    "regularization": ("coadaptation", "generalization"),
    "dropout_bn": ("coadaptation", "ensemble", "variance_shift"),
    "cheap": ("coadaptation", "generalization", "layer_inputs"),
    "all": tuple(sorted(PROBES)),
}
"""Preset name -> probe names: ``stable_inputs`` (claim bn-stable-inputs), ``smoothness`` (bn-smooth),
``bn_optimization`` (both: the probed deep runs of the study), ``regularization`` (bn-regularizes,
dropout-overfit, dropout-coadapt), ``dropout_bn`` (dropout-coadapt, dropout-ensemble, dropout-bn-shift),
``cheap`` (probes that cost about one forward pass), ``all``."""

KEEPABLE: tuple[str, ...] = ("final_weights",)
"""What a run may keep in the store's artifacts besides its metrics and probe records (``RunSpec.keep``):
``final_weights`` is ``torch.save`` of the trained network's state dict, for analyses that evaluate it again."""

KEPT_WITH: dict[str, tuple[str, ...]] = {"ensemble": ("final_weights",)}
"""What a run keeps by default when its spec lists the probe: a run measured by ``ensemble`` is one member of an
explicit ensemble (claim dropout-ensemble), whose analysis combines the members' trained networks."""


def expand_probes(names: Iterable[str]) -> tuple[str, ...]:
    """Probe and preset names -> the sorted, unique probe names they stand for (what ``RunSpec.probes`` stores)."""
    expanded: set[str] = set()
    for name in names:
        if name in PRESETS:
            expanded.update(PRESETS[name])
        elif name in PROBES:
            expanded.add(name)
        else:
            raise ValueError(f"unknown probe or preset {name!r}; probes: {sorted(PROBES)}, presets: {sorted(PRESETS)}")
    return tuple(sorted(expanded))


def kept_by_default(probes: Iterable[str]) -> tuple[str, ...]:
    """What a run with these (expanded) probes keeps when its spec does not say (sorted, unique)."""
    return tuple(sorted({kept for probe in probes for kept in KEPT_WITH.get(probe, ())}))
