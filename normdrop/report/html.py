"""The study report as one self-contained HTML file: inline CSS, figures as base64 PNG data URIs, no scripts, no
external fonts, images or links to fetch, so it opens offline and can be mailed as one file."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import TYPE_CHECKING, Any

from normdrop.claims.base import BUDGETS, ScopedClaimResult, SettingResult
from normdrop.claims.results import Measurement
from normdrop.report.text import (
    QUICK_BANNER,
    budget_label,
    effect_text,
    mde_text,
    p_text,
    short_effect,
)
from normdrop.significance import ALPHA
from normdrop.study import plain_reason

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
.v-setting-dependent { background: #e0f2f1; color: #00695c; }
.quick { background: #fff3cd; border: 1px solid #e0b100; color: #5c4400; font-weight: 700; padding: 6px 12px;
         border-radius: 6px; margin: 8px 0; }
.scope { margin: 0.2em 0 0.6em; }
.fragile { color: #a50e0e; font-weight: 700; }
.stable { color: #137333; }
td.claim-cell { border-right: 1px solid var(--line); }
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
    "supported": "the 95% confidence interval of the effect lies entirely on the side the claim predicts, and the "
    "test stays significant after Holm's correction",
    "contradicted": "the interval lies entirely on the other side",
    "inconclusive": "the interval includes 'no effect' (or straddles the equivalence band), or the effect is not "
    "significant after Holm's correction",
    "not measurable": "too few runs gave a value (failed or diverged runs, a missing probe); the reason is given",
}
"""What a verdict in one setting means."""

OVERALL_MEANINGS = {
    "supported": "supported in every setting",
    "setting-dependent": "supported in some settings only (the scope line says which and what the others gave)",
    "contradicted": "supported nowhere and contradicted in at least half of the settings where it was measurable",
    "inconclusive": "supported nowhere, contradicted in fewer than half",
    "not measurable": "measurable in no setting",
}
"""What an overall verdict means (:func:`normdrop.scope.overall_verdict`)."""

SHOWN_VERDICT_RULE = (
    "a per-setting 'supported' whose primary test is not significant after Holm's correction over every primary "
    "test of the study is shown as 'inconclusive' (the claim's own verdict is kept as raw_verdict); other verdicts "
    "are the claims' own. The mechanics checks (bn-mechanics, dropout-mechanics: a layer against its closed form, "
    "measured once) are not hypotheses about training and stay outside the family"
)
"""How multiplicity changes what the report shows (also recorded in summary.json)."""

WHY_HOLM = (
    "Holm, not Benjamini-Hochberg: each verdict is a statement a reader may cite on its own, so the error controlled "
    "is the chance that any cited 'supported' is false (the family-wise error rate), which Holm controls under any "
    "dependence between the tests; Benjamini-Hochberg controls the expected share of false discoveries, which suits "
    "screening many hypotheses rather than a list of individually cited verdicts."
)


def verdict_badge(verdict: str) -> str:
    """An inline verdict label."""
    return f'<span class="verdict v-{verdict.replace(" ", "-")}">{escape(verdict)}</span>'


def _quick(outcome: StudyOutcome) -> str:
    return f'<p class="quick">{escape(QUICK_BANNER)}</p>' if outcome.quick else ""


def _robustness(result: ScopedClaimResult) -> str:
    word = "fragile" if result.fragile else "stable"
    return f'<span class="{word}">{word}</span>'


def _interval_html(item: SettingResult) -> str:
    """The per-setting effect cell: the interval (or why none), the MDE next to it."""
    return f"{escape(short_effect(item.primary))}<br><span class='small'>MDE {escape(mde_text(item))}</span>"


def render_html(outcome: StudyOutcome) -> str:
    """The whole report."""
    total_runs = sum(item.result.runs.planned for r in outcome.results for item in r.settings)
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
{_quick(outcome)}
<h1>Batch norm and dropout, claim by claim</h1>
<p class="lead">Each claim below is tested with real training runs of small networks in {len(outcome.settings)}
setting(s): an experiment, a measured effect with a 95% confidence interval over seeds, and a verdict computed from
the data, per setting and overall, with how far it holds. Nothing is assumed true.</p>
"""
    overview = ["<h2>Verdicts</h2>", _verdict_table(outcome)]
    overview.append(
        f"<p class='small'><b>Multiplicity.</b> Holm across {outcome.holm_tests} primary tests (one per claim and "
        f"setting), family-wise {ALPHA:.0%}: {escape(SHOWN_VERDICT_RULE)}. {escape(WHY_HOLM)} Secondary measurements "
        "are exploratory: shown, not corrected, never a verdict.</p>"
    )
    overview.append(
        "<p class='small'><b>Per setting</b>: "
        + "; ".join(f"<b>{escape(v)}</b>: {escape(meaning)}" for v, meaning in VERDICT_MEANINGS.items())
        + ". <b>Overall</b>: "
        + "; ".join(f"<b>{escape(v)}</b>: {escape(meaning)}" for v, meaning in OVERALL_MEANINGS.items())
        + ". <b>Fragile</b>: the overall verdict changes with half the evaluation seeds or with every run cut to "
        "half its steps; <b>stable</b>: it does not. <b>MDE</b>: the smallest true effect the test detects with 80% "
        "power at one-sided 5% with these seeds' spread. <b>Resolution-limited</b>: the seeds agree to the "
        "resolution of the measurement, so no interval is shown; <b>zero-width: seeds tie</b>: every seed gave the "
        "same value, which is not precision.</p>"
    )
    study = ["<h3>This study</h3><ul>"]
    for s in outcome.settings:
        description = s.definition.description if s.definition is not None else "a custom setting"
        study.append(
            f"<li>Setting <b>{escape(s.name)}</b> ({escape(s.title)}): <code>{escape(s.dataset)}</code>; {s.seeds} "
            f"evaluation seeds and {s.selection_seeds} selection seeds per arm"
            f"{' (quick mode: short runs, thinned grids)' if s.quick else ''}"
            + (f"; overrides <code>{escape(json.dumps(dict(s.overrides)))}</code>" if s.overrides else "")
            + f". {escape(description)}</li>"
        )
    study += [
        f"<li>Runs: {total_runs} requested by the claims over all settings ({escape(sweep_text)}); executor "
        f"<code>{escape(outcome.executor)}</code>; store <code>{escape(outcome.store_path)}</code>.</li>",
        f"<li>Wall time of this invocation: {outcome.wall_seconds:.0f} s ("
        + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in outcome.phase_seconds.items())
        + f"); the runs' own wall times sum to {outcome.compute_seconds:.0f} s. "
        f"Started {escape(outcome.started_at)}.</li>",
        "<li>Versions: " + ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in outcome.versions.items()) + ".</li>",
    ]
    study += [f"<li>Note: {escape(note)}</li>" for note in outcome.notes]
    study.append("</ul>")
    how = """<h3>How to read a result</h3>
<p>Each claim compares arms (for example with and without BN) trained with the same seeds, in every setting it
applies to. One seed gives one value of the effect; the report shows their mean and its 95% confidence interval
(Student's t, unless stated). A ratio is given as a logarithm (ln, log2 or log10) so that 0 means 'no difference',
with the factor it stands for next to it. Every choice a claim makes (a learning rate, a target, a dropout rate) is
made on selection seeds, disjoint from the evaluation seeds the effects are measured on. Each effect is also shown
at a quarter and half of each run's steps, so a reader sees whether it grows, shrinks or flips with training.
Figures show means over seeds with shaded 95% bands.</p>"""
    sections = [_claim_section(result, outcome) for result in outcome.results]
    return head + "\n".join(overview + study) + how + "\n".join(sections) + "\n</main></body></html>\n"


def _verdict_table(outcome: StudyOutcome) -> str:
    rows = []
    for result in outcome.results:
        span = len(result.settings)
        for index, item in enumerate(result.settings):
            cells = ""
            if index == 0:
                cells = (
                    f'<td class="claim-cell" rowspan="{span}"><a href="#claim-{escape(result.claim.id)}">'
                    f"{escape(result.claim.id)}</a></td>"
                    f'<td class="claim-cell" rowspan="{span}">{verdict_badge(result.verdict)}'
                    f"<br><span class='small'>scope: {escape(result.scope)}</span></td>"
                    f'<td class="claim-cell" rowspan="{span}">{_robustness(result)}</td>'
                )
            changed = (
                f"<br><span class='small'>raw: {escape(item.raw_verdict)}</span>"
                if item.verdict != item.raw_verdict
                else ""
            )
            rows.append(
                f"<tr>{cells}<td>{escape(item.setting.name)}</td><td>{verdict_badge(item.verdict)}{changed}</td>"
                f"<td>{_interval_html(item)}</td><td>{escape(p_text(item))}</td>"
                f"<td>{item.result.n_seeds}</td></tr>"
            )
    caption = f"<caption class='quick'>{escape(QUICK_BANNER)}</caption>" if outcome.quick else ""
    return (
        f"<table class='verdicts'>{caption}<thead><tr><th>claim</th><th>overall verdict and scope</th>"
        "<th>robustness</th><th>setting</th><th>verdict</th><th>effect [95% CI], MDE</th><th>p (Holm-adjusted)</th>"
        "<th>seeds</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _measurement_rows(measurements: list[Measurement], exploratory: bool = False) -> str:
    rows = []
    for m in measurements:
        rows.append(
            f"<tr><td>{escape(m.name)}</td><td>{verdict_badge(m.verdict)}</td><td>{escape(effect_text(m))}</td>"
            f"<td>{escape(m.metric)}</td><td>{escape(plain_reason(m))}"
            + (f"<br><span class='small'>{escape(m.note)}</span>" if m.note else "")
            + "</td></tr>"
        )
    label = "<th>measurement (exploratory)</th>" if exploratory else "<th>measurement</th>"
    return (
        f"<table><thead><tr>{label}<th>verdict</th><th>effect [95% CI]</th><th>metric</th>"
        "<th>why this verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _figure(figure: Any) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.alt)}">'
        f"<figcaption><b>{escape(figure.title)}.</b> {escape(figure.caption)}</figcaption></figure>"
    )


def _settings_table(result: ScopedClaimResult) -> str:
    rows = []
    for item in result.settings:
        if item.budget_skipped:
            budgets = "".join(
                f"<td>{escape(short_effect(item.primary))}</td>" if b == 1.0 else "<td>—</td>" for b in BUDGETS
            )
        else:
            budgets = "".join(f"<td>{escape(short_effect(item.budgets.get(b)))}</td>" for b in BUDGETS)
        half = item.half_seeds
        half_text = "—" if half is None else f"{half.verdict}: {short_effect(half)}"
        rows.append(
            f"<tr><td>{escape(item.setting.name)}</td><td>{verdict_badge(item.verdict)}</td>"
            f"<td>{escape(mde_text(item))}</td><td>{escape(p_text(item))}</td>{budgets}"
            f"<td>{escape(half_text)}</td></tr>"
        )
    skipped = [item for item in result.settings if item.budget_skipped]
    note = (
        f"<p class='small'>Smaller budgets not re-analysed in {', '.join(i.setting.name for i in skipped)}: "
        f"{escape(skipped[0].budget_skipped)}.</p>"
        if skipped
        else ""
    )
    return (
        "<table><thead><tr><th>setting</th><th>verdict</th><th>MDE</th><th>p (Holm)</th>"
        + "".join(f"<th>{budget_label(b)} budget</th>" for b in BUDGETS)
        + "<th>half the seeds</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + note
    )


def _setting_details(item: SettingResult, opened: bool) -> str:
    result, analysis = item.result, item.result.analysis
    m = analysis.primary
    parts = [
        f"<details{' open' if opened else ''} data-setting='{escape(item.setting.name)}'><summary><b>"
        f"{escape(item.setting.name)}</b> ({escape(item.setting.title)}): {verdict_badge(item.verdict)}</summary>",
        f'<p class="effect"><b>Result.</b> {escape(m.name)}: <b>{escape(effect_text(m))}</b> over '
        f"{result.n_seeds} seeds; MDE {escape(mde_text(item))}; p {escape(p_text(item))}. "
        f"<b>{escape(item.verdict.capitalize())}</b>: {escape(item.reason)}."
        f"<br><span class='small'>Metric: {escape(m.metric)}.</span>"
        + (f"<br><span class='small'>{escape(m.note)}</span>" if m.note else "")
        + "</p>",
    ]
    if analysis.findings:
        parts.append("<ul>" + "".join(f"<li>{escape(f)}</li>" for f in analysis.findings) + "</ul>")
    parts += [_figure(figure) for figure in analysis.figures]
    if analysis.secondary:
        parts.append(
            "<h3>Other measurements (exploratory: not corrected for multiplicity, not part of the verdict)</h3>"
            + _measurement_rows(analysis.secondary, exploratory=True)
        )
    for table in analysis.tables:
        parts.append(
            f"<h3>{escape(table.title)}</h3><table><thead><tr>"
            + "".join(f"<th>{escape(c)}</th>" for c in table.columns)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
            + "</tbody></table>"
        )
    if result.experiment_description:
        parts.append(f"<p class='small'><b>Runs.</b> {escape(result.experiment_description)}</p>")
    r = result.runs
    parts.append(
        f"<p class='small'><b>Bookkeeping.</b> {r.planned} runs ({r.finished} finished, {r.diverged} diverged, "
        f"{r.failed} failed, {r.missing} not in the store); {r.compute_seconds:.0f} s of training compute; analysis "
        f"{result.analysis_seconds:.1f} s, re-analyses {item.reanalysis_seconds:.1f} s.</p>"
    )
    if result.configuration:
        parts.append(
            "<details><summary>Run configuration (spec fields)</summary><pre>"
            + escape(json.dumps(result.configuration, indent=1, default=str))
            + "</pre></details>"
        )
    parts.append("</details>")
    return "\n".join(parts)


def _claim_section(result: ScopedClaimResult, outcome: StudyOutcome) -> str:
    claim = result.claim
    parts = [
        f'<section class="claim" id="claim-{escape(claim.id)}" data-claim-id="{escape(claim.id)}" '
        f'data-verdict="{escape(result.verdict)}" data-fragile="{str(result.fragile).lower()}">',
        _quick(outcome),
        f"<h2>{escape(claim.title)} {verdict_badge(result.verdict)} <span class='small'>{escape(claim.id)}</span></h2>",
        f'<p class="scope"><b>Scope:</b> {escape(result.scope)}. <b>Robustness:</b> {_robustness(result)} — '
        f"{escape(result.fragile_detail)}. <span class='small'>{escape(adjusted_line(outcome))}.</span></p>",
        f'<p class="statement"><b>Claim.</b> {escape(claim.statement)}</p>',
    ]
    if claim.mechanism:
        parts.append(f'<div class="mechanism"><b>In plain words.</b> {escape(claim.mechanism)}</div>')
    if result.figure is not None:
        parts.append(_figure(result.figure))
    parts.append("<h3>Per setting</h3>" + _settings_table(result))
    parts += [_setting_details(item, index == 0) for index, item in enumerate(result.settings)]
    parts.append("<h3>What was measured, and why this experiment</h3>")
    if claim.rationale:
        parts.append(f"<p>{escape(claim.rationale)}</p>")
    if claim.caveats:
        parts.append(f'<h3>Caveats</h3><p class="caveats">{escape(claim.caveats)}</p>')
    if claim.references:
        parts.append("<p class='small'><b>Sources.</b> " + "; ".join(escape(x) for x in claim.references) + ".</p>")
    parts.append("</section>")
    return "\n".join(parts)


def adjusted_line(outcome: StudyOutcome) -> str:
    """The multiplicity line under every verdict."""
    return f"Holm across {outcome.holm_tests} primary tests, family-wise {ALPHA:.0%}"
