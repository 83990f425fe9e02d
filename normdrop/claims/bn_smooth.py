"""bn-smooth: BN makes optimization better behaved (Santurkar, Tsipras, Ilyas & Madry 2018).

On the probed deep runs (BN vs none, same learning rate and seeds), the ``landscape`` probe moves the weights along
the gradient by step sizes from 1/4 to 4 times the learning rate and records the range of the loss, the change of the
gradient (predictiveness) and the effective beta-smoothness max ||delta grad|| / ||eta g||; the ``curvature`` probe
the top Hessian eigenvalue (power iteration on Hessian-vector products, BN on batch statistics: the loss the
optimizer descends). Each is averaged over the probe steps after initialization. Effect per seed: ln(value without
BN / with BN); positive = BN smoother. The verdict is on the effective beta-smoothness, the paper's headline
quantity. The learning-rate grid runs of bn-faster give the sensitivity to the learning rate (how many grid values
end within 90% of the best training accuracy), and the probed runs the seed-to-seed spread of the final test
accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.bn_higher_lr import is_stable
from normdrop.claims.experiment import NORMS, Experiment, lr_grid_arms, lr_label, probed_deep_arms, probed_label
from normdrop.claims.figures import LABELS, align, finish, legend, new_figure, plot_band
from normdrop.claims.readers import final, mean_of, records
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult
from normdrop.stats import bootstrap_interval, paired_difference, paired_log_ratio

LANDSCAPE_FIELDS = {
    "beta_smoothness": "effective beta-smoothness, max ||grad L(w) - grad L(w - eta g)|| / ||eta g||",
    "grad_change_max": "gradient predictiveness, max ||grad L(w) - grad L(w - eta g)||",
    "loss_range": "loss variation, max - min of L(w - eta g) over eta",
}


def landscape_mean(result: RunResult | None, field: str) -> float | None:
    """Mean over the probe steps after 0 of a landscape summary field (the record with ``eta=None``)."""
    return mean_of(r.get(field) for r in records(result, "landscape", eta=None) if r["step"] > 0)


def top_eigenvalue(result: RunResult | None) -> float | None:
    """Mean over probe steps after 0 of |top Hessian eigenvalue| (BN on batch statistics, or no BN)."""
    return mean_of(
        abs(r["top_eigenvalue"])
        for r in records(result, "curvature")
        if r["step"] > 0 and r.get("bn_mode") in ("batch", "no_bn") and r.get("top_eigenvalue") is not None
    )


GOOD_FRACTION = 0.9


def good_learning_rates(data: ClaimData, norm: str) -> dict[int, float]:
    """Seed -> how many learning rates of the grid end within 90% of that seed's best final training accuracy (an
    unstable run counts as accuracy 0): the width of the range of good learning rates, which is scale-free."""
    out = {}
    for seed in data.setting.seed_list:
        accuracies = []
        for lr in data.setting.lr_grid:
            result = data.runs(lr_label(norm, lr)).get(seed)
            stable = is_stable(result)
            if stable is None:
                break
            accuracies.append((final(result, "train_accuracy") or 0.0) if stable else 0.0)
        else:
            best = max(accuracies)
            if best > 0:
                out[seed] = float(sum(a >= GOOD_FRACTION * best for a in accuracies))
    return out


def _log_std_ratio(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = float(np.std(a, ddof=1)), float(np.std(b, ddof=1))
    return math.log(sa / sb) if sa > 0 and sb > 0 else math.nan


class BNSmooth(Claim):
    id = "bn-smooth"
    title = "BN smooths optimization"
    statement = (
        "BN makes optimization better behaved: a smoother loss landscape, more predictive gradients, and less "
        "sensitivity to the seed and the learning rate."
    )
    mechanism = (
        "Gradient descent assumes the gradient at the current point still points downhill a little further on. "
        "If the loss surface is rough, a step of the usual size lands somewhere the gradient is very different, "
        "and training must use small steps. Santurkar et al. (2018) argue that BN re-parametrizes the network so "
        "that the loss and its gradient change more slowly along the directions training moves in, which makes "
        "larger, more reliable steps possible."
    )
    rationale = (
        "The probed deep MLP runs (BN vs none, learning rate 0.1, same seeds) measure the loss along the "
        "gradient at step sizes from 1/4 to 4 times the learning rate (landscape probe) and the top Hessian "
        "eigenvalue (curvature probe) a few times during training, on a fixed batch of 256 training examples. "
        "Limits: a few probe points, one batch, one learning rate; 'smooth' is measured in the parametrization "
        "each network has, so BN and plain networks are different functions of different weights."
    )
    caveats = (
        "Santurkar et al. (2018) measured the landscape along the training trajectory, not globally. The top "
        "Hessian eigenvalue of a BN network depends on the weight scale (BN makes the loss invariant to scaling "
        "the weights before it, so curvature falls as weights grow); Ghorbani, Krishnan & Xiao (2019) relate BN to "
        "the removal of large outlier eigenvalues. Lower curvature at the same learning rate is consistent with, "
        "but does not prove, the smoothness explanation."
    )
    probes = ("landscape", "curvature")
    references = ("Santurkar et al. 2018, section 3 and figure 4", "Ghorbani, Krishnan & Xiao 2019")

    def experiment(self, setting: StudySetting) -> Experiment:
        probed = probed_deep_arms(setting)
        spec = next(iter(probed.values()))[0]
        return Experiment(
            arms={**probed, **lr_grid_arms(setting)},
            description=(
                f"The probed deep MLP runs of bn-stable-inputs (learning rate {spec.lr:g}, probes every "
                f"{spec.probe_every} steps), plus the learning-rate grid runs of bn-faster for the sensitivity to "
                f"the learning rate; BN vs none, seeds {setting.seed_list}."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        runs = {norm: data.finished(probed_label(norm)) for norm in NORMS}
        values = {
            field: {norm: {seed: landscape_mean(r, field) for seed, r in runs[norm].items()} for norm in NORMS}
            for field in LANDSCAPE_FIELDS
        }
        primary = measure(
            "effective beta-smoothness, without BN / with BN",
            "ln(beta without BN / with BN); beta = " + LANDSCAPE_FIELDS["beta_smoothness"],
            paired_log_ratio(values["beta_smoothness"]["none"], values["beta_smoothness"]["batch"]),
            "increase",
            unit="ln ratio",
        )
        secondary = [
            measure(
                f"{LANDSCAPE_FIELDS[field].split(',')[0]}, without BN / with BN",
                f"ln(value without BN / with BN); {LANDSCAPE_FIELDS[field]}",
                paired_log_ratio(values[field]["none"], values[field]["batch"]),
                "increase",
                unit="ln ratio",
            )
            for field in ("grad_change_max", "loss_range")
        ]
        eigen = {norm: {seed: top_eigenvalue(r) for seed, r in runs[norm].items()} for norm in NORMS}
        secondary.append(
            measure(
                "top Hessian eigenvalue, without BN / with BN",
                "ln(|lambda_max| without BN / with BN), BN on batch statistics",
                paired_log_ratio(eigen["none"], eigen["batch"]),
                "increase",
                unit="ln ratio",
            )
        )
        accuracy = {norm: [final(r, "test_accuracy") for r in runs[norm].values()] for norm in NORMS}
        spread = bootstrap_interval([accuracy["none"], accuracy["batch"]], _log_std_ratio)
        secondary.append(
            measure(
                "seed-to-seed spread of test accuracy, without BN / with BN",
                "ln(std over seeds of final test accuracy without BN / with BN), percentile bootstrap",
                {},
                "increase",
                unit="ln ratio",
                estimate=spread,
                unmeasurable="fewer than two finished runs per arm, or no spread at all",
            )
        )
        good = {norm: good_learning_rates(data, norm) for norm in NORMS}
        secondary.append(
            measure(
                "width of the range of good learning rates, BN minus none",
                f"grid learning rates (of {len(data.setting.lr_grid)}) ending within 90% of the seed's best final "
                "training accuracy, BN minus none",
                paired_difference(good["batch"], good["none"]),
                "increase",
                unit="grid values",
            )
        )
        findings = []
        for norm in NORMS:
            beta = mean_of(values["beta_smoothness"][norm].values())
            eig = mean_of(eigen[norm].values())
            if beta is not None:
                findings.append(
                    f"{LABELS[norm]}: mean beta-smoothness {beta:.3g}"
                    + (f", mean top Hessian eigenvalue {eig:.3g}" if eig is not None else "")
                    + "."
                )
        return Analysis(primary, secondary, [_over_training(runs), _curvature(runs)], [], findings)


def _field_curves(results: dict[int, RunResult], field: str, probe: str = "landscape") -> tuple[Any, Any]:
    curves = []
    for result in results.values():
        rows = sorted(
            (r["step"], r[field])
            for r in records(result, probe)
            if r.get(field) is not None and (probe != "landscape" or r.get("eta") is None)
        )
        if rows:
            curves.append((np.array([s for s, _ in rows], float), np.array([v for _, v in rows], float)))
    return align(curves) if curves else (None, None)


def _over_training(runs: dict[str, dict[int, RunResult]]) -> Any:
    figure, axes = new_figure(ncols=3, height=3.0, width=7.4)
    for ax, field in zip(axes, ("loss_range", "grad_change_max", "beta_smoothness"), strict=True):
        for norm in NORMS:
            steps, table = _field_curves(runs[norm], field)
            if steps is not None:
                plot_band(ax, steps, table, LABELS[norm], key=norm, marker="o")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        legend(ax, fontsize=7)
    axes[0].set_ylabel("loss range (nats)")
    axes[1].set_ylabel("max gradient change (L2)")
    axes[2].set_ylabel("beta (grad change / step length)")
    for ax, title in zip(axes, ("loss variation", "gradient predictiveness", "effective smoothness"), strict=True):
        ax.set_title(title, fontsize=9)
    return finish(
        figure,
        "Loss landscape along the gradient during training",
        "At each probe step the weights are moved along the gradient by 1/4 to 4 times the learning rate; "
        "lower is smoother. Mean over seeds with 95% bands (log scale), as in figure 4 of Santurkar et al. (2018).",
    )


def _curvature(runs: dict[str, dict[int, RunResult]]) -> Any:
    figure, ax = new_figure(height=3.0)
    for norm in NORMS:
        steps, table = _field_curves(runs[norm], "top_eigenvalue", probe="curvature")
        if steps is not None:
            plot_band(ax, steps, np.abs(table), LABELS[norm], key=norm, marker="o")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("|top Hessian eigenvalue| (log scale)")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Curvature during training",
        "Largest-magnitude Hessian eigenvalue of the training loss on the probe batch (power iteration), BN on "
        "batch statistics; mean over seeds with 95% bands.",
    )


CLAIM = BNSmooth()
