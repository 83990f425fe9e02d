"""Per-seed stability limits of the deep family, found by bisection over rounds of runs (bn-higher-lr, bn-smooth).

Two definitions of "the largest usable learning rate" of one seed and arm, both from runs of
:func:`normdrop.claims.experiment.stability_spec` (``steps // 5`` of the family's budget):

(a) **does not diverge**: the largest rate whose run finishes (no non-finite loss, no loss above the spec's
    ``diverge_loss``). Found by :class:`normdrop.lr_search.LogBisection` over the setting's
    :func:`~normdrop.claims.experiment.bisection_range` to a ratio of x1.25 (x2 quick). Divergence is monotone in
    the rate in practice (and for gradient descent on a quadratic), which bisection assumes.
(b) **trains well**: the largest rate whose run ends with a training accuracy of at least ``GOOD_FRACTION`` (90%)
    of the seed's best, where *best* is the highest final training accuracy among the finished runs of that seed's
    search (a) (fixed once (a) is done, so the predicate does not move while (b) bisects). Too small a rate is also
    "not good" (it has not learned yet), so (b) is the upper edge of the good range: the bisection starts from the
    largest good rate seen in (a) and the smallest rate above it seen not good, and halves that bracket (on a log
    scale) to x1.25. This assumes the good range is one interval; every evaluated rate is kept, and a seed whose
    evaluations show a good rate above a not-good one above the good range's bottom is counted as non-monotone.

A search is a pure function of the results known so far (:func:`replay`): the study's adaptive rounds
(:attr:`normdrop.claims.experiment.Experiment.extend`) and ``normdrop report`` replay it from the store. A failed
run stops its search (the seed is then not measurable); a missing run is the search's next request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from normdrop.claims.experiment import bisection_range, bisection_resolution, stability_spec
from normdrop.claims.readers import final
from normdrop.claims.setting import StudySetting
from normdrop.lr_search import Bracket, LogBisection
from normdrop.spec import RunResult, RunSpec

GOOD_FRACTION = 0.9
"""Definition (b): a run is good when its final training accuracy is at least 90% of the seed's best."""


@dataclass
class LimitSearch:
    """One seed and arm's searches, replayed from the results.

    ``specs``: every run the searches evaluated or ask for next (the last one may be missing); ``state``:
    "pending" (a run is missing), "failed" (a run failed: no answer), or "done". ``diverge`` / ``good``: the
    brackets of definitions (a) and (b) (None until done; ``good`` None also when (b) was not asked for or (a)
    found no stable rate). ``accuracy``: final training accuracy of each finished evaluated rate.
    """

    norm: str
    seed: int
    specs: list[RunSpec] = field(default_factory=list)
    state: str = "pending"
    diverge: Bracket | None = None
    good: Bracket | None = None
    best_accuracy: float | None = None
    accuracy: dict[float, float] = field(default_factory=dict)
    stable: dict[float, bool] = field(default_factory=dict)

    @property
    def non_monotone(self) -> bool:
        """Whether the evaluated rates' good/not-good pattern is not one block of good rates (see the module)."""
        if self.best_accuracy is None:
            return False
        flags = [self.is_good(lr) for lr in sorted(self.stable)]
        first = flags.index(True) if True in flags else len(flags)
        last = len(flags) - 1 - flags[::-1].index(True) if True in flags else -1
        return not all(flags[first : last + 1])

    @property
    def diverge_non_monotone(self) -> bool:
        """Whether a diverged rate lies below a finished one among the evaluated rates (divergence not monotone:
        bisection (a) then finds a boundary, not necessarily the lowest one)."""
        flags = [self.stable[lr] for lr in sorted(self.stable)]
        first_bad = flags.index(False) if False in flags else len(flags)
        return any(flags[first_bad:])

    def is_good(self, lr: float) -> bool:
        """Definition (b) at an evaluated rate."""
        return (
            self.best_accuracy is not None
            and self.stable.get(lr, False)
            and self.accuracy.get(lr, -math.inf) >= GOOD_FRACTION * self.best_accuracy
        )


def _drive(
    search: LogBisection,
    outcome: LimitSearch,
    setting: StudySetting,
    results: Mapping[str, RunResult],
    predicate,
) -> bool:
    """Advance ``search`` over the known results; False when it stops on a missing or failed run."""
    while (lr := search.pending()) is not None:
        spec = stability_spec(setting, outcome.norm, lr, outcome.seed)
        if all(s.run_id != spec.run_id for s in outcome.specs):
            outcome.specs.append(spec)
        result = results.get(spec.run_id)
        if result is None:
            outcome.state = "pending"
            return False
        if result.status == "failed":
            outcome.state = "failed"
            return False
        outcome.stable[lr] = result.status == "finished"
        accuracy = final(result, "train_accuracy")
        if accuracy is not None:
            outcome.accuracy[lr] = accuracy
        search.record(lr, predicate(lr))
    return True


def replay(
    setting: StudySetting, norm: str, seed: int, results: Mapping[str, RunResult], *, good: bool = True
) -> LimitSearch:
    """Replay seed ``seed``'s searches for arm ``norm`` from ``results``: definition (a), then (b) if ``good``."""
    low, high = bisection_range(setting)
    outcome = LimitSearch(norm, seed)
    resolution = bisection_resolution(setting)
    diverge = LogBisection(low, high, resolution)
    if not _drive(diverge, outcome, setting, results, lambda lr: outcome.stable[lr]):
        return outcome
    outcome.diverge = diverge.result()
    finished = [outcome.accuracy[lr] for lr, ok in outcome.stable.items() if ok and lr in outcome.accuracy]
    if not good or not finished:
        outcome.state = "done"
        return outcome
    outcome.best_accuracy = max(finished)
    good_rates = [lr for lr in outcome.stable if outcome.is_good(lr)]
    top = max(good_rates)
    above = [lr for lr in outcome.stable if lr > top]
    if not above:  # the top of the range was good: censored like (a)
        outcome.good = Bracket(top, None, "at least", tuple((lr, True) for lr in sorted(good_rates)))
        outcome.state = "done"
        return outcome
    refine = LogBisection(top, min(above), resolution)
    if not _drive(refine, outcome, setting, results, outcome.is_good):
        return outcome
    outcome.good = refine.result()
    outcome.state = "done"
    return outcome


def replay_all(
    setting: StudySetting,
    norms: tuple[str, ...],
    seeds: list[int],
    results: Mapping[str, RunResult],
    *,
    good: bool = True,
) -> dict[tuple[str, int], LimitSearch]:
    """:func:`replay` for every norm and seed."""
    return {(norm, seed): replay(setting, norm, seed, results, good=good) for norm in norms for seed in seeds}


def search_arms(
    searches: Mapping[tuple[str, int], LimitSearch], prefix: str
) -> dict[str, tuple[list[RunSpec], list[int]]]:
    """The arms of an adaptive round: one per search, every run it evaluated or asks for (label ->
    ``(specs, replicates)``)."""
    return {
        f"{prefix} {norm} seed {seed}": (list(search.specs), [seed] * len(search.specs))
        for (norm, seed), search in searches.items()
        if search.specs
    }


def bracket_value(bracket: Bracket | None) -> tuple[float, str] | None:
    """``(value, censoring)`` of a finished bracket (None for none)."""
    return None if bracket is None else (bracket.value, bracket.censoring)


# ---- the probed runs' learning rates (bn-smooth, bn-stable-inputs) ----------------------------------------

PROBE_FRACTION = 0.5
"""The probed runs train each arm at half of its own stability limit (definition (b), the largest rate that still
trains well, geometric mean over the selection seeds' bisections), so BN and the plain net are probed at the same
relative distance from their limits, not at one shared rate that is a third of one arm's limit and a tenth of the
other's. Definition (b), not (a): a plain ReLU net at a large rate often neither diverges nor learns (its units
die), so half of its non-divergence limit can be a rate at which it sits at chance (measured in the quick study)."""


def probe_rates(setting: StudySetting, results: Mapping[str, RunResult]) -> dict[str, float] | None:
    """Norm -> learning rate of its probed runs, from the selection seeds' bisections of definition (b); None while a
    selection search still waits for a run. An arm whose searches all failed or found no stable rate is left out."""
    searches = replay_all(setting, ("none", "batch"), setting.selection_seed_list, results)
    if any(s.state == "pending" for s in searches.values()):
        return None
    rates = {}
    for norm in ("none", "batch"):
        values = [s.good.value for (n, _), s in searches.items() if n == norm and s.good is not None]
        if values:
            rates[norm] = PROBE_FRACTION * math.exp(sum(math.log(v) for v in values) / len(values))
    return rates


def selection_limits(setting: StudySetting, results: Mapping[str, RunResult]) -> dict[str, list[tuple[float, str]]]:
    """Norm -> ``(limit, censoring)`` of each finished selection-seed search, definition (b) (notes, findings)."""
    searches = replay_all(setting, ("none", "batch"), setting.selection_seed_list, results)
    out: dict[str, list[tuple[float, str]]] = {"none": [], "batch": []}
    for (norm, _), search in searches.items():
        if search.good is not None:
            out[norm].append((search.good.value, search.good.censoring))
    return out


def probed_arms_from(
    setting: StudySetting, results: Mapping[str, RunResult], *, noisy: bool = False
) -> dict[str, tuple[list[RunSpec], list[int] | None]]:
    """An adaptive round of the probed experiments: the selection seeds' searches (both definitions), then (once
    they are done) the probed runs of each arm at :data:`PROBE_FRACTION` of its limit, and with ``noisy`` the noisy-BN
    control at BN's rate."""
    from normdrop.claims.experiment import probed_deep_arms

    searches = replay_all(setting, ("none", "batch"), setting.selection_seed_list, results)
    arms: dict[str, tuple[list[RunSpec], list[int] | None]] = dict(search_arms(searches, "selection limit"))
    rates = probe_rates(setting, results)
    if rates:
        if noisy and "batch" in rates:
            rates = {**rates, "noisy": rates["batch"]}
        arms.update({label: (specs, None) for label, specs in probed_deep_arms(setting, rates).items()})
    return arms


def probed_runs(
    setting: StudySetting, results: Mapping[str, RunResult], rates: Mapping[str, float]
) -> dict[str, dict[int, RunResult]]:
    """Norm -> evaluation seed -> finished probed run, looked up by spec (missing, failed, diverged left out)."""
    from normdrop.claims.experiment import probed_spec

    out: dict[str, dict[int, RunResult]] = {}
    for norm, lr in rates.items():
        found = {seed: results.get(probed_spec(setting, norm, lr, seed).run_id) for seed in setting.seed_list}
        out[norm] = {seed: r for seed, r in found.items() if r is not None and r.status == "finished"}
    return out
