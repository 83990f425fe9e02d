"""What a claim's analysis returns: measurements with their intervals and verdicts, figures, tables, findings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from normdrop.stats import Decision, Direction, Estimate, decide, t_interval


@dataclass
class Measurement:
    """One measured effect: per-seed values, their mean with a 95% interval, and the verdict for ``direction``.

    ``metric`` names the quantity and its unit; ``display`` turns an effect value into words for readers (e.g. a
    log2 ratio into "2.1x"); ``null`` and ``margin`` are those of :func:`normdrop.stats.decide`.
    ``resolution_limited``: the per-seed values agree to the resolution of the measurement (e.g. a bisection's
    x1.25, :func:`normdrop.scope.resolution_limited`), so the report says "resolution-limited" instead of showing
    the interval.
    """

    name: str
    metric: str
    direction: Direction
    per_seed: dict[int, float]
    estimate: Estimate | None
    decision: Decision
    null: float = 0.0
    margin: float | None = None
    unit: str = ""
    note: str = ""
    resolution_limited: bool = False

    @property
    def verdict(self) -> str:
        return self.decision.verdict


def measure(
    name: str,
    metric: str,
    per_seed: Mapping[int, float | None],
    direction: Direction,
    *,
    null: float = 0.0,
    margin: float | None = None,
    unit: str = "",
    note: str = "",
    unmeasurable: str | None = None,
    estimate: Estimate | None = None,
) -> Measurement:
    """A :class:`Measurement` from per-seed values: a t interval of their mean (or ``estimate`` if given) and the
    verdict; ``unmeasurable`` explains a missing estimate."""
    values = {seed: float(v) for seed, v in per_seed.items() if v is not None and math.isfinite(float(v))}
    if estimate is None:
        estimate = t_interval(values.values())
    if estimate is None and unmeasurable is None:
        dropped = len(per_seed) - len(values)
        unmeasurable = f"only {len(values)} seed(s) gave a finite value" + (
            f" ({dropped} had no value: runs failed, diverged or never reached the target)" if dropped else ""
        )
    decision = decide(estimate, direction, null=null, margin=margin, unmeasurable=unmeasurable)
    return Measurement(name, metric, direction, values, estimate, decision, null, margin, unit, note)


def not_measurable(name: str, metric: str, direction: Direction, reason: str, **kwargs: Any) -> Measurement:
    """A measurement that could not be made, with the reason."""
    return Measurement(name, metric, direction, {}, None, Decision("not measurable", reason), **kwargs)


@dataclass
class Figure:
    """A rendered figure: PNG bytes with a title, a caption saying what is plotted, and alt text."""

    title: str
    caption: str
    png: bytes
    alt: str = ""


@dataclass
class Table:
    """A small table for the report: column names and rows of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Analysis:
    """What :meth:`Claim.analyze` returns: the primary measurement (its verdict is the claim's), secondary
    measurements, figures, tables and findings (sentences computed from the data)."""

    primary: Measurement
    secondary: list[Measurement] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


@dataclass
class RunCounts:
    """How the runs of a claim ended."""

    planned: int = 0
    finished: int = 0
    diverged: int = 0
    failed: int = 0
    missing: int = 0
    compute_seconds: float = 0.0
