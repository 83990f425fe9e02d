"""Building blocks of a replicated study: bisection, held-out selection, scoped verdicts, multiplicity, power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from normdrop.lr_search import LogBisection, bisect_all, rounds_needed
from normdrop.scope import SettingVerdict, fragile, half_of, overall_verdict, resolution_limited
from normdrop.selection import SelectionLeak, SelectionView, choose, evaluation_values, split_seeds
from normdrop.significance import (
    HULL_METHOD,
    example_bootstrap,
    holm,
    interval_p_value,
    min_detectable_effect,
    p_value,
    paired_example_bootstrap,
    seeds_for,
    with_example_error,
)
from normdrop.stats import Estimate, decide, t_interval

# --- bisection ---------------------------------------------------------------------------------------------------


def threshold_runner(thresholds: dict[int, float], calls: list[tuple[int, float]]):
    """A fake runner: seed s is stable exactly below thresholds[s]; every call is logged."""

    def evaluate(batch):
        calls.extend(batch)
        return {(seed, lr): lr < thresholds[seed] for seed, lr in batch}

    return evaluate


@pytest.mark.parametrize("threshold", [0.0123, 0.1, 0.5, 1.7, 8.9])
def test_bisection_brackets_a_known_threshold_to_the_resolution(threshold: float) -> None:
    calls: list = []
    found = bisect_all([0], threshold_runner({0: threshold}, calls), low=0.001, high=10.0, resolution=1.25)[0]
    assert found.censoring == ""
    assert found.largest_stable < threshold <= found.smallest_unstable
    assert found.ratio is not None and found.ratio <= 1.25 * (1 + 1e-9)
    assert found.largest_stable < found.value < found.smallest_unstable
    assert len(calls) <= rounds_needed(0.001, 10.0, 1.25)
    assert [lr for _, lr in calls] == [lr for lr, _ in found.evaluations]


def test_bisection_censors_at_both_ends() -> None:
    calls: list = []
    found = bisect_all([0, 1], threshold_runner({0: 100.0, 1: 1e-5}, calls), low=0.001, high=10.0)
    assert found[0].censoring == "at least" and found[0].largest_stable == 10.0 and found[0].smallest_unstable is None
    assert found[1].censoring == "below" and found[1].largest_stable is None and found[1].smallest_unstable == 0.001
    assert len(calls) == 1 + 2  # seed 0 stops after the top; seed 1 needs both ends


def test_bisection_evaluates_all_seeds_of_a_round_in_one_batch() -> None:
    batches: list[int] = []

    def evaluate(batch):
        batches.append(len(batch))
        return {(seed, lr): lr < 0.3 + seed for seed, lr in batch}

    found = bisect_all(range(5), evaluate, low=0.01, high=10.0)
    assert batches[0] == 5 and max(batches) == 5
    assert len(batches) <= rounds_needed(0.01, 10.0)
    for seed, bracket in found.items():
        assert bracket.largest_stable < 0.3 + seed <= bracket.smallest_unstable


def test_bisection_refuses_bad_ranges_and_out_of_order_outcomes() -> None:
    with pytest.raises(ValueError, match="0 < low < high"):
        LogBisection(1.0, 0.5)
    with pytest.raises(ValueError, match="resolution"):
        LogBisection(0.1, 1.0, resolution=1.0)
    search = LogBisection(0.1, 1.0)
    with pytest.raises(ValueError, match=r"expected the outcome at lr=1\.0"):
        search.record(0.5, True)
    with pytest.raises(KeyError, match="no outcome"):
        bisect_all([0], lambda batch: {}, low=0.1, high=1.0)


def test_per_seed_bisection_gives_intervals_with_width() -> None:
    """Thresholds that differ by seed give bracket values that differ: no zero-width interval from a grid."""
    rng = np.random.default_rng(0)
    thresholds = {s: float(10 ** rng.uniform(-1.5, -0.5)) for s in range(6)}
    found = bisect_all(list(thresholds), threshold_runner(thresholds, []), low=0.001, high=10.0)
    estimate = t_interval([math.log10(b.value) for b in found.values()])
    assert estimate is not None and estimate.ci_high - estimate.ci_low > 0.05
    assert not resolution_limited([b.value for b in found.values()], 1.25)


def test_equal_thresholds_are_reported_resolution_limited() -> None:
    found = bisect_all(range(5), threshold_runner(dict.fromkeys(range(5), 0.37), []), low=0.001, high=10.0)
    values = [b.value for b in found.values()]
    assert resolution_limited(values, 1.25)
    assert not resolution_limited([0.3, 0.5], 1.25)
    assert not resolution_limited([0.3], 1.25)


# --- held-out selection ------------------------------------------------------------------------------------------


def test_seed_split_is_disjoint_and_stable_when_grown() -> None:
    split = split_seeds(3, 5)
    assert split.selection == (0, 1, 2) and split.evaluation == (3, 4, 5, 6, 7)
    assert split_seeds(3, 8).evaluation[:5] == split.evaluation
    with pytest.raises(ValueError, match="disjoint"):
        type(split)((0, 1), (1, 2))
    with pytest.raises(ValueError, match="n_evaluation must be a positive integer"):
        split_seeds(2, 0)


class Tripwire(dict):
    """Per-seed scores that fail the test when an evaluation seed is read."""

    def __init__(self, values: dict[int, float], forbidden: tuple[int, ...]) -> None:
        super().__init__(values)
        self.forbidden = forbidden

    def __getitem__(self, seed: int) -> float:
        assert seed not in self.forbidden, f"selection read evaluation seed {seed}"
        return super().__getitem__(seed)


def test_choose_reads_only_selection_seeds() -> None:
    split = split_seeds(2, 3)
    # On the selection seeds lr 0.1 is best; on the evaluation seeds 0.3 would be. The choice must be 0.1.
    table = {
        0.1: {0: 0.9, 1: 0.8, 2: 0.1, 3: 0.1, 4: 0.1},
        0.3: {0: 0.5, 1: 0.5, 2: 0.99, 3: 0.99, 4: 0.99},
    }
    assert choose([0.1, 0.3], lambda lr: Tripwire(table[lr], split.evaluation), split) == 0.1
    assert choose([0.1, 0.3], lambda lr: table[lr], split, maximize=False) == 0.3
    assert evaluation_values(table[0.1], split) == {2: 0.1, 3: 0.1, 4: 0.1}


def test_selection_view_raises_on_an_evaluation_seed() -> None:
    split = split_seeds(2, 2)
    view = SelectionView({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, split)
    assert dict(view) == {0: 1.0, 1: 2.0} and len(view) == 2
    with pytest.raises(SelectionLeak, match="seed 3 is an evaluation seed"):
        view[3]
    with pytest.raises(ValueError, match="no candidate had a score"):
        choose([1], lambda _: {5: 1.0}, split)


# --- scoped verdicts from synthetic runs -------------------------------------------------------------------------


def setting_from_effects(name: str, mean: float, sd: float, n: int, seed: int) -> SettingVerdict:
    """A setting whose per-seed effects are drawn around ``mean``: its verdict is computed, never set."""
    values = np.random.default_rng(seed).normal(mean, sd, n)
    estimate = t_interval(values)
    decision = decide(estimate, "increase")
    assert estimate is not None
    return SettingVerdict(name, decision.verdict, estimate.value, estimate.ci_low, estimate.ci_high, n)


def test_overall_supported_in_every_setting() -> None:
    settings = [setting_from_effects(f"s{i}", 1.0, 0.1, 5, i) for i in range(4)]
    scoped = overall_verdict(settings)
    assert scoped.verdict == "supported" and scoped.scope == "4/4 settings" and scoped.exceptions == ()


def test_overall_setting_dependent_names_where_it_fails() -> None:
    settings = [setting_from_effects(f"s{i}", 1.0, 0.1, 5, i) for i in range(3)]
    settings.append(setting_from_effects("cnn", -1.0, 0.1, 5, 9))
    scoped = overall_verdict(settings)
    assert scoped.verdict == "setting-dependent"
    assert scoped.scope.startswith("3/4 settings") and "cnn: contradicted" in scoped.scope
    assert scoped.exceptions == (("cnn", "contradicted"),)


def test_overall_contradicted_inconclusive_and_unmeasurable() -> None:
    against = [setting_from_effects(f"s{i}", -1.0, 0.1, 5, i) for i in range(2)]
    null = [setting_from_effects(f"n{i}", 0.0, 1.0, 5, 10 + i) for i in range(2)]
    assert all(s.verdict == "inconclusive" for s in null)
    assert overall_verdict(against + null).verdict == "contradicted"
    assert overall_verdict(against[:1] + null).verdict == "inconclusive"
    missing = [SettingVerdict(f"m{i}", "not measurable") for i in range(3)]
    assert overall_verdict(missing).verdict == "not measurable"
    partly = overall_verdict([setting_from_effects("a", 1.0, 0.1, 5, 0), missing[0]])
    assert partly.verdict == "setting-dependent" and "m0: not measurable" in partly.scope
    with pytest.raises(ValueError, match="unique"):
        overall_verdict([missing[0], missing[0]])


def test_fragile_when_half_the_seeds_change_the_verdict() -> None:
    # the first eight seeds (the half-seeds subset) scatter around 0.05; the last eight lie near 0.65
    values = [0.5, -0.4, 0.3, -0.3, 0.2, -0.1, 0.4, -0.2, 0.6, 0.7, 0.5, 0.8, 0.6, 0.7, 0.9, 0.5]
    effects = dict(enumerate(values))
    full = decide(t_interval(effects.values()), "increase").verdict
    half = decide(t_interval([effects[s] for s in half_of(effects)]), "increase").verdict
    assert (full, half) == ("supported", "inconclusive")
    assert fragile(full, half)
    assert not fragile("supported", "supported", "supported")
    assert half_of([5, 1, 3]) == (1, 3)


# --- multiplicity and power --------------------------------------------------------------------------------------


def test_p_value_matches_scipy_one_sided_t_test() -> None:
    values = [0.3, 0.1, 0.5, 0.2, 0.4]
    assert p_value(values, "increase") == pytest.approx(scipy_stats.ttest_1samp(values, 0, alternative="greater")[1])
    assert p_value(values, "decrease") == pytest.approx(scipy_stats.ttest_1samp(values, 0, alternative="less")[1])
    tost = max(
        scipy_stats.ttest_1samp(values, -1, alternative="greater")[1],
        scipy_stats.ttest_1samp(values, 1, alternative="less")[1],
    )
    assert p_value(values, "equal", margin=1.0) == pytest.approx(tost)
    assert p_value([1.0], "increase") is None
    assert p_value([2.0, 2.0], "increase") == 0.0 and p_value([2.0, 2.0], "decrease") == 1.0


def test_holm_by_hand() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}, alpha=0.05)
    assert adjusted["d"] is None
    assert adjusted["a"].adjusted == pytest.approx(0.03) and adjusted["a"].significant
    assert adjusted["c"].adjusted == pytest.approx(0.06) and not adjusted["c"].significant
    assert adjusted["b"].adjusted == pytest.approx(0.06)  # monotone: max(0.06, 1 * 0.04)
    with pytest.raises(ValueError, match="must lie in"):
        holm({"x": 1.5})


def test_min_detectable_effect_has_the_stated_power() -> None:
    rng = np.random.default_rng(7)
    n, sd = 10, 1.0
    delta = min_detectable_effect(sd, n)
    hits = sum(p_value(rng.normal(delta, sd, n), "increase") < 0.05 for _ in range(4000))
    assert 0.76 <= hits / 4000 <= 0.84
    assert seeds_for(delta, sd) == n
    assert seeds_for(1e-6, 1.0) is None


def test_example_bootstrap_counts_the_test_sets_sampling_error() -> None:
    """Seeds that agree exactly on one fixed 200-example test set give a zero-width seed interval; the
    two-level bootstrap keeps the test set's own sampling error (binomial: sd of a difference of accuracies on
    n examples with discordant share d is about sqrt(d / n))."""
    rng = np.random.default_rng(11)
    a = (rng.random(200) < 0.80).astype(float)
    b = a.copy()
    flip = rng.choice(200, 30, replace=False)
    b[flip] = 1 - b[flip]
    correct_a, correct_b = dict.fromkeys(range(5), a), dict.fromkeys(range(5), b)
    seeds_only = t_interval([correct_a[s].mean() - correct_b[s].mean() for s in range(5)])
    both = paired_example_bootstrap(correct_a, correct_b, shared_test_set=True)
    assert seeds_only is not None and seeds_only.ci_high == seeds_only.ci_low
    assert both is not None and both.value == pytest.approx(seeds_only.value)
    half_width = (both.ci_high - both.ci_low) / 2
    assert half_width == pytest.approx(1.96 * math.sqrt(0.15 / 200), rel=0.25)
    # per-seed test sets (resampled data): each seed's examples are drawn on their own, so the error averages
    per_seed_a = {s: (rng.random(200) < 0.8).astype(float) for s in range(5)}
    per_seed_b = {s: np.where(rng.random(200) < 0.15, 1 - per_seed_a[s], per_seed_a[s]) for s in range(5)}
    own = paired_example_bootstrap(per_seed_a, per_seed_b)
    assert own is not None and (own.ci_high - own.ci_low) / 2 < half_width
    with pytest.raises(ValueError, match="same non-empty 1-d test set"):
        paired_example_bootstrap({0: np.ones(3), 1: np.ones(3)}, {0: np.ones(4), 1: np.ones(3)})
    with pytest.raises(ValueError, match="a shared test set has one size"):
        paired_example_bootstrap({0: np.ones(3), 1: np.ones(4)}, {0: np.ones(3), 1: np.ones(4)}, shared_test_set=True)


def test_example_bootstrap_of_any_per_example_value() -> None:
    """The general two-level bootstrap: the paired one is it on the per-example differences (the same draws), and
    on continuous per-example values (NLL differences) that every seed shares, its half-width is the test set's
    standard error: 1.96 sd / sqrt(N); each seed on its own test set averages that error over the seeds."""
    rng = np.random.default_rng(5)
    a = {s: (rng.random(150) < 0.7).astype(float) for s in range(4)}
    b = {s: (rng.random(150) < 0.6).astype(float) for s in range(4)}
    for shared in (True, False):
        paired = paired_example_bootstrap(a, b, shared_test_set=shared)
        assert paired == example_bootstrap({s: a[s] - b[s] for s in a}, shared_test_set=shared)
    row = rng.normal(0.01, 0.3, 400)
    shared_row = example_bootstrap(dict.fromkeys(range(5), row), shared_test_set=True)
    assert shared_row is not None and shared_row.value == pytest.approx(row.mean())
    half_width = (shared_row.ci_high - shared_row.ci_low) / 2
    assert half_width == pytest.approx(1.96 * row.std() / math.sqrt(400), rel=0.15)
    own = example_bootstrap({s: rng.normal(0.01, 0.3, 400) for s in range(5)})
    assert own is not None and (own.ci_high - own.ci_low) / 2 < 0.7 * half_width  # about 1 / sqrt(5)
    assert example_bootstrap({0: row}) is None
    with pytest.raises(ValueError, match="non-empty 1-d array"):
        example_bootstrap({0: row, 1: np.empty(0)})
    with pytest.raises(ValueError, match="a shared test set has one size"):
        example_bootstrap({0: row, 1: row[:10]}, shared_test_set=True)


def test_with_example_error_is_the_hull_in_the_t_intervals_units() -> None:
    t = Estimate(2.0, 1.0, 3.0, 5, "t")
    wide = Estimate(0.02, -0.05, 0.09, 5, "example-bootstrap")  # a fraction; the effect is in percentage points
    hull = with_example_error(t, wide, scale=100)
    assert (hull.value, hull.ci_low, hull.ci_high, hull.n, hull.method) == (2.0, -5.0, 9.0, 5, HULL_METHOD)
    narrow = Estimate(0.02, 0.015, 0.025, 5, "example-bootstrap")
    assert (with_example_error(t, narrow, scale=100).ci_low, with_example_error(t, narrow, scale=100).ci_high) == (
        1.0,
        3.0,
    )
    # seeds that agree (a zero-width t interval) leave the test set's error alone to decide
    tie = Estimate(0.5, 0.5, 0.5, 5, "t")
    assert decide(tie, "increase").verdict == "supported"
    assert decide(with_example_error(tie, Estimate(0.5, -0.1, 1.1, 5, "example-bootstrap")), "increase").verdict == (
        "inconclusive"
    )


def test_interval_p_value_inverts_a_normal_interval_and_reads_each_side() -> None:
    # a symmetric 95% interval of half-width 1.96 se: the implied one-sided p is the normal tail at value / se
    e = Estimate(0.5, 0.5 - 1.96 * 0.25, 0.5 + 1.96 * 0.25, 5, HULL_METHOD)
    assert interval_p_value(e, "increase") == pytest.approx(scipy_stats.norm.sf(2.0), rel=1e-3)
    assert interval_p_value(e, "decrease") == pytest.approx(scipy_stats.norm.cdf(2.0), rel=1e-3)
    # an interval whose lower end touches the null implies p = 0.025 one-sided
    edge = Estimate(1.0, 0.0, 3.0, 5, HULL_METHOD)
    assert interval_p_value(edge, "increase") == pytest.approx(0.025, rel=1e-6)
    # TOST reads the low side for the lower bound and the high side for the upper bound: the larger p
    band = Estimate(0.0, -0.01, 0.03, 5, HULL_METHOD)
    lower, upper = scipy_stats.norm.sf(0.05 / (0.01 / 1.959964)), scipy_stats.norm.cdf(-0.05 / (0.03 / 1.959964))
    assert interval_p_value(band, "equal", margin=0.05) == pytest.approx(max(lower, upper), rel=1e-6)
    assert interval_p_value(Estimate(0.2, 0.2, 0.2, 5, HULL_METHOD), "increase") == 0.0
    with pytest.raises(ValueError, match="positive margin"):
        interval_p_value(band, "equal")


def test_holm_reads_the_hulls_p_value_when_the_test_set_widens_the_interval() -> None:
    from normdrop.claims.results import measure
    from normdrop.study import primary_p_value

    per_seed = {0: 0.50, 1: 0.51, 2: 0.49, 3: 0.50, 4: 0.50}  # seeds agree: a tiny t p-value
    seeds_only = measure("gain", "pp", per_seed, "increase")
    t_p = primary_p_value(seeds_only)
    assert t_p is not None and t_p < 1e-6
    hull = with_example_error(seeds_only.estimate, Estimate(0.5, -0.1, 1.1, 5, "example-bootstrap"))
    widened = measure("gain", "pp", per_seed, "increase", estimate=hull)
    assert widened.verdict == "inconclusive"
    assert (
        primary_p_value(widened) == pytest.approx(interval_p_value(hull, "increase"))
        and primary_p_value(widened) > 0.05
    )
    narrow = with_example_error(seeds_only.estimate, Estimate(0.5, 0.499, 0.501, 5, "example-bootstrap"))
    assert primary_p_value(measure("gain", "pp", per_seed, "increase", estimate=narrow)) == pytest.approx(t_p)
