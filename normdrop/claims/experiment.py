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


# ---- the deep family (bnclaims) ------------------------------------------------------------------------

DEEP_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.01, 0.03, 0.1),
    "adam": (3e-4, 1e-3, 3e-3),
}
"""Per optimizer, the learning rates (a factor ~3 apart) tried on the selection seeds to choose each arm's rate
(bn-faster). They hold the measured best rates of both arms in every setting (SGD: BN 0.01-0.03, plain 0.1 with
torch's init, 0.01-0.03 with He init; the plain net diverges or collapses at 0.3; Adam: BN 3e-4-1e-3, plain 3e-3),
three points to keep the selection runs affordable; a choice at the grid's edge is flagged in the findings."""

BISECTION_RANGES: dict[str, tuple[float, float]] = {"sgd": (0.003, 30.0), "adam": (1e-4, 1.0)}
"""Per optimizer, the starting bracket of the stability-limit bisections (four decades; a limit outside it is
reported censored, "at least" the top or "below" the bottom). The bottom lies below both arms' best rates, so the
seed's best accuracy that definition (b) is relative to is found (measured on mnist1d at 300 steps: BN's best SGD
rate is at or below 0.03, and at 30 a run diverges)."""

BISECTION_RESOLUTION = 1.25
"""Bisections stop when ``bad / good <= 1.25`` (about a tenth of a decade)."""
QUICK_BISECTION_RESOLUTION = 2.0
"""The quick study's bisections stop at x2 (a first look: fewer rounds of runs)."""


def bisection_resolution(setting: StudySetting) -> float:
    """The stopping ratio of this setting's bisections (x1.25; x2 in the quick study)."""
    return QUICK_BISECTION_RESOLUTION if setting.quick else BISECTION_RESOLUTION


STABILITY_FRACTION = 5
STABILITY_MIN_STEPS = 150
STABILITY_MAX_STEPS = 150
"""Runs of a stability bisection train ``steps // 5`` steps of the family's budget, clipped to [150, 150] (and at
most the budget): divergence at a large rate shows within the first hundred or so steps, the bisection needs ~7-10
runs per seed and arm, and fewer than ~150 steps is too short for either definition (measured: at 30 steps a plain
net at lr 5 neither diverges nor learns, and no rate is yet near its accuracy). 300 steps were measured to fit as
well; 150 was chosen to keep the default study within its time budget, so the limits describe the first 150 steps
of training (a rate that diverges only later counts as stable), which every note states."""

PROBED_FRACTION = 4
"""Probed runs (bn-smooth, bn-stable-inputs) train a quarter of the family's budget: the probes follow the early
trajectory, where the two arms differ most, and each probed step costs a landscape scan and a Hessian power
iteration (a quarter rather than half to keep the default study within its time budget)."""


def deep_optimizer(setting: StudySetting) -> str:
    """The deep family's optimizer in this setting ("sgd" or "adam"; adamw takes Adam's ranges)."""
    name = str(setting.family_fields("deep")["optimizer"])
    return "adam" if name.startswith("adam") else "sgd"


def deep_lr_grid(setting: StudySetting) -> tuple[float, ...]:
    """The selection-seed learning-rate grid of the deep family for this setting's optimizer."""
    return DEEP_LR_GRIDS[deep_optimizer(setting)]


def bisection_range(setting: StudySetting) -> tuple[float, float]:
    """The starting bracket ``(low, high)`` of the stability bisections for this setting's optimizer."""
    return BISECTION_RANGES[deep_optimizer(setting)]


def stability_steps(setting: StudySetting) -> int:
    """Steps of a stability-bisection run (:data:`STABILITY_FRACTION`)."""
    budget = setting.steps("deep")
    return min(budget, max(STABILITY_MIN_STEPS, min(STABILITY_MAX_STEPS, budget // STABILITY_FRACTION)))


def lr_label(norm: str, lr: float) -> str:
    """Arm label of one point of the deep learning-rate grid."""
    return f"{norm} lr={lr:g}"


def deep_spec(setting: StudySetting, norm: str, lr: float, seed: int, **fields: Any) -> RunSpec:
    """One deep-family run (full budget unless ``fields`` say otherwise); every deep claim builds its specs here so
    a run two claims need has one spec and one run id."""
    return setting.spec("deep", norm=norm, lr=float(lr), seed=seed, **fields)


def stability_spec(setting: StudySetting, norm: str, lr: float, seed: int) -> RunSpec:
    """A run of a stability bisection: :func:`stability_steps` steps, evaluated at the start and the end only."""
    steps = stability_steps(setting)
    return deep_spec(setting, norm, lr, seed, steps=steps, eval_every=steps)


def selection_grid_arms(setting: StudySetting) -> dict[str, tuple[list[RunSpec], list[int]]]:
    """The deep net, with and without BN, at every rate of :func:`deep_lr_grid`, on the SELECTION seeds (label ->
    ``(specs, replicates)``): bn-faster chooses its target and each arm's rate on these."""
    seeds = setting.selection_seed_list
    return {
        f"selection {lr_label(norm, lr)}": ([deep_spec(setting, norm, lr, seed) for seed in seeds], list(seeds))
        for norm in NORMS
        for lr in deep_lr_grid(setting)
    }


def lr_grid_arms(setting: StudySetting) -> dict[str, list[RunSpec]]:
    """The deep net, with and without BN, at every rate of :func:`deep_lr_grid`, on the selection seeds, as plain
    ``label -> specs`` (the replicates are in :func:`selection_grid_arms`)."""
    return {label: specs for label, (specs, _) in selection_grid_arms(setting).items()}


def probed_label(norm: str) -> str:
    """Arm label of the probed deep runs."""
    return f"{norm} probed"


def probed_spec(setting: StudySetting, norm: str, lr: float, seed: int) -> RunSpec:
    """A probed deep run: half the budget (:data:`PROBED_FRACTION`) with the :data:`DEEP_PROBES` (noisy BN with its
    noise option)."""
    options = NOISY_OPTIONS if norm == "noisy" else ()
    steps = max(1, setting.steps("deep") // PROBED_FRACTION)
    return deep_spec(setting, norm, lr, seed, steps=steps, probes=DEEP_PROBES, norm_options=options)


NOISY_NOISE = 1.0
"""Noise of the noisy-BN control (:class:`normdrop.nn.NoisyBatchNorm1d`): shift ~ U(-1, 1), scale in [1/2, 2]
per channel and step, large next to BN's unit-variance output, as in Santurkar et al.'s control."""
NOISY_OPTIONS: tuple[tuple[str, float], ...] = (("noise", NOISY_NOISE),)


def probed_deep_arms(setting: StudySetting, lrs: Mapping[str, float] | None = None) -> dict[str, list[RunSpec]]:
    """The probed deep runs on the evaluation seeds, each norm of ``lrs`` at its learning rate (bn-smooth and
    bn-stable-inputs share them: each arm at a fixed fraction of its own stability limit, the noisy control at
    BN's rate); ``lrs`` None: BN and none at :attr:`StudySetting.probe_lr`."""
    if lrs is None:
        lrs = dict.fromkeys(NORMS, setting.probe_lr)
    return {
        probed_label(norm): [probed_spec(setting, norm, lr, seed) for seed in setting.seed_list]
        for norm, lr in lrs.items()
    }


SMALL_KEEP: tuple[str, ...] = ("final_weights",)
"""What every small-family run keeps besides metrics: its final weights (a 2 x 128 MLP is ~90 kB), so analyses can
evaluate the trained network again, per test example (:func:`normdrop.claims.readers.final_predictions`: the
test-set bootstrap of the accuracy differences, NLL and calibration)."""


def small_label(norm: str = "none", dropout: float = 0.0, train_size: int | None = -1, **fields: Any) -> str:
    """Arm label of a small-family run (``train_size=-1``: the family's default subset)."""
    parts = [norm, f"p={dropout:g}"]
    if train_size != -1:
        parts.append(f"n={train_size or 'all'}")
    parts += [f"{key}={value}" for key, value in sorted(fields.items())]
    return " ".join(parts)


def selection_label(label: str) -> str:
    """Arm label of the same arm on the selection seeds (:attr:`StudySetting.selection_seed_list`)."""
    return f"{label} [selection]"


def small_arm(
    setting: StudySetting,
    norm: str = "none",
    dropout: float = 0.0,
    train_size: int | None = -1,
    *,
    seeds: list[int] | None = None,
    **fields: Any,
) -> tuple[str, list[RunSpec]]:
    """``(label, specs)`` of a small-family arm, with the :data:`SMALL_PROBES` and keeping :data:`SMALL_KEEP`
    (unless ``probes`` / ``keep`` say otherwise); one spec per seed of ``seeds`` (default: the evaluation seeds).
    Neither ``probes``, ``keep`` nor ``seeds`` enters the label."""
    size = setting.small_train_size if train_size == -1 else train_size
    probes = fields.pop("probes", SMALL_PROBES)
    keep = fields.pop("keep", SMALL_KEEP)
    specs = setting.arm(
        "small", seeds=seeds, norm=norm, dropout=dropout, train_size=size, probes=probes, keep=keep, **fields
    )
    return small_label(norm, dropout, train_size, **fields), specs


def add_arms(experiment: Experiment, arms: Mapping[str, list[RunSpec] | tuple[list[RunSpec], list[int]]]) -> None:
    """Add arms to ``experiment``: ``label -> specs`` (evaluation seeds) or ``label -> (specs, replicates)``."""
    for label, arm in arms.items():
        if isinstance(arm, tuple):
            experiment.add(label, arm[0], arm[1])
        else:
            experiment.add(label, arm)


def factorial_arms(setting: StudySetting, seeds: list[int] | None = None) -> dict[str, list[RunSpec]]:
    """The 2 x 2 factorial of the small family: BN or none x dropout :attr:`StudySetting.primary_dropout` or none,
    the same seeds in every cell (bn-less-dropout and summary share these runs). ``seeds`` (default the evaluation
    seeds): an experiment that passes other seeds must name them as the arms' replicates."""
    arms = {}
    for norm in NORMS:
        for p in (0.0, setting.primary_dropout):
            label, specs = small_arm(setting, norm, p, seeds=seeds)
            arms[label] = specs
    return arms


def dropout_label(setting: StudySetting, p: float, train_size: int | None) -> str:
    """Arm label of the plain small network with dropout ``p`` trained on ``train_size`` examples."""
    return small_label("none", p) if train_size == setting.small_train_size else small_label("none", p, train_size)


def dropout_grid_arms(setting: StudySetting) -> dict[str, list[RunSpec]]:
    """The plain small network on the evaluation seeds: every dropout rate of :attr:`StudySetting.dropout_grid` on
    the family's subset, and p in :attr:`StudySetting.full_data_grid` (0 and the primary p) on the whole training
    set (dropout-overfit, dropout-generalizes and dropout-coadapt share these runs)."""
    arms = {}
    for size in setting.train_sizes:
        grid = setting.dropout_grid if size == setting.small_train_size else setting.full_data_grid
        for p in grid:
            _, specs = small_arm(setting, "none", p, train_size=-1 if size == setting.small_train_size else size)
            arms[dropout_label(setting, p, size)] = specs
    return arms


def dropout_selection_arms(setting: StudySetting) -> dict[str, tuple[list[RunSpec], list[int]]]:
    """The plain small network on the family's subset at every candidate rate of
    :attr:`StudySetting.dropout_candidates`, on the *selection* seeds: where the dropout rate is chosen
    (:func:`normdrop.claims.small_family.chosen_dropout`); ``label -> (specs, replicates)``, labels
    ``selection_label(dropout_label(...))``. Empty when there is a single candidate (the quick study): nothing to
    choose."""
    if len(setting.dropout_candidates) < 2:
        return {}
    seeds = setting.selection_seed_list
    arms = {}
    for p in setting.dropout_candidates:
        _, specs = small_arm(setting, "none", p, seeds=seeds)
        arms[selection_label(dropout_label(setting, p, setting.small_train_size))] = (specs, list(seeds))
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
