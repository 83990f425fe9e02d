"""bn-regularizes: BN has a slight regularizing effect, from the noise of batch statistics.

Small-family runs (a fresh 500-example training subset per seed, which a 2-layer network fits perfectly) with and
without BN. Comparing test accuracy at the end would mix regularization with speed, so the networks are compared
where each first reaches the same training accuracy, :data:`MATCH_TARGET` (fixed in code;
``normdrop.probes.gap_at_train_accuracy``, linear interpolation between evaluations).

**Primary** (fixed in code): per evaluation seed, test accuracy with BN minus without at that matched training
accuracy, in percentage points; positive = BN generalizes better for the same fit. t interval over seeds (the
matched point lies between evaluations, where no weights are kept, so test examples cannot be resampled).

**Mechanism, ghost BN** (Hoffer et al. 2017): BN's statistics computed over ghost batches of
:attr:`StudySetting.ghost_batch_sizes` examples within the same batches of 100, so the optimizer's batch (gradient
noise, number of updates) is unchanged and only the noise of the statistics grows as the ghost batch shrinks. The
noise mechanism predicts a dose-response: smaller ghost batches, higher test accuracy at matched fit. Measured per
seed as the least-squares slope of matched test accuracy against log2(ghost batch size), over the ghost sizes and
the full batch (plain BN = ghost size 100); claimed: negative (``"decrease"``).

**Batch size** (exploratory, confounded): BN vs none at the batch sizes of :attr:`StudySetting.batch_sizes`, each
trained for the same number of epochs. The noise mechanism predicts that BN's benefit shrinks as the batch grows
(benefit at the smaller batch minus at the larger > 0). The default study before this design found the opposite
(a larger benefit at batch 400 than at 25): but a batch size changes the gradient noise and, at equal epochs, the
number of updates as well, for both arms, so a larger benefit at a large batch does not contradict the noise
mechanism by itself; ghost BN is the test that isolates it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, small_arm, small_label
from normdrop.claims.figures import LABELS, color, finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import curve
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.claims.small_family import SMALL_N, mde_phrase, small_scope
from normdrop.spec import RunResult
from normdrop.stats import paired_difference

MATCH_TARGET = 0.95
"""The training accuracy (eval mode) at which the arms are compared, fixed in code: every converged small run fits
its 500 examples to 100%, so each run passes it; a run that never does gives no value for its seed."""
FAMILY_BATCH = 100


def batch_label(setting: StudySetting, norm: str, batch_size: int) -> str:
    """The arm of one norm and batch size (the family's batch size has the plain small-family label)."""
    if batch_size == FAMILY_BATCH:
        return small_label(norm, 0.0)
    return small_label(norm, 0.0, **same_epochs(setting, batch_size))


def ghost_label(ghost_batch_size: int) -> str:
    """The arm of ghost BN with ghost batches of ``ghost_batch_size`` (the full batch is the plain BN arm)."""
    if ghost_batch_size == FAMILY_BATCH:
        return small_label("batch", 0.0)
    return f"ghost {ghost_batch_size} p=0"


def same_epochs(setting: StudySetting, batch_size: int) -> dict[str, int]:
    """Spec fields of a run at ``batch_size`` that sees as many epochs (and evaluations) as the family's runs."""
    spec = setting.spec("small")
    scale = FAMILY_BATCH / batch_size
    return {
        "batch_size": batch_size,
        "steps": max(1, round(spec.steps * scale)),
        "eval_every": max(1, round(spec.eval_every * scale)),
    }


def accuracy_at_matched(result: RunResult | None, target: float = MATCH_TARGET) -> float | None:
    """Test accuracy where the run first reaches ``target`` training accuracy (None if it never does)."""
    from normdrop.probes import gap_at_train_accuracy

    if result is None or result.status != "finished":
        return None
    matched = gap_at_train_accuracy(result.metrics, target)
    return None if matched is None else float(matched["test_accuracy"])


def matched(data: ClaimData, label: str) -> dict[int, float | None]:
    """Evaluation seed -> test accuracy at the matched training accuracy, for one arm."""
    if label not in data.experiment.arms:
        return {}
    return {seed: accuracy_at_matched(result) for seed, result in data.runs(label).items()}


def matched_effect(data: ClaimData, batch_size: int) -> dict[int, float]:
    """Seed -> 100 x (test accuracy with BN - without) at the matched training accuracy, at one batch size."""
    with_bn = matched(data, batch_label(data.setting, "batch", batch_size))
    without = matched(data, batch_label(data.setting, "none", batch_size))
    return paired_difference(with_bn, without, scale=100)


def ghost_sizes(setting: StudySetting) -> list[int]:
    """The ghost batch sizes of the dose-response, smallest first, ending with the full batch (plain BN)."""
    return sorted({*setting.ghost_batch_sizes, FAMILY_BATCH})


def ghost_effects(data: ClaimData) -> dict[int, dict[int, float]]:
    """Ghost size -> seed -> 100 x (test accuracy with ghost BN - without BN) at the matched training accuracy."""
    without = matched(data, small_label("none", 0.0))
    return {g: paired_difference(matched(data, ghost_label(g)), without, scale=100) for g in ghost_sizes(data.setting)}


def dose_slopes(effects: dict[int, dict[int, float]], seeds: list[int]) -> dict[int, float | None]:
    """Seed -> least-squares slope of the effect (pp) against log2(ghost size), from the sizes where the seed has a
    value (None with fewer than two): pp per doubling of the ghost batch."""
    out: dict[int, float | None] = {}
    for seed in seeds:
        points = [(math.log2(g), by_seed[seed]) for g, by_seed in effects.items() if seed in by_seed]
        if len(points) < 2:
            out[seed] = None
            continue
        x, y = np.array(points).T
        out[seed] = float(np.polyfit(x, y, 1)[0])
    return out


class BNRegularizes(Claim):
    id = "bn-regularizes"
    title = "BN regularizes"
    statement = (
        "BN has a slight regularizing effect, through the noise of its batch statistics (tested on networks trained "
        f"on {SMALL_N} training examples)."
    )
    mechanism = (
        "In training, BN normalizes each example with the mean and variance of the other examples that happen to "
        "share its mini-batch, so the same example is transformed slightly differently every time it is seen. "
        "Like dropout, this noise can keep the network from fitting individual training examples too exactly. "
        "Smaller batches give noisier statistics, hence more noise; ghost BN makes that noise a knob by "
        "normalizing over smaller slices of the same batch."
    )
    rationale = (
        f"A small network (2 hidden layers) on {SMALL_N} training examples (a fresh subset per seed) overfits, "
        "which makes a regularizer visible. The arms are compared at a training accuracy fixed in code (95%), "
        "since BN also changes how fast the training set is fitted. The mechanism is tested by ghost BN at "
        "several ghost-batch sizes within the same batches (only the statistics' noise changes): the claim "
        "predicts higher matched test accuracy for smaller ghost batches. A comparison across batch sizes is "
        "shown as exploratory: it also changes the gradient noise and the number of updates. Limits: a matched "
        "point between evaluations is interpolated and its interval is over seeds only; equal learning rate."
    )
    caveats = (
        "The effect is usually described as slight (Ioffe & Szegedy 2015 reduced dropout and L2 with BN, but did "
        "not isolate the regularization). Luo et al. (2019) analyse BN's regularization as coming from the batch "
        "statistics' noise; Bjorck et al. (2018) attribute most of BN's generalization benefit to the larger "
        "learning rates it allows, not to this noise, which a comparison at equal learning rate (as here) does not "
        "include."
    )
    references = ("Ioffe & Szegedy 2015, section 3.4", "Hoffer, Hubara & Soudry 2017", "Luo et al. 2019")

    def experiment(self, setting: StudySetting) -> Experiment:
        arms: dict[str, list[Any]] = {}
        for batch_size in setting.batch_sizes:
            for norm in NORMS:
                fields = {} if batch_size == FAMILY_BATCH else same_epochs(setting, batch_size)
                label, specs = small_arm(setting, norm, 0.0, **fields)
                arms[label] = specs
        for g in setting.ghost_batch_sizes:
            _, specs = small_arm(setting, "ghost", 0.0, norm_options={"ghost_batch_size": g})
            arms[ghost_label(g)] = specs
        spec = setting.spec("small")
        return Experiment(
            arms=arms,
            description=(
                f"{spec.model} {spec.depth} x {spec.width} on {SMALL_N} training examples (a fresh subset per seed) "
                f"of {setting.dataset}, {spec.optimizer} lr {spec.lr:g}, {spec.steps} steps, evaluated every "
                f"{spec.eval_every} steps; BN vs none at batch {FAMILY_BATCH} (primary), ghost BN with ghost batches "
                f"of {list(setting.ghost_batch_sizes)} within batches of {FAMILY_BATCH} (dose-response), and BN vs "
                f"none at batch sizes {list(setting.batch_sizes)} for equal epochs (exploratory); compared at "
                f"{MATCH_TARGET:.0%} training accuracy (fixed in code); evaluation seeds {setting.seed_list}; "
                "nothing is chosen."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        metric = f"test accuracy with BN minus without, at {MATCH_TARGET:.0%} training accuracy (percentage points)"
        scope = f"{small_scope(data)}; matched at {MATCH_TARGET:.0%} training accuracy (fixed in code)"
        effect = matched_effect(data, FAMILY_BATCH)
        primary = measure(
            f"test accuracy at {MATCH_TARGET:.0%} training accuracy, BN minus none",
            metric,
            effect,
            "increase",
            unit="pp",
            note=f"{scope}; t interval over seeds (test examples not resampled); {mde_phrase(effect)}",
            unmeasurable=None
            if len(effect) >= 2
            else (
                f"only {len(effect)} seed(s) reached {MATCH_TARGET:.0%} training accuracy in both arms (the others "
                "failed, diverged, are missing or never reached the target)"
            ),
        )
        effects = ghost_effects(data)
        slopes = dose_slopes(effects, data.setting.seed_list)
        secondary = [
            measure(
                "ghost BN dose-response: change of BN's benefit per doubling of the ghost batch",
                "least-squares slope of (ghost BN minus none, pp, at matched training accuracy) against "
                "log2(ghost batch size); negative = smaller ghost batches regularize more",
                slopes,
                "decrease",
                unit="pp per doubling",
                note=f"{scope}; ghost sizes {ghost_sizes(data.setting)} (the last is plain BN)",
            )
        ]
        secondary += [
            measure(f"ghost BN ({g} per ghost batch) minus none", metric, effects[g], "increase", unit="pp", note=scope)
            for g in data.setting.ghost_batch_sizes
        ]
        sizes = sorted(data.setting.batch_sizes)
        secondary += [
            measure(f"same at batch size {bs} (equal epochs)", metric, matched_effect(data, bs), "increase", unit="pp")
            for bs in sizes
            if bs != FAMILY_BATCH
        ]
        if len(sizes) >= 2:
            secondary.append(
                measure(
                    f"BN's benefit at batch {sizes[0]} minus at batch {sizes[-1]} (the noise mechanism predicts > 0; "
                    "confounded with gradient noise and the number of updates)",
                    "difference of the BN-minus-none effects (percentage points)",
                    paired_difference(matched_effect(data, sizes[0]), matched_effect(data, sizes[-1])),
                    "increase",
                    unit="pp",
                    note=scope,
                )
            )
        findings = [f"Matched training accuracy: {MATCH_TARGET:.0%} (fixed in code)."]
        figures = [_trajectories(data), _by_ghost(data, effects)] if data.draw else []
        return Analysis(primary, secondary, figures, [], findings)


def _trajectories(data: ClaimData) -> Any:
    figure, ax = new_figure()
    for norm in NORMS:
        for index, result in enumerate(data.finished(batch_label(data.setting, norm, FAMILY_BATCH)).values()):
            _, train = curve(result, "train_accuracy")
            _, test = curve(result, "test_accuracy")
            ax.plot(train, test, color=color(norm), alpha=0.6, linewidth=1, label=LABELS[norm] if index == 0 else None)
    ax.axvline(MATCH_TARGET, color="#333", linestyle=":", label=f"matched training accuracy {MATCH_TARGET:.0%}")
    ax.set_xlabel("training accuracy (fraction)")
    ax.set_ylabel("test accuracy (fraction)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Test vs training accuracy during training",
        "Each line is one seed's run, from initialization (bottom left) to the end of training; at the dotted line "
        "both arms fit the training set equally well, and the vertical gap between them is the effect measured.",
    )


def _by_ghost(data: ClaimData, effects: dict[int, dict[int, float]]) -> Any:
    sizes = list(effects)
    figure, ax = new_figure(height=3.0)
    plot_band(ax, sizes, seeds_by_x(effects, data.setting.seed_list), "ghost BN minus none", key="batch", marker="o")
    ax.axhline(0, color="#333", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel(f"ghost batch size (log scale; {FAMILY_BATCH} = plain BN)")
    ax.set_ylabel("test accuracy difference (pp)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "BN's effect on generalization vs ghost batch size",
        f"Test accuracy with (ghost) BN minus without at {MATCH_TARGET:.0%} training accuracy, mean over evaluation "
        "seeds with 95% band. The noise mechanism predicts the left end (small ghost batches, noisy statistics) "
        "highest.",
    )


CLAIM = BNRegularizes()
