"""Effect sizes, 95% confidence intervals and the verdict rule of the study.

Every claim compares arms (BN vs none, dropout vs none, ...) over several seeds. One seed gives one value of the
effect (usually a paired difference or log ratio between arms trained with the same seed), and the verdict is read
from the confidence interval of the mean effect:

- claimed direction ``"increase"``: **supported** if the whole interval lies above ``null`` (0 by default),
  **contradicted** if it lies below, **inconclusive** otherwise;
- ``"decrease"``: the mirror image;
- ``"equal"`` (an equivalence claim, e.g. "dropout zeroes units with probability p"): **supported** if the interval
  lies inside ``null +- margin``, **contradicted** if it lies wholly outside that band, **inconclusive** otherwise
  (the two one-sided tests of Schuirmann 1987, read off one interval);
- **not measurable** when fewer than :data:`MIN_VALUES` finite values exist (runs failed, diverged or a probe is
  missing); the reason is always given.

Intervals: Student's t interval of the mean (exact for normal per-seed effects; with 5 seeds the bootstrap's
percentile interval is too narrow, so t is the default), and a percentile bootstrap for statistics that are not
means (a ratio of standard deviations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats

Direction = Literal["increase", "decrease", "equal"]
Verdict = Literal["supported", "contradicted", "inconclusive", "not measurable"]

VERDICTS: tuple[Verdict, ...] = ("supported", "contradicted", "inconclusive", "not measurable")
CONFIDENCE = 0.95
"""Confidence level of every interval in the study."""
DEFAULT_SEEDS = 5
"""Seeds per arm of the default study."""
MIN_VALUES = 2
"""Fewest finite per-seed values a verdict is drawn from (a t interval needs two)."""
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 1979  # Efron (1979), "Bootstrap methods: another look at the jackknife"


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval, from ``n`` values, by ``method`` ("t", "bootstrap")."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    method: str
    confidence: float = CONFIDENCE

    def as_dict(self) -> dict[str, float | int | str]:
        """Plain values for JSON."""
        return {
            "value": self.value,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
            "method": self.method,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class Decision:
    """A verdict and the sentence that justifies it."""

    verdict: Verdict
    reason: str


def finite(values: Iterable[float | None]) -> np.ndarray:
    """The finite values among ``values`` (None, NaN and infinities dropped), as float64."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(kept, dtype=np.float64)


def t_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Estimate | None:
    """Mean of the finite values and its Student-t interval: mean +- t_{n-1} * sd / sqrt(n).

    None with fewer than :data:`MIN_VALUES` finite values. Identical values give a zero-width interval.
    """
    data = finite(values)
    n = len(data)
    if n < MIN_VALUES:
        return None
    mean = float(data.mean())
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * data.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n, "t", confidence)


def bootstrap_interval(
    samples: Sequence[Iterable[float | None]],
    statistic: Callable[..., float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate | None:
    """``statistic(*samples)`` and its percentile bootstrap interval, each sample resampled independently.

    Args:
        samples: one or more groups of values (e.g. the per-seed accuracies of two arms).
        statistic: a function of as many 1-d arrays as there are groups.

    Returns None when a group has fewer than :data:`MIN_VALUES` finite values or the statistic is not finite.
    """
    groups = [finite(sample) for sample in samples]
    if not groups or min(len(g) for g in groups) < MIN_VALUES:
        return None
    value = float(statistic(*groups))
    if not math.isfinite(value):
        return None
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for index in range(resamples):
        draws[index] = statistic(*(g[rng.integers(0, len(g), len(g))] for g in groups))
    draws = draws[np.isfinite(draws)]
    if len(draws) < resamples // 2:
        return None
    alpha = 1 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(low), float(high), min(len(g) for g in groups), "bootstrap", confidence)


def paired(a: Mapping[int, float | None], b: Mapping[int, float | None]) -> list[tuple[int, float, float]]:
    """``(seed, a[seed], b[seed])`` for the seeds where both values are finite, in seed order."""
    pairs = []
    for seed in sorted(set(a) & set(b)):
        x, y = a[seed], b[seed]
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            pairs.append((seed, float(x), float(y)))
    return pairs


def paired_difference(
    a: Mapping[int, float | None], b: Mapping[int, float | None], *, scale: float = 1.0
) -> dict[int, float]:
    """Per seed, ``scale * (a - b)`` where both are finite (``scale=100`` turns fractions into percentage points)."""
    return {seed: scale * (x - y) for seed, x, y in paired(a, b)}


def paired_log_ratio(
    a: Mapping[int, float | None], b: Mapping[int, float | None], base: float = math.e
) -> dict[int, float]:
    """Per seed, ``log(a / b)`` where both are finite and positive (a ratio is scale-free, so it compares
    quantities whose units differ between arms, such as a BN and a plain network's gradient norms)."""
    return {seed: math.log(x / y, base) for seed, x, y in paired(a, b) if x > 0 and y > 0}


def cohens_dz(values: Iterable[float | None]) -> float | None:
    """Standardized mean of paired differences, mean / sd (Cohen's d_z); None if undefined."""
    data = finite(values)
    if len(data) < MIN_VALUES:
        return None
    sd = float(data.std(ddof=1))
    return float(data.mean() / sd) if sd > 0 else None


def decide(
    estimate: Estimate | None,
    direction: Direction,
    *,
    null: float = 0.0,
    margin: float | None = None,
    unmeasurable: str | None = None,
) -> Decision:
    """The verdict rule (see the module docstring).

    Args:
        estimate: the effect and its interval; None when too few values were measured.
        direction: what the claim says the effect is: above ``null``, below it, or equal to it within ``margin``.
        null: the value of "no effect" (or the tolerance a mechanical rule must beat).
        margin: half-width of the equivalence band, required for ``"equal"``.
        unmeasurable: why the effect could not be measured, used when ``estimate`` is None.
    """
    if direction not in ("increase", "decrease", "equal"):
        raise ValueError(f"direction must be 'increase', 'decrease' or 'equal', got {direction!r}")
    if direction == "equal" and (margin is None or margin <= 0):
        raise ValueError(f"an equivalence claim needs a positive margin, got {margin!r}")
    if estimate is None:
        return Decision("not measurable", unmeasurable or f"fewer than {MIN_VALUES} seeds gave a finite value")
    low, high = estimate.ci_low, estimate.ci_high
    if not (math.isfinite(low) and math.isfinite(high)):
        return Decision("not measurable", "the confidence interval is not finite")
    interval = f"{estimate.confidence:.0%} CI [{low:.4g}, {high:.4g}] over {estimate.n} seeds"
    if direction == "equal":
        assert margin is not None
        band = f"[{null - margin:.4g}, {null + margin:.4g}]"
        if null - margin <= low and high <= null + margin:
            return Decision("supported", f"{interval} lies inside the equivalence band {band}")
        if low > null + margin or high < null - margin:
            return Decision("contradicted", f"{interval} lies outside the equivalence band {band}")
        return Decision("inconclusive", f"{interval} overlaps the edge of the equivalence band {band}")
    claimed_above = direction == "increase"
    if (low > null) if claimed_above else (high < null):
        side = "above" if claimed_above else "below"
        return Decision("supported", f"{interval} lies {side} {null:.4g}, as claimed")
    if (high < null) if claimed_above else (low > null):
        side = "below" if claimed_above else "above"
        return Decision("contradicted", f"{interval} lies {side} {null:.4g}, against the claim")
    return Decision("inconclusive", f"{interval} contains {null:.4g}")
