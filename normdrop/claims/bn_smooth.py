"""bn-smooth: BN makes optimization better behaved (Santurkar, Tsipras, Ilyas & Madry 2018).

Probed deep runs (BN vs none, evaluation seeds), each arm at ``PROBE_FRACTION`` (1/2) of its OWN stability limit:
the geometric mean over the selection seeds of the largest rate that trains within 90% of the seed's best
accuracy (bn-higher-lr's definition (b)), bisected to x1.25
(:func:`normdrop.claims.stability.probe_rates`), so the arms are compared at the same distance from divergence
instead of at one shared rate. The ``landscape`` probe moves the weights along the gradient by 1/4 to 4 times the
learning rate and records the range of the loss, the change of the gradient (predictiveness) and the effective
beta-smoothness max ||delta grad|| / ||eta g||; the ``curvature`` probe the top Hessian eigenvalue (BN on batch
statistics). Effect per seed: ln(value without BN / with BN); positive = BN smoother.

**Primary**: beta-smoothness averaged over the probe steps after initialization (the training trajectory, as in
the paper), fixed here. Step 0 (initialization, before any update) is reported separately, and the average over
all probe steps including step 0 beside it, with a finding that says whether including step 0 changes the
verdict: at initialization the two arms are different functions of the same-law weights, not a result of training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NORMS, Experiment, probed_spec
from normdrop.claims.figures import LABELS, align, finish, legend, new_figure, plot_band, reason_figures
from normdrop.claims.readers import final, mean_of, records
from normdrop.claims.results import Analysis, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.claims.stability import PROBE_FRACTION, probe_rates, probed_arms_from, probed_runs, selection_limits
from normdrop.spec import RunResult, RunSpec
from normdrop.stats import bootstrap_interval, paired_log_ratio

LANDSCAPE_FIELDS = {
    "beta_smoothness": "effective beta-smoothness, max ||grad L(w) - grad L(w - eta g)|| / ||eta g||",
    "grad_change_max": "gradient predictiveness, max ||grad L(w) - grad L(w - eta g)||",
    "loss_range": "loss variation, max - min of L(w - eta g) over eta",
}
STEPS = {"trained": "probe steps after initialization", "init": "step 0 (initialization)", "all": "all probe steps"}


def _keep(step: int, which: str) -> bool:
    return {"trained": step > 0, "init": step == 0, "all": True}[which]


def landscape_mean(result: RunResult | None, field: str, which: str = "trained") -> float | None:
    """Mean over the probe steps ``which`` selects (see :data:`STEPS`) of a landscape summary field (the record
    with ``eta=None``)."""
    return mean_of(r.get(field) for r in records(result, "landscape", eta=None) if _keep(r["step"], which))


def top_eigenvalue(result: RunResult | None, which: str = "trained") -> float | None:
    """Mean over the probe steps ``which`` selects of |top Hessian eigenvalue| (BN on batch statistics, or no BN)."""
    return mean_of(
        abs(r["top_eigenvalue"])
        for r in records(result, "curvature")
        if _keep(r["step"], which) and r.get("bn_mode") in ("batch", "no_bn") and r.get("top_eigenvalue") is not None
    )


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
        "Probed deep-net runs (BN vs none, evaluation seeds) measure the loss along the gradient at step sizes "
        "from 1/4 to 4 times the learning rate (landscape probe) and the top Hessian eigenvalue (curvature probe) "
        "at initialization and a few times during training, on a fixed batch of 256 training examples. Each arm "
        "trains at half of its own stability limit (the largest rate that trains within 90% of the seed's best "
        "accuracy, bisected on the selection seeds), so both are probed equally far from their limits. The verdict "
        "averages the probe steps after "
        "initialization (the trajectory Santurkar et al. measured); step 0 is reported separately, and so is the "
        "average over all steps. Limits: a few probe points, one batch; 'smooth' is measured in each network's "
        "own parametrization, so BN and plain networks are different functions of different weights."
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
        spec = probed_spec(setting, "batch", 0.1, 0)

        def extend(results: Mapping[str, RunResult]) -> dict[str, tuple[list[RunSpec], list[int] | None]]:
            return probed_arms_from(setting, results)

        return Experiment(
            extend=extend,
            description=(
                f"Selection seeds {setting.selection_seed_list}: each arm's largest usable rate by bisection "
                "(within 90% of the seed's best accuracy) "
                f"(shared with bn-stable-inputs). Evaluation seeds {setting.seed_list}: the deep net ({spec.model}, "
                f"depth {spec.depth}, {spec.optimizer}, {spec.steps} steps, {setting.dataset}) with and without BN, "
                f"each at {PROBE_FRACTION:g} x its own limit, probes {', '.join(spec.probes)} at step 0 and every "
                f"{spec.probe_every} steps on the first {spec.probe_batch_size} training examples."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        setting = data.setting
        metric = "ln(beta without BN / with BN); beta = " + LANDSCAPE_FIELDS["beta_smoothness"]
        name = "effective beta-smoothness after initialization, without BN / with BN"
        rates = probe_rates(setting, data.choice_results)
        half = probed_spec(setting, "batch", 0.1, 0).steps
        if not rates or set(rates) != set(NORMS):
            reason = "the selection seeds' stability limits are not all known (a bisection run is missing or failed)"
            return Analysis(
                not_measurable(name, metric, "increase", reason), figures=reason_figures(self.title, reason, data.draw)
            )
        limits = selection_limits(setting, data.choice_results)
        censored = [f"{LABELS[n]} {c} {v:.3g}" for n in NORMS for v, c in limits[n] if c]
        note = (
            f"Each arm at {PROBE_FRACTION:g} x its own stability limit (geometric mean over selection seeds "
            f"{setting.selection_seed_list} of the bisected largest rate that trains within 90% of the seed's "
            f"best): lr {rates['none']:.3g} "
            f"without BN, {rates['batch']:.3g} with BN; {half} steps (half the family's budget) on {setting.dataset}; "
            f"averaged over probe steps after 0, on evaluation seeds {setting.seed_list}"
            + (f"; limits censored by the bisection range: {', '.join(censored)}" if censored else "")
        )
        runs = probed_runs(setting, data.results, rates)
        values = {
            (field, which): {
                norm: {s: landscape_mean(r, field, which) for s, r in runs[norm].items()} for norm in NORMS
            }
            for field in LANDSCAPE_FIELDS
            for which in STEPS
        }

        def ratio(field: str, which: str) -> dict[int, float]:
            return paired_log_ratio(values[(field, which)]["none"], values[(field, which)]["batch"])

        primary = measure(name, metric, ratio("beta_smoothness", "trained"), "increase", unit="ln ratio", note=note)
        secondary = [
            measure(
                f"effective beta-smoothness, {STEPS[which]}, without BN / with BN",
                f"ln(beta without BN / with BN) over {STEPS[which]}",
                ratio("beta_smoothness", which),
                "increase",
                unit="ln ratio",
            )
            for which in ("init", "all")
        ]
        secondary += [
            measure(
                f"{LANDSCAPE_FIELDS[field].split(',')[0]}, without BN / with BN",
                f"ln(value without BN / with BN) after initialization; {LANDSCAPE_FIELDS[field]}",
                ratio(field, "trained"),
                "increase",
                unit="ln ratio",
            )
            for field in ("grad_change_max", "loss_range")
        ]
        for which in ("trained", "init"):
            eigen = {norm: {s: top_eigenvalue(r, which) for s, r in runs[norm].items()} for norm in NORMS}
            secondary.append(
                measure(
                    f"top Hessian eigenvalue, {STEPS[which]}, without BN / with BN",
                    f"ln(|lambda_max| without BN / with BN) over {STEPS[which]}, BN on batch statistics",
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
        with_init = secondary[1]
        findings = [
            f"Probe rates (half of each arm's own limit, selection seeds): {rates['none']:.3g} without BN, "
            f"{rates['batch']:.3g} with BN.",
            f"Step 0 alone: {secondary[0].verdict}; all steps including step 0: {with_init.verdict}; the verdict "
            f"(after initialization) is {primary.verdict}"
            + (
                " -- including step 0 does not change it."
                if with_init.verdict == primary.verdict
                else " -- including step 0 changes it, so the verdict describes training, not initialization."
            ),
        ]
        for norm in NORMS:
            beta = mean_of(values[("beta_smoothness", "trained")][norm].values())
            beta0 = mean_of(values[("beta_smoothness", "init")][norm].values())
            if beta is not None:
                findings.append(
                    f"{LABELS[norm]}: mean beta-smoothness {beta:.3g} after initialization"
                    + (f", {beta0:.3g} at step 0" if beta0 is not None else "")
                    + "."
                )
        figures = [_over_training(runs), _curvature(runs)] if data.draw else []
        return Analysis(primary, secondary, figures, [], findings)


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
