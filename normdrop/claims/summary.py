"""summary: BN mainly speeds and stabilizes training; dropout mainly improves generalization.

Measured on the 2 x 2 factorial of bn-less-dropout (BN or not x dropout 0.5 or not, small family, same seeds), where
each factor's effect on speed and on generalization can be put on one scale:

- speed: ln(steps to reach the target training accuracy without the factor / with it), the target being 90% of the
  lowest cell's mean final training accuracy (positive = faster);
- generalization: ln(final test error without the factor / with it) (positive = fewer test errors);

each averaged over the two levels of the other factor (a main effect). The effect per seed is the contrast
(speed_BN - generalization_BN) - (speed_dropout - generalization_dropout): positive when BN's benefit leans towards
speed more than dropout's does, as the summary claims. The verdicts of the individual claims are shown beside it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, factorial_arms, small_label
from normdrop.claims.figures import color, finish, legend, new_figure
from normdrop.claims.readers import final, mean_of, steps_to_reach
from normdrop.claims.results import Analysis, Table, measure
from normdrop.claims.setting import StudySetting

TARGET_FRACTION = 0.9
BN_CLAIMS = ("bn-faster", "bn-higher-lr", "bn-smooth", "bn-regularizes")
DROPOUT_CLAIMS = ("dropout-overfit", "dropout-generalizes")


def main_effects(data: ClaimData) -> dict[str, dict[int, float]]:
    """Seed -> the four main effects: speed and generalization of BN and of dropout (ln ratios)."""
    p = data.setting.primary_dropout
    cells = {(norm, q): data.runs(small_label(norm, q)) for norm in NORMS for q in (0.0, p)}
    final_train = [mean_of(final(r, "train_accuracy") for r in runs.values()) for runs in cells.values()]
    if any(value is None for value in final_train):
        return {}
    target = TARGET_FRACTION * min(v for v in final_train if v is not None)
    steps: dict[tuple[str, float], dict[int, float]] = {}
    error: dict[tuple[str, float], dict[int, float]] = {}
    for cell, runs in cells.items():
        steps[cell], error[cell] = {}, {}
        for seed, result in runs.items():
            if result is None or result.status != "finished":
                continue
            reached = steps_to_reach(result, "train_accuracy", target)
            steps[cell][seed] = reached if reached is not None else float(result.spec.steps)
            accuracy = final(result, "test_accuracy")
            if accuracy is not None and accuracy < 1:
                error[cell][seed] = 1.0 - accuracy
    seeds = set(data.setting.seed_list)
    for table in (*steps.values(), *error.values()):
        seeds &= table.keys()

    def contrast(table: dict[tuple[str, float], dict[int, float]], seed: int, factor: str) -> float:
        if factor == "bn":
            pairs = [(("none", q), ("batch", q)) for q in (0.0, p)]
        else:
            pairs = [((norm, 0.0), (norm, p)) for norm in NORMS]
        return sum(math.log(max(table[a][seed], 1e-9) / max(table[b][seed], 1e-9)) for a, b in pairs) / 2

    return {
        "speed_bn": {s: contrast(steps, s, "bn") for s in seeds},
        "generalization_bn": {s: contrast(error, s, "bn") for s in seeds},
        "speed_dropout": {s: contrast(steps, s, "dropout") for s in seeds},
        "generalization_dropout": {s: contrast(error, s, "dropout") for s in seeds},
    }


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
        "The summary is measured, not asserted: in the same 2 x 2 experiment (bn-less-dropout), each factor's "
        "effect on speed and on test error is put on one scale (a log ratio), and the claim is that BN's benefit "
        "leans towards speed more than dropout's does. The table lists the verdicts of the claims that test each "
        "half separately. Limits: one small network on a small training set, where BN's speed-up is smaller than "
        "in the deep network of bn-faster."
    )
    caveats = (
        "BN also regularizes a little and dropout can stabilize training in some settings; 'mainly' is a "
        "statement about relative sizes, which depend on depth, data size and learning rate. Bjorck et al. (2018) "
        "argue that BN's generalization benefit comes through the larger learning rates it permits."
    )
    references = ("Ioffe & Szegedy 2015", "Srivastava et al. 2014", "Bjorck et al. 2018")

    def experiment(self, setting: StudySetting) -> Experiment:
        arms = factorial_arms(setting)
        return Experiment(
            arms=arms,
            description=(
                f"The 2 x 2 runs of bn-less-dropout (BN or none x dropout {setting.primary_dropout} or none, "
                f"{setting.small_train_size} training examples), seeds {setting.seed_list}; and the verdicts of "
                f"{', '.join(BN_CLAIMS + DROPOUT_CLAIMS)}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        effects = main_effects(data)
        contrast = {
            s: (effects["speed_bn"][s] - effects["generalization_bn"][s])
            - (effects["speed_dropout"][s] - effects["generalization_dropout"][s])
            for s in effects.get("speed_bn", {})
        }
        primary = measure(
            "BN leans to speed, dropout to generalization",
            "(speed - generalization effect of BN) - (same of dropout); effects are ln ratios of steps to target "
            "and of test error",
            contrast,
            "increase",
            unit="ln ratio",
        )
        names = {
            "speed_bn": "BN speeds training",
            "generalization_bn": "BN lowers test error",
            "speed_dropout": "dropout speeds training",
            "generalization_dropout": "dropout lowers test error",
        }
        secondary = [
            measure(
                names[key],
                "ln(steps to target without / with)" if key.startswith("speed") else "ln(test error without / with)",
                effects.get(key, {}),
                "increase",
                unit="ln ratio",
            )
            for key in names
        ]
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
        return Analysis(primary, secondary, [_bars(secondary)], [table])


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
