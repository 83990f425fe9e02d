"""bn-faster: BN lets a network reach a given accuracy in fewer steps.

Protocol (after DeepOBS, Schneider et al. 2019): the deep plain MLP with and without BN at every learning rate of a
log grid, each over the study's seeds. The target is set from the data, before looking at speed: 90% of the lower
of the two arms' best mean final training accuracy, so both arms can reach it. For each arm the best learning rate
is the one with the fewest mean steps to the target; the effect per seed is log2(steps without BN / steps with
BN), each arm at its own best learning rate (a value of 1 means BN needs half the steps). A run that never reaches
the target counts as reaching it at the end of its budget.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, lr_grid_arms, lr_label
from normdrop.claims.figures import LABELS, align, finish, legend, message_figure, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import curve, final, mean_of, paired_log2, steps_to_reach
from normdrop.claims.results import Analysis, Table, measure, not_measurable
from normdrop.claims.setting import StudySetting

TARGET_FRACTION = 0.9
METRIC = "train_accuracy"


def accuracy_target(data: ClaimData, arms: dict[str, dict[float, str]]) -> float | None:
    """90% of the lower of the arms' best mean final training accuracy (over the learning-rate grid)."""
    best = []
    for labels in arms.values():
        means = [mean_of(final(r, METRIC) for r in data.runs(label).values()) for label in labels.values()]
        means = [m for m in means if m is not None]
        if not means:
            return None
        best.append(max(means))
    return TARGET_FRACTION * min(best)


def censored_steps(data: ClaimData, label: str, target: float) -> dict[int, float]:
    """Seed -> steps to the target, a run that never reaches it counted at its budget (failed runs left out)."""
    out = {}
    for seed, result in data.runs(label).items():
        if result is None or result.status == "failed":
            continue
        reached = steps_to_reach(result, METRIC, target)
        out[seed] = reached if reached is not None else float(result.spec.steps)
    return out


def seconds_to(data: ClaimData, label: str, target: float) -> dict[int, float | None]:
    """Seed -> training seconds to the target (the trainer's ``train_time`` interpolated at that step)."""
    out: dict[int, float | None] = {}
    for seed, result in data.runs(label).items():
        reached = steps_to_reach(result, METRIC, target)
        if result is None or reached is None:
            out[seed] = None
            continue
        steps, seconds = curve(result, "train_time")
        out[seed] = float(np.interp(reached, steps, seconds)) if len(steps) else None
    return out


def best_lr(data: ClaimData, labels: dict[float, str], target: float) -> float:
    """The learning rate with the fewest mean (censored) steps to the target; the smaller one on a tie."""
    scores = {}
    for lr, label in labels.items():
        steps = censored_steps(data, label, target)
        scores[lr] = sum(steps.values()) / len(steps) if steps else math.inf
    return min(scores, key=lambda lr: (scores[lr], lr))


class BNFaster(Claim):
    id = "bn-faster"
    title = "BN trains faster"
    statement = "BN lets a network reach a given accuracy in fewer steps."
    mechanism = (
        "Without BN, the scale of each layer's signal depends on all the weights below it; in a deep network "
        "with a standard initialization it shrinks (or grows) layer after layer, so the gradients reaching the "
        "first layers are tiny or huge and the usable step size is small. BN resets every layer's signal to a "
        "standard scale at every step, so all layers learn at a similar pace from the start."
    )
    rationale = (
        "A deep plain MLP (6 hidden layers of 100 ReLU units, torch's default init, SGD with momentum 0.9) is the "
        "setting BN was designed for and trains in seconds on MNIST-1D. Both arms get the whole learning-rate grid "
        "and are compared at their own best rate (a fair race) and at an equal rate (the plain network's best). "
        "Limits: one architecture, one dataset, a short budget; the best rate is picked on the same seeds it is "
        "evaluated on (a small optimistic bias, equal for both arms); speed in wall-clock time also depends on "
        "the cost of a BN step, which is reported separately."
    )
    caveats = (
        "The speed-up is large for deep networks with poor initialization and small for shallow or well-"
        "initialized ones (e.g. with a careful init such as Fixup, Zhang et al. 2019, deep residual networks train "
        "without normalization). Why BN speeds training is disputed: Ioffe & Szegedy (2015) credited reduced "
        "internal covariate shift; Santurkar et al. (2018) a smoother loss landscape (see bn-stable-inputs, "
        "bn-smooth)."
    )
    references = ("Ioffe & Szegedy 2015, figure 2", "Schneider et al. 2019 (DeepOBS)", "Greydanus 2020 (MNIST-1D)")

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = setting.spec("deep")
        return Experiment(
            arms=lr_grid_arms(setting),
            description=(
                f"Deep MLP ({spec.depth} hidden layers x {spec.width} units, {spec.activation}) on {setting.dataset}, "
                f"SGD momentum {spec.momentum}, batch {spec.batch_size}, {spec.steps} steps, training accuracy "
                f"evaluated every {spec.eval_every} steps; learning rates {list(setting.lr_grid)}; BN vs none; "
                f"seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        grid = data.setting.lr_grid
        arms = {norm: {lr: lr_label(norm, lr) for lr in grid} for norm in NORMS}
        target = accuracy_target(data, arms)
        metric = "log2(steps to target without BN / with BN), each at its best learning rate"
        if target is None:
            reason = "an arm has no finished run at any learning rate"
            return Analysis(
                not_measurable("speed-up at the best learning rates", metric, "increase", reason),
                figures=[message_figure("Training accuracy at the best learning rates", reason)],
            )
        best = {norm: best_lr(data, arms[norm], target) for norm in NORMS}
        steps = {norm: censored_steps(data, arms[norm][best[norm]], target) for norm in NORMS}
        primary = measure(
            "speed-up at the best learning rates",
            metric,
            paired_log2(steps["none"], steps["batch"]),
            "increase",
            unit="log2 ratio",
        )
        equal_lr = best["none"]
        at_equal = {norm: censored_steps(data, arms[norm][equal_lr], target) for norm in NORMS}
        seconds = {norm: seconds_to(data, arms[norm][best[norm]], target) for norm in NORMS}
        secondary = [
            measure(
                f"speed-up at an equal learning rate ({equal_lr:g}, the plain network's best)",
                "log2(steps to target without BN / with BN)",
                paired_log2(at_equal["none"], at_equal["batch"]),
                "increase",
                unit="log2 ratio",
            ),
            measure(
                "speed-up in training seconds, each at its best learning rate",
                "log2(seconds to target without BN / with BN), seconds of training steps only",
                paired_log2(seconds["none"], seconds["batch"]),
                "increase",
                unit="log2 ratio",
            ),
        ]
        budget = data.setting.steps("deep")
        censored = {
            norm: sum(
                1
                for seed, r in data.runs(arms[norm][best[norm]]).items()
                if r is not None and r.status != "failed" and steps_to_reach(r, METRIC, target) is None
            )
            for norm in NORMS
        }
        findings = [
            f"Target: {target:.1%} training accuracy (90% of the lower arm's best mean final accuracy).",
            f"Best learning rate: {best['none']:g} without BN, {best['batch']:g} with BN.",
        ]
        if primary.estimate is not None:
            findings.append(
                f"With BN the target is reached in {2**-primary.estimate.value:.2f}x the steps "
                f"(95% CI {2**-primary.estimate.ci_high:.2f}x to {2**-primary.estimate.ci_low:.2f}x)."
            )
        for norm in NORMS:
            if best[norm] in (min(grid), max(grid)):
                edge = "smallest" if best[norm] == min(grid) else "largest"
                findings.append(
                    f"{LABELS[norm]}'s best learning rate is the {edge} of the grid: a rate beyond it might be faster "
                    f"still, so the speed-up {'understates' if norm == 'batch' else 'may overstate'} what a wider grid "
                    "would find."
                )
        if any(censored.values()):
            findings.append(
                f"Runs at the best rate that never reached the target within {budget} steps (counted at {budget}): "
                f"{censored['none']} without BN, {censored['batch']} with BN."
            )
        table = _steps_table(data, arms, target)
        figures = [_curves(data, arms, best, target), _steps_vs_lr(data, arms, target, budget)]
        return Analysis(primary, secondary, figures, [table], findings)


def _steps_table(data: ClaimData, arms: dict[str, dict[float, str]], target: float) -> Table:
    rows = []
    for lr in data.setting.lr_grid:
        row = [f"{lr:g}"]
        for norm in NORMS:
            steps = censored_steps(data, arms[norm][lr], target)
            reached = sum(
                1 for r in data.runs(arms[norm][lr]).values() if steps_to_reach(r, METRIC, target) is not None
            )
            mean = mean_of(steps.values())
            row.append(f"{mean:.0f} ({reached}/{len(data.runs(arms[norm][lr]))} reached)" if mean else "-")
        rows.append(row)
    return Table("Mean steps to the target by learning rate", ["learning rate", "no BN", "BN"], rows)


def _curves(data: ClaimData, arms: dict[str, dict[float, str]], best: dict[str, float], target: float) -> Any:
    figure, ax = new_figure()
    for norm in NORMS:
        runs = [r for r in data.runs(arms[norm][best[norm]]).values() if r is not None and r.status != "failed"]
        if not runs:
            continue
        steps, table = align([curve(r, METRIC) for r in runs])
        plot_band(ax, steps, table, f"{LABELS[norm]}, lr {best[norm]:g}", key=norm)
    ax.axhline(target, color="#333", linestyle=":", linewidth=1, label=f"target {target:.1%}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training accuracy (fraction)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Training accuracy at each arm's best learning rate",
        "Mean training accuracy over seeds (line) with its 95% confidence band, evaluated on the whole training set "
        "in eval mode; the dotted line is the target.",
    )


def _steps_vs_lr(data: ClaimData, arms: dict[str, dict[float, str]], target: float, budget: int) -> Any:
    figure, ax = new_figure()
    grid = list(data.setting.lr_grid)
    for norm in NORMS:
        values = {lr: censored_steps(data, arms[norm][lr], target) for lr in grid}
        plot_band(ax, grid, seeds_by_x(values, data.setting.seed_list), LABELS[norm], key=norm, marker="o")
    ax.axhline(budget, color="#999", linestyle="--", linewidth=1, label=f"budget ({budget} steps: not reached)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("steps to the target accuracy")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Steps to the target vs learning rate",
        "Mean over seeds with 95% band; runs that diverged or never reached the target count at the budget.",
    )


CLAIM = BNFaster()
