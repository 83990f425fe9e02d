"""The study engine: claims -> run specs -> sweep into the store -> analyses -> verdicts.

:func:`run_study` asks every registered claim (:mod:`normdrop.claims`) for its runs, runs the ones the store does not
hold yet in one sweep (:func:`normdrop.sweep.run_sweep`, local process pool or Ray), reads every run back from the
store and hands each claim its runs to analyse. The engine never trains by hand and never judges a claim: it moves
specs and results. Nothing here depends on which claims exist.

- Runs shared by several claims (same spec, same run id) run once.
- A claim naming probes outside ``normdrop.probe_catalog.PROBES`` is not measurable, with the reason, and asks for
  no runs.
- Failed and diverged runs never stop the study: claims see them as such; an analysis that raises makes its claim
  not measurable with the error, and the report still renders.
- A re-run finds every run in the store and only analyses (``train=False`` does not even try to run missing ones:
  ``normdrop report``).
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from normdrop.claims import all_claims
from normdrop.claims.base import Claim, ClaimData, ClaimResult
from normdrop.claims.experiment import Experiment
from normdrop.claims.figures import message_figure
from normdrop.claims.results import Analysis, RunCounts, not_measurable
from normdrop.claims.setting import StudySetting
from normdrop.probe_catalog import PROBES
from normdrop.spec import RunResult, RunSpec
from normdrop.store import Store
from normdrop.sweep import ExecutorName, SweepError, run_sweep
from normdrop.versions import STUDY_PACKAGES, package_versions

DEFAULT_OUT_DIR = Path("normdrop-report")
"""Where ``normdrop study`` and ``normdrop report`` write the report."""

POLL_SECONDS = 0.5
MAX_ROUNDS = 64
"""Most rounds of adaptive experiments (:attr:`Experiment.extend`) a study runs: a guard, far above a bisection's."""


@dataclass
class ClaimPlan:
    """A claim with its experiment, or the reasons it cannot be measured (missing probes)."""

    claim: Claim
    experiment: Experiment
    missing_probes: dict[str, str] = field(default_factory=dict)

    @property
    def specs(self) -> list[RunSpec]:
        return [] if self.missing_probes else self.experiment.specs()


@dataclass
class StudyOutcome:
    """Everything the report shows: the setting, each claim's result and the study's bookkeeping."""

    setting: StudySetting
    results: list[ClaimResult]
    store_path: str
    started_at: str
    wall_seconds: float
    executor: str
    trained: bool
    sweep: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    compute_seconds: float = 0.0


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages the numbers depend on."""
    return package_versions(STUDY_PACKAGES)


def plan_study(setting: StudySetting, claims: Sequence[Claim] | None = None) -> list[ClaimPlan]:
    """Each claim's experiment on ``setting``, with the probes it names that the catalogue lacks."""
    plans = []
    for claim in all_claims() if claims is None else claims:
        missing = {
            name: f"the probe {name!r} is not in normdrop.probe_catalog.PROBES ({', '.join(sorted(PROBES))})"
            for name in claim.probes
            if name not in PROBES
        }
        plans.append(ClaimPlan(claim, claim.experiment(setting), missing))
    return plans


def load_results(store: Store, run_ids: Sequence[str]) -> dict[str, RunResult]:
    """Stored results by run id (runs the store does not hold are left out)."""
    results = {}
    for run_id in dict.fromkeys(run_ids):
        with contextlib.suppress(KeyError):
            results[run_id] = store.result(run_id)
    return results


class MixedNumericPaths(RuntimeError):
    """The runs of one analysis were computed on different numeric paths (and ``strict_numeric_path`` was set)."""


def numeric_paths(store: Store, run_ids: Iterable[str]) -> dict[str, int]:
    """How many of ``run_ids`` were computed on each numeric path: backend and fast path as recorded in each run's
    provenance (``versions["numeric_path"]``, see :func:`normdrop.store.numeric_path`); runs stored before it was
    recorded count as "not recorded"."""
    wanted = set(run_ids)
    counts: dict[str, int] = {}
    for run in store.runs():
        if run.run_id not in wanted:
            continue
        path = (run.versions or {}).get("numeric_path")
        if not path:
            key = "not recorded"
        else:
            fast = path.get("fastpath")
            key = f"backend={path.get('backend')}, fast path={fast}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def run_study(
    setting: StudySetting,
    store_path: str | Path,
    *,
    claims: Sequence[Claim] | None = None,
    executor: ExecutorName = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    train: bool = True,
    progress: bool = True,
    run_fn: Callable[[RunSpec], RunResult] | None = None,
    console: Console | None = None,
    fleet: bool = True,
    strict_numeric_path: bool = False,
) -> StudyOutcome:
    """Run the study: missing runs into the store (unless ``train=False``), then every claim's analysis.

    Args:
        setting: data, seeds and budgets.
        store_path: the run store (SQLite file; created if missing).
        claims: the claims to test (default: the registry, :func:`normdrop.claims.all_claims`).
        executor, workers, ray_address: where runs execute (see :func:`normdrop.sweep.run_sweep`).
        train: run the missing runs; False only analyses what the store holds (``normdrop report``).
        progress: progress bars with ETA per claim on stderr.
        run_fn: trains one spec (default :func:`normdrop.lab.run_spec`, the sweep's); must be a module-level
            function.
        console: where progress goes (default: stderr).
        fleet: train runs that share a shape as fleets (see :func:`normdrop.sweep.run_sweep`; with the default
            ``run_fn`` only, whose fleet twin is :func:`normdrop.lab.run_fleet_specs`).
        strict_numeric_path: refuse (:class:`MixedNumericPaths`) to analyse runs computed on more than one numeric
            path; by default the mix is reported in the outcome's notes (see :func:`numeric_paths`).
    """
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    console = console or Console(stderr=True)
    plans = plan_study(setting, claims)
    for plan in plans:
        if plan.missing_probes and progress:
            console.print(
                f"[yellow]{plan.claim.id}: not measurable, missing probes {sorted(plan.missing_probes)}[/yellow]"
            )
    outcome = StudyOutcome(
        setting=setting,
        results=[],
        store_path=str(store_path),
        started_at=started_at,
        wall_seconds=0.0,
        executor=executor,
        trained=train,
        versions=versions(),
    )
    # report only reads: a read-only connection (a read-only store works); a missing store is created empty as before
    with Store(store_path, readonly=not train and Path(store_path).exists()) as store:
        all_specs = [spec for plan in plans for spec in plan.specs]
        if train and all_specs:
            sweep_started = time.perf_counter()
            outcome.sweep = _sweep(
                plans,
                all_specs,
                store,
                executor,
                workers,
                ray_address,
                progress,
                run_fn,
                console,
                outcome,
                fleet=fleet,
            )
            outcome.phase_seconds["training"] = time.perf_counter() - sweep_started
        results = load_results(store, [spec.run_id for spec in all_specs])
        rounds_started = time.perf_counter()
        for _ in range(MAX_ROUNDS):
            pending = next_round(plans, results)
            if not pending:
                break
            results.update(load_results(store, [spec.run_id for spec in pending]))
            missing = [spec for spec in pending if spec.run_id not in results]
            if not missing:
                continue
            if not train:
                break
            swept = _sweep(
                plans, missing, store, executor, workers, ray_address, progress, run_fn, console, outcome, fleet=fleet
            )
            for key, value in swept.items():
                outcome.sweep[key] = outcome.sweep.get(key, 0) + value
            results.update(load_results(store, [spec.run_id for spec in missing]))
            if any(spec.run_id not in results for spec in missing):
                break  # the sweep stopped early (its note says why)
        if train:
            outcome.phase_seconds["adaptive rounds"] = time.perf_counter() - rounds_started
        all_specs = [spec for plan in plans for spec in plan.specs]
        paths = numeric_paths(store, results.keys())
    if len(paths) > 1:
        described = "; ".join(f"{count} runs on {path}" for path, count in sorted(paths.items()))
        message = (
            f"the analysed runs were computed on {len(paths)} numeric paths ({described}): backends and the fast "
            "path agree only to rounding, so these results are not bitwise reproducible as one set"
        )
        if strict_numeric_path:
            raise MixedNumericPaths(message)
        outcome.notes.append(message)
        if progress:
            console.print(f"[yellow]note: {message}[/yellow]", highlight=False)
    outcome.compute_seconds = sum(result.wall_time for result in results.values())
    if not train:
        missing = len({s.run_id for s in all_specs} - results.keys())
        if missing:
            outcome.notes.append(f"{missing} runs are not in the store; run `normdrop study` to train them.")
    analysis_started = time.perf_counter()
    outcome.results = _analyze_all(plans, setting, results, progress, console)
    outcome.phase_seconds["analysis"] = time.perf_counter() - analysis_started
    outcome.wall_seconds = time.perf_counter() - started
    return outcome


def next_round(plans: Sequence[ClaimPlan], results: dict[str, RunResult]) -> list[RunSpec]:
    """Extend every adaptive experiment (:attr:`Experiment.extend`) given ``results`` and return the specs of all
    plans that have no result yet (each once)."""
    for plan in plans:
        extend = plan.experiment.extend
        if extend is None or plan.missing_probes:
            continue
        for label, (specs, replicates) in extend(results).items():
            plan.experiment.add(label, list(specs), None if replicates is None else list(replicates))
    pending: dict[str, RunSpec] = {}
    for plan in plans:
        for spec in plan.specs:
            if spec.run_id not in results:
                pending.setdefault(spec.run_id, spec)
    return list(pending.values())


def _sweep(
    plans: list[ClaimPlan],
    specs: list[RunSpec],
    store: Store,
    executor: ExecutorName,
    workers: int | None,
    ray_address: str | None,
    progress: bool,
    run_fn: Callable[[RunSpec], RunResult] | None,
    console: Console,
    outcome: StudyOutcome,
    fleet: bool = True,
) -> dict[str, int]:
    """Run the missing specs in one sweep (claim by claim in submission order), with a bar per claim."""
    with _ClaimProgress(plans, store.path, console, enabled=progress):
        try:
            report = run_sweep(
                specs,
                store,
                executor=executor,
                workers=workers,
                ray_address=ray_address,
                progress=False,
                run_fn=run_fn,
                fleet=fleet,
            )
        except SweepError as error:
            outcome.notes.append(f"the sweep stopped early: {error}")
            return {}
    return {
        "total": report.total,
        "reused": report.reused,
        "finished": report.finished,
        "diverged": report.diverged,
        "failed": report.failed,
    }


class _ClaimProgress:
    """One progress bar for all runs and one per claim (its runs done, time since the sweep started, ETA), fed by
    polling the store from a thread: the sweep saves each run as it completes, so the store is the source of truth.
    Runs are submitted claim by claim, so the claims' bars fill roughly one after the other."""

    def __init__(self, plans: list[ClaimPlan], store_path: Path, console: Console, enabled: bool) -> None:
        # Claims measured without training (or missing a probe) have no runs and no bar; "all runs" comes first.
        claim_runs = [(plan.claim.id, {spec.run_id for spec in plan.specs}) for plan in plans if plan.specs]
        self._plans = [("all runs", set().union(*(ids for _, ids in claim_runs))), *claim_runs]
        self._store_path = store_path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = datetime.now(UTC).isoformat(timespec="seconds")
        self._progress = Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._tasks = {claim_id: self._progress.add_task(claim_id, total=len(ids)) for claim_id, ids in self._plans}

    def __enter__(self) -> _ClaimProgress:
        self._progress.start()
        self._thread = threading.Thread(target=self._poll, name="normdrop-study-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._progress.stop()

    def _poll(self) -> None:
        with Store(self._store_path, readonly=True) as store:
            while True:
                done = store.completed_ids()
                done |= {run.run_id for run in store.runs(status="failed") if run.finished_at >= self._since}
                for claim_id, ids in self._plans:
                    self._progress.update(self._tasks[claim_id], completed=len(ids & done))
                if self._stop.wait(POLL_SECONDS):
                    break


def _analyze_all(
    plans: list[ClaimPlan],
    setting: StudySetting,
    results: dict[str, RunResult],
    progress: bool,
    console: Console,
) -> list[ClaimResult]:
    """Each claim's analysis on its runs, in plan order (the summary last), never raising."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process measurements are then bitwise reproducible across machines
    done: dict[str, ClaimResult] = {}
    try:
        with Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("claims analysed"),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
        ) as bar:
            task = bar.add_task("analysis", total=len(plans))
            for plan in plans:
                bar.update(task, description=plan.claim.id)
                done[plan.claim.id] = analyze_claim(plan, setting, results, done)
                bar.advance(task)
    finally:
        torch.set_num_threads(threads)
    return [done[plan.claim.id] for plan in plans]


def analyze_claim(
    plan: ClaimPlan, setting: StudySetting, results: dict[str, RunResult], others: dict[str, ClaimResult]
) -> ClaimResult:
    """One claim's result: its analysis, or a not-measurable result saying why (missing probe, analysis error)."""
    started = time.perf_counter()
    claim = plan.claim
    specs = plan.experiment.specs()
    mine = {spec.run_id: results[spec.run_id] for spec in specs if spec.run_id in results}
    counts = RunCounts(planned=len(plan.specs))
    for result in mine.values():
        setattr(counts, result.status, getattr(counts, result.status) + 1)
        counts.compute_seconds += result.wall_time
    counts.missing = counts.planned - len(mine) if not plan.missing_probes else 0
    if plan.missing_probes:
        reason = "; ".join(plan.missing_probes.values())
        analysis = _unmeasurable(claim, f"needs probes that are not available: {reason}")
    else:
        try:
            analysis = claim.analyze(ClaimData(setting, plan.experiment, mine, dict(others)))
        except Exception as error:
            detail = "".join(traceback.format_exception_only(error)).strip()
            analysis = _unmeasurable(claim, f"the analysis failed: {detail}")
    primary = analysis.primary
    n_seeds = primary.estimate.n if primary.estimate is not None else len(primary.per_seed)
    spec_fields = _common_fields(specs)
    return ClaimResult(
        claim=claim,
        analysis=analysis,
        runs=counts,
        n_seeds=n_seeds,
        analysis_seconds=time.perf_counter() - started,
        configuration=spec_fields,
        experiment_description=plan.experiment.description,
    )


def _unmeasurable(claim: Claim, reason: str) -> Analysis:
    return Analysis(
        primary=not_measurable("primary effect", "not measured", "increase", reason),
        figures=[message_figure(claim.title, reason)],
    )


def _common_fields(specs: Sequence[RunSpec]) -> dict[str, Any]:
    """Spec fields shared by every run of a claim, and for the others the values they take."""
    if not specs:
        return {}
    dumps = [spec.model_dump(mode="json") for spec in specs]
    fields: dict[str, Any] = {}
    for name in RunSpec.model_fields:
        values = list(dict.fromkeys(repr(d[name]) for d in dumps))
        if len(values) == 1:
            fields[name] = dumps[0][name]
        elif name != "seed":
            fields[name] = list({repr(d[name]): d[name] for d in dumps}.values())
    fields["seeds"] = sorted({d["seed"] for d in dumps})
    return fields
