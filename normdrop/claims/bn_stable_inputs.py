"""bn-stable-inputs: BN keeps the distribution of each layer's inputs stable during training.

Two measurements on the probed deep runs (BN vs none at the same learning rate, same seeds):

1. Distribution drift (the claim's own words; Ioffe & Szegedy 2015, figure 1): the ``layer_inputs`` probe gives,
   at each probe step, every layer's pre-activation input on a fixed probe batch. The drift of a layer between two
   probe steps is the Wasserstein-1 distance between its units' input distributions, divided by the units' standard
   deviation (so a network whose signals are small does not look stable just for being small). Per run: the mean
   over layers and probe intervals. Effect per seed: ln(drift without BN / drift with BN); positive = BN is more
   stable. This is the verdict.
2. Internal covariate shift in the gradient sense (Santurkar et al. 2018, definition 2.1), from the ``ics`` probe:
   ||G_i - G'_i|| / ||G_i||, the change of layer i's gradient caused by the update of the layers below it, mean
   over layers 2..L and probe steps. Same effect convention; reported beside the verdict.
3. Santurkar et al.'s control (their section 2.1): BN followed by injected time-varying noise (norm kind "noisy",
   :class:`normdrop.nn.NoisyBatchNorm1d`: a per-channel shift and scale redrawn at every step) makes the next
   layer's input distribution unstable on purpose; if BN helps because it stabilizes inputs, the noisy net should
   lose BN's speed. Measured: its training speed (mean training accuracy over the evaluations of the run, the area
   under the accuracy curve) against BN's, an equivalence test with the margin ``NOISY_MARGIN``, and its drift.

The probed runs are bn-smooth's: each arm at half of its own stability limit (bisected on the selection seeds),
the noisy control at BN's rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import NOISY_NOISE, NORMS, Experiment, probed_spec
from normdrop.claims.figures import LABELS, color, finish, legend, message_figure, new_figure, plot_band, reason_figures
from normdrop.claims.readers import curve, mean_of, records
from normdrop.claims.results import Analysis, measure, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.claims.stability import PROBE_FRACTION, probe_rates, probed_arms_from, probed_runs
from normdrop.spec import RunResult, RunSpec
from normdrop.stats import paired_difference, paired_log_ratio

NOISY_MARGIN = 0.05
"""Equivalence margin of "noisy BN trains about as fast as BN": +-5 points of mean training accuracy over the run
(the area under the accuracy curve), fixed before any data."""


def mean_accuracy(result: RunResult | None) -> float | None:
    """Mean training accuracy over a run's evaluations (the normalized area under its accuracy curve); None for a
    missing run or one with no evaluation."""
    if result is None:
        return None
    _, values = curve(result, "train_accuracy")
    return float(values.mean()) if len(values) else None


def relative_drift(result: RunResult | None) -> float | None:
    """Mean over layers and probe intervals of W1(previous probe step, this one) / std of the layer's input."""
    values = [
        r["w1_prev"] / math.sqrt(r["var"])
        for r in records(result, "layer_inputs", unit=None)
        if r.get("w1_prev") is not None and r.get("var") and r["var"] > 0
    ]
    return mean_of(values)


def drift_by_layer(result: RunResult | None) -> dict[str, float]:
    """Layer -> mean relative drift over probe intervals."""
    by_layer: dict[str, list[float]] = defaultdict(list)
    for r in records(result, "layer_inputs", unit=None):
        if r.get("w1_prev") is not None and r.get("var") and r["var"] > 0:
            by_layer[r["layer"]].append(r["w1_prev"] / math.sqrt(r["var"]))
    return {layer: sum(v) / len(v) for layer, v in by_layer.items()}


def ics_relative(result: RunResult | None, field: str = "ics_relative") -> float | None:
    """Mean over layers 2..L and probe steps of an ``ics`` probe field."""
    return mean_of(r.get(field) for r in records(result, "ics") if r.get("index", 1) >= 2)


def ics_by_layer(result: RunResult | None, field: str) -> dict[int, float]:
    """Layer index -> mean over probe steps of an ``ics`` field."""
    by_layer: dict[int, list[float]] = defaultdict(list)
    for r in records(result, "ics"):
        if r.get(field) is not None and math.isfinite(r[field]):
            by_layer[int(r["index"])].append(float(r[field]))
    return {index: sum(v) / len(v) for index, v in sorted(by_layer.items())}


class BNStableInputs(Claim):
    id = "bn-stable-inputs"
    title = "BN stabilizes layer inputs"
    statement = (
        "BN keeps the distribution of each layer's inputs stable during training (it reduces 'internal covariate "
        "shift')."
    )
    mechanism = (
        "Every update changes the weights of all layers at once, so each layer sees its inputs - the outputs of the "
        "layers below - drift while it is trying to learn from them. Ioffe & Szegedy (2015) called this internal "
        "covariate shift and designed BN to remove it: whatever the layers below do, BN re-centres and re-scales "
        "each unit, so the next layer sees inputs with a fixed mean and spread (up to the slowly learned gamma and "
        "beta)."
    )
    rationale = (
        "Probed deep-net runs (BN vs none, evaluation seeds; each arm at half of its own stability limit bisected "
        "on the selection seeds, shared with bn-smooth) record each layer's pre-activation input on a fixed batch "
        "of 256 training examples at step 0 and several times during training (the layer_inputs probe), and "
        "Santurkar et al.'s gradient-based shift (the ics probe). Drift is measured relative to each layer's "
        "spread, so BN cannot look stable merely because its outputs are small. Santurkar et al.'s control runs "
        "too: BN followed by a random per-channel shift and scale redrawn every step (noisy BN, at BN's rate), "
        "whose training speed is compared with BN's. Limits: few probe points; the two arms train at different "
        "rates (each at the same fraction of its own limit), and a larger rate moves the weights further per step; "
        "the verdict rests on the distributional definition, the claim's own."
    )
    caveats = (
        "Disputed mechanism. Santurkar, Tsipras, Ilyas & Madry (2018) found that BN networks train faster even when "
        "noise is injected after BN to make their input distributions unstable, and that by their gradient-based "
        "definition BN does not reduce internal covariate shift (it can increase it). They attribute BN's benefit "
        "to a smoother loss landscape instead (see bn-smooth). Stable distributions, if measured here, are "
        "therefore not evidence that stability is why BN helps."
    )
    probes = ("layer_inputs", "ics")
    references = ("Ioffe & Szegedy 2015, figure 1", "Santurkar et al. 2018, section 2 and definition 2.1")

    def experiment(self, setting: StudySetting) -> Experiment:
        spec = probed_spec(setting, "batch", 0.1, 0)

        def extend(results: Mapping[str, RunResult]) -> dict[str, tuple[list[RunSpec], list[int] | None]]:
            return probed_arms_from(setting, results, noisy=True)

        return Experiment(
            extend=extend,
            description=(
                f"Selection seeds {setting.selection_seed_list}: each arm's largest usable rate by bisection "
                "(within 90% of the seed's best accuracy). "
                f"Evaluation seeds {setting.seed_list}: the deep net ({spec.model}, depth {spec.depth}, "
                f"{spec.optimizer}, {spec.steps} steps, {setting.dataset}) with BN, without, and with noisy BN "
                f"(noise {NOISY_NOISE:g}: shift U(-{NOISY_NOISE:g}, {NOISY_NOISE:g}), scale in "
                f"[1/{1 + NOISY_NOISE:g}, {1 + NOISY_NOISE:g}] per channel, redrawn every step), BN and none at "
                f"{PROBE_FRACTION:g} x their own limits, noisy BN at BN's rate; probes {', '.join(spec.probes)} at "
                f"step 0 and every {spec.probe_every} steps on the first {spec.probe_batch_size} training examples."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        setting = data.setting
        name = "layer-input drift, without BN / with BN"
        metric = "ln(relative drift without BN / with BN); drift = W1 between successive probe steps / input std"
        rates = probe_rates(setting, data.choice_results)
        half = probed_spec(setting, "batch", 0.1, 0).steps
        if not rates or set(rates) != set(NORMS):
            reason = "the selection seeds' stability limits are not all known (a bisection run is missing or failed)"
            return Analysis(
                not_measurable(name, metric, "increase", reason), figures=reason_figures(self.title, reason, data.draw)
            )
        rates = {**rates, "noisy": rates["batch"]}
        runs = probed_runs(setting, data.results, rates)
        note = (
            f"Probed runs at half of each arm's own stability limit (selection seeds {setting.selection_seed_list}):"
            f" lr {rates['none']:.3g} without BN, {rates['batch']:.3g} with BN; {half} steps (half the "
            f"family's budget) on {setting.dataset}; evaluation seeds {setting.seed_list}"
        )
        drift = {norm: {seed: relative_drift(r) for seed, r in runs[norm].items()} for norm in rates}
        primary = measure(
            name, metric, paired_log_ratio(drift["none"], drift["batch"]), "increase", unit="ln ratio", note=note
        )
        ics = {norm: {seed: ics_relative(r) for seed, r in runs[norm].items()} for norm in NORMS}
        cosine = {norm: {seed: ics_relative(r, "ics_cosine") for seed, r in runs[norm].items()} for norm in NORMS}
        speed = {norm: {seed: mean_accuracy(r) for seed, r in runs[norm].items()} for norm in rates}
        secondary = [
            measure(
                "gradient-based ICS (Santurkar et al.), without BN / with BN",
                "ln(||G - G'|| / ||G|| without BN / with BN), layers 2..L",
                paired_log_ratio(ics["none"], ics["batch"]),
                "increase",
                unit="ln ratio",
                note="Santurkar et al. (2018) report that BN does not reduce this quantity.",
            ),
            measure(
                "cosine(G, G') with BN minus without",
                "mean cos(G, G'), BN minus none (1 = the update below leaves the gradient's direction unchanged)",
                paired_difference(cosine["batch"], cosine["none"]),
                "increase",
                unit="cosine",
            ),
            measure(
                "noisy-BN control: training speed, noisy BN minus BN (Santurkar et al.)",
                "mean training accuracy over the run's evaluations (area under the curve), noisy BN minus BN",
                paired_difference(speed["noisy"], speed["batch"]),
                "equal",
                margin=NOISY_MARGIN,
                unit="fraction",
                note=f"Santurkar et al. (2018): noisy BN trains about as fast as BN; margin +-{NOISY_MARGIN:g}.",
            ),
            measure(
                "noisy-BN control: training speed, noisy BN minus none",
                "mean training accuracy over the run's evaluations, noisy BN minus no BN",
                paired_difference(speed["noisy"], speed["none"]),
                "increase",
                unit="fraction",
            ),
            measure(
                "noisy-BN control: layer-input drift, noisy BN / BN (the noise makes inputs unstable)",
                "ln(relative drift with noisy BN / with BN)",
                paired_log_ratio(drift["noisy"], drift["batch"]),
                "increase",
                unit="ln ratio",
            ),
        ]
        findings = []
        for norm in rates:
            d, a = mean_of(drift[norm].values()), mean_of(speed[norm].values())
            label = LABELS.get(norm, "noisy BN")
            if d is not None and a is not None:
                findings.append(
                    f"{label} (lr {rates[norm]:.3g}): mean relative drift {d:.3g} per probe interval; mean training "
                    f"accuracy over the run {a:.1%}."
                )
        figures = [_percentiles(data, runs), _by_layer(data, runs)] if data.draw else []
        return Analysis(primary, secondary, figures, [], findings)


def _percentiles(data: ClaimData, runs: Mapping[str, Mapping[int, RunResult]]) -> Any:
    """The BN paper's figure 1(b, c): the 15/50/85th percentiles of one unit's input over training."""
    chosen = {}
    for norm in NORMS:
        finished = runs.get(norm, {})
        if finished:
            chosen[norm] = finished[min(finished)]
    if not chosen:
        return message_figure("Input percentiles of one unit over training", "no probed run finished")
    figure, axes = new_figure(ncols=len(chosen), height=3.0)
    axes = np.atleast_1d(axes)
    for ax, (norm, result) in zip(axes, chosen.items(), strict=True):
        unit_records = [r for r in records(result, "layer_inputs") if r.get("unit") == 0]
        if not unit_records:
            ax.text(0.5, 0.5, "no layer_inputs records", ha="center", transform=ax.transAxes)
            continue
        last_layer = sorted({r["layer"] for r in unit_records})[-1]
        rows = sorted((r["step"], r["p15"], r["p50"], r["p85"]) for r in unit_records if r["layer"] == last_layer)
        steps, p15, p50, p85 = (np.array(column) for column in zip(*rows, strict=True))
        ax.fill_between(steps, p15, p85, color=color(norm), alpha=0.25, label="15th-85th percentile")
        ax.plot(steps, p50, color=color(norm), marker="o", label="median")
        ax.set_title(f"{LABELS[norm]}: unit 0 of {last_layer}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("pre-activation input (units of x)")
        legend(ax, fontsize=7)
    return finish(
        figure,
        "Input distribution of one unit over training",
        "As in figure 1 of the BN paper: the median and the 15th-85th percentile range of one unit's input to its "
        "nonlinearity (the last hidden layer), on a fixed batch of training examples, at each probe step (first "
        "seed). With BN this input is BN's output, gamma x_hat + beta.",
    )


def _by_layer(data: ClaimData, runs: dict[str, dict[int, RunResult]]) -> Any:
    figure, axes = new_figure(ncols=2)
    for norm in NORMS:
        per_layer = [drift_by_layer(r) for r in runs[norm].values()]
        layers = sorted({layer for d in per_layer for layer in d})
        if layers:
            table = np.array([[d.get(layer, np.nan) for layer in layers] for d in per_layer])
            plot_band(axes[0], range(1, len(layers) + 1), table, LABELS[norm], key=norm, marker="o")
        per_index = [ics_by_layer(r, "ics_relative") for r in runs[norm].values()]
        indices = sorted({i for d in per_index for i in d if i >= 2})
        if indices:
            table = np.array([[d.get(i, np.nan) for i in indices] for d in per_index])
            plot_band(axes[1], indices, table, LABELS[norm], key=norm, marker="o")
    axes[0].set_xlabel("hidden layer")
    axes[0].set_ylabel("drift per probe interval (W1 / input std)")
    axes[0].set_title("distributional drift (Ioffe & Szegedy)", fontsize=9)
    axes[1].set_xlabel("layer index (parameters of block i)")
    axes[1].set_ylabel("||G - G'|| / ||G|| (ratio)")
    axes[1].set_title("gradient-based ICS (Santurkar et al.)", fontsize=9)
    for ax in axes:
        legend(ax, fontsize=8)
    return finish(
        figure,
        "Two measures of internal covariate shift, per layer",
        "Left: how far each layer's input distribution moves between probe steps, relative to its spread. Right: "
        "how much the update of the layers below changes a layer's gradient. Mean over seeds with 95% bands.",
    )


CLAIM = BNStableInputs()
