"""dropout-bn-shift: dropout before BN shifts the variance BN sees between training and inference (Li et al. 2019).

Small-family runs with BN and dropout 0.5 at the family's depth in two places: right before each BN
(``before_norm``, the harmful case) and after each activation (``after_norm``, the usual place); and, for the fix
"dropout after the last BN" with the **number of dropout layers matched**, a pair of one-hidden-layer networks with
exactly one dropout layer each: right before their only (so last) BN (``before_norm``), or after it, before the
classifier (``before_head``, Li et al.'s fix). At the family's depth the fix would also change the count (one dropout
layer instead of one per hidden layer), so the depth-2 ``before_head`` network is not run. The ``variance_shift``
probe measures at the end of training, per BN layer on training examples, the running variance (accumulated in
training, with dropout on) against the variance the layer really sees at inference (dropout off), and the closed-form
prediction (c^2 + v)/q - c^2 over v; it also re-estimates BN's statistics with dropout off (``recalibrate_bn``) and
records the test accuracy before and after.
The probe measures at the first and the last step only, so the claim is not re-analysed at smaller budgets.

Verdict: the shift itself, per seed ln(running variance / inference variance) averaged over the BN layers of the
``before_norm`` network; positive = BN's estimate is too large at inference, as claimed. Whether it hurts and whether
the fixes help are reported beside it.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment, small_arm, small_label
from normdrop.claims.figures import color, finish, new_figure
from normdrop.claims.readers import final, mean_of, records
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult
from normdrop.stats import paired_difference

POSITIONS = ("before_norm", "after_norm")
"""Dropout placements at the family's depth (one dropout layer per hidden layer in both)."""
MATCHED_DEPTH = 1
"""Hidden layers of the matched-count pair: one BN, one dropout layer, before or after the BN."""
MATCHED = {"before": "before_norm", "after": "before_head"}
"""The matched pair: where its one dropout layer is (``RunSpec.dropout_position``)."""
ARM_NAMES = {
    "before_norm": "dropout right before each BN",
    "after_norm": "dropout after each activation",
    "before": "1 hidden layer: one dropout right before the BN",
    "after": "1 hidden layer: one dropout after the BN",
}


def position_label(setting: StudySetting, position: str) -> str:
    """Arm label of BN + dropout at one position (after_norm is the plain small-family label)."""
    p = setting.primary_dropout
    return small_label("batch", p) if position == "after_norm" else small_label("batch", p, dropout_position=position)


def matched_label(setting: StudySetting, where: str) -> str:
    """Arm label of one network of the matched-count pair (``where``: ``"before"`` or ``"after"``)."""
    return small_label("batch", setting.primary_dropout, depth=MATCHED_DEPTH, dropout_position=MATCHED[where])


def shift_records(result: RunResult | None) -> list[dict[str, Any]]:
    """The per-layer variance_shift records at the run's last step."""
    if result is None or result.status != "finished":
        return []
    return [r for r in records(result, "variance_shift", step=result.spec.steps) if r.get("layer") is not None]


def log_shift(result: RunResult | None, field: str = "running_to_eval") -> float | None:
    """Mean over BN layers of ln(field), e.g. ln(running_var / eval_var)."""
    return mean_of(math.log(r[field]) for r in shift_records(result) if r.get(field) and r[field] > 0)


def recalibration(result: RunResult | None) -> tuple[float | None, float | None]:
    """(test accuracy, test accuracy after re-estimating BN statistics) at the last step."""
    if result is None or result.status != "finished":
        return None, None
    rows = [r for r in records(result, "variance_shift", step=result.spec.steps) if r.get("layer") is None]
    if not rows:
        return None, None
    return rows[-1].get("test_accuracy"), rows[-1].get("test_accuracy_recalibrated")


class DropoutBNShift(Claim):
    id = "dropout-bn-shift"
    title = "Dropout before BN shifts its variance"
    statement = (
        "Dropout placed before BN shifts the variance BN sees between training and inference, which can hurt "
        "(Li et al. 2019); dropout after the last BN, or re-estimated BN statistics, avoid it."
    )
    mechanism = (
        "In training, dropout zeroes some inputs and scales the rest up by 1/(1-p): the mean is unchanged but the "
        "values spread out more. A BN layer right after it learns its running variance from these wider training "
        "values. At inference dropout is off, the values are narrower, but BN still divides by the larger training "
        "variance - so it shrinks its outputs, and the next layers receive a signal they were not trained on."
    )
    rationale = (
        "The small network with BN and dropout 0.5 (where dropout is strong enough to matter), dropout right "
        "before each BN or after each activation, measured at the end of training with the variance_shift probe "
        "on training examples, which also tries the re-estimation fix. The other fix, 'dropout after the last BN', "
        "is compared with the number of dropout layers held fixed: two one-hidden-layer networks with exactly one "
        "dropout layer each, right before their BN or after it (moving dropout after the last BN in the deeper "
        "network would also remove all but one dropout layer, mixing less dropout with a better place). Limits: "
        "two hidden layers at most, so the shift compounds through at most two BN layers (Li et al. study deep "
        "convolutional networks); running statistics with momentum 0.1 also lag the weights, which adds to the "
        "measured ratio in every placement."
    )
    caveats = (
        "Li et al. (2019) also find that the shift is small for wide layers and for dropout with small p, and "
        "propose variance-stable dropout variants; Wu & Johnson (2021) discuss re-estimating BN statistics "
        "(PreciseBN) as a general fix for train/inference mismatches of BN."
    )
    probes = ("variance_shift",)
    references = ("Li, Chen, Hu & Yang 2019", "Wu & Johnson 2021")
    budget_reanalysis = False
    MARGIN_CLOSED_FORM = math.log(1.1)
    """Equivalence margin of the closed-form check (ln ratio: within 10%)."""

    def experiment(self, setting: StudySetting) -> Experiment:
        arms: dict[str, list[Any]] = {}
        for position in POSITIONS:
            fields = {} if position == "after_norm" else {"dropout_position": position}
            _, specs = small_arm(setting, "batch", setting.primary_dropout, **fields)
            arms[position_label(setting, position)] = specs
        for where, position in MATCHED.items():
            _, specs = small_arm(
                setting, "batch", setting.primary_dropout, depth=MATCHED_DEPTH, dropout_position=position
            )
            arms[matched_label(setting, where)] = specs
        spec = setting.spec("small")
        return Experiment(
            arms=arms,
            description=(
                f"{spec.model} depth {spec.depth} width {spec.width} with BN on {setting.small_train_size} "
                f"examples of {setting.dataset} drawn per seed, {spec.optimizer} lr {spec.lr:g}, {spec.steps} steps, "
                f"dropout {setting.primary_dropout} right before each BN or after each activation; and, with the "
                f"number of dropout layers matched (one each), depth-{MATCHED_DEPTH} networks with their one dropout "
                f"layer right before the BN or after it (before the classifier); variance_shift probe at the first "
                f"and last step; evaluation seeds {setting.seed_list}; nothing is chosen from the data."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        s = data.setting
        labels = {position: position_label(s, position) for position in POSITIONS}
        labels.update({where: matched_label(s, where) for where in MATCHED})
        runs = {arm: data.runs(label) for arm, label in labels.items()}
        shift = {arm: {seed: log_shift(r) for seed, r in arm_runs.items()} for arm, arm_runs in runs.items()}
        spec = s.spec("small")
        primary = measure(
            "variance shift with dropout right before BN",
            "ln(running variance / variance seen at inference), mean over the BN layers (0 = no shift)",
            shift["before_norm"],
            "increase",
            unit="ln ratio",
            note=(
                f"{spec.model} depth {spec.depth} x {spec.width} with BN, dropout {s.primary_dropout} right before "
                f"each BN, {s.small_train_size} training examples per seed, {spec.steps} steps; measured on training "
                "examples at the last step; nothing chosen from data."
            ),
        )
        accuracy = {
            arm: {seed: final(r, "test_accuracy") for seed, r in arm_runs.items()} for arm, arm_runs in runs.items()
        }
        recalibrated_gain = {}
        for seed, result in runs["before_norm"].items():
            plain, recalibrated = recalibration(result)
            if plain is not None and recalibrated is not None:
                recalibrated_gain[seed] = 100 * (recalibrated - plain)
        predicted = {
            seed: mean_of(
                math.log(r["train_to_eval"] / r["predicted_ratio"])
                for r in shift_records(result)
                if r.get("predicted_ratio")
                and r.get("train_to_eval")
                and r["train_to_eval"] > 0
                and r["layer"] == _first_layer(result)
            )
            for seed, result in runs["before_norm"].items()
        }
        secondary = [
            measure(
                "fix 1: one dropout layer after the BN instead of right before it, test accuracy gain",
                f"final test accuracy, depth-{MATCHED_DEPTH} network with its one dropout layer after the BN minus "
                "the same network with it right before the BN (same number of dropout layers), percentage points",
                paired_difference(accuracy["after"], accuracy["before"], scale=100),
                "increase",
                unit="pp",
                note="Matched count: both networks have exactly one dropout layer; only its place differs.",
            ),
            measure(
                "fix 2: re-estimated BN statistics, test accuracy gain",
                "test accuracy after re-estimating BN statistics with dropout off minus before (dropout before BN), pp",
                recalibrated_gain,
                "increase",
                unit="pp",
            ),
            measure(
                "measured train variance vs the closed form (first BN layer)",
                "ln(train-mode variance / eval variance) minus ln((c^2+v)/q - c^2 over v): 0 = formula exact",
                predicted,
                "equal",
                margin=self.MARGIN_CLOSED_FORM,
                unit="ln ratio",
            ),
            measure(
                "variance shift, one dropout layer right before the BN (matched pair)",
                "ln(running variance / variance seen at inference) of the BN",
                shift["before"],
                "increase",
                unit="ln ratio",
            ),
            measure(
                "variance shift, one dropout layer after the BN (matched pair)",
                "ln(running variance / variance seen at inference) of the BN",
                shift["after"],
                "increase",
                unit="ln ratio",
                note="Expected near 0 (no dropout before the BN: only the lag of the running averages remains).",
            ),
            measure(
                "dropout after each activation vs right before each BN, test accuracy",
                f"final test accuracy, depth {spec.depth}, dropout after each activation minus right before each BN "
                "(one dropout layer per hidden layer in both), percentage points",
                paired_difference(accuracy["after_norm"], accuracy["before_norm"], scale=100),
                "increase",
                unit="pp",
                note="After each activation, the first layer's dropout still feeds the next BN through a linear layer.",
            ),
        ]
        figures = [_shift_figure(shift, accuracy)] if data.draw else []
        return Analysis(primary, secondary, figures)


def _first_layer(result: RunResult | None) -> str | None:
    layers = [r["layer"] for r in shift_records(result) if r.get("predicted_ratio")]
    return layers[0] if layers else None


def _shift_figure(shift: dict[str, dict[int, float | None]], accuracy: dict[str, dict[int, float | None]]) -> Any:
    figure, axes = new_figure(ncols=2, width=7.6)
    arms = list(ARM_NAMES)
    for index, arm in enumerate(arms):
        for ax, values in ((axes[0], shift[arm]), (axes[1], accuracy[arm])):
            points = [v for v in values.values() if v is not None]
            if not points:
                continue
            jitter = np.linspace(-0.12, 0.12, len(points))
            ax.scatter(index + jitter, points, color=color("", index), s=18, alpha=0.8)
            ax.errorbar(index + 0.25, np.mean(points), yerr=_half_width(points), fmt="s", color="#222", capsize=4)
    axes[0].axhline(0, color="#333", linewidth=0.8)
    axes[0].set_ylabel("ln(running var / inference var)")
    axes[1].set_ylabel("final test accuracy (fraction)")
    for ax in axes:
        ax.set_xticks(range(len(arms)), [textwrap.fill(ARM_NAMES[a], 16) for a in arms], fontsize=6)
    return finish(
        figure,
        "Variance shift and accuracy by dropout placement",
        "Left: how much BN's running variance overestimates the variance it sees at inference, averaged over BN "
        "layers (0 = no shift). Right: final test accuracy. The first two networks have the family's depth and one "
        "dropout layer per hidden layer; the last two have one hidden layer and exactly one dropout layer each, "
        "before or after the BN. Dots: seeds; squares: mean with 95% t-interval.",
    )


def _half_width(points: list[float]) -> float:
    from normdrop.stats import t_interval

    estimate = t_interval(points)
    return 0.0 if estimate is None else (estimate.ci_high - estimate.ci_low) / 2


CLAIM = DropoutBNShift()
