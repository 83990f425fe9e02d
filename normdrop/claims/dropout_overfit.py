"""dropout-overfit: dropout reduces overfitting.

The plain small network (no BN) at dropout rates 0 to 0.5 on 500 training examples, where it overfits: training
accuracy reaches 100% while test accuracy stalls. Overfitting is measured by the generalization gap at the end of
training, final training accuracy minus final test accuracy (both in eval mode). Effect per seed: gap without
dropout minus gap with dropout 0.5, in percentage points; positive = dropout reduces overfitting.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment, dropout_grid_arms, dropout_label, size_name
from normdrop.claims.figures import align, finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import curve, final
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult
from normdrop.stats import paired_difference


def accuracy_gap(result: RunResult | None) -> float | None:
    """100 x (final training accuracy - final test accuracy), percentage points."""
    train, test = final(result, "train_accuracy"), final(result, "test_accuracy")
    return None if train is None or test is None else 100 * (train - test)


def loss_gap(result: RunResult | None) -> float | None:
    """Final test loss - final training loss (nats)."""
    train, test = final(result, "train_loss"), final(result, "test_loss")
    return None if train is None or test is None else test - train


def gaps(data: ClaimData, p: float, train_size: int | None, gap: Any = accuracy_gap) -> dict[int, float | None]:
    """Seed -> gap of one arm."""
    return {s: gap(r) for s, r in data.runs(dropout_label(data.setting, p, train_size)).items()}


class DropoutOverfit(Claim):
    id = "dropout-overfit"
    title = "Dropout reduces overfitting"
    statement = "Dropout reduces overfitting."
    mechanism = (
        "A network with many more weights than training examples can memorize the examples, noise included: its "
        "training accuracy reaches 100% while its test accuracy stops improving - the gap between them is "
        "overfitting. With dropout, no unit can count on any other being present, so memorizing a quirk of one "
        "example needs many units to agree, which the random masks keep breaking up; the network is pushed "
        "towards features that hold across examples."
    )
    rationale = (
        "A 2-layer MLP (128 units) with Adam on only 500 training examples of MNIST-1D fits the training set "
        "perfectly within the budget: the regime where overfitting can be reduced. Dropout rates 0 to 0.5 are "
        "compared on the same seeds; the gap is measured at the end of training. Limits: one architecture and "
        "budget; a smaller gap can also come from a lower training accuracy (the test accuracy is the subject of "
        "dropout-generalizes)."
    )
    caveats = (
        "A reduced gap is not by itself better generalization: dropout can shrink the gap by fitting the training "
        "set worse. With enough data the gap is small anyway and dropout mostly slows training (shown on the whole "
        "training set)."
    )
    references = ("Srivastava et al. 2014, sections 6-7",)

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = setting.spec("small")
        return Experiment(
            arms=dropout_grid_arms(setting),
            description=(
                f"MLP {spec.depth} x {spec.width} (no BN) on {setting.dataset}, Adam lr {spec.lr:g}, {spec.steps} "
                f"steps; dropout p in {list(setting.dropout_grid)} after each hidden activation; training sets of "
                f"{setting.small_train_size} examples (primary) and all examples; seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        s, p = data.setting, data.setting.primary_dropout
        small = s.small_train_size
        without, with_dropout = gaps(data, 0.0, small), gaps(data, p, small)
        primary = measure(
            f"generalization gap without dropout minus with dropout {p:g}",
            "final (training - test) accuracy, without minus with dropout, percentage points",
            paired_difference(without, with_dropout),
            "increase",
            unit="pp",
        )
        secondary = [
            measure(
                f"same on {size_name(s, None)}",
                "final (training - test) accuracy, without minus with dropout, percentage points",
                paired_difference(gaps(data, 0.0, None), gaps(data, p, None)),
                "increase",
                unit="pp",
            ),
            measure(
                f"loss gap without dropout minus with dropout {p:g}",
                "final (test - training) loss, without minus with dropout, nats",
                paired_difference(gaps(data, 0.0, small, loss_gap), gaps(data, p, small, loss_gap)),
                "increase",
                unit="nats",
            ),
        ]
        return Analysis(primary, secondary, [_curves(data, p), _gap_vs_p(data)])


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
    grid = list(data.setting.dropout_grid)
    for index, size in enumerate(data.setting.train_sizes):
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
