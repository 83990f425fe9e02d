"""normdrop.report: the study's results as one self-contained HTML file, ``summary.json``, ``summary.md`` and a
table in the terminal. The report only reads a :class:`normdrop.study.StudyOutcome`; it computes nothing.

``summary.json``::

    {"claims": [{"id", "verdict", "effect", "ci_low", "ci_high", "metric", "n_seeds"}, ...],   # one per claim id
     "details": {"<id>": {...the measurement, reason, secondary measurements, run counts...}},
     "study": {...setting, versions, wall time, store...}}

``effect`` is the mean per-seed effect of the claim's primary measurement in its unit (``details.<id>.unit``), with
its 95% interval; all three are null when the claim is not measurable (``details.<id>.reason`` says why).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table as RichTable
from rich.text import Text

from normdrop.claims.base import ClaimResult
from normdrop.claims.results import Measurement
from normdrop.report.html import render_html
from normdrop.report.text import effect_text
from normdrop.study import StudyOutcome

HTML_NAME = "report.html"
JSON_NAME = "summary.json"
MARKDOWN_NAME = "summary.md"

VERDICT_STYLES = {
    "supported": "bold green",
    "contradicted": "bold red",
    "inconclusive": "bold yellow",
    "not measurable": "bold magenta",
}


def _number(value: float | None) -> float | None:
    """A JSON-safe float: None for missing or non-finite values."""
    return None if value is None or not math.isfinite(value) else float(value)


def measurement_dict(m: Measurement) -> dict[str, Any]:
    """A measurement as JSON values."""
    e = m.estimate
    return {
        "name": m.name,
        "verdict": m.verdict,
        "reason": m.decision.reason,
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
    }


def claim_entry(result: ClaimResult) -> dict[str, Any]:
    """The claim's line of ``summary.json["claims"]``: exactly the keys of the issue."""
    m = result.analysis.primary
    e = m.estimate
    return {
        "id": result.claim.id,
        "verdict": m.verdict,
        "effect": _number(e.value) if e else None,
        "ci_low": _number(e.ci_low) if e else None,
        "ci_high": _number(e.ci_high) if e else None,
        "metric": m.metric,
        "n_seeds": result.n_seeds,
    }


def summary_dict(outcome: StudyOutcome) -> dict[str, Any]:
    """Everything ``summary.json`` holds."""
    details = {}
    for result in outcome.results:
        details[result.claim.id] = {
            "title": result.claim.title,
            "statement": result.claim.statement,
            "primary": measurement_dict(result.analysis.primary),
            "secondary": [measurement_dict(m) for m in result.analysis.secondary],
            "findings": result.analysis.findings,
            "runs": vars(result.runs),
            "analysis_seconds": result.analysis_seconds,
            "experiment": result.experiment_description,
            "probes": list(result.claim.probes),
        }
    return {
        "claims": [claim_entry(result) for result in outcome.results],
        "details": details,
        "study": {
            "setting": outcome.setting.as_dict(),
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


def markdown(outcome: StudyOutcome) -> str:
    """``summary.md``: the verdict table and, per claim, the measurement, its reason and findings."""
    setting = outcome.setting
    lines = [
        "# normdrop study: claims about batch norm and dropout",
        "",
        f"Dataset {setting.dataset}, {setting.seeds} seeds per arm{' (quick)' if setting.quick else ''}; "
        f"{'trained and analysed' if outcome.trained else 'analysed from the store'} in {outcome.wall_seconds:.0f} s "
        f"(started {outcome.started_at}); store `{outcome.store_path}`.",
        "",
        "| claim | verdict | effect [95% CI] | metric | seeds | runs (finished/diverged/failed/missing) |",
        "|---|---|---|---|---|---|",
    ]
    for result in outcome.results:
        m, r = result.analysis.primary, result.runs
        runs = f"{r.finished}/{r.diverged}/{r.failed}/{r.missing}" if r.planned else "in-process"
        metric = m.metric.replace("|", "\\|")  # a bare | would end the table cell
        cells = [result.claim.id, f"**{m.verdict}**", effect_text(m), metric, str(result.n_seeds), runs]
        lines.append(f"| {' | '.join(cells)} |")
    for note in outcome.notes:
        lines += ["", f"Note: {note}"]
    for result in outcome.results:
        m = result.analysis.primary
        lines += [
            "",
            f"## {result.claim.id}: {result.claim.title} — {m.verdict}",
            "",
            f"*Claim.* {result.claim.statement}",
            "",
            f"*Measured.* {m.name}: {effect_text(m)}. {m.decision.reason}.",
        ]
        lines += [f"- {finding}" for finding in result.analysis.findings]
        for s in result.analysis.secondary:
            lines.append(f"- {s.name}: {effect_text(s)} — {s.verdict}")
        if result.claim.caveats:
            lines += ["", f"*Caveats.* {result.claim.caveats}"]
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in outcome.versions.items())}.", ""]
    return "\n".join(lines)


def terminal_table(outcome: StudyOutcome) -> RichTable:
    """The verdicts as a rich table."""
    table = RichTable(title=f"normdrop study: {len(outcome.results)} claims ({outcome.wall_seconds:.0f} s)")
    for column in ("claim", "verdict", "effect [95% CI]", "seeds", "runs"):
        table.add_column(column, overflow="fold")
    for result in outcome.results:
        m, r = result.analysis.primary, result.runs
        runs = (
            f"{r.finished}+{r.diverged}d"
            + (f"+{r.failed}f" if r.failed else "")
            + (f" ({r.missing} missing)" if r.missing else "")
        )
        table.add_row(
            result.claim.id,
            Text(m.verdict, style=VERDICT_STYLES.get(m.verdict, "")),
            effect_text(m) if m.estimate else Text(m.decision.reason[:90], style="dim"),
            str(result.n_seeds),
            runs if r.planned else "in-process",
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


def read_setting(out_dir: str | Path) -> dict[str, Any] | None:
    """The study setting recorded in a report directory's ``summary.json`` (None if there is none)."""
    path = Path(out_dir) / JSON_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))["study"]["setting"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
