"""The study setting: data, seeds, budgets and the two experiment families every claim builds its runs from.

The two experiment families (see :class:`StudySetting`) were chosen so every claim is testable on 2 CPU cores:

- ``deep``: a deep plain MLP (6 hidden layers of 100 ReLU units, torch's default init) trained with SGD + momentum.
  Without BN its signal shrinks layer by layer at init, so it trains slowly and is sensitive to the learning
  rate: the regime in which Ioffe & Szegedy (2015) motivated BN. Used by bn-faster, bn-higher-lr,
  bn-stable-inputs, bn-smooth.
- ``small``: a 2-hidden-layer MLP (128 units) trained with Adam on a 500-example subset of the training set (a
  fresh subset per seed), long enough for the dropout arms to converge (budgets per setting, see
  :data:`FAMILIES`): the regime in which regularizers can matter. Every small run keeps its final weights. Used by
  the dropout claims, bn-regularizes, bn-less-dropout, dropout-bn-shift and summary.

A verdict from one setup describes that setup, so the study runs every claim in several **settings**
(:data:`SETTINGS`): MNIST-1D MLPs trained with SGD and with Adam, a 1-D CNN on MNIST-1D, MLPs on scikit-learn's
digits, and, for the BN claims only, MNIST-1D MLPs with He init (so "BN vs a badly initialized net" and "BN vs a
well initialized net" are both shown). A setting changes the two families' fields (:attr:`SettingDef.families`);
the claims build their runs the same way in every setting.

**Seeds.** Every choice a claim makes (a learning rate, a target, a dropout rate, a matched accuracy) is made on
the *selection* seeds and every reported effect is measured on the disjoint *evaluation* seeds
(:attr:`StudySetting.seed_split`, :mod:`normdrop.selection`). Evaluation seeds are ``0 .. seeds-1`` (so adding seeds
keeps the stored runs), selection seeds ``SELECTION_SEED_BASE ..``.

**Data per seed.** A run on a subset of the training set (``train_size``) or with label noise draws that subset and
that noise from its own seed (``data_seed = seed``), so the intervals include the variance of which examples were
drawn. The test set is a property of the dataset (fixed); the primaries of dropout-generalizes, bn-less-dropout,
dropout-ensemble and dropout-coadapt resample test examples too, from the kept final weights
(:func:`normdrop.significance.example_bootstrap`, :func:`normdrop.claims.small_family.example_estimate`); other
intervals are over seeds only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from normdrop.selection import SeedSplit
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
        "steps": 1500,
        "eval_every": 50,
    },
    "small": {
        "model": "mlp",
        "depth": 2,
        "width": 128,
        "optimizer": "adam",
        "lr": 3e-3,
        "batch_size": 100,
        "train_size": 500,
        "steps": 1000,
        "eval_every": 50,
    },
}
"""Spec fields of the two experiment families (see the module docstring); the quick study shortens ``steps``.

Small-family budgets (constant schedules; the study re-analyses at 1/4 and 1/2 of them) were chosen from learning
curves measured on selection seed 1000 (``normdrop.lab.run_spec``, 1 thread, 4000 steps, evaluated every 250), so
that the p = 0.5 arm on 500 examples has converged (100% training accuracy, test accuracy flat to about 1 pp):

- mlp-adam (Adam 3e-3): p = 0 fits by step 250 (test 37%); p = 0.5 reaches 100% training accuracy at 750 and test
  43% at 750, 44% at 1000-1500, 45-46% later: 1000 steps.
- mlp-sgd (SGD momentum 0.9, lr 0.05): p = 0.5 at 100% training accuracy and test 45-46% from step 500 on: 750
  steps. lr 0.05 beat 0.02 (slower: 44.5% at 1000) and 0.1 (43.7% at 1000) on the same seed.
- cnn1d (2 conv layers of 32 channels, Adam 3e-3): p = 0 fits by 500 (test 40%); p = 0.5 is slow: training accuracy
  94% / test 52% at 1000, 98% / 57.5% at 2000, 100% / 60% at 3500. 1000 steps (cost): that arm has NOT converged
  and the notes say so (``small_family.convergence_phrase``); its gain over p = 0 is already +12 pp there.
- digits: both arms at 100% training accuracy and flat test accuracy (95-96%) by step 250-500: 500 steps.

On the whole MNIST-1D training set (4000 examples) p = 0.5 has not converged at any of these budgets (training
accuracy 66-69% at 1000 steps, 81% at 4000, test accuracy still rising); those cells are exploratory and their
notes say so. On digits it converges by 500.

The deep family's budgets (here and per setting in :data:`SETTINGS`) are set from measured learning curves at a
constant learning rate (issue 14), so the slower arm's curve has flattened at its best rate: MNIST-1D MLP with SGD
1500 steps (plain net, default init, ~87% training accuracy at lr 0.1 and still creeping up: not fully converged;
BN ~99%), Adam 1500 (plain ~95% at lr 3e-3), He init 1000 (plain ~94-95% at lr 0.01-0.03), digits 600 (plain ~99%
from step ~400-600), 1-D CNN 1000 (plain ~93% at lr 0.1, flat from step ~900)."""

SELECTION_SEEDS = 3
"""Selection seeds per arm (quick: :data:`QUICK_SELECTION_SEEDS`): where claims make their choices."""
QUICK_SELECTION_SEEDS = 2
SELECTION_SEED_BASE = 1000
"""First selection seed; evaluation seeds start at 0, so the two never meet."""


@dataclass(frozen=True)
class SettingDef:
    """One entry of the settings catalogue.

    Attributes:
        name: the key (``normdrop study --settings NAME``).
        title: a few words for the report ("MNIST-1D, MLP, Adam").
        dataset: the dataset every run trains on.
        families: per family (``"deep"``, ``"small"``), spec fields that replace the family's defaults of
            :data:`FAMILIES` in this setting (e.g. ``{"deep": {"optimizer": "adam", "lr": 1e-3}}``).
        claims: ids of the claims run in this setting; None: every claim.
        description: what the setting tests, for the report.
    """

    name: str
    title: str
    dataset: str
    families: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    claims: frozenset[str] | None = None
    description: str = ""

    def applies_to(self, claim_id: str) -> bool:
        """Whether the claim runs in this setting."""
        return self.claims is None or claim_id in self.claims


BN_CLAIMS = frozenset({"bn-faster", "bn-higher-lr", "bn-stable-inputs", "bn-smooth", "bn-regularizes"})
"""The empirical BN claims: the ones the He-init setting is for."""

SETTINGS: dict[str, SettingDef] = {
    setting.name: setting
    for setting in (
        SettingDef(
            "mlp-sgd",
            "MNIST-1D, MLP, SGD",
            "mnist1d",
            {"small": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "steps": 750}},
            description="MLPs on MNIST-1D trained with SGD + momentum 0.9 (torch's default init).",
        ),
        SettingDef(
            "mlp-adam",
            "MNIST-1D, MLP, Adam",
            "mnist1d",
            {"deep": {"optimizer": "adam", "momentum": 0.0, "lr": 1e-3, "steps": 1500, "eval_every": 50}},
            description="MLPs on MNIST-1D trained with Adam (torch's default init).",
        ),
        SettingDef(
            "cnn1d",
            "MNIST-1D, 1-D CNN",
            "mnist1d",
            {
                "deep": {"model": "cnn1d", "depth": 5, "width": 32, "steps": 1000, "eval_every": 50},
                "small": {"model": "cnn1d", "depth": 2, "width": 32, "steps": 1000},
            },
            description="1-D convolutional networks on MNIST-1D (stride-2 convolutions, a linear head).",
        ),
        SettingDef(
            "digits",
            "digits, MLP",
            "digits",
            {"deep": {"steps": 600, "eval_every": 25}, "small": {"steps": 500, "eval_every": 25}},
            description="MLPs on scikit-learn's 8x8 digits (1797 images; a different input distribution).",
        ),
        SettingDef(
            "mlp-sgd-he",
            "MNIST-1D, MLP, SGD, He init",
            "mnist1d",
            {
                "deep": {"init": "kaiming", "steps": 1000, "eval_every": 50},
                "small": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "steps": 750, "init": "kaiming"},
            },
            claims=BN_CLAIMS,
            description="As mlp-sgd, with He (kaiming) init: BN against a well initialized plain network.",
        ),
    )
}
"""The settings catalogue, in report order (``normdrop study --list-settings``)."""

DEFAULT_SETTING = "mlp-sgd"

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
        seeds: evaluation seeds per arm (default 5, quick 3): the seeds every reported effect is measured on.
        quick: short runs and thinned grids (``normdrop study --quick``).
        overrides: spec fields applied to every run of every claim, e.g. ``(("model", "cnn1d"),)`` to point the
            study at another architecture. Fields a claim varies (``norm``, ``dropout``, ``lr``...) still win.
        name: the setting of :data:`SETTINGS` whose family fields apply ("custom": none, only the overrides).
        selection_seeds: seeds per arm on which claims make their choices (disjoint from the evaluation seeds).
    """

    dataset: str = "mnist1d"
    seeds: int = DEFAULT_SEEDS
    quick: bool = False
    overrides: tuple[tuple[str, Any], ...] = ()
    name: str = DEFAULT_SETTING
    selection_seeds: int = SELECTION_SEEDS

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if self.selection_seeds < 1:
            raise ValueError(f"selection_seeds must be at least 1, got {self.selection_seeds}")
        if self.name != "custom" and self.name not in SETTINGS:
            raise ValueError(f"unknown setting {self.name!r}; expected one of {', '.join(SETTINGS)} or 'custom'")
        unknown = [name for name, _ in self.overrides if name not in RunSpec.model_fields]
        if unknown:
            raise ValueError(f"overrides name unknown spec fields {unknown}")

    @classmethod
    def create(
        cls,
        *,
        quick: bool = False,
        dataset: str | None = None,
        seeds: int | None = None,
        overrides: Mapping[str, Any] | None = None,
        name: str = DEFAULT_SETTING,
        selection_seeds: int | None = None,
    ) -> StudySetting:
        """A setting of the catalogue (default or quick); ``seeds`` / ``selection_seeds`` None take the defaults.

        ``dataset`` None: a catalogue setting's own dataset (``"mnist1d"`` for a ``"custom"`` one); a name: that
        dataset instead (``normdrop study --dataset``)."""
        if dataset is None:
            dataset = SETTINGS[name].dataset if name in SETTINGS else "mnist1d"
        return cls(
            dataset=dataset,
            seeds=seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS),
            quick=quick,
            overrides=tuple(sorted((overrides or {}).items())),
            name=name,
            selection_seeds=selection_seeds
            if selection_seeds is not None
            else (QUICK_SELECTION_SEEDS if quick else SELECTION_SEEDS),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (the report and ``normdrop report`` read it back with :meth:`from_dict`)."""
        return {
            "name": self.name,
            "dataset": self.dataset,
            "seeds": self.seeds,
            "selection_seeds": self.selection_seeds,
            "quick": self.quick,
            "overrides": dict(self.overrides),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudySetting:
        """Inverse of :meth:`as_dict` (a dict written before settings had names is the ``"custom"`` setting)."""
        return cls.create(
            quick=bool(data.get("quick", False)),
            dataset=str(data["dataset"]) if data.get("dataset") is not None else None,
            seeds=int(data["seeds"]) if data.get("seeds") is not None else None,
            overrides=data.get("overrides") or {},
            name=str(data.get("name", "custom")),
            selection_seeds=int(data["selection_seeds"]) if data.get("selection_seeds") is not None else None,
        )

    @property
    def definition(self) -> SettingDef | None:
        """The catalogue entry (None for a ``"custom"`` setting)."""
        return SETTINGS.get(self.name)

    @property
    def title(self) -> str:
        """How the report names this setting."""
        return self.definition.title if self.definition is not None else f"custom ({self.dataset})"

    def applies_to(self, claim_id: str) -> bool:
        """Whether the claim runs in this setting (the He-init setting runs the BN claims only)."""
        return self.definition is None or self.definition.applies_to(claim_id)

    # ---- seeds and grids -------------------------------------------------------------------------------------

    @property
    def seed_list(self) -> list[int]:
        """The evaluation seeds: every reported effect is measured on these (``0 .. seeds-1``)."""
        return list(range(self.seeds))

    @property
    def selection_seed_list(self) -> list[int]:
        """The selection seeds: choices (learning rates, targets, p) are made on these only."""
        return list(range(SELECTION_SEED_BASE, SELECTION_SEED_BASE + self.selection_seeds))

    @property
    def seed_split(self) -> SeedSplit:
        """Selection and evaluation seeds as a :class:`normdrop.selection.SeedSplit`."""
        return SeedSplit(tuple(self.selection_seed_list), tuple(self.seed_list))

    @property
    def lr_grid(self) -> tuple[float, ...]:
        """Learning rates of the deep family, a factor ~3 apart (DeepOBS-style log grid)."""
        return (0.01, 0.1, 1.0, 10.0) if self.quick else (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)

    probe_lr: ClassVar[float] = 0.1
    """Learning rate of the probed deep runs: the plain network's best on MNIST-1D, and fine for BN."""

    @property
    def dropout_grid(self) -> tuple[float, ...]:
        """Dropout probabilities of the small family on the evaluation seeds (0 and every candidate)."""
        return (0.0, *self.dropout_candidates)

    @property
    def dropout_candidates(self) -> tuple[float, ...]:
        """The dropout rates p > 0 among which the dropout claims choose, on the selection seeds (the quick study
        has only the primary p, so its "choice" is fixed)."""
        return (self.primary_dropout,) if self.quick else (0.1, 0.3, 0.5)

    primary_dropout: ClassVar[float] = 0.5
    """The fixed p of the pre-registered comparisons (bn-less-dropout, the factorial, the whole-training-set
    cells; a secondary comparison of dropout-generalizes and dropout-overfit), fixed before seeing data
    (Srivastava et al. 2014 recommend 0.5 for hidden units)."""

    @property
    def full_data_grid(self) -> tuple[float, ...]:
        """Dropout probabilities of the runs on the whole training set: 0 and :attr:`primary_dropout` (an
        exploratory comparison; those runs are the most expensive of the family)."""
        return (0.0, self.primary_dropout)

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
        """Batch sizes of bn-regularizes' batch-size comparison, each trained for as many epochs as the family's
        runs (the family's own, 100, is among them; the quick study has only it)."""
        return (100,) if self.quick else (100, 250)

    @property
    def ghost_batch_sizes(self) -> tuple[int, ...]:
        """Ghost-batch sizes of bn-regularizes' dose-response (Hoffer et al. 2017), besides the full batch: BN's
        statistics over ghost batches of this many examples within each batch of the family's size."""
        return (25,) if self.quick else (10, 25, 50)

    @property
    def ensemble_members(self) -> int:
        """Independently trained networks in each explicit ensemble of dropout-ensemble."""
        return 3 if self.quick else 4

    # ---- specs -----------------------------------------------------------------------------------------------

    def family_fields(self, family: str) -> dict[str, Any]:
        """The spec fields of a family in this setting: :data:`FAMILIES`, then the setting's, then quick budgets,
        then the overrides (what :meth:`spec` starts from)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown experiment family {family!r}; expected one of {sorted(FAMILIES)}")
        values: dict[str, Any] = {**FAMILIES[family], "dataset": self.dataset}
        if self.definition is not None:
            values.update(self.definition.families.get(family, {}))
        if self.quick:
            values["steps"] = QUICK_STEPS[family]
            values["eval_every"] = QUICK_EVAL_EVERY[family]
        values.update(dict(self.overrides))
        return values

    def steps(self, family: str) -> int:
        """The step budget of a family's runs."""
        return int(self.family_fields(family)["steps"])

    def spec(self, family: str, **fields: Any) -> RunSpec:
        """A run of ``family`` on this setting's data: :meth:`family_fields`, then ``fields``.

        A run on a training subset or with label noise draws them from its own seed (``data_seed = seed``) unless
        ``fields`` set ``data_seed``."""
        values = self.family_fields(family)
        values.update(fields)
        if "data_seed" not in fields and (values.get("train_size") is not None or values.get("label_noise", 0) > 0):
            values["data_seed"] = values.get("seed", 0)
        if values.get("probes") and "probe_every" not in fields:
            calls = QUICK_PROBES_PER_RUN if self.quick else PROBES_PER_RUN
            values["probe_every"] = max(1, values["steps"] // calls) if family == "deep" else values["steps"]
        return RunSpec(**values)

    def arm(self, family: str, *, seeds: list[int] | None = None, **fields: Any) -> list[RunSpec]:
        """One spec per seed of ``seeds`` (default :attr:`seed_list`, the evaluation seeds)."""
        return [self.spec(family, seed=seed, **fields) for seed in (self.seed_list if seeds is None else seeds)]
