"""bn-less-dropout: with BN, dropout is less needed.

A 2 x 2 factorial on the small family (BN or not, dropout p = 0.5 or none), the same seeds in every cell, on a fresh
500-example training subset per seed, trained to convergence. Dropout's gain is its final test accuracy minus that
of the same network without dropout; the effect per seed is the interaction, gain without BN - gain with BN, in
percentage points: positive means dropout helps less once BN is there, as claimed.

The effect is small, so this claim runs on :data:`SEED_FACTOR` times the setting's evaluation seeds (10 by default,
seeds ``0 .. 2n-1``; the first ``n`` are the factorial runs summary shares), and its note states the minimum
detectable effect. p is fixed in code (:attr:`StudySetting.primary_dropout`, pre-registered): nothing is chosen, so
no selection seeds are needed. Interval: the hull of the t interval over seeds and a paired bootstrap over seeds and
test examples (:func:`normdrop.claims.small_family.accuracy_estimate`).
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, factorial_arms, small_label
from normdrop.claims.figures import LABELS, finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.claims.small_family import SMALL_N, accuracy_estimate, final_values, mde_phrase, small_scope
from normdrop.spec import RunResult
from normdrop.stats import paired_difference

SEED_FACTOR = 2
"""Evaluation seeds of this claim per evaluation seed of the setting (5 -> 10; a half-seeds re-analysis halves
them too)."""


def claim_seeds(setting: StudySetting) -> list[int]:
    """This claim's evaluation seeds: ``0 .. SEED_FACTOR * setting.seeds - 1`` (disjoint from the selection
    seeds, which start at 1000)."""
    return list(range(SEED_FACTOR * setting.seeds))


def cell(data: ClaimData, norm: str, p: float) -> dict[int, RunResult | None]:
    """Seed -> result of one cell on this claim's seeds (read by spec: the cells run on more seeds than the
    setting's evaluation seeds, which :meth:`ClaimData.runs` keeps to)."""
    label = small_label(norm, p)
    specs = data.experiment.arms.get(label, [])
    replicates = data.experiment.replicates.get(label, data.setting.seed_list)
    wanted = set(claim_seeds(data.setting))
    return {
        seed: data.results.get(spec.run_id) for seed, spec in zip(replicates, specs, strict=False) if seed in wanted
    }


def dropout_gain(data: ClaimData, norm: str, p: float) -> dict[int, float]:
    """Seed -> 100 x (final test accuracy with dropout p - without), for one norm."""
    with_dropout = final_values(cell(data, norm, p), "test_accuracy")
    without = final_values(cell(data, norm, 0.0), "test_accuracy")
    return paired_difference(with_dropout, without, scale=100)


class BNLessDropout(Claim):
    id = "bn-less-dropout"
    title = "With BN, dropout is less needed"
    statement = (
        f"With BN, dropout is less needed: it adds less on top of BN than on a plain network (tested on networks "
        f"trained on {SMALL_N} training examples)."
    )
    mechanism = (
        "Ioffe & Szegedy (2015) observed that BN networks generalize well with little or no dropout and "
        "suggested that BN's own noise (each example normalized with different batch companions) plays part of "
        "dropout's role. If so, adding dropout to a BN network should gain less than adding it to a plain one."
    )
    rationale = (
        "A 2 x 2 factorial (BN or not, dropout 0.5 or none) on the small, overfitting setting, where dropout can "
        "help: the same seeds in every cell, so each seed gives one interaction contrast; twice the setting's "
        "evaluation seeds (10 by default), since the interaction is small (the note gives the minimum detectable "
        "effect). Limits: one dropout rate fixed in advance (0.5, Srivastava et al.'s default) rather than tuned "
        "per arm. Dropout sits after each hidden layer's BN and activation, so the first hidden layer's dropout "
        "feeds the second layer's linear map and then its BN: that BN sees the variance shift of Li et al. "
        "(2019) between training and inference (only the last dropout, before the classifier, feeds no BN). Part "
        "of a smaller gain with BN can therefore come from that shift rather than from BN making dropout "
        "redundant; dropout-bn-shift measures the shift."
    )
    caveats = (
        "Dropout and BN also interact through the variance shift (see dropout-bn-shift): dropout placed before a "
        "BN layer can hurt for reasons that have nothing to do with redundancy of their regularization."
    )
    references = ("Ioffe & Szegedy 2015, section 4.2.1", "Li et al. 2019")

    def experiment(self, setting: StudySetting) -> Experiment:
        seeds = claim_seeds(setting)
        spec = setting.spec("small")
        experiment = Experiment(
            description=(
                f"{spec.model} {spec.depth} x {spec.width} on {SMALL_N} training examples (a fresh subset per seed) "
                f"of {setting.dataset}, {spec.optimizer} lr {spec.lr:g}, {spec.steps} steps; BN or none x dropout "
                f"{setting.primary_dropout} (fixed in code) or none, dropout after each hidden activation; "
                f"evaluation seeds {seeds} ({SEED_FACTOR} x the setting's, for power); nothing is chosen."
            )
        )
        for label, specs in factorial_arms(setting, seeds=seeds).items():
            experiment.add(label, specs, seeds)
        return experiment

    def analyze(self, data: ClaimData) -> Analysis:
        p = data.setting.primary_dropout
        gains = {norm: dropout_gain(data, norm, p) for norm in NORMS}
        per_seed = paired_difference(gains["none"], gains["batch"])
        estimate, interval = accuracy_estimate(
            per_seed,
            [cell(data, "none", p), cell(data, "batch", 0.0)],
            [cell(data, "none", 0.0), cell(data, "batch", p)],
        )
        scope = small_scope(data, seeds=claim_seeds(data.setting))
        primary = measure(
            "dropout's gain without BN minus its gain with BN",
            f"(test accuracy gain of dropout {p:g} without BN) - (its gain with BN), percentage points",
            per_seed,
            "increase",
            unit="pp",
            estimate=estimate,
            note=f"{scope}; p = {p:g} fixed in code; {interval}; {mde_phrase(per_seed)}",
        )
        secondary = [
            measure(
                f"dropout's gain {'without' if norm == 'none' else 'with'} BN",
                f"final test accuracy with dropout {p:g} minus without, percentage points",
                gains[norm],
                "increase",
                unit="pp",
                note=scope,
            )
            for norm in NORMS
        ]
        return Analysis(primary, secondary, [_interaction(data, p)] if data.draw else [])


def _interaction(data: ClaimData, p: float) -> Any:
    figure, ax = new_figure(height=3.0)
    seeds = claim_seeds(data.setting)
    for norm in NORMS:
        values = {q: final_values(cell(data, norm, q), "test_accuracy") for q in (0.0, p)}
        plot_band(ax, [0.0, p], seeds_by_x(values, seeds), LABELS[norm], key=norm, marker="o")
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
