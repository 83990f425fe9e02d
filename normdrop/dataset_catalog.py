"""The datasets a spec may name, as plain data: their names, the synthetic sets' options, and the check of a
dataset's options.

:mod:`normdrop.spec` validates ``RunSpec.dataset`` and ``RunSpec.dataset_options`` here without importing torch or
numpy; :mod:`normdrop.data` builds the datasets (``load_dataset`` accepts exactly these names, and applies the same
option check).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

DATASET_NAMES: tuple[str, ...] = (
    "mnist1d",
    "digits",
    "blobs",
    "spirals",
    "teacher",
    "mnist",
    "fashion-mnist",
    "cifar10",
)
"""Every dataset ``normdrop.data.load_dataset`` loads."""

FILE_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10")
"""The datasets read from files the user has (``root=``); the others are generated offline."""

# Size and noise knobs of the synthetic sets: the keyword options load_dataset accepts, with their defaults.
# An option's type is its default's type (int or float).
SYNTHETIC_DEFAULTS: dict[str, dict[str, int | float]] = {
    "blobs": {"n_train": 1000, "n_test": 1000, "n_features": 10, "n_classes": 4, "noise": 0.5},
    "spirals": {"n_train": 1000, "n_test": 1000, "n_classes": 3, "noise": 0.05, "n_turns": 1.0},
    "teacher": {
        "n_train": 1000,
        "n_test": 1000,
        "n_features": 20,
        "n_classes": 10,
        "teacher_width": 100,
        "teacher_depth": 2,
        "noise": 0.0,
    },
}


def check_dataset_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the option and what is expected) unless ``load_dataset(name, **options)`` accepts
    ``options``: the synthetic sets' knobs of ``SYNTHETIC_DEFAULTS``, none for the other sets."""
    if name in SYNTHETIC_DEFAULTS:
        _resolve_options(name, options)
    else:
        _check_no_options(name, options)


def _check_no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        given = ", ".join(f"{key}={value!r}" for key, value in options.items())
        raise ValueError(f"dataset {name!r} takes no options, got {given}")


def _resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` updated with ``options``; ints must be positive, floats finite and non-negative."""
    defaults = SYNTHETIC_DEFAULTS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; expected some of {', '.join(defaults)}"
        )
    resolved = dict(defaults)
    for key, value in options.items():
        if isinstance(defaults[key], int):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} option {key} must be a positive integer, got {value!r}")
            resolved[key] = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{name} option {key} must be a finite number >= 0, got {value!r}")
            resolved[key] = float(value)
    if resolved["n_classes"] < 2:
        raise ValueError(f"{name} option n_classes must be at least 2, got {resolved['n_classes']}")
    if resolved["n_train"] < resolved["n_classes"]:
        raise ValueError(
            f"{name} option n_train={resolved['n_train']} must be at least n_classes={resolved['n_classes']}"
        )
    return resolved
