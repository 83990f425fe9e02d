"""normdrop.report: the study's results as one self-contained HTML file, ``summary.json``, ``summary.md`` and a
table in the terminal. The report only reads a :class:`normdrop.study.StudyOutcome`; it computes nothing.

``summary.json``::

    {"claims": [{"id", "verdict", "effect", "ci_low", "ci_high", "metric", "n_seeds",      # one per claim id
                 "numbers_from", "scope", "supported_in", "settings": [...], "fragile", "fragile_detail",
                 "reanalyses", "adjusted", "quick"}, ...],
     "details": {"<id>": {...the first setting's measurement, reason, exploratory secondary measurements, run
                          counts..., "by_setting": {"<setting>": {...the same for every setting...}}}},
     "study": {"setting", "settings", "claims", "multiplicity", ...versions, wall time, store...}}

Per claim, ``verdict`` is the **overall** verdict over its settings (:func:`normdrop.scope.overall_verdict`:
supported, setting-dependent, contradicted, inconclusive, not measurable) with its ``scope`` line; ``effect``,
``ci_low``, ``ci_high``, ``metric`` and ``n_seeds`` are the primary measurement's **in the first setting**
(``numbers_from`` names it), in its unit (``details.<id>.unit``); all three numbers are null when it is not
measurable there. Each row of ``settings`` is::

    {"setting", "title", "verdict", "raw_verdict", "reason", "effect", "ci_low", "ci_high", "n_seeds", "p",
     "p_adjusted", "mde", "resolution_limited", "zero_width", "unit", "budgets": {"0.25", "0.5", "1"},
     "budget_skipped", "half_seeds"}

``verdict`` is the shown one (a "supported" that is not significant after Holm's correction over every primary test
of the study is "inconclusive"; ``raw_verdict`` is the claim's own); ``p`` the one-sided (TOST for equivalence)
p-value from the per-seed values and ``p_adjusted`` Holm's; ``mde`` the minimum detectable effect (80% power,
one-sided 5%) with those seeds' sd and n; ``budgets`` the primary effect (``{"effect", "ci_low", "ci_high",
"verdict"}``) at a quarter, half and the whole of each run's steps (null where not re-analysed:
``budget_skipped`` says why); ``half_seeds`` the same on the first ceil(n/2) evaluation seeds. ``fragile`` is true
when the overall verdict changes with half the seeds or half the budget (``fragile_detail`` says how). Secondary
measurements carry ``"exploratory": true``: they are outside the multiplicity correction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable
from rich.text import Text

from normdrop.claims.base import BUDGETS, ScopedClaimResult, SettingResult
from normdrop.claims.results import Measurement
from normdrop.report.html import SHOWN_VERDICT_RULE, render_html
from normdrop.report.text import (
    QUICK_BANNER,
    budget_key,
    budgets_text,
    effect_text,
    mde_text,
    p_text,
    verdict_text,
    zero_width,
)
from normdrop.significance import ALPHA
from normdrop.study import StudyOutcome, plain_reason

HTML_NAME = "report.html"
JSON_NAME = "summary.json"
MARKDOWN_NAME = "summary.md"

VERDICT_STYLES = {
    "supported": "bold green",
    "setting-dependent": "bold cyan",
    "contradicted": "bold red",
    "inconclusive": "bold yellow",
    "not measurable": "bold magenta",
}


def _number(value: float | None) -> float | None:
    """A JSON-safe float: None for missing or non-finite values."""
    return None if value is None or not math.isfinite(value) else float(value)


def measurement_dict(m: Measurement, *, exploratory: bool = False) -> dict[str, Any]:
    """A measurement as JSON values (``exploratory``: a secondary measurement, outside Holm's family)."""
    e = m.estimate
    data = {
        "name": m.name,
        "verdict": m.verdict,
        "reason": plain_reason(m),
        "effect": _number(e.value) if e else None,
        "ci_low": _number(e.ci_low) if e else None,
        "ci_high": _number(e.ci_high) if e else None,
        "interval": e.method if e else None,
        "n_seeds": e.n if e else len(m.per_seed),
        "metric": m.metric,
        "unit": m.unit,
        "direction": m.direction,
        "null": m.null,
        "margin": m.margin,
        "per_seed": {str(seed): _number(v) for seed, v in sorted(m.per_seed.items())},
        "note": m.note,
        "resolution_limited": m.resolution_limited,
        "zero_width": zero_width(m),
    }
    if exploratory:
        data["exploratory"] = True
    return data


def _brief(m: Measurement | None) -> dict[str, Any] | None:
    """Effect, interval and verdict of a re-analysed primary (None where it was not re-analysed)."""
    if m is None:
        return None
    e = m.estimate
    return {
        "effect": _number(e.value) if e else None,
        "ci_low": _number(e.ci_low) if e else None,
        "ci_high": _number(e.ci_high) if e else None,
        "n_seeds": e.n if e else len(m.per_seed),
        "verdict": m.verdict,
        "resolution_limited": m.resolution_limited,
    }


def setting_row(item: SettingResult) -> dict[str, Any]:
    """One row of a claim's ``settings`` in ``summary.json``."""
    m = item.primary
    e = m.estimate
    return {
        "setting": item.setting.name,
        "title": item.setting.title,
        "verdict": item.verdict,
        "raw_verdict": item.raw_verdict,
        "reason": item.reason,
        "effect": _number(e.value) if e else None,
        "ci_low": _number(e.ci_low) if e else None,
        "ci_high": _number(e.ci_high) if e else None,
        "n_seeds": item.result.n_seeds,
        "p": _number(item.p),
        "p_adjusted": _number(item.p_adjusted),
        "mde": _number(item.mde),
        "resolution_limited": m.resolution_limited,
        "zero_width": zero_width(m),
        "unit": m.unit,
        "budgets": {budget_key(b): _brief(item.budgets.get(b)) for b in BUDGETS},
        "budget_skipped": item.budget_skipped or None,
        "half_seeds": _brief(item.half_seeds),
    }


def adjusted_text(outcome: StudyOutcome) -> str:
    """How multiplicity was handled, in a few words."""
    return f"Holm over {outcome.holm_tests} primary tests"


def claim_entry(result: ScopedClaimResult, outcome: StudyOutcome) -> dict[str, Any]:
    """The claim's line of ``summary.json["claims"]`` (see the module docstring)."""
    first = result.settings[0]
    m = first.primary
    e = m.estimate
    return {
        "id": result.claim.id,
        "verdict": result.verdict,
        "effect": _number(e.value) if e else None,
        "ci_low": _number(e.ci_low) if e else None,
        "ci_high": _number(e.ci_high) if e else None,
        "metric": m.metric,
        "n_seeds": first.result.n_seeds,
        "numbers_from": first.setting.name,
        "scope": result.scope,
        "supported_in": list(result.scoped.supported_in),
        "settings": [setting_row(item) for item in result.settings],
        "fragile": result.fragile,
        "fragile_detail": result.fragile_detail,
        "reanalyses": {name: {"verdict": v.verdict, "scope": v.scope} for name, v in result.reanalyses.items()},
        "adjusted": adjusted_text(outcome),
        "quick": outcome.quick,
    }


def _details(item: SettingResult) -> dict[str, Any]:
    result = item.result
    return {
        "setting": item.setting.name,
        "primary": measurement_dict(result.analysis.primary),
        "secondary": [measurement_dict(m, exploratory=True) for m in result.analysis.secondary],
        "findings": result.analysis.findings,
        "runs": vars(result.runs),
        "analysis_seconds": result.analysis_seconds,
        "reanalysis_seconds": item.reanalysis_seconds,
        "experiment": result.experiment_description,
        "half_seeds": measurement_dict(item.half_seeds) if item.half_seeds is not None else None,
        "budgets": {budget_key(b): measurement_dict(m) for b, m in sorted(item.budgets.items())},
        "budget_skipped": item.budget_skipped or None,
    }


def summary_dict(outcome: StudyOutcome) -> dict[str, Any]:
    """Everything ``summary.json`` holds."""
    details = {}
    for result in outcome.results:
        first = _details(result.settings[0])
        details[result.claim.id] = {
            "title": result.claim.title,
            "statement": result.claim.statement,
            "numbers_from": result.settings[0].setting.name,
            **{key: first[key] for key in ("primary", "secondary", "findings", "runs", "analysis_seconds")},
            "experiment": first["experiment"],
            "probes": list(result.claim.probes),
            "by_setting": {item.setting.name: _details(item) for item in result.settings},
        }
    return {
        "claims": [claim_entry(result, outcome) for result in outcome.results],
        "details": details,
        "study": {
            "setting": outcome.setting.as_dict(),
            "settings": [s.as_dict() for s in outcome.settings],
            "claims": [result.claim.id for result in outcome.results],
            "quick": outcome.quick,
            "multiplicity": {
                "method": "holm",
                "tests": outcome.holm_tests,
                "family_wise_alpha": ALPHA,
                "rule": SHOWN_VERDICT_RULE,
                "secondary": "exploratory: not corrected, not part of any verdict",
            },
            "started_at": outcome.started_at,
            "wall_seconds": outcome.wall_seconds,
            "phase_seconds": outcome.phase_seconds,
            "compute_seconds": outcome.compute_seconds,
            "store": outcome.store_path,
            "executor": outcome.executor,
            "trained": outcome.trained,
            "sweep": outcome.sweep,
            "notes": outcome.notes,
            "versions": outcome.versions,
        },
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the table cell


def markdown(outcome: StudyOutcome) -> str:
    """``summary.md``: the verdict table with scope and robustness, and per claim its settings, reasons and
    findings."""
    names = ", ".join(s.name for s in outcome.settings)
    seeds = sorted({s.seeds for s in outcome.settings})
    lines = ["# normdrop study: claims about batch norm and dropout", ""]
    if outcome.quick:
        lines += [f"> **{QUICK_BANNER}**", ""]
    lines += [
        f"Settings {names}; {'/'.join(map(str, seeds))} evaluation seeds per arm{' (quick)' if outcome.quick else ''}; "
        f"{'trained and analysed' if outcome.trained else 'analysed from the store'} in {outcome.wall_seconds:.0f} s "
        f"(started {outcome.started_at}); store `{outcome.store_path}`. Multiplicity: {adjusted_text(outcome)} "
        f"(family-wise {ALPHA:.0%}); secondary measurements are exploratory.",
        "",
        "| claim | verdict | scope | robustness | effect in the first setting [95% CI] | MDE | metric |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in outcome.results:
        first = result.settings[0]
        verdict = f"**{result.verdict}**" + (" (quick)" if outcome.quick else "")
        cells = [
            result.claim.id,
            verdict,
            result.scope,
            "fragile" if result.fragile else "stable",
            f"{first.setting.name}: {effect_text(first.primary)}",
            mde_text(first),
            first.primary.metric,
        ]
        lines.append(f"| {' | '.join(_cell(c) for c in cells)} |")
    for note in outcome.notes:
        lines += ["", f"Note: {note}"]
    for result in outcome.results:
        lines += [
            "",
            f"## {result.claim.id}: {result.claim.title} — {result.verdict}",
            "",
            f"*Scope.* {result.scope}. *Robustness.* {'fragile' if result.fragile else 'stable'}: "
            f"{result.fragile_detail}.",
        ]
        if outcome.quick:
            lines += ["", f"> {QUICK_BANNER}"]
        lines += [
            "",
            f"*Claim.* {result.claim.statement}",
            "",
            "| setting | verdict | effect [95% CI] | MDE | p (Holm) | 1/4, 1/2, full budget |",
            "|---|---|---|---|---|---|",
        ]
        for item in result.settings:
            cells = [item.setting.name, verdict_text(item), effect_text(item.primary), mde_text(item), p_text(item)]
            cells.append(budgets_text(item))
            lines.append(f"| {' | '.join(_cell(c) for c in cells)} |")
        for item in result.settings:
            m = item.primary
            lines += ["", f"*{item.setting.name}.* {m.name}: {effect_text(m)}. {item.reason}."]
            lines += [f"- {finding}" for finding in item.result.analysis.findings]
            for s in item.result.analysis.secondary:
                lines.append(f"- exploratory: {s.name}: {effect_text(s)} — {s.verdict}")
        if result.claim.caveats:
            lines += ["", f"*Caveats.* {result.claim.caveats}"]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in outcome.versions.items())}.", ""]
    return "\n".join(lines)


def terminal_table(outcome: StudyOutcome) -> RichTable:
    """The verdicts as a rich table: overall verdict, scope, robustness, the first setting's effect, runs."""
    quick = f" — {QUICK_BANNER}" if outcome.quick else ""
    table = RichTable(
        title=f"normdrop study: {len(outcome.results)} claims x {len(outcome.settings)} settings "
        f"({outcome.wall_seconds:.0f} s){quick}",
        caption=f"{adjusted_text(outcome)}, family-wise {ALPHA:.0%}; effect and MDE in the first setting",
    )
    for column in ("claim", "verdict", "scope", "fragile", "effect [95% CI]", "MDE", "runs"):
        table.add_column(column, overflow="fold")
    for result in outcome.results:
        first = result.settings[0]
        m = first.primary
        finished = sum(item.result.runs.finished for item in result.settings)
        diverged = sum(item.result.runs.diverged for item in result.settings)
        failed = sum(item.result.runs.failed for item in result.settings)
        missing = sum(item.result.runs.missing for item in result.settings)
        planned = sum(item.result.runs.planned for item in result.settings)
        runs = (
            f"{finished}+{diverged}d" + (f"+{failed}f" if failed else "") + (f" ({missing} missing)" if missing else "")
        )
        table.add_row(
            result.claim.id,
            Text(result.verdict, style=VERDICT_STYLES.get(result.verdict, "")),
            result.scope,
            Text("fragile", style="bold yellow") if result.fragile else "stable",
            f"{first.setting.name}: " + (effect_text(m) if m.estimate else m.decision.reason[:80]),
            mde_text(first),
            runs if planned else "in-process",
        )
    return table


def write_report(outcome: StudyOutcome, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.html``, ``summary.json`` and ``summary.md`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / HTML_NAME, "json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME}
    paths["html"].write_text(render_html(outcome), encoding="utf-8")
    paths["json"].write_text(json.dumps(summary_dict(outcome), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(outcome), encoding="utf-8")
    return paths


def read_study(out_dir: str | Path) -> dict[str, Any] | None:
    """The study recorded in a report directory's ``summary.json``: ``{"settings": [setting dicts], "claims":
    [ids]}`` (a report written before settings were lists gives its one setting); None if there is none."""
    path = Path(out_dir) / JSON_NAME
    try:
        study = json.loads(path.read_text(encoding="utf-8"))["study"]
        settings = study.get("settings") or [study["setting"]]
        claims = study.get("claims")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
        return None
    return {"settings": settings, "claims": claims if isinstance(claims, list) else None}


def read_setting(out_dir: str | Path) -> dict[str, Any] | None:
    """The first study setting recorded in a report directory's ``summary.json`` (None if there is none)."""
    study = read_study(out_dir)
    return study["settings"][0] if study else None
