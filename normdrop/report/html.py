"""The study report as one self-contained HTML file: inline CSS, figures as base64 PNG data URIs, no scripts, no
external fonts, images or links to fetch, so it opens offline and can be mailed as one file."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import TYPE_CHECKING, Any

from normdrop.claims.base import ClaimResult
from normdrop.claims.results import Measurement
from normdrop.report.text import effect_text

if TYPE_CHECKING:
    from normdrop.study import StudyOutcome

CSS = """
:root { --ink: #1d1d1f; --muted: #5f6368; --line: #dadce0; --bg: #fbfbfa; }
* { box-sizing: border-box; }
body { font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: var(--bg); margin: 0; }
main { max-width: 980px; margin: 0 auto; padding: 24px 20px 64px; }
h1 { font-size: 1.7em; margin: 0.2em 0; }
h2 { font-size: 1.3em; margin: 0 0 0.4em; display: flex; gap: 0.6em; align-items: center; flex-wrap: wrap; }
h3 { font-size: 1.02em; margin: 1.2em 0 0.3em; }
p, li { max-width: 78ch; }
.lead { color: var(--muted); }
table { border-collapse: collapse; width: 100%; margin: 0.6em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f4; }
.verdict { font-size: 0.72em; font-weight: 700; text-transform: uppercase; letter-spacing: 0.04em;
           padding: 2px 9px; border-radius: 999px; white-space: nowrap; }
.v-supported { background: #e6f4ea; color: #137333; }
.v-contradicted { background: #fce8e6; color: #a50e0e; }
.v-inconclusive { background: #fef7e0; color: #8d6e00; }
.v-not-measurable { background: #f3e8fd; color: #681da8; }
section.claim { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px;
                margin: 22px 0; }
.statement { font-size: 1.05em; }
.mechanism { background: #f4f8fe; border-left: 4px solid #1f6fb4; padding: 8px 14px; border-radius: 4px; }
.effect { background: #f8f9fa; padding: 8px 12px; border-radius: 6px; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; background: #fff; }
figcaption { font-size: 0.88em; color: var(--muted); max-width: 78ch; }
.caveats { border-left: 4px solid #d2691e; padding: 4px 14px; background: #fff8f1; border-radius: 4px; }
.small { font-size: 0.85em; color: var(--muted); }
details { margin: 0.5em 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.85em; }
pre { background: #f1f3f4; padding: 8px; overflow-x: auto; border-radius: 4px; }
nav a { color: inherit; }
"""

VERDICT_MEANINGS = {
    "supported": "the 95% confidence interval of the effect lies entirely on the side the claim predicts",
    "contradicted": "the interval lies entirely on the other side",
    "inconclusive": "the interval includes 'no effect' (or straddles the equivalence band)",
    "not measurable": "too few runs gave a value (failed or diverged runs, a missing probe); the reason is given",
}


def verdict_badge(verdict: str) -> str:
    """An inline verdict label."""
    return f'<span class="verdict v-{verdict.replace(" ", "-")}">{escape(verdict)}</span>'


def render_html(outcome: StudyOutcome) -> str:
    """The whole report."""
    s = outcome.setting
    total_runs = sum(r.runs.planned for r in outcome.results)
    sweep = outcome.sweep
    sweep_text = (
        f"{sweep.get('total', 0)} distinct runs: {sweep.get('reused', 0)} reused from the store, "
        f"{sweep.get('finished', 0)} finished, {sweep.get('diverged', 0)} diverged, {sweep.get('failed', 0)} failed "
        "in this invocation"
        if sweep
        else "runs read from the store (no training in this invocation)"
    )
    head = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>normdrop study: batch norm and dropout, claim by claim</title>
<style>{CSS}</style></head><body><main>
<h1>Batch norm and dropout, claim by claim</h1>
<p class="lead">Each claim below is tested with real training runs of small networks: an experiment, a measured
effect with a 95% confidence interval over seeds, and a verdict computed from the data. Nothing is assumed true.</p>
"""
    overview = [
        "<h2>Verdicts</h2>",
        "<table><thead><tr><th>claim</th><th>verdict</th><th>effect [95% CI]</th><th>metric</th><th>seeds</th>"
        "<th>runs finished / diverged / failed</th></tr></thead><tbody>",
    ]
    for result in outcome.results:
        m, r = result.analysis.primary, result.runs
        runs = f"{r.finished} / {r.diverged} / {r.failed}" + (f" ({r.missing} missing)" if r.missing else "")
        runs = runs if r.planned else "in-process"
        overview.append(
            f'<tr><td><a href="#claim-{escape(result.claim.id)}">{escape(result.claim.id)}</a></td>'
            f"<td>{verdict_badge(m.verdict)}</td><td>{escape(effect_text(m))}</td><td>{escape(m.metric)}</td>"
            f"<td>{result.n_seeds}</td><td>{escape(runs)}</td></tr>"
        )
    overview.append("</tbody></table>")
    overview.append(
        "<p class='small'>"
        + "; ".join(f"<b>{escape(v)}</b>: {escape(meaning)}" for v, meaning in VERDICT_MEANINGS.items())
        + ".</p>"
    )
    study = [
        "<h3>This study</h3><ul>",
        f"<li>Data: <code>{escape(s.dataset)}</code>; {s.seeds} seeds per arm"
        f"{' (quick mode: short runs, thinned grids)' if s.quick else ''}"
        + (f"; overrides <code>{escape(json.dumps(dict(s.overrides)))}</code>" if s.overrides else "")
        + ".</li>",
        f"<li>Runs: {total_runs} requested by the claims ({escape(sweep_text)}); executor "
        f"<code>{escape(outcome.executor)}</code>; store <code>{escape(outcome.store_path)}</code>.</li>",
        f"<li>Wall time of this invocation: {outcome.wall_seconds:.0f} s ("
        + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in outcome.phase_seconds.items())
        + f"); the runs' own wall times sum to {outcome.compute_seconds:.0f} s. "
        f"Started {escape(outcome.started_at)}.</li>",
        "<li>Versions: " + ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in outcome.versions.items()) + ".</li>",
    ]
    study += [f"<li>Note: {escape(note)}</li>" for note in outcome.notes]
    study.append("</ul>")
    how = """<h3>How to read a result</h3>
<p>Each claim compares arms (for example with and without BN) trained with the same seeds. One seed gives one value
of the effect; the report shows their mean and its 95% confidence interval (Student's t, unless stated). A ratio
is given as a logarithm (ln, log2 or log10) so that 0 means 'no difference', with the factor it stands for next to
it. Figures show means over seeds with shaded 95% bands.</p>"""
    sections = [_claim_section(result) for result in outcome.results]
    return head + "\n".join(overview + study) + how + "\n".join(sections) + "\n</main></body></html>\n"


def _measurement_rows(measurements: list[Measurement]) -> str:
    rows = []
    for m in measurements:
        rows.append(
            f"<tr><td>{escape(m.name)}</td><td>{verdict_badge(m.verdict)}</td><td>{escape(effect_text(m))}</td>"
            f"<td>{escape(m.metric)}</td><td>{escape(m.decision.reason)}"
            + (f"<br><span class='small'>{escape(m.note)}</span>" if m.note else "")
            + "</td></tr>"
        )
    return (
        "<table><thead><tr><th>measurement</th><th>verdict</th><th>effect [95% CI]</th><th>metric</th>"
        "<th>why this verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _figure(figure: Any) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.alt)}">'
        f"<figcaption><b>{escape(figure.title)}.</b> {escape(figure.caption)}</figcaption></figure>"
    )


def _claim_section(result: ClaimResult) -> str:
    claim, analysis = result.claim, result.analysis
    m = analysis.primary
    parts = [
        f'<section class="claim" id="claim-{escape(claim.id)}" data-claim-id="{escape(claim.id)}" '
        f'data-verdict="{escape(m.verdict)}">',
        f"<h2>{escape(claim.title)} {verdict_badge(m.verdict)} <span class='small'>{escape(claim.id)}</span></h2>",
        f'<p class="statement"><b>Claim.</b> {escape(claim.statement)}</p>',
    ]
    if claim.mechanism:
        parts.append(f'<div class="mechanism"><b>In plain words.</b> {escape(claim.mechanism)}</div>')
    parts.append(
        f'<p class="effect"><b>Result.</b> {escape(m.name)}: <b>{escape(effect_text(m))}</b>'
        f" over {result.n_seeds} seeds. <b>{escape(m.verdict.capitalize())}</b>: {escape(m.decision.reason)}."
        f"<br><span class='small'>Metric: {escape(m.metric)}.</span></p>"
    )
    if analysis.findings:
        parts.append("<ul>" + "".join(f"<li>{escape(f)}</li>" for f in analysis.findings) + "</ul>")
    parts += [_figure(figure) for figure in analysis.figures]
    if analysis.secondary:
        parts.append("<h3>Other measurements</h3>" + _measurement_rows(analysis.secondary))
    for table in analysis.tables:
        parts.append(
            f"<h3>{escape(table.title)}</h3><table><thead><tr>"
            + "".join(f"<th>{escape(c)}</th>" for c in table.columns)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
            + "</tbody></table>"
        )
    parts.append("<h3>What was measured, and why this experiment</h3>")
    if claim.rationale:
        parts.append(f"<p>{escape(claim.rationale)}</p>")
    if result.experiment_description:
        parts.append(f"<p class='small'><b>Runs.</b> {escape(result.experiment_description)}</p>")
    r = result.runs
    parts.append(
        f"<p class='small'><b>Bookkeeping.</b> {r.planned} runs ({r.finished} finished, {r.diverged} diverged, "
        f"{r.failed} failed, {r.missing} not in the store); {r.compute_seconds:.0f} s of training compute; analysis "
        f"{result.analysis_seconds:.1f} s.</p>"
    )
    if result.configuration:
        parts.append(
            "<details><summary>Run configuration (spec fields)</summary><pre>"
            + escape(json.dumps(result.configuration, indent=1, default=str))
            + "</pre></details>"
        )
    if claim.caveats:
        parts.append(f'<h3>Caveats</h3><p class="caveats">{escape(claim.caveats)}</p>')
    if claim.references:
        parts.append("<p class='small'><b>Sources.</b> " + "; ".join(escape(x) for x in claim.references) + ".</p>")
    parts.append("</section>")
    return "\n".join(parts)
