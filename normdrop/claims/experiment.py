"""The runs a claim asks for (:class:`Experiment`, by arm), and the arms several claims share, built once here so
shared runs have one spec (and one run id) whichever claim asks for them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from normdrop.claims.setting import StudySetting
from normdrop.probe_catalog import PRESETS
from normdrop.spec import RunResult, RunSpec

Extension = Callable[[Mapping[str, RunResult]], Mapping[str, tuple[list[RunSpec], list[int] | None]]]
"""An adaptive experiment's next round: given every result known so far (run id -> result), the arms it needs
now, as ``label -> (specs, replicates)`` (see :attr:`Experiment.extend`)."""


@dataclass
class Experiment:
    """The runs a claim needs, by arm: ``arms[label]`` holds one spec per seed, in seed order.

    ``description`` says what was run and why, for the report. An experiment with no arms needs no training (the
    mechanics claims). ``replicates[label]`` names the replicate seed of each spec of an arm, in order, where it is
    not :attr:`StudySetting.seed_list` (e.g. an arm on the selection seeds,
    :attr:`StudySetting.selection_seed_list`); :meth:`ClaimData.runs` keys results by it.
    """

    arms: dict[str, list[RunSpec]] = field(default_factory=dict)
    description: str = ""
    replicates: dict[str, list[int]] = field(default_factory=dict)
    extend: Extension | None = None
    """For an adaptive experiment (a bisection): called by the study after each round of runs with every result
    known so far; it returns the arms needed given those results (a pure function of them, so ``normdrop report``
    replays the same rounds from the store). Returned arms are added (a label already present is replaced); the
    study stops when every spec has a result and a call adds no new spec."""

    def add(self, label: str, specs: list[RunSpec], replicates: list[int] | None = None) -> None:
        """Add an arm (``replicates``: its seeds, when not the setting's evaluation seeds)."""
        if replicates is not None and len(replicates) != len(specs):
            raise ValueError(f"arm {label!r}: {len(specs)} specs but {len(replicates)} replicate seeds")
        self.arms[label] = specs
        if replicates is not None:
            self.replicates[label] = list(replicates)

    def specs(self) -> list[RunSpec]:
        """Every spec, each once, in arm order."""
        unique: dict[str, RunSpec] = {}
        for specs in self.arms.values():
            for spec in specs:
                unique.setdefault(spec.run_id, spec)
        return list(unique.values())


# ---- probes and shared arms ------------------------------------------------------------------------------

NORMS: tuple[str, ...] = ("none", "batch")
"""The two arms of every BN claim: no normalization, batch normalization."""

DEEP_PROBES: tuple[str, ...] = PRESETS["bn_optimization"]
"""Probes of the probed deep runs, shared by bn-stable-inputs and bn-smooth (one set of runs measures both)."""

SMALL_PROBES: tuple[str, ...] = ("coadaptation", "variance_shift")
"""Probes of every small-family run, at the first and the last step (about a forward pass of the training set
each), read by dropout-coadapt and dropout-bn-shift; every small run has them, so the claims share runs."""


def lr_label(norm: str, lr: float) -> str:
    """Arm label of one point of the deep learning-rate grid."""
    return f"{norm} lr={lr:g}"


def lr_grid_arms(setting: StudySetting) -> dict[str, list[RunSpec]]:
    """The deep MLP, with and without BN, at every learning rate of the grid (bn-faster, bn-higher-lr, bn-smooth
    share these runs)."""
    return {lr_label(norm, lr): setting.arm("deep", norm=norm, lr=lr) for norm in NORMS for lr in setting.lr_grid}


def probed_label(norm: str) -> str:
    """Arm label of the probed deep runs."""
    return f"{norm} probed"


def probed_deep_arms(setting: StudySetting) -> dict[str, list[RunSpec]]:
    """The deep MLP at :attr:`StudySetting.probe_lr`, with and without BN, with the :data:`DEEP_PROBES`."""
    return {
        probed_label(norm): setting.arm("deep", norm=norm, lr=setting.probe_lr, probes=DEEP_PROBES) for norm in NORMS
    }


def small_label(norm: str = "none", dropout: float = 0.0, train_size: int | None = -1, **fields: Any) -> str:
    """Arm label of a small-family run (``train_size=-1``: the family's default subset)."""
    parts = [norm, f"p={dropout:g}"]
    if train_size != -1:
        parts.append(f"n={train_size or 'all'}")
    parts += [f"{key}={value}" for key, value in sorted(fields.items())]
    return " ".join(parts)


def small_arm(
    setting: StudySetting, norm: str = "none", dropout: float = 0.0, train_size: int | None = -1, **fields: Any
) -> tuple[str, list[RunSpec]]:
    """``(label, specs)`` of a small-family arm, with the :data:`SMALL_PROBES` (unless ``probes`` says otherwise)."""
    size = setting.small_train_size if train_size == -1 else train_size
    probes = fields.pop("probes", SMALL_PROBES)
    specs = setting.arm("small", norm=norm, dropout=dropout, train_size=size, probes=probes, **fields)
    return small_label(norm, dropout, train_size, **fields), specs


def factorial_arms(setting: StudySetting) -> dict[str, list[RunSpec]]:
    """The 2 x 2 factorial of the small family: BN or none x dropout :attr:`StudySetting.primary_dropout` or none,
    the same seeds in every cell (bn-less-dropout and summary share these runs)."""
    arms = {}
    for norm in NORMS:
        for p in (0.0, setting.primary_dropout):
            label, specs = small_arm(setting, norm, p)
            arms[label] = specs
    return arms


def dropout_label(setting: StudySetting, p: float, train_size: int | None) -> str:
    """Arm label of the plain small network with dropout ``p`` trained on ``train_size`` examples."""
    return small_label("none", p) if train_size == setting.small_train_size else small_label("none", p, train_size)


def dropout_grid_arms(setting: StudySetting) -> dict[str, list[RunSpec]]:
    """The plain small network at every dropout rate of the grid and every training-set size (dropout-overfit,
    dropout-generalizes and dropout-coadapt share these runs)."""
    arms = {}
    for size in setting.train_sizes:
        for p in setting.dropout_grid:
            _, specs = small_arm(setting, "none", p, train_size=-1 if size == setting.small_train_size else size)
            arms[dropout_label(setting, p, size)] = specs
    return arms


def size_name(setting: StudySetting, train_size: int | None) -> str:
    """How the report names a training-set size."""
    return "all training examples" if train_size is None else f"{train_size} training examples"


# ---- (dropmech) ----------------------------------------------------------------------------------------------


def factorial_selection_label(label: str) -> str:
    """Arm label of a 2 x 2 factorial cell run on the selection seeds."""
    return f"{label} (selection seeds)"


def factorial_selection_arms(setting: StudySetting) -> dict[str, tuple[list[RunSpec], list[int]]]:
    """The cells of :func:`factorial_arms` on the selection seeds, as ``label -> (specs, replicates)``: where a
    claim on the factorial makes its choices (e.g. a speed target), so the evaluation seeds are only measured."""
    seeds = setting.selection_seed_list
    arms = {}
    for norm in NORMS:
        for p in (0.0, setting.primary_dropout):
            _, specs = small_arm(setting, norm, p, seeds=seeds)
            arms[factorial_selection_label(small_label(norm, p))] = (specs, seeds)
    return arms
