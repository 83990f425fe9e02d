"""The study setting: data, seeds, budgets and the two experiment families every claim builds its runs from.

The two experiment families (see :class:`StudySetting`) were chosen so every claim is testable on 2 CPU cores:

- ``deep``: a deep plain MLP (6 hidden layers of 100 ReLU units, torch's default init) trained with SGD + momentum.
  Without BN its signal shrinks layer by layer at init, so it trains slowly and is sensitive to the learning
  rate: the regime in which Ioffe & Szegedy (2015) motivated BN. Used by bn-faster, bn-higher-lr,
  bn-stable-inputs, bn-smooth.
- ``small``: a 2-hidden-layer MLP (128 units) trained with Adam on a 500-example subset of the training set, long
  enough to fit it perfectly: the regime in which regularizers can matter. Used by the dropout claims,
  bn-regularizes, bn-less-dropout, dropout-bn-shift and summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from normdrop.spec import RunSpec
from normdrop.stats import DEFAULT_SEEDS

QUICK_SEEDS = 3
"""Seeds per arm of ``normdrop study --quick``: enough for an interval, too few for a firm verdict."""

FAMILIES: dict[str, dict[str, Any]] = {
    "deep": {
        "model": "mlp",
        "depth": 6,
        "width": 100,
        "optimizer": "sgd",
        "momentum": 0.9,
        "batch_size": 100,
        "steps": 400,
        "eval_every": 25,
    },
    "small": {
        "model": "mlp",
        "depth": 2,
        "width": 128,
        "optimizer": "adam",
        "lr": 3e-3,
        "batch_size": 100,
        "train_size": 500,
        "steps": 750,
        "eval_every": 50,
    },
}
"""Spec fields of the two experiment families (see the module docstring); the quick study shortens ``steps``."""

QUICK_STEPS = {"deep": 150, "small": 200}
QUICK_EVAL_EVERY = {"deep": 25, "small": 25}
PROBES_PER_RUN = 4
"""How many times along a deep run its probes measure (besides step 0); the quick study measures twice."""
QUICK_PROBES_PER_RUN = 2


@dataclass(frozen=True)
class StudySetting:
    """Where the study runs and how big it is: data, seeds, budgets and grids.

    Args:
        dataset: a name of ``normdrop.data.DATASET_NAMES`` (all claims train on it).
        seeds: seeds per arm (default 5, quick 3).
        quick: short runs and thinned grids (``normdrop study --quick``).
        overrides: spec fields applied to every run of every claim, e.g. ``(("model", "cnn1d"),)`` to point the
            study at another architecture. Fields a claim varies (``norm``, ``dropout``, ``lr``...) still win.
    """

    dataset: str = "mnist1d"
    seeds: int = DEFAULT_SEEDS
    quick: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        unknown = [name for name, _ in self.overrides if name not in RunSpec.model_fields]
        if unknown:
            raise ValueError(f"overrides name unknown spec fields {unknown}")

    @classmethod
    def create(
        cls,
        *,
        quick: bool = False,
        dataset: str = "mnist1d",
        seeds: int | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> StudySetting:
        """The default setting, or the quick one; ``seeds`` None takes the default of either."""
        return cls(
            dataset=dataset,
            seeds=seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS),
            quick=quick,
            overrides=tuple(sorted((overrides or {}).items())),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (the report and ``normdrop report`` read it back with :meth:`from_dict`)."""
        return {"dataset": self.dataset, "seeds": self.seeds, "quick": self.quick, "overrides": dict(self.overrides)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySetting:
        """Inverse of :meth:`as_dict`."""
        return cls.create(
            quick=bool(data.get("quick", False)),
            dataset=str(data.get("dataset", "mnist1d")),
            seeds=int(data["seeds"]) if data.get("seeds") is not None else None,
            overrides=data.get("overrides") or {},
        )

    # ---- seeds and grids -------------------------------------------------------------------------------------

    @property
    def seed_list(self) -> list[int]:
        """The seeds every arm runs with."""
        return list(range(self.seeds))

    @property
    def lr_grid(self) -> tuple[float, ...]:
        """Learning rates of the deep family, a factor ~3 apart (DeepOBS-style log grid)."""
        return (0.01, 0.1, 1.0, 10.0) if self.quick else (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)

    probe_lr: ClassVar[float] = 0.1
    """Learning rate of the probed deep runs: the plain network's best on MNIST-1D, and fine for BN."""

    @property
    def dropout_grid(self) -> tuple[float, ...]:
        """Dropout probabilities of the small family."""
        return (0.0, 0.5) if self.quick else (0.0, 0.1, 0.3, 0.5)

    primary_dropout: ClassVar[float] = 0.5
    """The p every dropout claim's verdict compares with p = 0, fixed before seeing data (Srivastava et al. 2014
    recommend 0.5 for hidden units)."""

    @property
    def small_train_size(self) -> int:
        """Training examples of the small family."""
        return int(FAMILIES["small"]["train_size"])

    @property
    def train_sizes(self) -> tuple[int | None, ...]:
        """Training-set sizes of dropout-generalizes (None: the whole training set)."""
        return (self.small_train_size, None)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes of bn-regularizes (the family's own, 100, is among them; the quick study has only it)."""
        return (100,) if self.quick else (25, 100, 400)

    @property
    def ensemble_members(self) -> int:
        """Independently trained networks in each explicit ensemble of dropout-ensemble."""
        return 3 if self.quick else 4

    # ---- specs -----------------------------------------------------------------------------------------------

    def steps(self, family: str) -> int:
        """The step budget of a family's runs."""
        return QUICK_STEPS[family] if self.quick else int(FAMILIES[family]["steps"])

    def spec(self, family: str, **fields: Any) -> RunSpec:
        """A run of ``family`` on this setting's data: the family's fields, then the overrides, then ``fields``."""
        if family not in FAMILIES:
            raise ValueError(f"unknown experiment family {family!r}; expected one of {sorted(FAMILIES)}")
        values: dict[str, Any] = {**FAMILIES[family], "dataset": self.dataset}
        if self.quick:
            values["steps"] = QUICK_STEPS[family]
            values["eval_every"] = QUICK_EVAL_EVERY[family]
        values.update(dict(self.overrides))
        values.update(fields)
        if values.get("probes") and "probe_every" not in fields:
            calls = QUICK_PROBES_PER_RUN if self.quick else PROBES_PER_RUN
            values["probe_every"] = max(1, values["steps"] // calls) if family == "deep" else values["steps"]
        return RunSpec(**values)

    def arm(self, family: str, **fields: Any) -> list[RunSpec]:
        """One spec per seed of :attr:`seed_list`."""
        return [self.spec(family, seed=seed, **fields) for seed in self.seed_list]
