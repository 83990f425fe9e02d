"""summary: BN mainly speeds and stabilizes training; dropout mainly improves generalization.

Measured on the 2 x 2 factorial of bn-less-dropout (BN or not x dropout 0.5 or not, small family, the same
evaluation seeds in every cell), with each factor's effect on two outcomes, each on its own scale:

- speed: ln(steps to reach the target training accuracy without the factor / with it) (positive = faster). The
  target is :data:`TARGET_FRACTION` of the lowest cell's mean final training accuracy **on the selection seeds**
  (the same four cells run on :attr:`StudySetting.selection_seed_list`); a run that never reaches it counts as
  reaching it at its last step (censored, which shrinks differences);
- test error: ln(final test error without the factor / with it) (positive = fewer test errors);

each averaged over the two levels of the other factor (a main effect). Two like-for-like comparisons, per
evaluation seed:

- test error: dropout's effect minus BN's effect (positive = dropout lowers the test error more than BN does);
- speed: BN's effect minus dropout's effect (positive = BN speeds training more than dropout does).

The claim needs both. Primary per seed: the smaller of the two comparisons, a lower bound of each, so an interval
above 0 means both are positive (an intersection-union test, conservative); it is contradicted when either
comparison's own interval lies below 0. The two comparisons are the first secondaries, each with its own interval;
the four main effects follow, and the verdicts of the individual claims are shown beside them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import (
    NORMS,
    Experiment,
    factorial_arms,
    factorial_selection_arms,
    factorial_selection_label,
    small_label,
)
from normdrop.claims.figures import color, finish, legend, new_figure
from normdrop.claims.readers import final, mean_of, steps_to_reach
from normdrop.claims.results import Analysis, Measurement, Table, measure
from normdrop.claims.setting import StudySetting
from normdrop.selection import SelectionView
from normdrop.stats import Decision

TARGET_FRACTION = 0.9
BN_CLAIMS = ("bn-faster", "bn-higher-lr", "bn-smooth", "bn-regularizes")
DROPOUT_CLAIMS = ("dropout-overfit", "dropout-generalizes")
Cell = tuple[str, float]


def cells(data: ClaimData) -> list[Cell]:
    """The four (norm, dropout p) cells."""
    return [(norm, q) for norm in NORMS for q in (0.0, data.setting.primary_dropout)]


def speed_target(data: ClaimData) -> float | None:
    """:data:`TARGET_FRACTION` x the lowest cell's mean final training accuracy over the selection seeds (read
    through :class:`normdrop.selection.SelectionView`, so an evaluation seed can never set it); None when a cell
    has no finished selection run."""
    split = data.setting.seed_split
    means = []
    for norm, q in cells(data):
        label = factorial_selection_label(small_label(norm, q))
        if label not in data.experiment.arms:
            return None
        values = {seed: final(r, "train_accuracy") for seed, r in data.runs(label).items()}
        view = SelectionView({seed: v for seed, v in values.items() if v is not None}, split)
        means.append(mean_of(view[seed] for seed in view))
    if any(m is None for m in means):
        return None
    return TARGET_FRACTION * min(m for m in means if m is not None)


def main_effects(data: ClaimData, target: float | None) -> dict[str, dict[int, float]]:
    """Evaluation seed -> the four main effects: speed and test error of BN and of dropout (ln ratios; speed
    only with a target)."""
    p = data.setting.primary_dropout
    runs = {cell: data.runs(small_label(*cell)) for cell in cells(data)}
    steps: dict[Cell, dict[int, float]] = {}
    error: dict[Cell, dict[int, float]] = {}
    for cell, by_seed in runs.items():
        steps[cell], error[cell] = {}, {}
        for seed, result in by_seed.items():
            if result is None or result.status != "finished":
                continue
            if target is not None:
                reached = steps_to_reach(result, "train_accuracy", target)
                steps[cell][seed] = reached if reached is not None else data.budget * result.spec.steps
            accuracy = final(result, "test_accuracy")
            if accuracy is not None and accuracy < 1:
                error[cell][seed] = 1.0 - accuracy

    def contrast(table: dict[Cell, dict[int, float]], factor: str) -> dict[int, float]:
        if factor == "bn":
            pairs = [(("none", q), ("batch", q)) for q in (0.0, p)]
        else:
            pairs = [((norm, 0.0), (norm, p)) for norm in NORMS]
        seeds = set(data.setting.seed_list)
        for values in table.values():
            seeds &= values.keys()
        return {
            s: sum(math.log(max(table[a][s], 1e-9) / max(table[b][s], 1e-9)) for a, b in pairs) / 2
            for s in sorted(seeds)
        }

    effects = {"generalization_bn": contrast(error, "bn"), "generalization_dropout": contrast(error, "dropout")}
    if target is not None:
        effects.update(speed_bn=contrast(steps, "bn"), speed_dropout=contrast(steps, "dropout"))
    return effects


def comparisons(effects: dict[str, dict[int, float]]) -> tuple[dict[int, float], dict[int, float]]:
    """(test-error comparison, speed comparison) per seed: dropout's minus BN's test-error effect, and BN's minus
    dropout's speed effect (both positive as the summary claims)."""
    gen_bn, gen_dropout = effects.get("generalization_bn", {}), effects.get("generalization_dropout", {})
    speed_bn, speed_dropout = effects.get("speed_bn", {}), effects.get("speed_dropout", {})
    error = {s: gen_dropout[s] - gen_bn[s] for s in gen_bn if s in gen_dropout}
    speed = {s: speed_bn[s] - speed_dropout[s] for s in speed_bn if s in speed_dropout}
    return error, speed


class Summary(Claim):
    id = "summary"
    title = "BN speeds, dropout generalizes"
    statement = "BN mainly speeds and stabilizes training; dropout mainly improves generalization."
    mechanism = (
        "The two layers are often used together but do different jobs. BN changes how the network is "
        "parametrized so that gradient descent works better: training is faster and tolerates larger steps. "
        "Dropout adds noise that makes the network fit the training set less exactly, which can make it fit unseen "
        "data better, and usually makes training slower."
    )
    rationale = (
        "The summary is measured, not asserted, as two like-for-like comparisons in the same 2 x 2 experiment "
        "(bn-less-dropout): BN's effect on test error against dropout's effect on test error, and BN's effect on "
        "training speed against dropout's effect on speed, each a log ratio with its own interval. The claim needs "
        "both, so the primary takes the smaller of the two per seed. The speed target is set on separate "
        "selection seeds. The table lists the verdicts of the claims that test each half separately. Limits: one "
        "small network on a small training set, where BN's speed-up is smaller than in the deep network of "
        "bn-faster; the speed comparison counts dropout slowing training as much as BN speeding it (BN's own "
        "speed effect is shown beside it)."
    )
    caveats = (
        "BN also regularizes a little and dropout can stabilize training in some settings; 'mainly' is a "
        "statement about relative sizes, which depend on depth, data size and learning rate. Bjorck et al. (2018) "
        "argue that BN's generalization benefit comes through the larger learning rates it permits."
    )
    references = ("Ioffe & Szegedy 2015", "Srivastava et al. 2014", "Bjorck et al. 2018")

    def experiment(self, setting: StudySetting) -> Experiment:
        experiment = Experiment(arms=factorial_arms(setting))
        for label, (specs, seeds) in factorial_selection_arms(setting).items():
            experiment.add(label, specs, seeds)
        spec = setting.spec("small")
        experiment.description = (
            f"The 2 x 2 runs of bn-less-dropout (BN or none x dropout {setting.primary_dropout} or none, {spec.model} "
            f"depth {spec.depth} x {spec.width}, {setting.small_train_size} training examples drawn per seed, "
            f"{spec.steps} steps) on the evaluation seeds {setting.seed_list}, and the same four cells on the "
            f"selection seeds {setting.selection_seed_list}, where the speed target ({TARGET_FRACTION:g} x the lowest "
            f"cell's mean final training accuracy) is chosen; and the verdicts of "
            f"{', '.join(BN_CLAIMS + DROPOUT_CLAIMS)}."
        )
        return experiment

    def analyze(self, data: ClaimData) -> Analysis:
        target = speed_target(data)
        effects = main_effects(data, target)
        error, speed = comparisons(effects)
        spec = data.setting.spec("small")
        target_text = (
            "no speed target: a cell has no finished run on the selection seeds"
            if target is None
            else f"speed target {target:.3g} training accuracy, chosen on the selection seeds "
            f"{data.setting.selection_seed_list}"
        )
        scope = (
            f"{spec.model} depth {spec.depth} x {spec.width}, {data.setting.small_train_size} training examples per "
            f"seed, {round(data.budget * spec.steps)} steps; {target_text}."
        )
        error_measure = measure(
            "test error: dropout lowers it more than BN",
            "ln(test error without / with dropout) minus ln(test error without / with BN), main effects",
            error,
            "increase",
            unit="ln ratio",
        )
        speed_measure = measure(
            "speed: BN speeds training more than dropout",
            "ln(steps to target without / with BN) minus ln(steps to target without / with dropout), main effects",
            speed,
            "increase",
            unit="ln ratio",
            note="Dropout slowing training counts towards this comparison; BN's own speed effect is shown below.",
            unmeasurable=None if target is not None else "no speed target: " + target_text,
        )
        both = {s: min(error[s], speed[s]) for s in error if s in speed}
        primary = measure(
            "both comparisons: BN leans to speed, dropout to test error",
            "per seed the smaller of the two comparisons (test error: dropout's minus BN's effect; speed: BN's minus "
            "dropout's effect), ln ratios",
            both,
            "increase",
            unit="ln ratio",
            note=scope + " Above 0 means both comparisons are above 0 (the per-seed minimum bounds each).",
            unmeasurable=None if both else "needs both comparisons on the same seeds: " + target_text,
        )
        primary = _contradicted_by_either(primary, (error_measure, speed_measure))
        names = {
            "speed_bn": "BN speeds training",
            "generalization_bn": "BN lowers test error",
            "speed_dropout": "dropout speeds training",
            "generalization_dropout": "dropout lowers test error",
        }
        secondary = [error_measure, speed_measure] + [
            measure(
                names[key],
                "ln(steps to target without / with)" if key.startswith("speed") else "ln(test error without / with)",
                effects.get(key, {}),
                "increase",
                unit="ln ratio",
            )
            for key in names
        ]
        findings = []
        bn_speed = secondary[2]
        if speed_measure.verdict == "supported" and bn_speed.verdict != "supported":
            findings.append(
                "The speed comparison holds, but BN's own speed-up is not significant: the comparison rests on "
                "dropout slowing training."
            )
        rows = []
        for claim_id in BN_CLAIMS + DROPOUT_CLAIMS:
            other = data.others.get(claim_id)
            if other is None:
                rows.append([claim_id, "not analysed", "", ""])
                continue
            m = other.analysis.primary
            effect = (
                ""
                if m.estimate is None
                else f"{m.estimate.value:.3g} [{m.estimate.ci_low:.3g}, {m.estimate.ci_high:.3g}]"
            )
            rows.append([claim_id, m.verdict, effect, f"{m.unit} ({m.metric})"])
        table = Table("The claims behind the summary", ["claim", "verdict", "effect [95% CI]", "unit (metric)"], rows)
        figures = [_bars(secondary[2:])] if data.draw else []
        return Analysis(primary, secondary, figures, [table], findings)


def _contradicted_by_either(primary: Measurement, parts: tuple[Measurement, ...]) -> Measurement:
    """The primary, contradicted when either comparison's own interval lies below 0."""
    against = [m for m in parts if m.verdict == "contradicted"]
    if not against or primary.verdict == "not measurable":
        return primary
    reason = "; ".join(f"{m.name}: {m.decision.reason}" for m in against)
    primary.decision = Decision("contradicted", f"a comparison the claim needs goes the other way ({reason})")
    return primary


def _bars(secondary: list[Any]) -> Any:
    figure, ax = new_figure(height=3.0)
    groups = ("speed", "test error")
    for offset, (factor, key) in zip((-0.17, 0.17), (("BN", "batch"), ("dropout", "dropout")), strict=True):
        ms = [m for m in secondary if m.name.startswith(factor)]
        values = [m.estimate.value if m.estimate else np.nan for m in ms]
        errors = [
            [(m.estimate.value - m.estimate.ci_low) if m.estimate else 0 for m in ms],
            [(m.estimate.ci_high - m.estimate.value) if m.estimate else 0 for m in ms],
        ]
        ax.bar(np.arange(len(groups)) + offset, values, width=0.32, color=color(key), label=factor)
        ax.errorbar(np.arange(len(groups)) + offset, values, yerr=errors, fmt="none", color="#222", capsize=4)
    ax.axhline(0, color="#333", linewidth=0.8)
    ax.set_xticks(
        range(len(groups)), ["speed: ln(steps without / with)", "generalization: ln(test error without / with)"]
    )
    ax.set_ylabel("effect (ln ratio; > 0 = helps)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "What each layer mainly does",
        "Main effects in the 2 x 2 experiment, averaged over the other factor, with 95% intervals over seeds: "
        "positive speed = the target training accuracy is reached in fewer steps; positive generalization = fewer "
        "test errors.",
    )


CLAIM = Summary()
