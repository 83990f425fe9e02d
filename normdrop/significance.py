"""p-values of the verdicts, Holm's correction across the primary claims, power, and test-set resampling.

**p-values.** A directional claim is tested with a one-sided t test of the per-seed effects against ``null``;
an equivalence claim with the two one-sided tests (TOST, Schuirmann 1987), whose p-value is the larger of the two.

**Holm (1979)**, not Benjamini-Hochberg: each primary verdict is a separate statement that a reader may cite on
its own, so the error to control is the chance that *any* cited "supported" is false (the family-wise error
rate), which Holm controls under any dependence between claims; BH controls the expected share of false
discoveries, which suits screening many hypotheses, not a list of individually cited verdicts. Sorted p-values
``p_(1) <= ... <= p_(m)`` are adjusted to ``max_{j<=i} min(1, (m - j + 1) p_(j))``.

**Power.** With ``n`` seeds and per-seed standard deviation ``sd``, a one-sided t test at level ``alpha`` detects a
true mean effect ``delta`` with probability ``power`` when ``delta >= (t_{1-alpha,n-1} + t_{power,n-1}) sd /
sqrt(n)`` (the usual normal-approximation form with t quantiles); :func:`min_detectable_effect` gives that
``delta``, :func:`seeds_for` the smallest ``n`` reaching a given one.

**Test-set sampling error.** A test accuracy is itself an estimate from a finite test set; an interval over seeds
alone leaves that error out when the test set is fixed. :func:`paired_example_bootstrap` resamples seeds, and
within each seed resamples test examples (the same examples for both arms, which are evaluated on one test set),
so both sources of variance are in the interval. :func:`example_bootstrap` does the same for any effect that is,
per seed, a mean over test examples of a per-example value ``d_si`` (a correctness difference, a difference of
per-example NLLs, a share of units that classify the example right):

    effect_s = (1/N) sum_i d_si,   effect = (1/n) sum_s effect_s

With one fixed test set every seed's mean shares the same examples, so the seeds' spread cannot show the test
set's error: ``Var(effect) ~ Var_seeds(effect_s) / n + Var_i(dbar_i) / N`` with ``dbar_i`` the mean over seeds of
``d_si``, and the second term is what a t interval over seeds leaves out. :func:`with_example_error` combines the
two intervals (the hull; see there why not a sum of variances). The p-value that enters Holm's correction for such
an effect is the larger of the seeds' t test and the p-value the hull implies (:func:`interval_p_value`), so the
multiplicity step counts the test set's error too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from normdrop.stats import BOOTSTRAP_SEED, CONFIDENCE, Direction, Estimate, finite

ALPHA = 1 - CONFIDENCE
"""Family-wise error rate of the primary verdicts."""


def p_value(
    values: Iterable[float | None], direction: Direction, *, null: float = 0.0, margin: float | None = None
) -> float | None:
    """The one-sided (or TOST) p-value of the per-seed effects; None with fewer than two finite values.

    Identical values give p = 0 when they lie on the claimed side (or inside the band) and 1 otherwise.
    """
    data = finite(values)
    n = len(data)
    if n < 2:
        return None
    mean, sd = float(data.mean()), float(data.std(ddof=1))

    se = sd / math.sqrt(n)
    return _one_sided(
        direction,
        lambda b: (0.0 if mean > b else 1.0) if sd == 0 else float(scipy_stats.t.sf((mean - b) / se, n - 1)),
        lambda b: (0.0 if mean < b else 1.0) if sd == 0 else float(scipy_stats.t.cdf((mean - b) / se, n - 1)),
        null,
        margin,
    )


def _one_sided(
    direction: Direction,
    above: Callable[[float], float],
    below: Callable[[float], float],
    null: float,
    margin: float | None,
) -> float:
    """The p-value of ``direction`` from the two one-sided tests: ``above(b)`` of H0 mean <= b, ``below(b)`` of H0
    mean >= b; an equivalence claim takes the larger at ``null -+ margin`` (TOST)."""
    if direction == "increase":
        return above(null)
    if direction == "decrease":
        return below(null)
    if direction == "equal":
        if margin is None or margin <= 0:
            raise ValueError(f"an equivalence test needs a positive margin, got {margin!r}")
        return max(above(null - margin), below(null + margin))
    raise ValueError(f"direction must be 'increase', 'decrease' or 'equal', got {direction!r}")


@dataclass(frozen=True)
class Adjusted:
    """A p-value, its Holm-adjusted value, and whether it is significant at the family-wise level."""

    p: float
    adjusted: float
    significant: bool


def holm(p_values: Mapping[str, float | None], alpha: float = ALPHA) -> dict[str, Adjusted | None]:
    """Holm's step-down adjustment over the claims with a p-value (None stays None and is not counted)."""
    present = sorted(((p, name) for name, p in p_values.items() if p is not None), key=lambda item: item[0])
    m = len(present)
    out: dict[str, Adjusted | None] = {name: None for name, p in p_values.items() if p is None}
    running = 0.0
    for index, (p, name) in enumerate(present):
        if not 0 <= p <= 1:
            raise ValueError(f"p-value of {name!r} must lie in [0, 1], got {p!r}")
        running = max(running, min(1.0, (m - index) * p))
        out[name] = Adjusted(p, running, running < alpha)
    return out


def min_detectable_effect(sd: float, n: int, *, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest true mean effect a one-sided t test on ``n`` seeds detects with probability ``power``."""
    if n < 2:
        raise ValueError(f"a t test needs at least 2 seeds, got {n}")
    if not (sd >= 0 and math.isfinite(sd)):
        raise ValueError(f"sd must be finite and non-negative, got {sd!r}")
    quantiles = scipy_stats.t.ppf(1 - alpha, n - 1) + scipy_stats.t.ppf(power, n - 1)
    return float(quantiles * sd / math.sqrt(n))


def seeds_for(effect: float, sd: float, *, alpha: float = ALPHA, power: float = 0.8, most: int = 200) -> int | None:
    """Fewest seeds (>= 2) whose :func:`min_detectable_effect` is at most ``effect``; None if more than ``most``."""
    if effect <= 0:
        raise ValueError(f"effect must be positive, got {effect!r}")
    for n in range(2, most + 1):
        if min_detectable_effect(sd, n, alpha=alpha, power=power) <= effect:
            return n
    return None


def example_bootstrap(
    values: Mapping[int, np.ndarray],
    *,
    shared_test_set: bool = False,
    resamples: int = 2000,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Estimate | None:
    """Mean over seeds of the per-seed mean of a per-test-example value, with a two-level percentile bootstrap.

    Args:
        values: seed -> the per-test-example values ``d_si`` whose mean over examples is the seed's effect (for a
            paired effect, already the difference of the two arms on each example).
        shared_test_set: True when every seed is evaluated on the same test examples (a fixed test split): then one
            draw of example indices serves all seeds of a resample, since the examples, not the seeds, carry that
            error; False when each seed draws its own test set (resampled data).

    Each resample draws seeds with replacement, then test examples with replacement, and averages the per-seed
    means: ``effect* = (1/n) sum_{s in S*} (1/N) sum_{i in I*_s} d_si`` (``I*_s = I*`` for every seed with a
    shared test set). None with fewer than two seeds; a one-line ValueError for a seed without a non-empty 1-d
    array, or a shared test set whose seeds have different sizes.
    """
    seeds = sorted(values)
    if len(seeds) < 2:
        return None
    rows = []
    for s in seeds:
        row = np.asarray(values[s], dtype=np.float64)
        if row.ndim != 1 or len(row) == 0:
            raise ValueError(f"seed {s}: the per-example values must be a non-empty 1-d array, got shape {row.shape}")
        rows.append(row)
    return _two_level(rows, shared_test_set, resamples, seed, confidence)


def _two_level(rows: list[np.ndarray], shared_test_set: bool, resamples: int, seed: int, confidence: float) -> Estimate:
    """The resampling of :func:`example_bootstrap` on validated per-seed rows (at least two)."""
    if shared_test_set and len({len(d) for d in rows}) != 1:
        raise ValueError(f"a shared test set has one size, got sizes {sorted({len(d) for d in rows})}")
    value = float(np.mean([d.mean() for d in rows]))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for r in range(resamples):
        chosen = rng.integers(0, len(rows), len(rows))
        if shared_test_set:
            examples = rng.integers(0, len(rows[0]), len(rows[0]))
            draws[r] = np.mean([rows[i][examples].mean() for i in chosen])
        else:
            draws[r] = np.mean([rows[i][rng.integers(0, len(rows[i]), len(rows[i]))].mean() for i in chosen])
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Estimate(value, float(low), float(high), len(rows), "example-bootstrap", confidence)


def paired_example_bootstrap(
    correct_a: Mapping[int, np.ndarray],
    correct_b: Mapping[int, np.ndarray],
    *,
    shared_test_set: bool = False,
    resamples: int = 2000,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Estimate | None:
    """Mean over seeds of ``accuracy_a - accuracy_b``, with a two-level percentile bootstrap interval.

    Args:
        correct_a, correct_b: seed -> per-test-example correctness (0/1) of each arm, the same examples in the
            same order for both arms of a seed.
        shared_test_set: True when every seed is evaluated on the same test examples (a fixed test split):
            then one draw of example indices serves all seeds of a resample, since the examples, not the seeds,
            carry that error; False when each seed draws its own test set (resampled data).

    Each resample draws seeds with replacement, then test examples with replacement (the same indices for both
    arms: the pairing), and averages the per-seed accuracy differences: :func:`example_bootstrap` of the
    per-example differences ``a - b`` (the same draws).
    """
    seeds = sorted(set(correct_a) & set(correct_b))
    if len(seeds) < 2:
        return None
    pairs = []
    for s in seeds:
        a, b = np.asarray(correct_a[s], dtype=np.float64), np.asarray(correct_b[s], dtype=np.float64)
        if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
            raise ValueError(f"seed {s}: both arms need the same non-empty 1-d test set, got {a.shape} and {b.shape}")
        pairs.append(a - b)
    return _two_level(pairs, shared_test_set, resamples, seed, confidence)


def interval_p_value(
    estimate: Estimate, direction: Direction, *, null: float = 0.0, margin: float | None = None
) -> float:
    """The one-sided (or TOST) p-value an interval implies under a normal approximation (Altman & Bland 2011), one
    standard error per side: ``se_low = (value - ci_low) / z``, ``se_high = (ci_high - value) / z``, ``z`` the
    two-sided normal quantile of the interval's confidence. ``H0: mean <= b`` has ``p = Phi(-(value - b) / se_low)``,
    ``H0: mean >= b`` has ``p = Phi((value - b) / se_high)``; an equivalence test the larger of the two at
    ``null -+ margin``. For an interval that is not a t interval over seeds (the hull of :func:`with_example_error`),
    so that a p-value and the interval read the same variance; a zero-width side gives 0 or 1."""
    z = float(scipy_stats.norm.ppf(1 - (1 - estimate.confidence) / 2))
    value = estimate.value
    se_low, se_high = (value - estimate.ci_low) / z, (estimate.ci_high - value) / z
    return _one_sided(
        direction,
        lambda b: (0.0 if value > b else 1.0) if se_low <= 0 else float(scipy_stats.norm.sf((value - b) / se_low)),
        lambda b: (0.0 if value < b else 1.0) if se_high <= 0 else float(scipy_stats.norm.cdf((value - b) / se_high)),
        null,
        margin,
    )


HULL_METHOD = "t + example bootstrap (hull)"
"""``Estimate.method`` of :func:`with_example_error`."""


def with_example_error(t: Estimate, boot: Estimate, *, scale: float = 1.0) -> Estimate:
    """The hull of a t interval over seeds and a two-level example bootstrap (in units ``scale`` times the
    bootstrap's): ``[min(t_low, scale boot_low), max(t_high, scale boot_high)]``, the value and n of ``t``.

    Why the hull and not a sum of the two half-widths in quadrature: the two-level bootstrap already resamples
    seeds *and* examples, so its spread holds both terms of ``v_s / n + v_e / N`` (module docstring), and adding an
    example-only term to the t half-width would count the seeds twice. What the percentile bootstrap lacks is the
    small-sample t correction: over n = 5 seeds it reads near-normal quantiles of a plug-in seed variance, so when
    the seeds carry the error it is narrower than the t interval (``t_{0.975,4} = 2.78`` vs 1.96). The hull takes
    the wider end of each: exact in both limits (the t interval when ``v_e = 0``; the bootstrap, whose quantiles
    are then right because the examples are many, when ``v_s = 0``). In between it is not conservative: against
    ``t_{n-1} sqrt(v_s/n + v_e/N)`` its half-width is ``max(sqrt(r), 1.96 / t_{n-1})`` times as wide, ``r`` the
    seeds' share of the variance, at worst about 0.7 with 5 seeds (both shares near one half). A Satterthwaite
    combination of the two variance components would close that gap; the hull is kept so that every claim of the
    study that includes test-set error (:func:`normdrop.claims.small_family.accuracy_estimate` too) combines the
    two in the same way.
    """
    low, high = min(t.ci_low, scale * boot.ci_low), max(t.ci_high, scale * boot.ci_high)
    return Estimate(t.value, low, high, t.n, HULL_METHOD, t.confidence)
