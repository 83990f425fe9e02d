"""Effect sizes, intervals and the verdict rule: known values, and each verdict reached when it is due."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from normdrop.claims.results import measure
from normdrop.stats import (
    MIN_VALUES,
    VERDICTS,
    Estimate,
    bootstrap_interval,
    cohens_dz,
    decide,
    finite,
    paired,
    paired_difference,
    paired_log_ratio,
    t_interval,
)


def test_t_interval_matches_the_textbook_formula() -> None:
    estimate = t_interval([1.0, 2.0, 3.0])
    assert estimate is not None
    half = scipy_stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of 1, 2, 3 is 1
    assert estimate.value == pytest.approx(2.0)
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((2.0 - half, 2.0 + half))
    assert estimate.n == 3 and estimate.method == "t"
    assert half == pytest.approx(2.4841, abs=1e-4)


def test_t_interval_drops_missing_values_and_needs_two() -> None:
    assert t_interval([1.0, None, math.nan, math.inf]) is None
    estimate = t_interval([4.0, 4.0, None])
    assert estimate is not None and (estimate.ci_low, estimate.ci_high, estimate.n) == (4.0, 4.0, 2)
    assert MIN_VALUES == 2
    assert list(finite([1, None, float("nan"), 2])) == [1.0, 2.0]


def test_t_interval_covers_the_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        estimate = t_interval(rng.normal(1.0, 2.0, size=5))
        assert estimate is not None
        covered += estimate.ci_low <= 1.0 <= estimate.ci_high
    assert 0.935 <= covered / 2000 <= 0.965


def test_bootstrap_interval_of_a_ratio_of_spreads() -> None:
    rng = np.random.default_rng(1)
    wide, narrow = rng.normal(0, 3.0, 40), rng.normal(0, 1.0, 40)

    def log_ratio(a: np.ndarray, b: np.ndarray) -> float:
        return math.log(np.std(a, ddof=1) / np.std(b, ddof=1))

    estimate = bootstrap_interval([wide, narrow], log_ratio, resamples=2000)
    assert estimate is not None and estimate.method == "bootstrap"
    assert estimate.ci_low < estimate.value < estimate.ci_high
    assert estimate.ci_low < math.log(3.0) < estimate.ci_high and estimate.ci_low > 0
    again = bootstrap_interval([wide, narrow], log_ratio, resamples=2000)
    assert again == estimate  # seeded: the same data give the same interval
    assert bootstrap_interval([[1.0], [2.0, 3.0]], log_ratio) is None


def test_paired_effects_use_only_seeds_with_both_values() -> None:
    a = {0: 2.0, 1: 4.0, 2: None, 3: 8.0}
    b = {0: 1.0, 1: 1.0, 2: 1.0, 4: 1.0}
    assert paired(a, b) == [(0, 2.0, 1.0), (1, 4.0, 1.0)]
    assert paired_difference(a, b) == {0: 1.0, 1: 3.0}
    assert paired_log_ratio(a, b, base=2) == pytest.approx({0: 1.0, 1: 2.0})
    assert paired_log_ratio({0: 0.0}, {0: 1.0}) == {}
    assert cohens_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert cohens_dz([1.0, 1.0]) is None


def _interval(low: float, high: float) -> Estimate:
    return Estimate((low + high) / 2, low, high, 5, "t")


@pytest.mark.parametrize(
    ("low", "high", "direction", "verdict"),
    [
        (0.1, 0.5, "increase", "supported"),
        (-0.5, -0.1, "increase", "contradicted"),
        (-0.1, 0.5, "increase", "inconclusive"),
        (-0.5, -0.1, "decrease", "supported"),
        (0.1, 0.5, "decrease", "contradicted"),
        (-0.5, 0.1, "decrease", "inconclusive"),
    ],
)
def test_verdict_of_a_directional_claim(low: float, high: float, direction: str, verdict: str) -> None:
    decision = decide(_interval(low, high), direction)  # type: ignore[arg-type]
    assert decision.verdict == verdict
    assert "95% CI" in decision.reason


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [(-0.5, 0.5, "supported"), (1.5, 2.0, "contradicted"), (-2.0, -1.5, "contradicted"), (0.5, 1.5, "inconclusive")],
)
def test_verdict_of_an_equivalence_claim(low: float, high: float, verdict: str) -> None:
    assert decide(_interval(low, high), "equal", margin=1.0).verdict == verdict


def test_verdicts_with_a_null_other_than_zero_and_unmeasurable_effects() -> None:
    assert decide(_interval(0.01, 0.3), "decrease", null=1.0).verdict == "supported"
    missing = decide(None, "increase", unmeasurable="every run diverged")
    assert missing.verdict == "not measurable" and missing.reason == "every run diverged"
    assert decide(_interval(-math.inf, 1.0), "increase").verdict == "not measurable"
    with pytest.raises(ValueError, match="margin"):
        decide(_interval(0, 1), "equal")
    with pytest.raises(ValueError, match="direction"):
        decide(_interval(0, 1), "sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("per_seed", "verdict"),
    [
        ({0: 1.1, 1: 0.9, 2: 1.0, 3: 1.2, 4: 0.8}, "supported"),
        ({0: -1.1, 1: -0.9, 2: -1.0, 3: -1.2, 4: -0.8}, "contradicted"),
        ({0: 1.0, 1: -1.0, 2: 0.5, 3: -0.5, 4: 0.1}, "inconclusive"),
        ({0: 1.0, 1: None, 2: math.nan, 3: None, 4: None}, "not measurable"),
    ],
)
def test_each_verdict_is_reached_from_per_seed_records(per_seed: dict, verdict: str) -> None:
    m = measure("effect", "units", per_seed, "increase")
    assert m.verdict == verdict
    assert verdict in VERDICTS
    if verdict == "not measurable":
        assert "only 1 seed" in m.decision.reason and "runs failed, diverged" in m.decision.reason
        assert m.estimate is None
    else:
        assert m.estimate is not None and m.estimate.n == 5
