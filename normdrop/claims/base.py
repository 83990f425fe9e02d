"""What every claim shares: the :class:`Claim` base class, the study setting (data, seeds, budgets and the two
experiment families), the experiment a claim asks for, and the result it hands to the report.

A claim is one class in one module (named by its id in docs/claims.md). It never trains anything itself: it returns
run specs (:meth:`Claim.experiment`), the study engine runs the missing ones into the store, and
:meth:`Claim.analyze` reads the finished runs back and turns them into measurements with confidence intervals and
verdicts (:mod:`normdrop.stats`). Claims about what a layer computes ("mechanics") need no training: they measure
the layers directly, in :meth:`Claim.analyze`, and ask for no runs.

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

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from normdrop.spec import RunResult, RunSpec
from normdrop.stats import DEFAULT_SEEDS, Decision, Direction, Estimate, decide, paired_log_ratio, t_interval

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


# ---- experiments -------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """The runs a claim needs, by arm: ``arms[label]`` holds one spec per seed, in seed order.

    ``description`` says what was run and why, for the report. An experiment with no arms needs no training (the
    mechanics claims).
    """

    arms: dict[str, list[RunSpec]] = field(default_factory=dict)
    description: str = ""

    def specs(self) -> list[RunSpec]:
        """Every spec, each once, in arm order."""
        unique: dict[str, RunSpec] = {}
        for specs in self.arms.values():
            for spec in specs:
                unique.setdefault(spec.run_id, spec)
        return list(unique.values())


# ---- what an analysis returns ------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One measured effect: per-seed values, their mean with a 95% interval, and the verdict for ``direction``.

    ``metric`` names the quantity and its unit; ``display`` turns an effect value into words for readers (e.g. a
    log2 ratio into "2.1x"); ``null`` and ``margin`` are those of :func:`normdrop.stats.decide`.
    """

    name: str
    metric: str
    direction: Direction
    per_seed: dict[int, float]
    estimate: Estimate | None
    decision: Decision
    null: float = 0.0
    margin: float | None = None
    unit: str = ""
    note: str = ""

    @property
    def verdict(self) -> str:
        return self.decision.verdict


def measure(
    name: str,
    metric: str,
    per_seed: Mapping[int, float | None],
    direction: Direction,
    *,
    null: float = 0.0,
    margin: float | None = None,
    unit: str = "",
    note: str = "",
    unmeasurable: str | None = None,
    estimate: Estimate | None = None,
) -> Measurement:
    """A :class:`Measurement` from per-seed values: a t interval of their mean (or ``estimate`` if given) and the
    verdict; ``unmeasurable`` explains a missing estimate."""
    values = {seed: float(v) for seed, v in per_seed.items() if v is not None and math.isfinite(float(v))}
    if estimate is None:
        estimate = t_interval(values.values())
    if estimate is None and unmeasurable is None:
        dropped = len(per_seed) - len(values)
        unmeasurable = f"only {len(values)} seed(s) gave a finite value" + (
            f" ({dropped} had no value: runs failed, diverged or never reached the target)" if dropped else ""
        )
    decision = decide(estimate, direction, null=null, margin=margin, unmeasurable=unmeasurable)
    return Measurement(name, metric, direction, values, estimate, decision, null, margin, unit, note)


def not_measurable(name: str, metric: str, direction: Direction, reason: str, **kwargs: Any) -> Measurement:
    """A measurement that could not be made, with the reason."""
    return Measurement(name, metric, direction, {}, None, Decision("not measurable", reason), **kwargs)


@dataclass
class Figure:
    """A rendered figure: PNG bytes with a title, a caption saying what is plotted, and alt text."""

    title: str
    caption: str
    png: bytes
    alt: str = ""


@dataclass
class Table:
    """A small table for the report: column names and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Analysis:
    """What :meth:`Claim.analyze` returns: the primary measurement (its verdict is the claim's), secondary
    measurements, figures, tables and findings (sentences computed from the data)."""

    primary: Measurement
    secondary: list[Measurement] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


@dataclass
class RunCounts:
    """How the runs of a claim ended."""

    planned: int = 0
    finished: int = 0
    diverged: int = 0
    failed: int = 0
    missing: int = 0
    compute_seconds: float = 0.0


@dataclass
class ClaimResult:
    """A claim with its analysis and the bookkeeping the report shows."""

    claim: Claim
    analysis: Analysis
    runs: RunCounts
    n_seeds: int
    analysis_seconds: float = 0.0
    configuration: dict[str, Any] = field(default_factory=dict)
    experiment_description: str = ""

    @property
    def verdict(self) -> str:
        return self.analysis.primary.verdict


# ---- what an analysis reads --------------------------------------------------------------------------------


@dataclass
class ClaimData:
    """The finished runs of one claim's experiment, as its analysis sees them.

    ``results`` maps run id to the stored result (failed runs included; a run the store does not hold is
    absent). ``others`` holds the results of the claims analysed before this one (the summary reads them).
    """

    setting: StudySetting
    experiment: Experiment
    results: Mapping[str, RunResult]
    others: Mapping[str, ClaimResult] = field(default_factory=dict)

    def runs(self, arm: str) -> dict[int, RunResult | None]:
        """Replicate seed -> result of an arm (None when the store does not hold the run).

        The i-th spec of an arm belongs to the i-th seed of the setting (for most arms it is that seed; an arm of
        ensemble members uses other seeds for each replicate).
        """
        specs = self.experiment.arms[arm]
        return {seed: self.results.get(spec.run_id) for seed, spec in zip(self.setting.seed_list, specs, strict=False)}

    def finished(self, arm: str) -> dict[int, RunResult]:
        """Seed -> result of the arm's runs that finished (neither diverged nor failed)."""
        return {seed: r for seed, r in self.runs(arm).items() if r is not None and r.status == "finished"}

    def completed(self, arm: str) -> dict[int, RunResult]:
        """Seed -> result of the arm's runs that finished or diverged."""
        return {seed: r for seed, r in self.runs(arm).items() if r is not None and r.status != "failed"}


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


# ---- the claim ---------------------------------------------------------------------------------------------


class Claim(ABC):
    """One claim of docs/claims.md: what it says, how it is tested, and the analysis of its runs.

    Subclasses set the class attributes and implement :meth:`experiment` and :meth:`analyze`; register an
    instance with :func:`normdrop.claims.register` to add it to the study.

    Attributes:
        id: the claim's id in docs/claims.md (module ``normdrop/claims/<id with underscores>.py``).
        title: a few words.
        statement: the claim, in our words.
        mechanism: a plain-language explanation of the mechanism, for learners.
        rationale: why this experiment tests the claim on 2 CPU cores, and its limits.
        caveats: where the literature disputes the claim or its mechanism.
        probes: names of ``normdrop.probes`` instruments the runs need; a missing one makes the claim not
            measurable, with the reason.
        references: papers the measurement follows.
    """

    id: ClassVar[str]
    title: ClassVar[str]
    statement: ClassVar[str]
    mechanism: ClassVar[str] = ""
    rationale: ClassVar[str] = ""
    caveats: ClassVar[str] = ""
    probes: ClassVar[tuple[str, ...]] = ()
    references: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def experiment(self, setting: StudySetting) -> Experiment:
        """The runs this claim needs (none for a claim measured without training)."""

    @abstractmethod
    def analyze(self, data: ClaimData) -> Analysis:
        """Measurements, figures and findings from the runs; must not raise for failed or diverged runs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"


# ---- probes, shared arms and kept weights ------------------------------------------------------------------

NORMS: tuple[str, ...] = ("none", "batch")
"""The two arms of every BN claim: no normalization, batch normalization."""

DEEP_PROBES: tuple[str, ...] = ("curvature", "ics", "landscape", "layer_inputs")
"""Probes of the probed deep runs, shared by bn-stable-inputs and bn-smooth (one set of runs measures both)."""

SMALL_PROBES: tuple[str, ...] = ("coadaptation", "variance_shift")
"""Probes of every small-family run, at the first and the last step (about a forward pass of the training set
each), read by dropout-coadapt and dropout-bn-shift; every small run has them, so the claims share runs."""

FINAL_STATE = "final_state"
"""Probe name of the record holding a run's final weights (see :class:`FinalStateHook`)."""

WEIGHT_PROBES: tuple[str, ...] = ("ensemble",)
"""A run whose spec lists one of these probes keeps its final weights in the store, because its claim evaluates
the trained network again (dropout-ensemble combines several runs' networks)."""


def probe_problem(name: str) -> str | None:
    """Why the probe ``name`` cannot be attached to a run (None when ``normdrop.probes.make_probe`` builds it)."""
    try:
        from normdrop.probes import make_probe
    except ImportError as error:
        return f"normdrop.probes offers no make_probe registry yet ({error})"
    try:
        make_probe(name, every=1)
    except Exception as error:
        return f"the probe {name!r} is not in the normdrop.probes registry ({type(error).__name__}: {error})"
    return None


def available(names: Iterable[str]) -> tuple[str, ...]:
    """The probes among ``names`` that exist, in order."""
    return tuple(name for name in names if probe_problem(name) is None)


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
    """The deep MLP at :attr:`StudySetting.probe_lr`, with and without BN, with the :data:`DEEP_PROBES` that exist."""
    probes = available(DEEP_PROBES)
    return {probed_label(norm): setting.arm("deep", norm=norm, lr=setting.probe_lr, probes=probes) for norm in NORMS}


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
    """``(label, specs)`` of a small-family arm, with the :data:`SMALL_PROBES` that exist."""
    size = setting.small_train_size if train_size == -1 else train_size
    probes = fields.pop("probes", available(SMALL_PROBES))
    specs = setting.arm("small", norm=norm, dropout=dropout, train_size=size, probes=probes, **fields)
    return small_label(norm, dropout, train_size, **fields), specs


class FinalStateHook:
    """A trainer hook that records the final weights (``torch.save`` of the state dict, base64) as one record."""

    name = FINAL_STATE
    every = 0

    def __call__(self, ctx: Any) -> list[dict[str, Any]]:
        import base64
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(ctx.model.state_dict(), buffer)
        return [{"format": "torch.save+base64", "state": base64.b64encode(buffer.getvalue()).decode("ascii")}]


def keeps_weights(spec: RunSpec) -> bool:
    """Whether a run keeps its final weights (see :data:`WEIGHT_PROBES`)."""
    return any(probe in spec.probes for probe in WEIGHT_PROBES)


def final_model(result: RunResult | None) -> Any:
    """The trained network of a finished run that kept its weights, in eval mode; None otherwise."""
    import base64
    import io

    import torch

    from normdrop.models import build_model
    from normdrop.train import load_run_dataset

    found = records(result, FINAL_STATE)
    if result is None or result.status != "finished" or not found:
        return None
    data = load_run_dataset(result.spec)
    model = build_model(result.spec, data.input_shape, data.num_classes)
    state = torch.load(io.BytesIO(base64.b64decode(found[-1]["state"])), weights_only=True)
    model.load_state_dict(state)
    return model.eval()


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
