"""bn-regularizes: BN has a slight regularizing effect, from the noise of batch statistics.

Small-family runs (500 training examples, which a 2-layer MLP fits perfectly) with and without BN. Comparing test
accuracy at the end would mix regularization with speed, so the networks are compared where each first reaches the
same training accuracy (``normdrop.probes.gap_at_train_accuracy``, linear interpolation between evaluations): the
highest accuracy every run of the main arms reaches, capped at 95%. Effect per seed: test accuracy with BN minus
without, at that matched training accuracy, in percentage points; positive = BN generalizes better for the same
fit. Batch size changes the noise of BN's statistics (Hoffer et al. 2017 "ghost batch norm" make that noise a knob):
the same comparison at other batch sizes shows whether smaller, noisier batches regularize more.
"""

from __future__ import annotations

from typing import Any

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, small_arm, small_label
from normdrop.claims.figures import LABELS, color, finish, legend, message_figure, new_figure, plot_band, seeds_by_x
from normdrop.claims.readers import curve
from normdrop.claims.results import Analysis, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult
from normdrop.stats import paired_difference

MATCH_CAP = 0.95
FAMILY_BATCH = 100


def batch_label(setting: StudySetting, norm: str, batch_size: int) -> str:
    """The arm of one norm and batch size (the family's batch size has the plain small-family label)."""
    if batch_size == FAMILY_BATCH:
        return small_label(norm, 0.0)
    return small_label(norm, 0.0, **same_epochs(setting, batch_size))


def same_epochs(setting: StudySetting, batch_size: int) -> dict[str, int]:
    """Spec fields of a run at ``batch_size`` that sees as many epochs (and evaluations) as the family's runs."""
    spec = setting.spec("small")
    scale = FAMILY_BATCH / batch_size
    return {
        "batch_size": batch_size,
        "steps": max(1, round(spec.steps * scale)),
        "eval_every": max(1, round(spec.eval_every * scale)),
    }


def matched_target(results: list[RunResult]) -> float | None:
    """The highest training accuracy every run reaches, capped at :data:`MATCH_CAP`."""
    from normdrop.probes import common_train_accuracy

    if not results:
        return None
    return min(MATCH_CAP, common_train_accuracy([r.metrics for r in results]))


def accuracy_at_matched(result: RunResult | None, target: float) -> float | None:
    """Test accuracy where the run first reaches ``target`` training accuracy (None if it never does)."""
    from normdrop.probes import gap_at_train_accuracy

    if result is None or result.status != "finished":
        return None
    matched = gap_at_train_accuracy(result.metrics, target)
    return None if matched is None else float(matched["test_accuracy"])


def matched_effect(data: ClaimData, batch_size: int, target: float) -> dict[int, float]:
    """Seed -> 100 x (test accuracy with BN - without) at the matched training accuracy."""
    with_bn = {
        s: accuracy_at_matched(r, target) for s, r in data.runs(batch_label(data.setting, "batch", batch_size)).items()
    }
    without = {
        s: accuracy_at_matched(r, target) for s, r in data.runs(batch_label(data.setting, "none", batch_size)).items()
    }
    return paired_difference(with_bn, without, scale=100)


class BNRegularizes(Claim):
    id = "bn-regularizes"
    title = "BN regularizes"
    statement = "BN has a slight regularizing effect, through the noise of its batch statistics."
    mechanism = (
        "In training, BN normalizes each example with the mean and variance of the other examples that happen to "
        "share its mini-batch, so the same example is transformed slightly differently every time it is seen. "
        "Like dropout, this noise can keep the network from fitting individual training examples too exactly. "
        "Smaller batches give noisier statistics, hence more noise."
    )
    rationale = (
        "A 2-layer MLP (128 units) with Adam on 500 training examples overfits within the budget, which makes a "
        "regularizer visible. The two arms are compared at matched training accuracy, since BN also changes how "
        "fast the training set is fitted. Batch sizes 25 to 400, each trained for the same number of epochs, vary "
        "the noise of the batch statistics. Limits: one small network and dataset; a matched point between "
        "evaluations is interpolated; batch size also changes SGD's own noise, which the comparison with the plain "
        "network at the same batch size removes."
    )
    caveats = (
        "The effect is usually described as slight (Ioffe & Szegedy 2015 reduced dropout and L2 with BN, but did "
        "not isolate the regularization). Luo et al. (2019) analyse BN's regularization as coming from the batch "
        "statistics' noise; Bjorck et al. (2018) attribute most of BN's generalization benefit to the larger "
        "learning rates it allows, not to this noise, which a comparison at equal learning rate (as here) does not "
        "include."
    )
    references = ("Ioffe & Szegedy 2015, section 3.4", "Hoffer, Hubara & Soudry 2017", "Luo et al. 2019")

    def experiment(self, setting: StudySetting) -> Experiment:
        arms: dict[str, list[Any]] = {}
        for batch_size in setting.batch_sizes:
            for norm in NORMS:
                fields = {} if batch_size == FAMILY_BATCH else same_epochs(setting, batch_size)
                label, specs = small_arm(setting, norm, 0.0, **fields)
                arms[label] = specs
        spec = setting.spec("small")
        return Experiment(
            arms=arms,
            description=(
                f"MLP {spec.depth} x {spec.width} on {setting.small_train_size} training examples of "
                f"{setting.dataset}, Adam lr {spec.lr:g}, {spec.steps} steps, evaluated every {spec.eval_every} "
                f"steps; BN vs none at batch sizes {list(setting.batch_sizes)} (primary: {FAMILY_BATCH}); seeds "
                f"{setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        main = [r for norm in NORMS for r in data.finished(batch_label(data.setting, norm, FAMILY_BATCH)).values()]
        target = matched_target(main)
        metric = "test accuracy with BN minus without, at matched training accuracy (percentage points)"
        if target is None:
            reason = "no run of the main arms finished"
            return Analysis(
                not_measurable("test accuracy at matched training accuracy", metric, "increase", reason),
                figures=[message_figure("Test vs training accuracy", reason)],
            )
        primary = measure(
            f"test accuracy at matched training accuracy ({target:.1%}), BN minus none",
            metric,
            matched_effect(data, FAMILY_BATCH, target),
            "increase",
            unit="pp",
        )
        sizes = sorted(data.setting.batch_sizes)
        secondary = [
            measure(
                f"same at batch size {bs}",
                metric,
                matched_effect(data, bs, target),
                "increase",
                unit="pp",
            )
            for bs in sizes
            if bs != FAMILY_BATCH
        ]
        if len(sizes) >= 2:
            small, large = matched_effect(data, sizes[0], target), matched_effect(data, sizes[-1], target)
            secondary.append(
                measure(
                    f"BN's benefit at batch {sizes[0]} minus at batch {sizes[-1]} (smaller batches regularize more?)",
                    "difference of the BN-minus-none effects (percentage points)",
                    paired_difference(small, large),
                    "increase",
                    unit="pp",
                )
            )
        findings = [f"Matched training accuracy: {target:.1%} (the highest all main runs reach, capped at 95%)."]
        return Analysis(primary, secondary, [_trajectories(data, target), _by_batch(data, target)], [], findings)


def _trajectories(data: ClaimData, target: float) -> Any:
    figure, ax = new_figure()
    for norm in NORMS:
        for index, result in enumerate(data.finished(batch_label(data.setting, norm, FAMILY_BATCH)).values()):
            _, train = curve(result, "train_accuracy")
            _, test = curve(result, "test_accuracy")
            ax.plot(train, test, color=color(norm), alpha=0.6, linewidth=1, label=LABELS[norm] if index == 0 else None)
    ax.axvline(target, color="#333", linestyle=":", label=f"matched training accuracy {target:.1%}")
    ax.set_xlabel("training accuracy (fraction)")
    ax.set_ylabel("test accuracy (fraction)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Test vs training accuracy during training",
        "Each line is one seed's run, from initialization (bottom left) to the end of training; at the dotted line "
        "both arms fit the training set equally well, and the vertical gap between them is the effect measured.",
    )


def _by_batch(data: ClaimData, target: float) -> Any:
    sizes = sorted(data.setting.batch_sizes)
    if not sizes:
        return message_figure("Effect vs batch size", "no batch sizes")
    figure, ax = new_figure(height=3.0)
    effects = {bs: matched_effect(data, bs, target) for bs in sizes}
    plot_band(ax, sizes, seeds_by_x(effects, data.setting.seed_list), "BN minus none", key="batch", marker="o")
    ax.axhline(0, color="#333", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (log scale)")
    ax.set_ylabel("test accuracy difference (pp)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "BN's effect on generalization vs batch size",
        f"Test accuracy with BN minus without at {target:.1%} training accuracy, mean over seeds with 95% band.",
    )


CLAIM = BNRegularizes()
