"""How the report words a measurement (shared by the HTML page, ``summary.md`` and the terminal table)."""

from __future__ import annotations

import contextlib
import math

from normdrop.claims.results import Measurement


def effect_text(m: Measurement) -> str:
    """The effect with its interval and unit, and for log ratios the factor they stand for."""
    e = m.estimate
    if e is None:
        return "—"
    text = f"{e.value:.3g} [{e.ci_low:.3g}, {e.ci_high:.3g}]"
    if m.unit:
        text += f" {m.unit}"
    base = {"ln ratio": math.e, "log2 ratio": 2.0, "decades": 10.0}.get(m.unit)
    if base is not None:
        with contextlib.suppress(OverflowError):
            text += f" (x{base**e.value:.3g}, CI x{base**e.ci_low:.3g} to x{base**e.ci_high:.3g})"
    return text
