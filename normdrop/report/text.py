"""How the report words a measurement (shared by the HTML page, ``summary.md`` and the terminal table).

Two intervals are never printed as if they were precision: a measurement whose per-seed values agree to the
resolution of the instrument (``Measurement.resolution_limited``) shows "resolution-limited" instead of an interval,
and an interval of zero width that is not so flagged says "zero-width: seeds tie".
"""

from __future__ import annotations

import contextlib
import math

from normdrop.claims.base import BUDGETS, SettingResult
from normdrop.claims.results import Measurement
from normdrop.claims.scope_figure import budget_label

QUICK_BANNER = "quick: a first look, not for citing"
"""The line on every page and section of a quick study's report."""

RESOLUTION_LIMITED = "resolution-limited"
ZERO_WIDTH = "zero-width: seeds tie"

LOG_BASES = {"ln ratio": math.e, "log2 ratio": 2.0, "decades": 10.0}
"""Units that are logarithms of a ratio, with their base (the report adds the factor they stand for)."""


def zero_width(m: Measurement) -> bool:
    """Whether the interval has zero width without the claim having flagged the measurement resolution-limited."""
    e = m.estimate
    return e is not None and not m.resolution_limited and e.ci_low == e.ci_high


def effect_text(m: Measurement) -> str:
    """The effect with its interval (or why there is none) and unit, and for log ratios the factor they stand
    for."""
    e = m.estimate
    if e is None:
        return "—"
    base = LOG_BASES.get(m.unit)
    unit = f" {m.unit}" if m.unit else ""
    if m.resolution_limited or e.ci_low == e.ci_high:
        text = f"{e.value:.3g}{unit} ({RESOLUTION_LIMITED if m.resolution_limited else ZERO_WIDTH})"
        if base is not None:
            with contextlib.suppress(OverflowError):
                text += f" (x{base**e.value:.3g})"
        return text
    text = f"{e.value:.3g} [{e.ci_low:.3g}, {e.ci_high:.3g}]{unit}"
    if base is not None:
        with contextlib.suppress(OverflowError):
            text += f" (x{base**e.value:.3g}, CI x{base**e.ci_low:.3g} to x{base**e.ci_high:.3g})"
    return text


def short_effect(m: Measurement | None) -> str:
    """The effect and its interval without unit or factor (table cells); "—" when not measured."""
    if m is None or m.estimate is None:
        return "—"
    e = m.estimate
    if m.resolution_limited:
        return f"{e.value:.3g} ({RESOLUTION_LIMITED})"
    if e.ci_low == e.ci_high:
        return f"{e.value:.3g} ({ZERO_WIDTH})"
    return f"{e.value:.3g} [{e.ci_low:.3g}, {e.ci_high:.3g}]"


def mde_text(item: SettingResult) -> str:
    """The minimum detectable effect in the primary's unit ("—" below two seeds)."""
    if item.mde is None:
        return "—"
    unit = f" {item.primary.unit}" if item.primary.unit else ""
    return f"{item.mde:.3g}{unit}"


def p_text(item: SettingResult) -> str:
    """The primary's p-value and its Holm-adjusted value."""
    if item.p is None:
        return "—"
    adjusted = "—" if item.p_adjusted is None else f"{item.p_adjusted:.2g}"
    return f"{item.p:.2g} (Holm {adjusted})"


def budgets_text(item: SettingResult) -> str:
    """The primary effect at each budget ("1/4: ...; 1/2: ...; full: ..."), or why only the full one exists."""
    if item.budget_skipped:
        return f"full: {short_effect(item.primary)} (smaller budgets: {item.budget_skipped})"
    return "; ".join(f"{budget_label(b)}: {short_effect(item.budgets.get(b))}" for b in BUDGETS)


def verdict_text(item: SettingResult) -> str:
    """The shown verdict, with the claim's own one when Holm changed it."""
    if item.verdict != item.raw_verdict:
        return f"{item.verdict} (raw: {item.raw_verdict})"
    return item.verdict


def budget_key(budget: float) -> str:
    """The JSON key of a budget ("0.25", "0.5", "1")."""
    return f"{budget:g}"
