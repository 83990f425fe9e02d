"""dropout-mechanics: what a dropout layer computes, checked on normdrop's layer against the rule and torch.nn.

Inverted dropout (Srivastava et al. 2014, with the 1/(1-p) scaling moved to training time as in every modern
library): in training, y_i = x_i m_i / (1 - p) with m_i ~ Bernoulli(1 - p) drawn independently per element, so
E[y_i] = x_i; at inference y = x. The statistical checks use 5 standard errors as tolerance (a correct layer fails
one with probability ~6e-7); the exact ones use float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import Experiment
from normdrop.claims.figures import finish, legend, new_figure
from normdrop.claims.results import Analysis, measure
from normdrop.claims.setting import StudySetting
from normdrop.seeds import derive_seed

P_VALUES = (0.1, 0.3, 0.5)
ROWS, UNITS = 2000, 100
SIGMAS = 5.0
CHECKS: dict[str, str] = {
    "drop rate": "|fraction of zeroed elements - p| (tolerance 5 standard errors of a Bernoulli(p) rate)",
    "expectation preserved": "|mean(y / x) - 1| (tolerance 5 standard errors)",
    "survivors scaled by 1/(1-p)": "max relative |y - x / (1 - p)| over kept elements (tolerance 1e-6)",
    "independent units": "|mean correlation of neighbouring units' masks| (tolerance 5 standard errors)",
    "identity at inference": "max |y_eval - x| (tolerance 1e-12: exactly equal)",
    "gradient uses the same mask": "max relative |dL/dx - g m / (1 - p)| (tolerance 1e-6)",
    "drop rate matches torch.nn": "|rate(normdrop) - rate(torch.nn.Dropout)| (tolerance 5 standard errors)",
}


def measure_seed(seed: int) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """``{check: (worst deviation over p, its tolerance)}`` for one seed, and masks for the figures.

    The worst over p is the one with the largest deviation / tolerance.
    """
    import normdrop.nn as nd

    generator = torch.Generator().manual_seed(derive_seed(seed, "dropout-mechanics"))
    x = 0.5 + torch.randn(ROWS, UNITS, generator=generator).abs()
    upstream = torch.randn(ROWS, UNITS, generator=generator)
    n = x.numel()
    worst: dict[str, tuple[float, float]] = {}
    rates: dict[str, dict[float, float]] = {"normdrop": {}, "torch.nn": {}}
    masks: list[np.ndarray] = []

    def note(check: str, deviation: float, tolerance: float) -> None:
        if check not in worst or deviation / tolerance > worst[check][0] / worst[check][1]:
            worst[check] = (deviation, tolerance)

    for p in P_VALUES:
        layer = nd.Dropout(p)
        inputs = x.clone().requires_grad_(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, f"dropout-mask-{p}"))
            y = layer.train()(inputs)
            if p == max(P_VALUES):
                masks = [(y[:24, :48] != 0).numpy(), (layer(x)[:24, :48] != 0).numpy()]
        (y * upstream).sum().backward()
        kept = (y != 0).detach()
        rate = 1.0 - float(kept.double().mean())
        rates["normdrop"][p] = rate
        rate_se = math.sqrt(p * (1 - p) / n)
        note("drop rate", abs(rate - p), SIGMAS * rate_se)
        ratio = (y.detach() / x).double()
        note("expectation preserved", abs(float(ratio.mean()) - 1.0), SIGMAS * math.sqrt(p / (1 - p) / n))
        scaled = x / (1 - p)
        note("survivors scaled by 1/(1-p)", float(((y.detach() - scaled).abs() * kept).max() / scaled.max()), 1e-6)
        m = kept.double()
        centred = (m - m.mean(0)) / m.std(0).clamp_min(1e-12)
        neighbour_corr = float((centred[:, :-1] * centred[:, 1:]).mean())
        note("independent units", abs(neighbour_corr), SIGMAS / math.sqrt(ROWS * (UNITS - 1)))
        expected_grad = upstream * kept / (1 - p)
        assert inputs.grad is not None
        note(
            "gradient uses the same mask",
            float((inputs.grad - expected_grad).abs().max() / expected_grad.abs().max()),
            1e-6,
        )
        note("identity at inference", float((layer.eval()(x) - x).abs().max()), 1e-12)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, f"torch-mask-{p}"))
            reference = torch.nn.Dropout(p).train()(x)
        torch_rate = 1.0 - float((reference != 0).double().mean())
        rates["torch.nn"][p] = torch_rate
        note("drop rate matches torch.nn", abs(rate - torch_rate), SIGMAS * math.sqrt(2) * rate_se)
    return worst, {"masks": masks, "rates": rates}


class DropoutMechanics(Claim):
    id = "dropout-mechanics"
    title = "What dropout computes"
    statement = (
        "Dropout zeroes each unit independently with probability p during training, scaling the survivors by "
        "1/(1-p), and does nothing at inference."
    )
    mechanism = (
        "In every training step, each unit of a dropout layer flips a biased coin: with probability p it is "
        "switched off (its output set to 0) for this example and this step only; otherwise its output is "
        "multiplied by 1/(1-p), so that on average the next layer receives the same total input as without "
        "dropout. Each step therefore trains a different random 'thinned' sub-network. At inference nothing is "
        "dropped and nothing is rescaled: the full network is used."
    )
    rationale = (
        "A rule about a layer needs no training. normdrop's Dropout is applied to 200,000 positive inputs per seed "
        "at p = 0.1, 0.3 and 0.5; the statistical checks allow 5 standard errors, the exact ones float32 rounding. "
        "normdrop draws its masks from its own counter-based generator, so they are not torch's masks: the "
        "comparison with torch.nn.Dropout is of the drop rate (same distribution), not of individual masks."
    )
    caveats = (
        "The original paper (Srivastava et al. 2014) scales the weights by (1-p) at test time instead of the "
        "survivors by 1/(1-p) in training; the two give the same expected pre-activations."
    )
    references = ("Srivastava et al. 2014, section 4",)
    per_setting = False

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment(
            description=(
                f"No training runs. Per seed: normdrop.nn.Dropout at p in {list(P_VALUES)} on a {ROWS} x {UNITS} "
                "tensor of positive values (one forward and backward pass each), and torch.nn.Dropout on the same "
                "input."
            )
        )

    def analyze(self, data: ClaimData) -> Analysis:
        per_check: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in CHECKS}
        pictures: dict[str, Any] = {}
        for seed in data.setting.seed_list:
            worst, seed_pictures = measure_seed(seed)
            pictures = pictures or seed_pictures
            for name in CHECKS:
                per_check[name][seed] = worst[name]
        ratio = {name: {seed: d / t for seed, (d, t) in values.items()} for name, values in per_check.items()}
        primary = measure(
            "worst deviation from the rule, in units of its tolerance",
            "max over the checks and p of deviation / tolerance (1 = at the tolerance)",
            {seed: max(ratio[name][seed] for name in CHECKS) for seed in data.setting.seed_list},
            "decrease",
            null=1.0,
            unit="x tolerance",
        )
        secondary = [
            measure(name, f"{what}, as a multiple of the tolerance", ratio[name], "decrease", null=1.0)
            for name, what in CHECKS.items()
        ]
        failing = [name for name in CHECKS if max(ratio[name].values()) >= 1]
        findings = [
            "Every check is within its tolerance for every seed."
            if not failing
            else f"Checks beyond tolerance: {', '.join(failing)}."
        ]
        return Analysis(primary, secondary, [_masks(pictures), _rates(pictures)], [], findings)


def _masks(pictures: dict[str, Any]) -> Any:
    figure, axes = new_figure(ncols=2, height=2.6)
    for ax, mask, title in zip(axes, pictures["masks"], ("training step 1", "training step 2"), strict=True):
        ax.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{title}: {1 - mask.mean():.0%} dropped", fontsize=9)
        ax.set_xlabel("unit of the layer")
        ax.set_ylabel("example in the batch")
        ax.grid(False)
    return finish(
        figure,
        "Dropout masks on one layer (p = 0.5)",
        "Which units a dropout layer keeps (white) or drops (black) for 24 examples and 48 units, in two "
        "training steps. Every example and every step gets its own random mask, so each step trains a different "
        "thinned network; at inference all units are kept.",
    )


def _rates(pictures: dict[str, Any]) -> Any:
    figure, ax = new_figure(height=2.8)
    ax.plot([0, 0.6], [0, 0.6], color="#999", linewidth=0.8, label="rule: rate = p")
    for index, (name, rates) in enumerate(pictures["rates"].items()):
        ps = list(rates)
        errors = [SIGMAS * math.sqrt(p * (1 - p) / (ROWS * UNITS)) for p in ps]
        ax.errorbar(
            [p + 0.006 * (index - 0.5) for p in ps],
            list(rates.values()),
            yerr=errors,
            fmt="o",
            capsize=3,
            label=f"{name} (bars: 5 standard errors)",
        )
    ax.set_xlabel("dropout probability p")
    ax.set_ylabel("measured fraction dropped")
    legend(ax, fontsize=8)
    return finish(
        figure,
        "Measured drop rate vs p",
        f"Fraction of {ROWS * UNITS:,} elements zeroed by normdrop's and torch's dropout at each p (first seed), "
        "with the tolerance of the check as error bars.",
    )


CLAIM = DropoutMechanics()
