"""dropout-generalizes: dropout improves accuracy on unseen data.

The runs of dropout-overfit (plain small network, dropout 0 to 0.5, 500 examples and the whole training set). Effect
per seed: final test accuracy with dropout 0.5 minus without, in percentage points, on the 500-example training set;
the whole training set and the test loss are reported beside it, since whether dropout helps depends on how much
data there is.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment, dropout_grid_arms, dropout_label, size_name
from normdrop.claims.figures import finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import final
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.stats import paired_difference


def finals(data: ClaimData, p: float, train_size: int | None, metric: str) -> dict[int, float | None]:
    """Seed -> final value of a metric for one arm."""
    return {s: final(r, metric) for s, r in data.runs(dropout_label(data.setting, p, train_size)).items()}


class DropoutGeneralizes(Claim):
    id = "dropout-generalizes"
    title = "Dropout improves test accuracy"
    statement = "Dropout improves accuracy on unseen data."
    mechanism = (
        "Each training step with dropout trains a random thinned sub-network, and all of them share the weights. "
        "The full network used at test time then behaves roughly like an average of these many sub-networks, and "
        "averages of many models usually predict unseen data better than any single one (see dropout-ensemble)."
    )
    rationale = (
        "The runs of dropout-overfit: a 2-layer MLP on 500 examples (where the plain network overfits) and on all "
        "4000 (where it overfits less), dropout 0 to 0.5. The verdict compares p = 0.5, fixed in advance, with no "
        "dropout on the 500 examples. Limits: the budget is the same for every p, while dropout usually needs "
        "longer training to converge; the learning rate is not re-tuned per p."
    )
    caveats = (
        "Whether dropout helps depends on data size and architecture: Srivastava et al. (2014, figure 10) show it "
        "helps least on very small and on very large training sets, and modern convolutional networks with BN "
        "often use little or none."
    )
    references = ("Srivastava et al. 2014, section 6 and figure 10",)

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = setting.spec("small")
        return Experiment(
            arms=dropout_grid_arms(setting),
            description=(
                f"The runs of dropout-overfit: MLP {spec.depth} x {spec.width} (no BN), Adam lr {spec.lr:g}, "
                f"{spec.steps} steps, dropout p in {list(setting.dropout_grid)}, {setting.small_train_size} and all "
                f"training examples of {setting.dataset}; seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        s, p = data.setting, data.setting.primary_dropout
        small = s.small_train_size
        accuracy = {size: {q: finals(data, q, size, "test_accuracy") for q in s.dropout_grid} for size in s.train_sizes}
        loss = {size: {q: finals(data, q, size, "test_loss") for q in s.dropout_grid} for size in s.train_sizes}
        primary = measure(
            f"test accuracy with dropout {p:g} minus without ({small} training examples)",
            "final test accuracy, with minus without dropout, percentage points",
            paired_difference(accuracy[small][p], accuracy[small][0.0], scale=100),
            "increase",
            unit="pp",
        )
        secondary = [
            measure(
                f"same on {size_name(s, None)}",
                "final test accuracy, with minus without dropout, percentage points",
                paired_difference(accuracy[None][p], accuracy[None][0.0], scale=100),
                "increase",
                unit="pp",
            ),
            measure(
                f"test loss with dropout {p:g} minus without ({small} training examples)",
                "final test cross-entropy, with minus without dropout, nats",
                paired_difference(loss[small][p], loss[small][0.0]),
                "decrease",
                unit="nats",
            ),
        ]
        findings = []
        for size in s.train_sizes:
            means = {
                q: sum(v for v in values.values() if v is not None)
                / max(1, sum(v is not None for v in values.values()))
                for q, values in accuracy[size].items()
            }
            best = max(means, key=lambda q: means[q])
            findings.append(f"{size_name(s, size)}: best mean test accuracy {means[best]:.1%} at p = {best:g}.")
        return Analysis(primary, secondary, [_versus_p(data, accuracy, loss)], [], findings)


def _versus_p(data: ClaimData, accuracy: dict[Any, Any], loss: dict[Any, Any]) -> Any:
    figure, axes = new_figure(ncols=2)
    grid = list(data.setting.dropout_grid)
    for index, size in enumerate(data.setting.train_sizes):
        name = size_name(data.setting, size)
        plot_band(axes[0], grid, seeds_by_x(accuracy[size], data.setting.seed_list), name, index=index, marker="o")
        plot_band(axes[1], grid, seeds_by_x(loss[size], data.setting.seed_list), name, index=index, marker="o")
    axes[0].set_ylabel("final test accuracy (fraction)")
    axes[1].set_ylabel("final test loss (nats)")
    for ax in axes:
        ax.set_xlabel("dropout probability p")
        legend(ax, fontsize=8)
    return finish(
        figure,
        "Test accuracy and loss vs dropout rate",
        "Mean over seeds with 95% band, for the small and the whole training set. Compare the curves: dropout's "
        "benefit depends on how much data there is.",
    )


CLAIM = DropoutGeneralizes()
