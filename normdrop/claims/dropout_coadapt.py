"""dropout-coadapt: dropout stops hidden units from co-adapting.

On the runs of dropout-overfit, the ``coadaptation`` probe measures at the end of training, on a fixed batch of
training examples in eval mode, each hidden layer's mean absolute correlation between units, the DeCov penalty
(Cogswell et al. 2016) and the fraction of units active per example (the sparsity the dropout paper reports as a
side effect). Effect per seed: ln(mean |correlation| without dropout / with dropout 0.5), averaged over layers;
positive = less correlated units with dropout.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment, dropout_grid_arms, dropout_label
from normdrop.claims.figures import finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import mean_of, records
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult
from normdrop.stats import paired_difference, paired_log_ratio


def final_layer_mean(result: RunResult | None, field: str) -> float | None:
    """Mean over layers of a coadaptation field at the run's last step."""
    if result is None or result.status != "finished":
        return None
    rows = records(result, "coadaptation", unit=None, step=result.spec.steps)
    return mean_of(r.get(field) for r in rows)


def by_p(data: ClaimData, field: str) -> dict[float, dict[int, float | None]]:
    """Dropout p -> seed -> the field's final layer mean, on the small training set."""
    s = data.setting
    return {
        p: {seed: final_layer_mean(r, field) for seed, r in data.runs(dropout_label(s, p, s.small_train_size)).items()}
        for p in s.dropout_grid
    }


class DropoutCoadapt(Claim):
    id = "dropout-coadapt"
    title = "Dropout prevents co-adaptation"
    statement = "Dropout stops hidden units from co-adapting, so features are more individually useful."
    mechanism = (
        "Without dropout, a unit can become useful only in combination with particular other units - fixing "
        "their mistakes or copying their signal. Srivastava et al. (2014) call this co-adaptation. When any unit "
        "may vanish at any step, such partnerships are unreliable, so each unit is pushed to detect something "
        "useful on its own: units should be less redundant (less correlated with each other) and, as the paper "
        "observed, activations become sparser."
    )
    rationale = (
        "The coadaptation probe reads each hidden layer's activations on 256 training examples at the end of the "
        "dropout-overfit runs (plain MLP, 500 examples): mean |correlation| between units, the DeCov value (the sum "
        "of squared covariances between different units) and the fraction of active ReLUs. Limits: correlation is a "
        "proxy for co-adaptation, which the paper defines only informally; two layers of 128 units."
    )
    caveats = (
        "Correlation between units measures redundancy, not 'individual usefulness', which would need ablating "
        "units one at a time. Dropout can also increase redundancy: copying a feature into several units is one "
        "way to survive random deletion, so the direction is an empirical question here."
    )
    probes = ("coadaptation",)
    references = ("Srivastava et al. 2014, section 7.1 and figure 8", "Cogswell et al. 2016 (DeCov)")

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = setting.spec("small")
        return Experiment(
            arms=dropout_grid_arms(setting),
            description=(
                f"The runs of dropout-overfit (MLP {spec.depth} x {spec.width}, {setting.small_train_size} training "
                f"examples, dropout p in {list(setting.dropout_grid)}), with the coadaptation probe at the first and "
                f"the last step; seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        p = data.setting.primary_dropout
        correlation = by_p(data, "mean_abs_correlation")
        decov = by_p(data, "decov")
        active = by_p(data, "active_fraction")
        primary = measure(
            f"mean |correlation| between units, without / with dropout {p:g}",
            "ln(mean |corr| without dropout / with dropout), mean over hidden layers, end of training",
            paired_log_ratio(correlation[0.0], correlation[p]),
            "increase",
            unit="ln ratio",
        )
        secondary = [
            measure(
                f"DeCov, without / with dropout {p:g}",
                "ln(DeCov without / with dropout)",
                paired_log_ratio(decov[0.0], decov[p]),
                "increase",
                unit="ln ratio",
            ),
            measure(
                f"fraction of active units, with dropout {p:g} minus without",
                "fraction of ReLU units > 0 per example, with minus without dropout (negative = sparser)",
                paired_difference(active[p], active[0.0]),
                "decrease",
                unit="fraction",
                note="The dropout paper reports sparser activations with dropout (figure 8).",
            ),
        ]
        return Analysis(primary, secondary, [_versus_p(data, correlation, active)])


def _versus_p(data: ClaimData, correlation: dict[float, Any], active: dict[float, Any]) -> Any:
    figure, axes = new_figure(ncols=2)
    grid = list(data.setting.dropout_grid)
    seeds = data.setting.seed_list
    plot_band(axes[0], grid, seeds_by_x(correlation, seeds), "mean over hidden layers", key="dropout", marker="o")
    plot_band(axes[1], grid, seeds_by_x(active, seeds), "mean over hidden layers", key="dropout", marker="o")
    axes[0].set_ylabel("mean |correlation| between units")
    axes[1].set_ylabel("fraction of units active per example")
    for ax in axes:
        ax.set_xlabel("dropout probability p")
        legend(ax, fontsize=8)
    return finish(
        figure,
        "Co-adaptation and sparsity vs dropout rate",
        "Measured at the end of training in eval mode on 256 training examples (500-example training set); mean "
        "over seeds with 95% band.",
    )


CLAIM = DropoutCoadapt()
