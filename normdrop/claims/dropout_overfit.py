"""dropout-overfit: dropout reduces overfitting (here: networks trained on 500 examples).

The runs of dropout-generalizes: the plain small network (no BN) on a fresh 500-example subset per seed, where it
overfits (training accuracy reaches 100% while test accuracy stalls), trained to convergence. Overfitting is the
generalization gap at the end of training, final training accuracy minus final test accuracy (both in eval mode).

Primary (fixed in code): per evaluation seed, gap without dropout minus gap with the dropout rate chosen on the
selection seeds (:func:`normdrop.claims.small_family.chosen_dropout`, the same choice as dropout-generalizes), in
percentage points; positive = dropout reduces overfitting. t interval over seeds (the gap's training part is
measured on each seed's own subset, so the shared-test-set bootstrap does not apply to it). Secondary,
pre-registered: the same at the fixed p = 0.5. Exploratory: the whole training set, the loss gap.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import (
    Experiment,
    add_arms,
    dropout_grid_arms,
    dropout_label,
    dropout_selection_arms,
    size_name,
)
from normdrop.claims.figures import align, finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import curve, final
from normdrop.claims.results import Analysis, Measurement, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.claims.small_family import SMALL_N, chosen_dropout, convergence_phrase, mde_phrase, small_scope
from normdrop.spec import RunResult
from normdrop.stats import paired_difference

GAP_METRIC = "final (training - test) accuracy, without minus with dropout, percentage points"


def accuracy_gap(result: RunResult | None) -> float | None:
    """100 x (final training accuracy - final test accuracy), percentage points."""
    train, test = final(result, "train_accuracy"), final(result, "test_accuracy")
    return None if train is None or test is None else 100 * (train - test)


def loss_gap(result: RunResult | None) -> float | None:
    """Final test loss - final training loss (nats)."""
    train, test = final(result, "train_loss"), final(result, "test_loss")
    return None if train is None or test is None else test - train


def gaps(data: ClaimData, p: float, train_size: int | None, gap: Any = accuracy_gap) -> dict[int, float | None]:
    """Evaluation seed -> gap of one arm."""
    return {s: gap(r) for s, r in data.runs(dropout_label(data.setting, p, train_size)).items()}


def gap_reduction(data: ClaimData, name: str, p: float, train_size: int | None, note: str) -> Measurement:
    """Gap without dropout minus gap with dropout ``p`` (pp), on the evaluation seeds."""
    per_seed = paired_difference(gaps(data, 0.0, train_size), gaps(data, p, train_size))
    return measure(name, GAP_METRIC, per_seed, "increase", unit="pp", note=f"{note}; {mde_phrase(per_seed)}")


class DropoutOverfit(Claim):
    id = "dropout-overfit"
    title = f"Dropout reduces overfitting ({SMALL_N} training examples)"
    statement = f"Dropout reduces overfitting (tested on networks trained on {SMALL_N} training examples)."
    mechanism = (
        "A network with many more weights than training examples can memorize the examples, noise included: its "
        "training accuracy reaches 100% while its test accuracy stops improving - the gap between them is "
        "overfitting. With dropout, no unit can count on any other being present, so memorizing a quirk of one "
        "example needs many units to agree, which the random masks keep breaking up; the network is pushed "
        "towards features that hold across examples."
    )
    rationale = (
        f"A small network (2 hidden layers) on only {SMALL_N} training examples (a fresh subset per seed) fits "
        "them perfectly within the budget: the regime where overfitting can be reduced. Budgets per setting are "
        "long enough for the dropout arms to converge (measured learning curves). The dropout rate is the one "
        "dropout-generalizes chose on the selection seeds; the fixed p = 0.5 is a pre-registered second "
        "comparison. Limits: a smaller gap can also come from a lower training accuracy (the test accuracy is the "
        "subject of dropout-generalizes); the gap's interval is over seeds only."
    )
    caveats = (
        "A reduced gap is not by itself better generalization: dropout can shrink the gap by fitting the training "
        "set worse. With enough data the gap is small anyway and dropout mostly slows training (shown on the whole "
        "training set, where the dropout arm has not converged within the budget)."
    )
    references = ("Srivastava et al. 2014, sections 6-7",)

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = setting.spec("small")
        experiment = Experiment(
            arms=dropout_grid_arms(setting),
            description=(
                f"The runs of dropout-generalizes: plain {spec.model} {spec.depth} x {spec.width} (no BN), "
                f"{spec.optimizer} lr {spec.lr:g}, {spec.steps} steps; dropout p in {list(setting.dropout_candidates)}"
                f" on {SMALL_N} training examples (a fresh subset per seed) on the selection seeds "
                f"{setting.selection_seed_list} (p chosen there), p in {list(setting.dropout_grid)} on the "
                f"evaluation seeds {setting.seed_list}, p in {list(setting.full_data_grid)} on all training examples."
            ),
        )
        add_arms(experiment, dropout_selection_arms(setting))
        return experiment

    def analyze(self, data: ClaimData) -> Analysis:
        s, p = data.setting, data.setting.primary_dropout
        small = s.small_train_size
        choice = chosen_dropout(data)
        if choice.p is None:
            primary = not_measurable(
                "generalization gap without dropout minus with the chosen rate",
                GAP_METRIC,
                "increase",
                choice.describe(),
                unit="pp",
            )
        else:
            primary = gap_reduction(
                data,
                f"generalization gap without dropout minus with dropout {choice.p:g} (chosen) "
                f"({SMALL_N} training examples)",
                choice.p,
                small,
                f"{small_scope(data)}; {choice.describe()}; "
                + convergence_phrase(data.runs(dropout_label(s, choice.p, small)), "chosen-p arm"),
            )
        secondary = [
            gap_reduction(
                data,
                f"pre-registered: gap without dropout minus with dropout {p:g} (fixed) ({SMALL_N} training examples)",
                p,
                small,
                f"{small_scope(data)}; p fixed in code before any data",
            ),
            gap_reduction(
                data,
                f"same on {size_name(s, None)} (dropout {p:g})",
                p,
                None,
                f"{small_scope(data, 'all training examples')}; "
                + convergence_phrase(data.runs(dropout_label(s, p, None)), f"p = {p:g} arm"),
            ),
            measure(
                f"loss gap without dropout minus with dropout {p:g} ({SMALL_N} training examples)",
                "final (test - training) loss, without minus with dropout, nats",
                paired_difference(gaps(data, 0.0, small, loss_gap), gaps(data, p, small, loss_gap)),
                "increase",
                unit="nats",
                note=small_scope(data),
            ),
        ]
        figures = [_curves(data, choice.p if choice.p is not None else p), _gap_vs_p(data)] if data.draw else []
        return Analysis(primary, secondary, figures, [], [choice.describe().capitalize() + "."])


def _curves(data: ClaimData, p: float) -> Any:
    figure, ax = new_figure()
    small = data.setting.small_train_size
    for index, q in enumerate((0.0, p)):
        runs = [r for r in data.runs(dropout_label(data.setting, q, small)).values() if r is not None]
        runs = [r for r in runs if r.status == "finished"]
        if not runs:
            continue
        key = "no dropout" if q == 0 else "dropout"
        for metric, style in (("train_accuracy", "--"), ("test_accuracy", "-")):
            steps, table = align([curve(r, metric) for r in runs])
            plot_band(ax, steps, table, f"{metric.split('_')[0]}, p={q:g}", key=key, index=index, linestyle=style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (fraction)")
    legend(ax, fontsize=8, ncols=2)
    return finish(
        figure,
        f"Training and test accuracy, {small} training examples",
        "Dashed: accuracy on the training set; solid: on the test set (both in eval mode). The vertical distance "
        "between a dashed and a solid line of one colour is the generalization gap. Mean over seeds, 95% bands.",
    )


def _gap_vs_p(data: ClaimData) -> Any:
    figure, ax = new_figure(height=3.0)
    for index, size in enumerate(data.setting.train_sizes):
        grid = list(data.setting.dropout_grid if size == data.setting.small_train_size else data.setting.full_data_grid)
        values = {q: gaps(data, q, size) for q in grid}
        plot_band(
            ax,
            grid,
            seeds_by_x(values, data.setting.seed_list),
            size_name(data.setting, size),
            key="",
            index=index,
            marker="o",
        )
    ax.set_xlabel("dropout probability p")
    ax.set_ylabel("training - test accuracy (pp)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Generalization gap vs dropout rate",
        "Final training accuracy minus final test accuracy, mean over seeds with 95% band, for the small training "
        "set and for the whole training set.",
    )


CLAIM = DropoutOverfit()
