"""The study's own figure: per claim, a small multiple of its primary effect in every setting and at every budget.

One row per setting; in each row the primary effect at a quarter, half and the whole of each run's steps, each with
its 95% interval (a resolution-limited value is drawn as an open marker without an interval), the null value as a
vertical line and an equivalence band where the claim has a margin. The study engine draws it
(:attr:`normdrop.claims.base.ScopedClaimResult.figure`) from the measurements it made; the report only shows it.
"""

from __future__ import annotations

from normdrop.claims.base import BUDGETS, ScopedClaimResult
from normdrop.claims.figures import finish, new_figure
from normdrop.claims.results import Figure

BUDGET_COLORS = {0.25: "#9ab8d8", 0.5: "#4f8cc9", 1.0: "#0b3d73"}
"""Light to dark: the longer the runs, the darker the marker."""


def budget_label(budget: float) -> str:
    """1/4, 1/2, full."""
    return {0.25: "1/4", 0.5: "1/2", 1.0: "full"}.get(budget, f"{budget:g}")


def small_multiples(result: ScopedClaimResult) -> Figure:
    """The claim's primary effect per setting (rows) at each budget, with intervals, null and margin."""
    items = result.settings
    figure, ax = new_figure(height=1.4 + 0.55 * len(items))
    first = items[0].primary
    offsets = {0.25: -0.22, 0.5: 0.0, 1.0: 0.22}
    drawn: set[float] = set()
    for row, item in enumerate(items):
        for budget in BUDGETS:
            m = item.budgets.get(budget)
            if m is None or m.estimate is None:
                continue
            e = m.estimate
            y = row + offsets[budget]
            label = None if budget in drawn else f"{budget_label(budget)} budget"
            drawn.add(budget)
            if m.resolution_limited or e.ci_low == e.ci_high:
                ax.plot(e.value, y, "o", mfc="white", color=BUDGET_COLORS[budget], label=label)
            else:
                ax.errorbar(
                    e.value,
                    y,
                    xerr=[[e.value - e.ci_low], [e.ci_high - e.value]],
                    fmt="o",
                    color=BUDGET_COLORS[budget],
                    capsize=3,
                    label=label,
                )
        ax.text(1.01, row, item.verdict, transform=ax.get_yaxis_transform(), fontsize=8, va="center")
    ax.axvline(first.null, color="#333", linewidth=0.8)
    if first.margin:
        ax.axvspan(first.null - first.margin, first.null + first.margin, color="#e8f0e8", zorder=0)
    ax.set_yticks(range(len(items)), [item.setting.name for item in items], fontsize=8)
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.set_xlabel(f"{first.metric}" + (f" ({first.unit})" if first.unit else ""), fontsize=8)
    if drawn:
        figure.legend(fontsize=7, loc="outside lower center", ncols=3, frameon=False)
    names = ", ".join(item.setting.name for item in items)
    caption = (
        f"The primary effect ({first.name}) in each setting ({names}), at a quarter, half and the whole of each "
        "run's steps (light to dark), with 95% intervals; open markers: resolution-limited or tied seeds (no "
        "interval). The vertical line is 'no effect'"
        + (", the shaded band the equivalence margin" if first.margin else "")
        + "; the verdict shown per setting is after Holm's correction."
    )
    return finish(figure, f"{result.claim.id}: the effect in every setting and budget", caption)
