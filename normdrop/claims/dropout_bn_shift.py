"""dropout-bn-shift: dropout before BN shifts the variance BN sees between training and inference (Li et al. 2019).

Small-family runs with BN and dropout 0.5 in three places: right before each BN (``before_norm``, the harmful
case), after each activation (``after_norm``, the usual place), and once before the classifier, after the last BN
(``before_head``, Li et al.'s fix). The ``variance_shift`` probe measures at the end of training, per BN layer on
training examples, the running variance (accumulated in training, with dropout on) against the variance the layer
really sees at inference (dropout off), and the closed-form prediction (c^2 + v)/q - c^2 over v; it also
re-estimates BN's statistics with dropout off (``recalibrate_bn``) and records the test accuracy before and after.

Verdict: the shift itself, per seed ln(running variance / inference variance) averaged over the BN layers of the
``before_norm`` network; positive = BN's estimate is too large at inference, as claimed. Whether it hurts and whether
the fixes help are reported beside it.
"""

from __future__ import annotations

import math
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

POSITIONS = ("before_norm", "after_norm", "before_head")
POSITION_NAMES = {
    "before_norm": "dropout right before each BN",
    "after_norm": "dropout after each activation",
    "before_head": "dropout after the last BN only",
}


def position_label(setting: StudySetting, position: str) -> str:
    """Arm label of BN + dropout at one position (after_norm is the plain small-family label)."""
    p = setting.primary_dropout
    return small_label("batch", p) if position == "after_norm" else small_label("batch", p, dropout_position=position)


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
        "The small MLP with BN and dropout 0.5 (where dropout is strong enough to matter) in three placements, "
        "measured at the end of training with the variance_shift probe on training examples, which also tries "
        "the re-estimation fix. Limits: a 2-layer MLP, so the shift can compound through only two BN layers (Li "
        "et al. study deep convolutional networks); running statistics with momentum 0.1 also lag the weights, "
        "which adds to the measured ratio in every placement."
    )
    caveats = (
        "Li et al. (2019) also find that the shift is small for wide layers and for dropout with small p, and "
        "propose variance-stable dropout variants; Wu & Johnson (2021) discuss re-estimating BN statistics "
        "(PreciseBN) as a general fix for train/inference mismatches of BN."
    )
    probes = ("variance_shift",)
    references = ("Li, Chen, Hu & Yang 2019", "Wu & Johnson 2021")

    def experiment(self, setting: StudySetting) -> Experiment:
        arms: dict[str, list[Any]] = {}
        for position in POSITIONS:
            fields = {} if position == "after_norm" else {"dropout_position": position}
            _, specs = small_arm(setting, "batch", setting.primary_dropout, **fields)
            arms[position_label(setting, position)] = specs
        spec = setting.spec("small")
        return Experiment(
            arms=arms,
            description=(
                f"MLP {spec.depth} x {spec.width} with BN on {setting.small_train_size} examples of "
                f"{setting.dataset}, Adam lr {spec.lr:g}, {spec.steps} steps, dropout {setting.primary_dropout} at "
                f"positions {', '.join(POSITIONS)}; variance_shift probe at the first and last step; seeds "
                f"{setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        s = data.setting
        runs = {position: data.runs(position_label(s, position)) for position in POSITIONS}
        shift = {position: {seed: log_shift(r) for seed, r in runs[position].items()} for position in POSITIONS}
        primary = measure(
            "variance shift with dropout right before BN",
            "ln(running variance / variance seen at inference), mean over the BN layers (0 = no shift)",
            shift["before_norm"],
            "increase",
            unit="ln ratio",
        )
        accuracy = {
            position: {seed: final(r, "test_accuracy") for seed, r in runs[position].items()} for position in POSITIONS
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
                "fix 1: dropout after the last BN, test accuracy gain",
                "final test accuracy, dropout after the last BN minus dropout right before each BN, percentage points",
                {k: 100 * v for k, v in paired_difference(accuracy["before_head"], accuracy["before_norm"]).items()},
                "increase",
                unit="pp",
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
                margin=math.log(1.1),
                unit="ln ratio",
            ),
            measure(
                "variance shift with dropout after the last BN only",
                "ln(running variance / variance seen at inference), mean over the BN layers",
                shift["before_head"],
                "increase",
                unit="ln ratio",
                note="Expected near 0 (only the lag of the running averages remains).",
            ),
        ]
        return Analysis(primary, secondary, [_shift_figure(data, runs, shift, accuracy)])


def _first_layer(result: RunResult | None) -> str | None:
    layers = [r["layer"] for r in shift_records(result) if r.get("predicted_ratio")]
    return layers[0] if layers else None


def _shift_figure(
    data: ClaimData, runs: dict[str, Any], shift: dict[str, dict[int, float | None]], accuracy: dict[str, Any]
) -> Any:
    figure, axes = new_figure(ncols=2, width=7.2)
    for index, position in enumerate(POSITIONS):
        for ax, values, scale in ((axes[0], shift[position], 1.0), (axes[1], accuracy[position], 1.0)):
            points = [scale * v for v in values.values() if v is not None]
            if not points:
                continue
            jitter = np.linspace(-0.12, 0.12, len(points))
            ax.scatter(index + jitter, points, color=color("", index), s=18, alpha=0.8)
            ax.errorbar(index + 0.25, np.mean(points), yerr=_half_width(points), fmt="s", color="#222", capsize=4)
    axes[0].axhline(0, color="#333", linewidth=0.8)
    axes[0].set_ylabel("ln(running var / inference var)")
    axes[1].set_ylabel("final test accuracy (fraction)")
    for ax in axes:
        ax.set_xticks(range(len(POSITIONS)), [POSITION_NAMES[p].replace(" ", "\n", 2) for p in POSITIONS], fontsize=7)
    return finish(
        figure,
        "Variance shift and accuracy by dropout placement",
        "Left: how much BN's running variance overestimates the variance it sees at inference, averaged over BN "
        "layers (0 = no shift). Right: final test accuracy. Dots: seeds; squares: mean with 95% t-interval.",
    )


def _half_width(points: list[float]) -> float:
    from normdrop.stats import t_interval

    estimate = t_interval(points)
    return 0.0 if estimate is None else (estimate.ci_high - estimate.ci_low) / 2


CLAIM = DropoutBNShift()
