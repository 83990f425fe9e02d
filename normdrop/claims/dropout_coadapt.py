"""dropout-coadapt: dropout stops hidden units from co-adapting, so each feature is more useful on its own.

On the plain small-family runs at dropout 0 and :attr:`StudySetting.primary_dropout` (the runs of dropout-overfit,
shared), the ``coadaptation`` probe measures at the last step, in inference mode:

- **individual usefulness** (the primary): for every hidden unit alone, a one-feature linear probe (a Gaussian
  class-conditional classifier with a shared variance, i.e. one-feature LDA, fitted in closed form on the run's own
  training examples) and its accuracy on the test set (:func:`normdrop.probes.single_unit_probe_accuracy`);
  per network the mean over all hidden units. Effect per evaluation seed: that mean with dropout minus without, in
  percentage points; positive = units more useful alone with dropout, as Srivastava et al. (2014) claim.
- reliance on single units (secondary): the test-accuracy drop when one unit is zeroed, mean over units
  (:func:`normdrop.probes.ablation_drops`), with dropout minus without;
- redundancy (secondary, the old primary): ln(mean |correlation| between units without / with dropout), DeCov, and
  the fraction of active units.

The probe's usefulness fields exist only at the last step, so the claim is not re-analysed at smaller budgets
(``budget_reanalysis = False``).

**Interval of the primary.** The probes are scored on the first :data:`normdrop.probes.coadaptation.TEST_EXAMPLES`
examples of the fixed test set, the same for every seed, so a t interval over seeds leaves that set's sampling error
out. The stored records hold only each layer's mean over units and examples, but the runs keep their final weights,
so the analysis rebuilds each network, refits the probes on the run's own training examples and scores them per
test example (:func:`normdrop.claims.readers.final_unit_probe_scores`): ``c_si`` = the share of the network's
hidden units whose probe classifies example i right, whose mean over examples is the recorded unit-weighted mean
accuracy (checked: a seed whose refit does not reproduce the record to :data:`SCORE_TOLERANCE` leaves the
bootstrap out). The effect per seed is ``100 (1/N) sum_i (c_si(dropout) - c_si(none))``, so the interval is the
hull of the t interval over seeds and a paired bootstrap over seeds and test examples
(:func:`normdrop.claims.small_family.example_estimate`). Runs without kept weights (stored before the small family
kept them) fall back to the t interval, and the note says the test-set error is then left out. The probes'
training-set variability is in the seed term: each seed fits on its own training subset. The secondaries keep the
t interval over seeds alone, and their notes say so.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment, small_arm, small_label
from normdrop.claims.figures import finish, legend, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import final_unit_probe_scores, mean_of, records
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.claims.small_family import example_estimate
from normdrop.probes.coadaptation import ABLATION_EXAMPLES, TEST_EXAMPLES
from normdrop.spec import RunResult
from normdrop.stats import paired_difference, paired_log_ratio

MISSING_USEFULNESS = (
    "the runs' coadaptation records have no unit_probe_accuracy (runs missing, failed or diverged, or stored before "
    "the probe measured individual usefulness: re-run them)"
)


SCORE_TOLERANCE = 1e-6
"""Largest |100 x mean of the per-example scores - the recorded effect| (pp) for the refitted per-example probe scores
to count as those of the primary (float rounding of the records only)."""
SEED_ONLY = "t interval over seeds only (the test set's sampling error is not included)"
"""What the secondaries' notes say about their intervals."""


def final_rows(result: RunResult | None) -> list[dict[str, Any]]:
    """The coadaptation layer rows at a finished run's last step."""
    if result is None or result.status != "finished":
        return []
    return records(result, "coadaptation", unit=None, step=result.spec.steps)


def final_layer_mean(result: RunResult | None, field: str) -> float | None:
    """Mean over layers of a coadaptation field at the run's last step."""
    return mean_of(r.get(field) for r in final_rows(result))


def unit_mean(result: RunResult | None, field: str) -> float | None:
    """Mean over every hidden unit of a per-layer mean field (layers weighted by their number of units)."""
    rows = [r for r in final_rows(result) if r.get(field) is not None and r.get("units")]
    total = sum(int(r["units"]) for r in rows)
    return sum(float(r[field]) * int(r["units"]) for r in rows) / total if total else None


class DropoutCoadapt(Claim):
    id = "dropout-coadapt"
    title = "Dropout prevents co-adaptation"
    statement = "Dropout stops hidden units from co-adapting, so features are more individually useful."
    mechanism = (
        "Without dropout, a unit can become useful only in combination with particular other units - fixing "
        "their mistakes or copying their signal. Srivastava et al. (2014) call this co-adaptation. When any unit "
        "may vanish at any step, such partnerships are unreliable, so each unit is pushed to detect something "
        "useful on its own: a single unit should then tell the classes apart better by itself, the network should "
        "rely less on any one unit, and, as the paper observed, activations become sparser."
    )
    rationale = (
        "'Individually useful' is measured directly: each hidden unit alone is given to a one-feature linear "
        "classifier (one-feature LDA, fitted on the run's training examples, scored on the test set), and the mean "
        "accuracy over units is compared between the plain small network trained with and without dropout (the "
        "dropout-overfit runs, same evaluation seeds, each seed its own training subset); every seed is scored on "
        "the same test examples, so the interval also resamples them (it includes the test set's sampling error), "
        "from the probes refitted on the kept final networks. Beside it: how much test "
        "accuracy drops when one unit is zeroed (reliance on single units), and the old redundancy measures "
        "(correlation between units, DeCov, sparsity). Limits: one-feature probes see only what a unit says "
        "alone, not how it combines with others; the probe's chance level is the frequency of the most common "
        "class; two hidden layers."
    )
    caveats = (
        "Co-adaptation is defined only informally in the paper. A higher single-unit accuracy can also come from "
        "redundancy: dropout may copy a useful feature into several units to survive deletion, which makes each "
        "copy individually useful and correlated with the others - so the usefulness and the correlation "
        "measures can disagree. The ablation drop measures robustness to deleting one unit, which dropout trains "
        "for directly, so it is expected to shrink whatever happens to co-adaptation."
    )
    probes = ("coadaptation",)
    references = ("Srivastava et al. 2014, sections 1 and 7.1, figure 8", "Cogswell et al. 2016 (DeCov)")
    budget_reanalysis = False
    NULL_PP = 0.0
    """The primary's null: no difference in mean single-unit probe accuracy (percentage points)."""

    def arms(self, setting: StudySetting) -> dict[float, str]:
        """Dropout p -> arm label, for every p of the grid (the shared plain small-family runs)."""
        return {p: small_label("none", p) for p in setting.dropout_grid}

    def experiment(self, setting: StudySetting) -> Experiment:
        arms = {}
        for p in setting.dropout_grid:
            label, specs = small_arm(setting, "none", p)
            arms[label] = specs
        spec = setting.spec("small")
        return Experiment(
            arms=arms,
            description=(
                f"The plain small-family runs of dropout-overfit ({spec.model} depth {spec.depth} width "
                f"{spec.width}, {setting.small_train_size} training examples drawn per seed, {spec.steps} steps, "
                f"dropout p in {list(setting.dropout_grid)}), with the coadaptation probe at the first and the last "
                f"step; individual usefulness at the last step: one-feature probes fitted on the run's training "
                f"examples and scored on the first {TEST_EXAMPLES} test examples, ablations on the first "
                f"{ABLATION_EXAMPLES}; evaluation seeds {setting.seed_list}; nothing is chosen from the data."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        s = data.setting
        p = s.primary_dropout
        labels = self.arms(s)

        def by_p(reader: Any, field: str) -> dict[float, dict[int, float | None]]:
            return {q: {seed: reader(r, field) for seed, r in data.runs(label).items()} for q, label in labels.items()}

        usefulness = by_p(unit_mean, "unit_probe_accuracy")
        spec = s.spec("small")
        scope = (
            f"{spec.model} depth {spec.depth} x {spec.width}, {s.small_train_size} training examples per seed, "
            f"{spec.steps} steps, measured at the last step on {s.dataset}'s test set; dropout {p:g} vs 0 fixed in "
            "advance, no choice made from data."
        )
        effect = paired_difference(usefulness[p], usefulness[0.0], scale=100)
        estimate, interval = example_estimate(
            effect,
            example_differences(data, labels[p], labels[0.0], set(effect)),
            scale=100.0,
            missing="the runs kept no final weights to score the probes per test example",
            bootstrap="a paired bootstrap",
            tolerance=SCORE_TOLERANCE,
        )
        primary = measure(
            f"single-unit probe accuracy, dropout {p:g} minus none",
            "test accuracy of a one-feature linear probe per hidden unit, mean over units, with minus without "
            "dropout, percentage points",
            effect,
            "increase",
            null=self.NULL_PP,
            unit="pp",
            note=f"{scope} {interval[0].upper()}{interval[1:]}.",
            unmeasurable=None if effect else MISSING_USEFULNESS,
            estimate=estimate,
        )
        correlation = by_p(final_layer_mean, "mean_abs_correlation")
        decov = by_p(final_layer_mean, "decov")
        active = by_p(final_layer_mean, "active_fraction")
        ablation = by_p(unit_mean, "ablation_drop")
        secondary = [
            measure(
                f"accuracy drop when one unit is zeroed, dropout {p:g} minus none",
                "test-accuracy drop when a single hidden unit is set to 0, mean over units, with minus without "
                "dropout, percentage points (negative = the network relies less on any one unit)",
                paired_difference(ablation[p], ablation[0.0], scale=100),
                "decrease",
                unit="pp",
                note=(
                    "Dropout trains for robustness to deleted units directly, so this is expected to fall. "
                    f"{SEED_ONLY}."
                ),
            ),
            measure(
                f"mean |correlation| between units, without / with dropout {p:g}",
                "ln(mean |corr| without dropout / with dropout), mean over hidden layers, end of training",
                paired_log_ratio(correlation[0.0], correlation[p]),
                "increase",
                unit="ln ratio",
                note=f"{SEED_ONLY}.",
            ),
            measure(
                f"DeCov, without / with dropout {p:g}",
                "ln(DeCov without / with dropout)",
                paired_log_ratio(decov[0.0], decov[p]),
                "increase",
                unit="ln ratio",
                note=f"{SEED_ONLY}.",
            ),
            measure(
                f"fraction of active units, with dropout {p:g} minus without",
                "fraction of ReLU units > 0 per example, with minus without dropout (negative = sparser)",
                paired_difference(active[p], active[0.0]),
                "decrease",
                unit="fraction",
                note=f"The dropout paper reports sparser activations with dropout (figure 8). {SEED_ONLY}.",
            ),
        ]
        figures = [_versus_p(data, usefulness, ablation, correlation)] if data.draw else []
        return Analysis(primary, secondary, figures)


def example_differences(data: ClaimData, with_label: str, without_label: str, seeds: set[int]) -> dict[int, Any]:
    """Seed -> per-test-example score with dropout minus without (:func:`final_unit_probe_scores`), for the seeds
    in ``seeds`` where both runs kept their final weights on one test set."""
    with_runs, without_runs = data.runs(with_label), data.runs(without_label)
    out = {}
    for seed in sorted(seeds):
        a, b = final_unit_probe_scores(with_runs.get(seed)), final_unit_probe_scores(without_runs.get(seed))
        if a is not None and b is not None and a.shape == b.shape:
            out[seed] = a - b
    return out


def _versus_p(data: ClaimData, usefulness: dict[float, Any], ablation: dict[float, Any], correlation: Any) -> Any:
    figure, axes = new_figure(ncols=3, width=8.4)
    grid = list(data.setting.dropout_grid)
    seeds = data.setting.seed_list
    scaled = {q: {s: None if v is None else 100 * v for s, v in values.items()} for q, values in usefulness.items()}
    dropped = {q: {s: None if v is None else 100 * v for s, v in values.items()} for q, values in ablation.items()}
    plot_band(axes[0], grid, seeds_by_x(scaled, seeds), "mean over hidden units", key="dropout", marker="o")
    plot_band(axes[1], grid, seeds_by_x(dropped, seeds), "mean over hidden units", key="dropout", marker="o")
    plot_band(axes[2], grid, seeds_by_x(correlation, seeds), "mean over hidden layers", key="dropout", marker="o")
    axes[0].set_ylabel("single-unit probe test accuracy (%)")
    axes[1].set_ylabel("accuracy drop, one unit zeroed (pp)")
    axes[2].set_ylabel("mean |correlation| between units")
    for ax in axes:
        ax.set_xlabel("dropout probability p")
        legend(ax, fontsize=7)
    return finish(
        figure,
        "Individual usefulness, reliance and redundancy of units vs dropout rate",
        "At the end of training, in inference mode: left, the test accuracy of a one-feature linear probe on each "
        "hidden unit alone (mean over units); middle, the test-accuracy drop when one unit is zeroed (mean over "
        "units); right, the mean |correlation| between units on 256 training examples. Mean over evaluation seeds "
        "with 95% bands.",
    )


CLAIM = DropoutCoadapt()
