"""How far a verdict holds: one verdict per setting, an overall verdict with its scope, robustness, resolution.

A claim tested in one setup (one architecture, optimizer, dataset, budget) describes that setup. Run in ``n``
settings, each setting gets the verdict of :func:`normdrop.stats.decide`, and the claim gets an overall verdict:

- **supported**: supported in every setting where it was measurable, and measurable in all of them;
- **setting-dependent**: supported in ``k`` of the ``n`` settings (``0 < k < n``), with the settings where it is not
  and what they gave;
- **contradicted**: supported nowhere, and contradicted in at least half of the settings where it was measurable;
- **inconclusive**: supported nowhere, contradicted in fewer than half;
- **not measurable**: measurable in no setting.

A claim supported everywhere it was measurable but not measurable in some setting is *setting-dependent* (its
scope says so): "holds in 3 of 4 settings" is what a reader can cite.

**Fragile**: the overall verdict changes when the analysis is repeated with half the seeds or half the training
budget (:func:`fragile`). **Resolution-limited**: per-seed values that agree to the resolution of the
measurement (e.g. a bisection's x1.25) have no meaningful t interval; :func:`resolution_limited` says so, and the
report prints "resolution-limited" instead of a zero-width interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from normdrop.stats import Verdict, finite

Overall = Literal["supported", "setting-dependent", "contradicted", "inconclusive", "not measurable"]
OVERALL: tuple[Overall, ...] = ("supported", "setting-dependent", "contradicted", "inconclusive", "not measurable")


@dataclass(frozen=True)
class SettingVerdict:
    """One setting's verdict and effect (the per-setting row of summary.json)."""

    setting: str
    verdict: Verdict
    effect: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_seeds: int = 0
    resolution_limited: bool = False

    def as_dict(self) -> dict[str, object]:
        """Plain values for JSON."""
        return {
            "setting": self.setting,
            "verdict": self.verdict,
            "effect": self.effect,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n_seeds": self.n_seeds,
            "resolution_limited": self.resolution_limited,
        }


@dataclass(frozen=True)
class ScopedVerdict:
    """The overall verdict over settings, its scope line and the settings where the claim does not hold."""

    verdict: Overall
    scope: str
    supported_in: tuple[str, ...]
    exceptions: tuple[tuple[str, Verdict], ...]


def overall_verdict(settings: Sequence[SettingVerdict]) -> ScopedVerdict:
    """Combine per-setting verdicts by the rule in the module docstring."""
    if not settings:
        raise ValueError("an overall verdict needs at least one setting")
    names = [s.setting for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be unique, got {names}")
    n = len(settings)
    supported = tuple(s.setting for s in settings if s.verdict == "supported")
    measurable = [s for s in settings if s.verdict != "not measurable"]
    contradicted = [s for s in measurable if s.verdict == "contradicted"]
    exceptions = tuple((s.setting, s.verdict) for s in settings if s.verdict != "supported")
    if not measurable:
        return ScopedVerdict("not measurable", f"measurable in 0/{n} settings", (), exceptions)
    k = len(supported)
    if k == n:
        return ScopedVerdict("supported", f"{n}/{n} settings", supported, ())
    if k > 0:
        where = ", ".join(f"{name}: {verdict}" for name, verdict in exceptions)
        return ScopedVerdict("setting-dependent", f"{k}/{n} settings (not in {where})", supported, exceptions)
    verdict: Overall = "contradicted" if 2 * len(contradicted) >= len(measurable) else "inconclusive"
    scope = f"contradicted in {len(contradicted)}/{n} settings, supported in none"
    if len(measurable) < n:
        scope += f"; measurable in {len(measurable)}/{n}"
    return ScopedVerdict(verdict, scope, (), exceptions)


def fragile(full: Overall, *reanalyses: Overall) -> bool:
    """Whether any re-analysis (half the seeds, half the budget, ...) reaches another overall verdict."""
    return any(other != full for other in reanalyses)


def half_of(seeds: Iterable[int]) -> tuple[int, ...]:
    """The first half (rounded up) of the seeds in sorted order: the fixed subset a half-seeds re-analysis uses."""
    ordered = sorted(seeds)
    return tuple(ordered[: (len(ordered) + 1) // 2])


def resolution_limited(values: Iterable[float | None], resolution: float) -> bool:
    """Whether all finite positive per-seed values lie within one resolution step of each other.

    ``resolution`` is a ratio (e.g. 1.25 for a bisection that stops at ``bad / good <= 1.25``), so the values are
    compared on a log scale: ``max / min <= resolution``. Such values carry no spread a t interval could use; the
    honest statement is "agree to within the resolution".
    """
    if not resolution > 1:
        raise ValueError(f"resolution must be a ratio above 1, got {resolution!r}")
    data = finite(values)
    if len(data) < 2 or (data <= 0).any():
        return False
    return math.log(float(data.max()) / float(data.min())) <= math.log(resolution) * (1 + 1e-12)
