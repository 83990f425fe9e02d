"""Time of the study's analysis phase (full analyses, re-analyses, Holm, overall verdicts, figures) and of the
report, on a store of fake runs: every claim in every setting of the catalogue, no real training.

The fake trainer is ``tests/test_study.py``'s ``fake_run`` (accuracy curves of known shape; plain nets diverge at high
learning rates, some runs fail), so the timing covers the claims' analyses on the study's real run layout without
the cost of training. The store is filled once (a fresh temporary one), then ``run_study(train=False)`` and
``write_report`` are timed; the slowest claim x setting pairs are listed. Usage:

    .venv/bin/python benchmarks/bench_study_analysis.py [--full] [--json]

(``--full``: the default study's settings, else the quick ones.) Run with ``uptime`` beside it: on a shared machine
the wall times scale with the load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the default study's settings (default: quick)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from test_study import fake_run

    from normdrop.report import write_report
    from normdrop.study import default_settings, run_study

    settings = default_settings(quick=not args.full)
    root = Path(tempfile.mkdtemp(prefix="normdrop-bench-analysis-"))
    started = time.perf_counter()
    run_study(settings, root / "runs.sqlite", workers=2, progress=False, run_fn=fake_run)
    fill = time.perf_counter() - started
    started = time.perf_counter()
    outcome = run_study(settings, root / "runs.sqlite", train=False, progress=False)
    analysis = time.perf_counter() - started
    started = time.perf_counter()
    paths = write_report(outcome, root / "report")
    report = time.perf_counter() - started
    pairs = sorted(
        (
            (item.result.analysis_seconds, item.reanalysis_seconds, result.claim.id, item.setting.name)
            for result in outcome.results
            for item in result.settings
        ),
        reverse=True,
    )
    summary = {
        "settings": [s.name for s in settings],
        "claim_setting_pairs": len(pairs),
        "fill_store_s": round(fill, 1),
        "analysis_s": round(analysis, 1),
        "phases_s": {phase: round(seconds, 1) for phase, seconds in outcome.phase_seconds.items()},
        "report_s": round(report, 1),
        "html_mb": round(paths["html"].stat().st_size / 1e6, 2),
        "slowest": [
            {"claim": c, "setting": s, "analysis_s": round(a, 2), "reanalyses_s": round(r, 2)}
            for a, r, c, s in pairs[:6]
        ],
    }
    if args.json:
        print(json.dumps(summary))
        return
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
