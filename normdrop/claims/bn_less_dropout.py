"""bn-less-dropout: with BN, dropout is less needed.

A 2 x 2 factorial on the small family (BN or not, dropout p = 0.5 or none), same seeds in every cell. Dropout's gain
is its test accuracy minus that of the same network without dropout; the effect per seed is the interaction
gain without BN - gain with BN, in percentage points: positive means dropout helps less once BN is there, as
claimed.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, factorial_arms, small_label
from normdrop.claims.figures import LABELS, finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import final
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.stats import paired_difference


def dropout_gain(data: ClaimData, norm: str, p: float) -> dict[int, float]:
    """Seed -> 100 x (final test accuracy with dropout p - without), for one norm."""
    with_dropout = {s: final(r, "test_accuracy") for s, r in data.runs(small_label(norm, p)).items()}
    without = {s: final(r, "test_accuracy") for s, r in data.runs(small_label(norm, 0.0)).items()}
    return paired_difference(with_dropout, without, scale=100)


class BNLessDropout(Claim):
    id = "bn-less-dropout"
    title = "With BN, dropout is less needed"
    statement = "With BN, dropout is less needed: it adds less on top of BN than on a plain network."
    mechanism = (
        "Ioffe & Szegedy (2015) observed that BN networks generalize well with little or no dropout and "
        "suggested that BN's own noise (each example normalized with different batch companions) plays part of "
        "dropout's role. If so, adding dropout to a BN network should gain less than adding it to a plain one."
    )
    rationale = (
        "A 2 x 2 factorial (BN or not, dropout 0.5 or none) on the small, overfitting setting, where dropout can "
        "help: the same seeds in every cell, so each seed gives one interaction contrast. Limits: one dropout "
        "rate fixed in advance (0.5, Srivastava et al.'s default) rather than tuned per arm; dropout sits after "
        "BN and the activation here, where Li et al. (2019) find no variance shift."
    )
    caveats = (
        "Dropout and BN also interact through the variance shift (see dropout-bn-shift): dropout placed before a "
        "BN layer can hurt for reasons that have nothing to do with redundancy of their regularization."
    )
    references = ("Ioffe & Szegedy 2015, section 4.2.1", "Li et al. 2019")

    def experiment(self, setting: StudySetting) -> Experiment:
        arms = factorial_arms(setting)
        spec = setting.spec("small")
        return Experiment(
            arms=arms,
            description=(
                f"MLP {spec.depth} x {spec.width} on {setting.small_train_size} training examples of "
                f"{setting.dataset}, Adam lr {spec.lr:g}, {spec.steps} steps; BN or none x dropout "
                f"{setting.primary_dropout} or none (dropout after the activation); seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        p = data.setting.primary_dropout
        gains = {norm: dropout_gain(data, norm, p) for norm in NORMS}
        primary = measure(
            "dropout's gain without BN minus its gain with BN",
            f"(test accuracy gain of dropout {p:g} without BN) - (its gain with BN), percentage points",
            paired_difference(gains["none"], gains["batch"]),
            "increase",
            unit="pp",
        )
        secondary = [
            measure(
                f"dropout's gain {'without' if norm == 'none' else 'with'} BN",
                f"test accuracy with dropout {p:g} minus without, percentage points",
                gains[norm],
                "increase",
                unit="pp",
            )
            for norm in NORMS
        ]
        return Analysis(primary, secondary, [_interaction(data, p)])


def _interaction(data: ClaimData, p: float) -> Any:
    figure, ax = new_figure(height=3.0)
    for norm in NORMS:
        values = {
            q: {s: final(r, "test_accuracy") for s, r in data.runs(small_label(norm, q)).items()} for q in (0.0, p)
        }
        plot_band(ax, [0.0, p], seeds_by_x(values, data.setting.seed_list), LABELS[norm], key=norm, marker="o")
    ax.set_xticks([0.0, p], ["no dropout", f"dropout {p:g}"])
    ax.set_xlabel("dropout")
    ax.set_ylabel("final test accuracy (fraction)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Interaction of BN and dropout",
        "Final test accuracy in each cell of the 2 x 2 design, mean over seeds with 95% band. Parallel lines mean "
        "dropout helps equally with and without BN; a flatter BN line means it helps less with BN.",
    )


CLAIM = BNLessDropout()
