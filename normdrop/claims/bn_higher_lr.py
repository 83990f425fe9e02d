"""bn-higher-lr: BN makes much larger learning rates usable.

Per evaluation seed and arm (BN, none), the largest usable learning rate is measured by bisection on a log scale to
x1.25 (:mod:`normdrop.claims.stability`; nothing is chosen, the threshold is measured on every evaluation seed),
under two definitions, both reported:

(a) the largest rate whose run does not diverge;
(b) the largest rate whose run ends within 90% of the seed's best final training accuracy (best over that seed's
    divergence-search runs).

**Primary: (b)**, fixed here: the claim says "usable", and a run that does not diverge but learns little (a plain
net left at 10% accuracy) is not usable; (a) is the classical limit and is reported beside it. Effect per seed:
log10(limit with BN / limit without BN), in decades. A limit beyond the bisection range is censored ("at least" its
top, "below" its bottom); a seed whose two arms are censored on the same side says nothing about their ratio and is
left out, one censored arm enters at its bound (a conservative value for "BN larger" when BN is "at least"). Where
the per-seed ratios agree to the bisection's x1.25, the measurement is flagged resolution-limited instead of
showing a t interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from normdrop.claims.base import Claim, ClaimData
from normdrop.claims.experiment import (
    NORMS,
    Experiment,
    bisection_range,
    bisection_resolution,
    stability_steps,
)
from normdrop.claims.figures import LABELS, color, finish, legend, new_figure
from normdrop.claims.results import Analysis, Measurement, Table, measure
from normdrop.claims.setting import StudySetting
from normdrop.claims.stability import GOOD_FRACTION, LimitSearch, replay_all, search_arms
from normdrop.lr_search import Bracket, rounds_needed
from normdrop.scope import resolution_limited
from normdrop.spec import RunResult, RunSpec

DEFINITIONS = {
    "good": f"largest rate ending within {GOOD_FRACTION:.0%} of the seed's best final training accuracy",
    "diverge": "largest rate that does not diverge",
}
DEAD_ACCURACY = 0.2
"""A finished run below 20% training accuracy (chance is 10%) learned nothing: counted in the findings."""
PRIMARY = "good"
"""The primary definition, fixed before any data: (b) "trains well" (see the module docstring)."""


def _bracket(search: LimitSearch, definition: str) -> Bracket | None:
    return search.good if definition == "good" else search.diverge


def limit_ratios(
    searches: Mapping[tuple[str, int], LimitSearch], seeds: list[int], definition: str
) -> tuple[dict[int, float], dict[str, int]]:
    """Seed -> log10(limit with BN / without BN) for one definition, and counts of seeds left out by reason."""
    out: dict[int, float] = {}
    dropped = {"not finished": 0, "censored alike": 0}
    for seed in seeds:
        brackets = [_bracket(searches[(norm, seed)], definition) for norm in ("batch", "none")]
        if any(b is None for b in brackets):
            dropped["not finished"] += 1
            continue
        bn, plain = brackets
        assert bn is not None and plain is not None
        if bn.censoring and bn.censoring == plain.censoring:
            dropped["censored alike"] += 1
            continue
        out[seed] = math.log10(bn.value / plain.value)
    return out, dropped


def _describe(bracket: Bracket | None) -> str:
    if bracket is None:
        return "-"
    prefix = {"at least": ">=", "below": "<", "": ""}[bracket.censoring]
    return f"{prefix}{bracket.value:.3g}"


class BNHigherLR(Claim):
    id = "bn-higher-lr"
    title = "BN allows larger learning rates"
    statement = "BN makes much larger learning rates usable."
    mechanism = (
        "A large learning rate makes the weights jump far; without BN, a jump that grows a layer's weights also "
        "grows everything the layers above receive, and the loss can explode. With BN the output of a layer does "
        "not change when its incoming weights are scaled up, so a big step cannot blow up the signal; larger "
        "weights even shrink the effective step (the gradient scales inversely with the weights), which keeps "
        "training stable."
    )
    rationale = (
        "Per evaluation seed and arm, a bisection on a log scale (x1.25 resolution) over four decades of learning "
        "rate (SGD 0.003-30, Adam 0.0001-1) finds the largest rate that (a) does not diverge and (b) ends within 90% "
        "of the seed's best training accuracy; the verdict is on (b), the claim's 'usable'. Each bisection run "
        "trains a fifth of the deep family's budget, so 'usable' means usable over that many steps. Limits: a "
        "limit beyond the range is only a bound; (b) assumes the good rates form one interval (seeds where they "
        "do not are counted); stability within a short budget does not guarantee it over a long one."
    )
    caveats = (
        "Bjorck et al. (2018) show that BN's benefit largely comes from allowing larger learning rates, which "
        "then add gradient noise that helps generalization. BN networks with weight decay have an effective "
        "learning rate that changes during training (van Laarhoven 2017; Hoffer et al. 2018), so 'the learning "
        "rate' is not the same quantity with and without BN."
    )
    references = ("Ioffe & Szegedy 2015, section 3.3", "Bjorck, Gomes, Selman & Weinberger 2018")
    budget_reanalysis = False
    """The limit is measured on bisection runs of their own budget; cutting them shorter would replay other
    bisection paths whose runs were never made."""

    def experiment(self, setting: StudySetting) -> Experiment:
        low, high = bisection_range(setting)
        resolution = bisection_resolution(setting)
        spec = setting.spec("deep")

        def extend(results: Mapping[str, RunResult]) -> dict[str, tuple[list[RunSpec], list[int] | None]]:
            searches = replay_all(setting, NORMS, setting.seed_list, results)
            return dict(search_arms(searches, "limit"))

        return Experiment(
            extend=extend,
            description=(
                f"Per evaluation seed ({setting.seed_list}) and arm (BN, none): bisection on a log scale of the "
                f"learning rate over [{low:g}, {high:g}] to x{resolution:g} (at most "
                f"{rounds_needed(low, high, resolution)} runs for (a), a few more for (b)), each run the "
                f"deep net ({spec.model}, depth {spec.depth}, width {spec.width}, {spec.optimizer}, batch "
                f"{spec.batch_size}, init {spec.init}) trained {stability_steps(setting)} steps on {setting.dataset}. "
                "(a) largest rate that does not diverge; (b, primary) largest rate ending within 90% of the seed's "
                "best final training accuracy. Nothing is chosen: the limits are measured on the evaluation seeds. "
                "Five seeds detect a mean effect of about 1.4 per-seed standard deviations (one-sided t test, "
                "alpha 0.05, power 0.8)."
            ),
        )

    def analyze(self, data: ClaimData) -> Analysis:
        setting = data.setting
        seeds = setting.seed_list
        searches = replay_all(setting, NORMS, seeds, data.results)
        scope = (
            f"Limits by per-seed bisection to x{bisection_resolution(setting):g} over "
            f"{list(bisection_range(setting))} on the "
            f"{len(seeds)} evaluation seeds; runs of {stability_steps(setting)} steps on {setting.dataset}"
        )
        measurements: dict[str, Measurement] = {}
        for definition, words in DEFINITIONS.items():
            ratios, dropped = limit_ratios(searches, seeds, definition)
            left_out = ", ".join(f"{n} {why}" for why, n in dropped.items() if n)
            censored = sum(
                1
                for seed in ratios
                for norm in NORMS
                if (b := _bracket(searches[(norm, seed)], definition)) and b.censoring
            )
            note = scope + (f"; seeds left out: {left_out}" if left_out else "")
            if censored:
                note += f"; {censored} arm-seed limit(s) censored by the range enter at their bound"
            if definition == "good":
                bent = sum(1 for s in searches.values() if s.non_monotone)
                note += f"; good/not-good pattern not one interval in {bent} of {len(searches)} searches"
            else:
                bent = sum(1 for s in searches.values() if s.diverge_non_monotone)
                note += f"; a diverged rate below a finished one in {bent} of {len(searches)} searches"
            m = measure(
                f"largest usable learning rate ({words}), BN vs none",
                f"log10(limit with BN / limit without BN), decades; limit = {words}",
                ratios,
                "increase",
                unit="decades",
                note=note,
            )
            m.resolution_limited = resolution_limited([10**v for v in ratios.values()], bisection_resolution(setting))
            measurements[definition] = m
        primary = measurements[PRIMARY]
        secondary = [m for d, m in measurements.items() if d != PRIMARY]
        state = {s.state for s in searches.values()}
        findings = []
        if "pending" in state or "failed" in state:
            counts = {k: sum(1 for s in searches.values() if s.state == k) for k in ("pending", "failed")}
            findings.append(
                f"Searches without an answer: {counts['pending']} missing a run, {counts['failed']} stopped by a "
                "failed run."
            )
        for norm in NORMS:
            dead = [
                seed
                for seed in seeds
                if any(
                    ok and searches[(norm, seed)].accuracy.get(lr, 1.0) < DEAD_ACCURACY
                    for lr, ok in searches[(norm, seed)].stable.items()
                )
            ]
            if dead:
                findings.append(
                    f"{LABELS[norm]}: {len(dead)} of {len(seeds)} seeds have rates that neither diverge nor learn "
                    f"(final training accuracy below {DEAD_ACCURACY:.0%}): definition (a) counts them usable, (b) "
                    "does not, which is why the two limits differ."
                )
        table = Table(
            "Largest usable learning rate per seed",
            ["seed", "no BN (a)", "BN (a)", "no BN (b)", "BN (b)", "runs"],
            [
                [
                    str(seed),
                    _describe(searches[("none", seed)].diverge),
                    _describe(searches[("batch", seed)].diverge),
                    _describe(searches[("none", seed)].good),
                    _describe(searches[("batch", seed)].good),
                    str(len(searches[("none", seed)].specs) + len(searches[("batch", seed)].specs)),
                ]
                for seed in seeds
            ],
        )
        figures = [_largest(searches, seeds)] if data.draw else []
        return Analysis(primary, secondary, figures, [table], findings)


def _largest(searches: Mapping[tuple[str, int], LimitSearch], seeds: list[int]) -> Any:
    figure, ax = new_figure(height=2.8)
    rows = [(norm, definition) for norm in NORMS for definition in ("diverge", "good")]
    for row, (norm, definition) in enumerate(rows):
        brackets = [(_bracket(searches[(norm, seed)], definition)) for seed in seeds]
        jitter = np.linspace(-0.15, 0.15, len(seeds)) if seeds else []
        for bracket, dy in zip(brackets, jitter, strict=True):
            if bracket is None:
                continue
            low = bracket.largest_stable or bracket.value
            high = bracket.smallest_unstable or bracket.value
            marker = {"at least": ">", "below": "<", "": "o"}[bracket.censoring]
            ax.plot([low, high], [row + dy] * 2, color=color(norm), linewidth=2)
            ax.scatter(bracket.value, row + dy, color=color(norm), marker=marker, s=30)
    ax.set_yticks(
        range(len(rows)),
        [f"{LABELS[n]}, {'(a) no divergence' if d == 'diverge' else '(b) trains well'}" for n, d in rows],
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.scatter([], [], marker=">", color="#555", label="top of the range (a lower bound)")
    ax.scatter([], [], marker="o", color="#555", label="bracketed to x1.25")
    legend(ax, fontsize=7, loc="lower right")
    return finish(
        figure,
        "Largest usable learning rate per seed",
        "One bar per evaluation seed and arm: the final bisection bracket [largest good rate, smallest bad rate] "
        "and its geometric midpoint (the value), for (a) no divergence and (b) ending within 90% of the seed's "
        "best training accuracy.",
    )


CLAIM = BNHigherLR()
