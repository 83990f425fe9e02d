"""The layer kinds a spec may name, as plain data: norm and dropout kinds, where each exists, their options.

:mod:`normdrop.spec` validates a spec's ``norm``, ``dropout_kind``, ``activation`` and ``layers`` against these tables
without importing torch, so that a process that only validates specs and reads the store (a sweep with nothing left
to run) never pays torch's import. :mod:`normdrop.nn.factory` builds the layers; its registry holds exactly these
kinds, sources and dims (``tests/test_layer_catalog.py`` checks it, and that every option listed here is a parameter
of the layer's constructor).

How a spec's layer options are checked. ``surely_accepted`` answers True only when the layer is certain to accept
the spec's arguments: the kind exists in that source for those dims, every required option is given, and every given
option has a rule here that the value passes. The rules are at least as strict as the layers' own checks (the test
builds the layer for every case the rules accept, including their edges). Anything else -- an unknown option, a
value the rules do not vouch for, a kind registered at run time -- is decided by building the layer once, with the
layer's own error message (``normdrop.spec._check_layer_options``), so no error message depends on this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACTIVATION_NAMES",
    "ALL_DIMS",
    "DROPOUT_KINDS",
    "LAYER_SOURCES",
    "NORM_KINDS",
    "LayerKind",
    "add_kind",
    "surely_accepted",
]

ALL_DIMS: tuple[int, ...] = (0, 1, 2, 3)
"""Spatial dims of a layer's input: 0 for (N, C), 1 for (N, C, L), 2 for (N, C, H, W), 3 for (N, C, D, H, W)."""

LAYER_SOURCES: tuple[str, ...] = ("normdrop", "torch")
"""Where ``RunSpec.layers`` takes BatchNorm/Dropout from: normdrop.nn or torch.nn."""

ACTIVATION_NAMES: tuple[str, ...] = ("relu", "gelu", "tanh", "selu", "elu", "identity")
"""``RunSpec.activation`` names; ``normdrop.nn.factory.ACTIVATIONS`` maps each to its module class."""

Rule = Callable[[Any], bool]
"""An option's value -> True when the layer certainly accepts it (False: let the layer decide)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _at_least(low: float) -> Rule:
    return lambda value: _is_number(value) and value >= low


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


@dataclass(frozen=True)
class LayerKind:
    """One norm or dropout kind.

    Attributes:
        sources: layer source (``LAYER_SOURCES``) -> the spatial dims it is built for there.
        options: every keyword option of the layer's constructor a spec may pass (``norm_options`` /
            ``dropout_options``), each with the rule its value must pass to be accepted without building the layer,
            or None where only the layer decides (e.g. ``affine``: a bool, which a spec's int/float values are not).
        required: options the constructor cannot do without (ghost BN's ``ghost_batch_size``).
        defaults: defaults of options that ``joint`` reads (equal to the constructor's, by test).
        joint: a rule across the options, given the defaults updated with the given options.
        takes_momentum: False for kinds with fixed statistics (frozen BN): no running-statistics momentum.
        checked_here: False for a kind registered at run time, whose constructor this table does not know: a spec
            naming it is always checked by building its layer.
    """

    sources: Mapping[str, tuple[int, ...]]
    options: Mapping[str, Rule | None] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    defaults: Mapping[str, int | float] = field(default_factory=dict)
    joint: Callable[[Mapping[str, Any]], bool] | None = None
    takes_momentum: bool = True
    checked_here: bool = True


_BN_OPTIONS: dict[str, Rule | None] = {"affine": None, "track_running_stats": None, "bias": None}
_RENORM_STEPS = ("warmup_steps", "r_max_steps", "d_max_steps")


def _renorm_schedule(options: Mapping[str, Any]) -> bool:
    # The limits relax from warmup_steps to r_max_steps / d_max_steps: neither end may come before the start.
    return options["r_max_steps"] >= options["warmup_steps"] and options["d_max_steps"] >= options["warmup_steps"]


NORM_KINDS: dict[str, LayerKind] = {
    "batch": LayerKind({"normdrop": ALL_DIMS, "torch": ALL_DIMS}, _BN_OPTIONS),
    "ghost": LayerKind(
        {"normdrop": (0, 1, 2)}, {**_BN_OPTIONS, "ghost_batch_size": _positive_int}, required=("ghost_batch_size",)
    ),
    "noisy": LayerKind({"normdrop": (0, 1, 2)}, {**_BN_OPTIONS, "noise": _at_least(0.0)}, defaults={"noise": 1.0}),
    "renorm": LayerKind(
        {"normdrop": (0, 1, 2)},
        {
            "affine": None,
            "bias": None,
            "r_max": _at_least(1.0),
            "d_max": _at_least(0.0),
            **dict.fromkeys(_RENORM_STEPS, _non_negative_int),
        },
        defaults={"warmup_steps": 5_000, "r_max_steps": 40_000, "d_max_steps": 25_000},
        joint=_renorm_schedule,
    ),
    "sync": LayerKind({"normdrop": ALL_DIMS, "torch": ALL_DIMS}, _BN_OPTIONS),
    "frozen": LayerKind({"normdrop": ALL_DIMS}, {"trainable_affine": None}, takes_momentum=False),
    "none": LayerKind({"normdrop": ALL_DIMS, "torch": ALL_DIMS}),
}
"""Norm kind (``RunSpec.norm``) -> where it exists and what it takes (see :class:`LayerKind`)."""

_BERNOULLI = {"normdrop": ALL_DIMS, "torch": ALL_DIMS}

DROPOUT_KINDS: dict[str, LayerKind] = {
    "standard": LayerKind(_BERNOULLI, {"inplace": None}),
    "channel": LayerKind(_BERNOULLI, {"inplace": None}),
    "alpha": LayerKind(_BERNOULLI, {"inplace": None}),
    "feature_alpha": LayerKind(_BERNOULLI, {"inplace": None}),
    "gaussian": LayerKind({"normdrop": ALL_DIMS}),
    "droppath": LayerKind({"normdrop": ALL_DIMS}),
    "dropblock": LayerKind({"normdrop": (2,)}, {"block_size": _positive_int}),
    "uout": LayerKind({"normdrop": ALL_DIMS}),
    "concrete": LayerKind(
        {"normdrop": ALL_DIMS},
        {
            "layer": None,
            "temperature": _positive,
            "weight_regularizer": _at_least(0.0),
            "dropout_regularizer": _at_least(0.0),
        },
    ),
    "none": LayerKind({"normdrop": ALL_DIMS, "torch": ALL_DIMS}),
}
"""Dropout kind (``RunSpec.dropout_kind``) -> where it exists and what it takes. The rate ``p`` is not an option:
it is the spec's ``dropout`` (Uout's beta, ConcreteDropout's initial rate)."""


def add_kind(table: dict[str, LayerKind], name: str, dims: tuple[int, ...]) -> None:
    """Record a kind registered at run time (``normdrop.nn.factory.register_norm`` / ``register_dropout``): it exists
    in normdrop for ``dims``; its options are unknown here, so a spec naming it is checked by building its layer."""
    table[name] = LayerKind({"normdrop": tuple(dims)}, checked_here=False)


def surely_accepted(kind: LayerKind | None, layers: str, dims: int, options: Mapping[str, Any]) -> bool:
    """True when the layer of ``kind`` from ``layers`` for ``dims`` spatial dims certainly accepts ``options`` (and
    the spec's rate, momentum and eps, which the spec's own field bounds keep in every layer's range); False when
    only building it can tell (see the module docstring)."""
    if kind is None or not kind.checked_here or dims not in kind.sources.get(layers, ()):
        return False
    if any(name not in options for name in kind.required):
        return False
    for name, value in options.items():
        rule = kind.options.get(name)
        if rule is None or not rule(value):
            return False
    return kind.joint is None or kind.joint({**kind.defaults, **options})
