"""bn-faster: BN lets a network reach a given accuracy in fewer steps.

Protocol (after DeepOBS, Schneider et al. 2019), with every choice on the SELECTION seeds:

1. The deep net with and without BN at every rate of :func:`normdrop.claims.experiment.deep_lr_grid` (SGD or Adam
   per setting) on the selection seeds, constant learning rate, the family's whole budget.
2. Target: ``TARGET_FRACTION`` (95%) of the slower arm's best mean final training accuracy on the selection seeds
   (near the convergence of the slower arm, so the race is to almost where the slower arm ends, not to an early
   point only BN's fast start decides). Each arm's rate: the one with the fewest mean steps to the target on the
   selection seeds (:func:`normdrop.selection.choose`; a run that never reaches it counts at the budget).
3. Both arms at their chosen rates on the EVALUATION seeds; effect per evaluation seed: log2(steps to the target
   without BN / with BN) (1 = BN needs half the steps). A run that never reaches the target counts at the budget,
   which understates the speed-up when the plain arm is the one that does not reach it.

Re-analysed at a fraction of the budget (runs cut), the target and the rates stay those chosen on the whole
selection runs (:attr:`ClaimData.choice_results`): the evaluation runs are cut and each counts the steps to that
target within the shorter budget (censored at it), so the re-analysis asks how far the same comparison had got.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, deep_lr_grid, deep_spec, selection_grid_arms
from normdrop.claims.figures import LABELS, align, finish, legend, new_figure, plot_band, reason_figures
from normdrop.claims.readers import curve, final, mean_of, paired_log2, steps_to_reach
from normdrop.claims.results import Analysis, Table, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.selection import choose
from normdrop.spec import RunResult, RunSpec
from normdrop.stats import paired_difference

TARGET_FRACTION = 0.95
"""The target: 95% of the slower arm's best mean final training accuracy on the selection seeds."""
METRIC = "train_accuracy"


def _run(setting: StudySetting, results: Mapping[str, RunResult], norm: str, lr: float, seed: int) -> RunResult | None:
    return results.get(deep_spec(setting, norm, lr, seed).run_id)


def censored(result: RunResult | None, target: float, budget: float = 1.0) -> float | None:
    """Steps to the target, a run that never reaches it (or diverged first) counted at its budget
    (``budget * steps``); None for a missing or failed run."""
    if result is None or result.status == "failed":
        return None
    reached = steps_to_reach(result, METRIC, target)
    return reached if reached is not None else float(result.spec.steps) * budget


def _final_or_zero(result: RunResult | None) -> float | None:
    """Final training accuracy; 0 for a diverged run (it ends unusable), None for a missing or failed one."""
    if result is None or result.status == "failed":
        return None
    return 0.0 if result.status == "diverged" else final(result, METRIC)


def choices(
    setting: StudySetting, results: Mapping[str, RunResult], budget: float = 1.0
) -> tuple[float, dict[str, float], dict[str, float]] | str:
    """``(target, best rate per norm, best mean final accuracy per norm)`` from the selection seeds, or why not.

    Scores are keyed by every seed that has a run (selection and evaluation), and :func:`normdrop.selection.choose`
    reads them through a view that raises on an evaluation seed: the choice cannot see the evaluation runs."""
    split, grid = setting.seed_split, deep_lr_grid(setting)

    def scores(norm: str, lr: float, score) -> dict[int, float]:
        values = {seed: score(_run(setting, results, norm, lr, seed)) for seed in split.all}
        return {seed: v for seed, v in values.items() if v is not None}

    best_accuracy: dict[str, float] = {}
    for norm in NORMS:
        try:
            lr = choose(grid, lambda lr, norm=norm: scores(norm, lr, _final_or_zero), split)
        except ValueError:
            return f"no selection-seed run of the {LABELS[norm]} arm finished"
        view = scores(norm, lr, _final_or_zero)
        best_accuracy[norm] = sum(view[s] for s in split.selection if s in view) / sum(
            1 for s in split.selection if s in view
        )
    target = TARGET_FRACTION * min(best_accuracy.values())
    best = {
        norm: choose(
            grid, lambda lr, norm=norm: scores(norm, lr, lambda r: censored(r, target, budget)), split, maximize=False
        )
        for norm in NORMS
    }
    return target, best, best_accuracy


def evaluation_arms(setting: StudySetting, best: Mapping[str, float]) -> dict[str, list[RunSpec]]:
    """Each arm at its chosen rate on the evaluation seeds."""
    return {
        f"{norm} at its best rate": [deep_spec(setting, norm, best[norm], s) for s in setting.seed_list]
        for norm in NORMS
    }


def seconds_to(result: RunResult | None, target: float) -> float | None:
    """Training seconds to the target (the trainer's ``train_time`` interpolated at that step)."""
    reached = steps_to_reach(result, METRIC, target)
    if result is None or reached is None:
        return None
    steps, seconds = curve(result, "train_time")
    return float(np.interp(reached, steps, seconds)) if len(steps) else None


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
        "A deep plain net (the deep family of each setting: 6 x 100 ReLU MLPs, or a 5-block 1-D CNN; SGD with "
        "momentum or Adam; torch's default init, or He init in mlp-sgd-he) is the setting BN was designed for. "
        "Each arm gets its own best constant learning rate from a grid, chosen on selection seeds; the target is "
        "95% of the slower arm's best final training accuracy on those seeds, so it sits near the end of the "
        "slower arm's curve; the effect is measured on separate evaluation seeds. Limits: the budget (stated per "
        "setting) is a few thousand steps at most, so 'converged' means the training curve has flattened, not "
        "100%; a run that never reaches the target counts at the budget (understating the speed-up); the grid has "
        "three rates a factor ~3 apart; wall-clock speed also depends on the cost of a BN step (reported "
        "separately)."
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
        selection = selection_grid_arms(setting)

        def extend(results: Mapping[str, RunResult]) -> dict[str, tuple[list[RunSpec], list[int] | None]]:
            arms: dict[str, tuple[list[RunSpec], list[int] | None]] = dict(selection)
            if all(spec.run_id in results for specs, _ in selection.values() for spec in specs):
                chosen = choices(setting, results)
                if not isinstance(chosen, str):
                    arms.update({label: (specs, None) for label, specs in evaluation_arms(setting, chosen[1]).items()})
            return arms

        return Experiment(
            extend=extend,
            description=(
                f"Deep net ({spec.model}, depth {spec.depth}, width {spec.width}, {spec.activation}, init "
                f"{spec.init}) on {setting.dataset}, {spec.optimizer} (momentum {spec.momentum}), batch "
                f"{spec.batch_size}, constant learning rate, {spec.steps} steps, training accuracy every "
                f"{spec.eval_every} steps. Selection seeds {setting.selection_seed_list}: BN and none at rates "
                f"{list(deep_lr_grid(setting))}; target = {TARGET_FRACTION:.0%} of the slower arm's best mean final "
                "training accuracy; each arm's rate = fewest mean steps to the target. Evaluation seeds "
                f"{setting.seed_list}: each arm at its chosen rate. Five seeds detect a mean effect of about 1.4 "
                "per-seed standard deviations (one-sided t test, alpha 0.05, power 0.8)."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        setting = data.setting
        metric = "log2(steps to target without BN / with BN), each at its own rate chosen on selection seeds"
        name = "speed-up at each arm's chosen learning rate"
        chosen = choices(setting, data.choice_results)  # whole runs: held fixed in a budget re-analysis
        if isinstance(chosen, str):
            figures = reason_figures(self.title, chosen, data.draw)
            return Analysis(not_measurable(name, metric, "increase", chosen), figures=figures)
        target, best, best_accuracy = chosen
        spec = setting.spec("deep")
        budget = spec.steps * data.budget
        runs = {
            norm: {s: _run(setting, data.results, norm, best[norm], s) for s in setting.seed_list} for norm in NORMS
        }
        slower = min(best_accuracy, key=best_accuracy.get)
        note = (
            f"Budget {budget:.0f} of {spec.steps} steps ({spec.optimizer}, batch {spec.batch_size}, "
            f"{setting.dataset}); "
            f"target {target:.1%} training accuracy = {TARGET_FRACTION:.0%} of the slower arm's ({LABELS[slower]}) "
            f"best mean final accuracy {best_accuracy[slower]:.1%}; rates {best['none']:g} (no BN) and "
            f"{best['batch']:g} (BN); target and rates chosen on selection seeds {setting.selection_seed_list}, "
            f"effect on evaluation seeds {setting.seed_list}; a run that never reaches the target counts at the budget."
        )
        if all(r is None for arm in runs.values() for r in arm.values()):
            reason = f"the chosen rates ({best['none']:g}, {best['batch']:g}) have no finished evaluation runs"
            figures = reason_figures(self.title, reason, data.draw)
            return Analysis(not_measurable(name, metric, "increase", reason, note=note), figures=figures)
        steps = {norm: {s: censored(r, target, data.budget) for s, r in runs[norm].items()} for norm in NORMS}
        primary = measure(
            name, metric, paired_log2(steps["none"], steps["batch"]), "increase", unit="log2 ratio", note=note
        )
        seconds = {norm: {s: seconds_to(r, target) for s, r in runs[norm].items()} for norm in NORMS}
        finals = {norm: {s: final(r, METRIC) for s, r in runs[norm].items()} for norm in NORMS}
        secondary = [
            measure(
                "speed-up in training seconds, each at its chosen rate",
                "log2(seconds to target without BN / with BN), seconds of training steps only",
                paired_log2(seconds["none"], seconds["batch"]),
                "increase",
                unit="log2 ratio",
            ),
            measure(
                "final training accuracy, BN minus none (how far each arm got within the budget)",
                "final training accuracy with BN minus without, percentage points",
                paired_difference(finals["batch"], finals["none"], scale=100),
                "increase",
                unit="points",
            ),
        ]
        never = {
            norm: sum(
                1
                for r in runs[norm].values()
                if r is not None and r.status != "failed" and steps_to_reach(r, METRIC, target) is None
            )
            for norm in NORMS
        }
        findings = [
            f"Target: {target:.1%} training accuracy ({TARGET_FRACTION:.0%} of the slower arm's best mean final "
            f"accuracy on the selection seeds, {best_accuracy[slower]:.1%}, {LABELS[slower]}).",
            f"Chosen rates (selection seeds): {best['none']:g} without BN, {best['batch']:g} with BN.",
        ]
        plain_final = mean_of(finals["none"].values())
        if plain_final is not None:
            findings.append(
                f"Without BN the evaluation runs end at {plain_final:.1%} training accuracy after {budget:.0f} steps"
                + (" (not converged: still below 95%)." if plain_final < 0.95 else ".")
            )
        if primary.estimate is not None:
            findings.append(
                f"With BN the target is reached in {2**-primary.estimate.value:.2f}x the steps "
                f"(95% CI {2**-primary.estimate.ci_high:.2f}x to {2**-primary.estimate.ci_low:.2f}x)."
            )
        grid = deep_lr_grid(setting)
        for norm in NORMS:
            if best[norm] in (min(grid), max(grid)):
                edge = "smallest" if best[norm] == min(grid) else "largest"
                findings.append(
                    f"{LABELS[norm]}'s chosen rate is the {edge} of the grid: a rate beyond it might be faster still."
                )
        if any(never.values()):
            findings.append(
                f"Evaluation runs that never reached the target within {budget:.0f} steps (counted at the budget): "
                f"{never['none']} without BN, {never['batch']} with BN."
            )
        tables = [_steps_table(data, target)]
        figures = [_curves(runs, best, target)] if data.draw else []
        return Analysis(primary, secondary, figures, tables, findings)


def _steps_table(data: ClaimData, target: float) -> Table:
    setting = data.setting
    rows = []
    for lr in deep_lr_grid(setting):
        row = [f"{lr:g}"]
        for norm in NORMS:
            values = [
                censored(_run(setting, data.results, norm, lr, s), target, data.budget)
                for s in setting.selection_seed_list
            ]
            kept = [v for v in values if v is not None]
            row.append(f"{sum(kept) / len(kept):.0f} ({len(kept)} runs)" if kept else "-")
        rows.append(row)
    return Table("Selection seeds: mean steps to the target by learning rate", ["learning rate", "no BN", "BN"], rows)


def _curves(runs: Mapping[str, Mapping[int, RunResult | None]], best: Mapping[str, float], target: float) -> Any:
    figure, ax = new_figure()
    for norm in NORMS:
        kept = [r for r in runs[norm].values() if r is not None and r.status != "failed"]
        if not kept:
            continue
        steps, table = align([curve(r, METRIC) for r in kept])
        plot_band(ax, steps, table, f"{LABELS[norm]}, lr {best[norm]:g}", key=norm)
    ax.axhline(target, color="#333", linestyle=":", linewidth=1, label=f"target {target:.1%}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training accuracy (fraction)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Training accuracy at each arm's chosen learning rate (evaluation seeds)",
        "Mean training accuracy over evaluation seeds (line) with its 95% confidence band, evaluated on the whole "
        "training set in eval mode; the dotted line is the target, chosen on the selection seeds.",
    )


CLAIM = BNFaster()
