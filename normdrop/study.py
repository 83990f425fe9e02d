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
import dataclasses
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from normdrop.claims.base import Claim, ClaimData, ClaimResult, ScopedClaimResult, SettingResult
from normdrop.claims.experiment import Experiment
from normdrop.claims.figures import message_figure, not_rendered
from normdrop.claims.results import Analysis, Measurement, RunCounts, not_measurable
from normdrop.claims.scope_figure import small_multiples
from normdrop.claims.setting import DEFAULT_SETTING, SETTINGS, StudySetting
from normdrop.probe_catalog import PROBES
from normdrop.scope import ScopedVerdict, SettingVerdict, fragile, overall_verdict
from normdrop.significance import (
    ALPHA,
    HULL_METHOD,
    Adjusted,
    holm,
    interval_p_value,
    min_detectable_effect,
    p_value,
)
from normdrop.spec import RunResult, RunSpec
from normdrop.store import Store
from normdrop.sweep import ExecutorName, SweepError, WorkerPool, run_sweep
from normdrop.versions import STUDY_PACKAGES, package_versions

DEFAULT_OUT_DIR = Path("normdrop-report")
"""Where ``normdrop study`` and ``normdrop report`` write the report."""

POLL_SECONDS = 0.5
MAX_ROUNDS = 64
"""Most rounds of adaptive experiments (:attr:`Experiment.extend`) a study runs: a guard, far above a bisection's."""


@dataclass
class ClaimPlan:
    """A claim in one setting with its experiment, or the reasons it cannot be measured (missing probes)."""

    claim: Claim
    experiment: Experiment
    setting: StudySetting
    missing_probes: dict[str, str] = field(default_factory=dict)

    @property
    def specs(self) -> list[RunSpec]:
        return [] if self.missing_probes else self.experiment.specs()


@dataclass
class StudyOutcome:
    """Everything the report shows: the settings, each claim's scoped result and the study's bookkeeping.

    ``holm_tests``: how many per-setting primary tests Holm's correction ran over (those with a p-value)."""

    settings: list[StudySetting]
    results: list[ScopedClaimResult]
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
    holm_tests: int = 0

    @property
    def setting(self) -> StudySetting:
        """The first setting (a one-setting study's setting)."""
        return self.settings[0]

    @property
    def quick(self) -> bool:
        """Whether any setting is a quick one (short runs, few seeds: a first look)."""
        return any(s.quick for s in self.settings)


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages the numbers depend on."""
    return package_versions(STUDY_PACKAGES)


def study_settings(settings: StudySetting | Sequence[StudySetting] | None = None) -> list[StudySetting]:
    """The settings of a study: one setting, a list (names must be unique), or None for every catalogue setting
    (:func:`default_settings`)."""
    if settings is None:
        return default_settings()
    chosen = [settings] if isinstance(settings, StudySetting) else list(settings)
    if not chosen:
        raise ValueError("a study needs at least one setting")
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"the settings of a study must have distinct names, got {names}")
    return chosen


QUICK_SETTINGS: tuple[str, ...] = (DEFAULT_SETTING,)
"""The settings of ``normdrop study --quick``: one, so a first look fits a minute and a half; its verdicts have no
replication across settings (every page of its report says so)."""


def default_settings(
    names: Sequence[str] | None = None,
    *,
    quick: bool = False,
    seeds: int | None = None,
    dataset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[StudySetting]:
    """Settings of the catalogue (default: all of :data:`normdrop.claims.setting.SETTINGS`, in its order; quick:
    :data:`QUICK_SETTINGS`), each with the same quick flag, seeds, dataset (None: each setting's own) and spec
    overrides."""
    chosen = (list(QUICK_SETTINGS) if quick else list(SETTINGS)) if names is None else list(names)
    unknown = [name for name in chosen if name not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; expected names from {', '.join(SETTINGS)}")
    return [
        StudySetting.create(name=name, quick=quick, seeds=seeds, dataset=dataset, overrides=overrides)
        for name in dict.fromkeys(chosen)
    ]


def plan_study(
    settings: StudySetting | Sequence[StudySetting] | None = None, claims: Sequence[Claim] | None = None
) -> list[ClaimPlan]:
    """Each claim's experiment in every setting that applies to it (claim by claim, settings in order), with the
    probes it names that the catalogue lacks.

    Raises:
        ValueError: a claim runs in none of the settings (e.g. a BN-only setting chosen for a dropout claim).
    """
    chosen = study_settings(settings)
    plans = []
    for claim in all_claims() if claims is None else claims:
        missing = {
            name: f"the probe {name!r} is not in normdrop.probe_catalog.PROBES ({', '.join(sorted(PROBES))})"
            for name in claim.probes
            if name not in PROBES
        }
        applicable = [setting for setting in chosen if setting.applies_to(claim.id)]
        if not claim.per_setting:
            applicable = applicable[:1]
        if not applicable:
            where = [name for name, d in SETTINGS.items() if d.applies_to(claim.id)]
            raise ValueError(
                f"claim {claim.id!r} runs in none of the settings {', '.join(s.name for s in chosen)}; "
                f"it runs in {', '.join(where) or 'custom settings only'}"
            )
        plans += [ClaimPlan(claim, claim.experiment(setting), setting, missing) for setting in applicable]
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


def mixed_paths(paths: dict[str, int]) -> bool:
    """Whether the path counts of :func:`numeric_paths` hold runs that may differ by rounding: two backends, or
    one backend with the fast path both on and off. A run that never loaded the fast path (``fast path=None``: no
    layer of it had a fast-path kernel to call, e.g. a plain network) agrees with either."""
    backends: dict[str, set[str]] = {}
    for key in paths:
        if key == "not recorded":
            backends.setdefault(key, set())
            continue
        backend, _, fast = key.partition(", fast path=")
        backends.setdefault(backend, set())
        if fast != "None":
            backends[backend].add(fast)
    return len(backends) > 1 or any(len(fast) > 1 for fast in backends.values())


def run_study(
    settings: StudySetting | Sequence[StudySetting] | None,
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
    """Run the study: missing runs into the store (unless ``train=False``), then every claim's analysis in every
    setting that applies to it, its re-analyses (half the seeds, a half and a quarter of the budget), Holm's
    correction and the overall verdicts.

    Args:
        settings: one setting, a list of them (distinct names), or None for every setting of the catalogue
            (:func:`default_settings`). Runs shared by claims or settings run once, in one sweep per round.
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
    chosen = study_settings(settings)
    plans = plan_study(chosen, claims)
    warned: set[str] = set()
    for plan in plans:
        if plan.missing_probes and progress and plan.claim.id not in warned:
            warned.add(plan.claim.id)
            console.print(
                f"[yellow]{plan.claim.id}: not measurable, missing probes {sorted(plan.missing_probes)}[/yellow]"
            )
    outcome = StudyOutcome(
        settings=chosen,
        results=[],
        store_path=str(store_path),
        started_at=started_at,
        wall_seconds=0.0,
        executor=executor,
        trained=train,
        versions=versions(),
    )
    # report only reads: a read-only connection (a read-only store works); a missing store is created empty as before
    # One pool of local workers for the first sweep and every adaptive round: a round is often a few runs, and
    # starting the workers again for each cost about as much as its runs (~6 s a round on 2 busy cores).
    pool = WorkerPool(workers) if train and executor == "local" else None
    with Store(store_path, readonly=not train and Path(store_path).exists()) as store, pool or contextlib.nullcontext():
        all_specs = [spec for plan in plans for spec in plan.specs]

        def sweep(specs: list[RunSpec]) -> dict[str, int]:
            return _sweep(
                plans, specs, store, executor, workers, ray_address, progress, run_fn, console, outcome, fleet, pool
            )

        if train and all_specs:
            sweep_started = time.perf_counter()
            outcome.sweep = sweep(all_specs)
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
            swept = sweep(missing)
            for key, value in swept.items():
                outcome.sweep[key] = outcome.sweep.get(key, 0) + value
            results.update(load_results(store, [spec.run_id for spec in missing]))
            if any(spec.run_id not in results for spec in missing):
                break  # the sweep stopped early (its note says why)
        if train:
            outcome.phase_seconds["adaptive rounds"] = time.perf_counter() - rounds_started
        all_specs = [spec for plan in plans for spec in plan.specs]
        paths = numeric_paths(store, results.keys())
    if mixed_paths(paths):
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
    outcome.results, outcome.holm_tests, seconds = _analyze_all(plans, results, progress, console)
    outcome.phase_seconds.update(seconds)
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
    pool: WorkerPool | None = None,
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
                pool=pool,
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
        by_claim: dict[str, set[str]] = {}
        for plan in plans:
            if plan.specs:
                by_claim.setdefault(plan.claim.id, set()).update(spec.run_id for spec in plan.specs)
        claim_runs = list(by_claim.items())  # a claim's runs over all its settings
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
        with Store(self._store_path, readonly=True, quick_check=False) as store:
            while True:
                done = store.completed_ids()
                done |= {run.run_id for run in store.runs(status="failed") if run.finished_at >= self._since}
                for claim_id, ids in self._plans:
                    self._progress.update(self._tasks[claim_id], completed=len(ids & done))
                if self._stop.wait(POLL_SECONDS):
                    break


# ---- analysis: per setting, re-analyses, multiplicity, overall verdicts -------------------------------------

VARIANT_FULL = "full"
VARIANT_HALF_SEEDS = "half the seeds"
VARIANT_HALF_BUDGET = "half the budget"
VARIANT_QUARTER_BUDGET = "a quarter of the budget"
"""The analyses of each claim and setting: the whole runs on all evaluation seeds, and three re-analyses."""


def half_seed_setting(setting: StudySetting) -> StudySetting:
    """The setting with the first ``ceil(n/2)`` evaluation seeds (the half-seeds re-analysis; same experiment)."""
    return dataclasses.replace(setting, seeds=math.ceil(setting.seeds / 2))


def budget_skip_reason(plan: ClaimPlan) -> str:
    """Why a claim's runs cannot be re-analysed at a smaller budget ("" when they can)."""
    if plan.missing_probes:
        return "not measurable (missing probes)"
    if not plan.claim.budget_reanalysis:
        return "its primary needs whole runs (e.g. final weights), so it is not re-analysed at smaller budgets"
    specs = plan.specs
    if not specs:
        return "measured without training runs: no budget to cut"
    scheduled = [s for s in specs if getattr(s, "schedule", "constant") != "constant" or getattr(s, "warmup_steps", 0)]
    if scheduled:
        return (
            f"{len(scheduled)} of its runs follow a learning-rate schedule or warmup, so a run cut short is not a "
            "shorter run: not re-analysed at smaller budgets"
        )
    return ""


def cut_result(result: RunResult, budget: float) -> RunResult:
    """The run as if it had stopped after ``floor(budget * steps)`` steps.

    Metrics and probe records of later steps are dropped, and so are artifacts (final weights belong to the whole
    run); the spec's ``steps`` becomes the cut (the run id stays the stored run's). A run that diverged after the
    cut counts as finished there; ``summary`` is rebuilt from the last evaluation at or before the cut.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if budget == 1:
        return result
    spec = result.spec
    cutoff = math.floor(budget * spec.steps)
    metrics = [row for row in result.metrics if row[0] <= cutoff]
    probe_records = [r for r in result.probe_records if int(r.get("step") or 0) <= cutoff]
    status, diverged_step = result.status, result.diverged_step
    if status == "diverged" and diverged_step is not None and diverged_step > cutoff:
        status, diverged_step = "finished", None
    summary: dict[str, float | bool | None] = dict(result.summary)
    if status == "finished":
        last: dict[str, tuple[int, float]] = {}
        for step, name, value in metrics:
            if name in result.summary and (name not in last or step >= last[name][0]):
                last[name] = (step, value)
        summary = {name: value for name, (_, value) in last.items()}
        summary.update(diverged=False, steps_completed=cutoff)
    return dataclasses.replace(
        result,
        spec=spec.model_copy(update={"steps": max(cutoff, 1)}),
        status=status,
        diverged_step=diverged_step,
        metrics=metrics,
        probe_records=probe_records,
        summary=summary,
        artifacts={},
    )


def primary_p_value(m: Measurement) -> float | None:
    """The primary's p-value from its per-seed values (None with fewer than two, or without a margin where the
    test needs one); for an interval that also holds the test set's sampling error (the hull of
    :func:`normdrop.significance.with_example_error`), the larger of that and the p-value the interval implies
    (:func:`normdrop.significance.interval_p_value`), so Holm's correction sees the same variance as the verdict."""
    if m.verdict == "not measurable":
        return None
    try:
        p = p_value(m.per_seed.values(), m.direction, null=m.null, margin=m.margin)  # type: ignore[arg-type]
        if p is not None and m.estimate is not None and m.estimate.method == HULL_METHOD:
            p = max(p, interval_p_value(m.estimate, m.direction, null=m.null, margin=m.margin))  # type: ignore[arg-type]
        return p
    except ValueError:
        return None


def detectable_effect(m: Measurement) -> float | None:
    """The minimum detectable effect of a measurement with its per-seed sd and n (None below two seeds)."""
    values = [v for v in m.per_seed.values() if math.isfinite(v)]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return min_detectable_effect(sd, len(values))


def plain_reason(m: Measurement) -> str:
    """The measurement's reason, with a zero-width interval worded as what it is: seeds that agree to the
    resolution of the measurement ("resolution-limited") or tie exactly ("zero-width: seeds tie"), not precision.

    The interval is found in the words :func:`normdrop.stats.decide` writes ("95% CI [a, b] over n seeds")."""
    e, reason = m.estimate, m.decision.reason
    if e is None or not (m.resolution_limited or e.ci_low == e.ci_high):
        return reason
    interval = f"{e.confidence:.0%} CI [{e.ci_low:.4g}, {e.ci_high:.4g}] over {e.n} seeds"
    what = (
        "resolution-limited: the seeds agree to the measurement's resolution"
        if m.resolution_limited
        else "zero-width: seeds tie"
    )
    words = f"all {e.n} seeds at {e.value:.4g} ({what}; no interval)"
    return reason.replace(interval, words) if interval in reason else f"{reason} ({what})"


def shown_verdict(m: Measurement, adjusted: Adjusted | None, tests: int) -> tuple[str, str]:
    """The verdict and reason the report shows for a primary: a "supported" that is not significant after Holm
    over ``tests`` primary tests becomes "inconclusive"; every other verdict is the claim's own."""
    reason = plain_reason(m)
    if m.verdict != "supported":
        return m.verdict, reason
    if adjusted is None:
        return "supported", f"{reason}; no per-seed p-value (fewer than two per-seed values), so outside Holm's family"
    if adjusted.significant:
        return (
            "supported",
            f"{reason}; significant after Holm over {tests} primary tests (p = {adjusted.p:.2g}, "
            f"adjusted {adjusted.adjusted:.2g})",
        )
    return "inconclusive", (
        f"supported at the 5% level on its own ({reason}), but not significant after Holm's correction over {tests} "
        f"primary tests (p = {adjusted.p:.2g}, adjusted {adjusted.adjusted:.2g} >= {ALPHA:g}); the claim's own "
        "verdict is kept as raw_verdict"
    )


def _analyze_all(
    plans: list[ClaimPlan],
    results: dict[str, RunResult],
    progress: bool,
    console: Console,
) -> tuple[list[ScopedClaimResult], int, dict[str, float]]:
    """Every claim in every setting, with its re-analyses; then Holm and the overall verdicts. Never raises.

    Returns the scoped results in claim order, the size of Holm's family and the seconds of each phase."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process measurements are then bitwise reproducible across machines
    by_key: dict[tuple[str, str], SettingResult] = {}
    seconds = {"analysis": 0.0, "re-analyses": 0.0}
    cut_cache: dict[tuple[str, float], RunResult] = {}
    settings = list(dict.fromkeys(plan.setting for plan in plans))
    try:
        with Progress(
            TextColumn("{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("claims x settings analysed"),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
        ) as bar:
            task = bar.add_task("analysis", total=len(plans))
            for setting in settings:
                mine = [plan for plan in plans if plan.setting == setting]
                mine.sort(key=lambda plan: plan.claim.id == "summary")  # the summary reads the others: last
                others: dict[str, dict[str, ClaimResult]] = {
                    VARIANT_FULL: {},
                    VARIANT_HALF_SEEDS: {},
                    VARIANT_HALF_BUDGET: {},
                    VARIANT_QUARTER_BUDGET: {},
                }
                half = half_seed_setting(setting)
                for plan in mine:
                    bar.update(task, description=f"{plan.claim.id} ({setting.name})")
                    started = time.perf_counter()
                    full = analyze_claim(plan, setting, results, others[VARIANT_FULL])
                    others[VARIANT_FULL][plan.claim.id] = full
                    seconds["analysis"] += time.perf_counter() - started
                    started = time.perf_counter()
                    item = SettingResult(setting=setting, result=full, budgets={1.0: full.analysis.primary})
                    halved = analyze_claim(plan, half, results, others[VARIANT_HALF_SEEDS], draw=False)
                    others[VARIANT_HALF_SEEDS][plan.claim.id] = halved
                    item.half_seeds = halved.analysis.primary
                    item.budget_skipped = budget_skip_reason(plan)
                    if not item.budget_skipped:
                        for budget, variant in ((0.5, VARIANT_HALF_BUDGET), (0.25, VARIANT_QUARTER_BUDGET)):
                            cut = {}
                            for spec in plan.specs:
                                if spec.run_id in results:
                                    key = (spec.run_id, budget)
                                    if key not in cut_cache:
                                        cut_cache[key] = cut_result(results[spec.run_id], budget)
                                    cut[spec.run_id] = cut_cache[key]
                            shorter = analyze_claim(
                                plan, setting, cut, others[variant], budget=budget, draw=False, whole=results
                            )
                            others[variant][plan.claim.id] = shorter
                            item.budgets[budget] = shorter.analysis.primary
                    item.reanalysis_seconds = time.perf_counter() - started
                    seconds["re-analyses"] += item.reanalysis_seconds
                    by_key[(plan.claim.id, setting.name)] = item
                    bar.advance(task)
    finally:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    scoped, tests = _combine(plans, by_key)
    seconds["multiplicity and overall verdicts"] = time.perf_counter() - started
    started = time.perf_counter()
    for result in scoped:
        try:
            result.figure = small_multiples(result)
        except Exception as error:  # a figure never stops the study
            result.figure = message_figure(result.claim.title, f"the settings figure failed: {error}")
    seconds["settings figures"] = time.perf_counter() - started
    return scoped, tests, seconds


def _variant_measurement(item: SettingResult, variant: str) -> Measurement | None:
    if variant == VARIANT_FULL:
        return item.primary
    if variant == VARIANT_HALF_SEEDS:
        return item.half_seeds
    return item.budgets.get(0.5 if variant == VARIANT_HALF_BUDGET else 0.25)


def _combine(
    plans: list[ClaimPlan], by_key: dict[tuple[str, str], SettingResult]
) -> tuple[list[ScopedClaimResult], int]:
    """Holm over the primaries of each variant (the full analysis, and each re-analysis as a study of its own),
    the shown verdicts, the overall verdicts and the robustness of each claim."""
    shown: dict[str, dict[tuple[str, str], str]] = {}
    family_size: dict[str, int] = {}
    checks = {plan.claim.id for plan in plans if not plan.claim.per_setting}
    for variant in (VARIANT_FULL, VARIANT_HALF_SEEDS, VARIANT_HALF_BUDGET, VARIANT_QUARTER_BUDGET):
        measured = {key: m for key, item in by_key.items() if (m := _variant_measurement(item, variant)) is not None}
        p_values = {f"{claim}@{setting}": primary_p_value(m) for (claim, setting), m in measured.items()}
        # the mechanics checks (Claim.per_setting False) verify what a layer computes against its closed form; they
        # are not hypotheses about training, so they stay outside the family (their own p is reported)
        adjusted = holm({key: p for key, p in p_values.items() if key.split("@")[0] not in checks})
        tests = sum(1 for key, p in p_values.items() if p is not None and key.split("@")[0] not in checks)
        family_size[variant] = tests
        shown[variant] = {}
        for key, m in measured.items():
            if key[0] in checks:
                verdict, reason = m.verdict, f"{plain_reason(m)}; a check of the implementation, outside Holm's family"
            else:
                verdict, reason = shown_verdict(m, adjusted.get(f"{key[0]}@{key[1]}"), tests)
            shown[variant][key] = verdict
            if variant == VARIANT_FULL:
                item = by_key[key]
                item.verdict, item.reason = verdict, reason
                item.p = p_values[f"{key[0]}@{key[1]}"]
                adj = adjusted.get(f"{key[0]}@{key[1]}")
                item.p_adjusted = adj.adjusted if adj is not None else None
                item.mde = None if m.verdict == "not measurable" else detectable_effect(m)
    scoped_results = []
    for claim in dict.fromkeys(plan.claim for plan in plans):
        items = [by_key[(plan.claim.id, plan.setting.name)] for plan in plans if plan.claim is claim]
        keys = [(claim.id, item.setting.name) for item in items]
        full = overall_verdict([SettingVerdict(k[1], shown[VARIANT_FULL][k]) for k in keys])  # type: ignore[arg-type]
        reanalyses: dict[str, ScopedVerdict] = {}
        details = []
        changed = []
        notes_unmeasurable: list[str] = []
        for variant in (VARIANT_HALF_SEEDS, VARIANT_HALF_BUDGET, VARIANT_QUARTER_BUDGET):
            present = [k for k in keys if k in shown[variant]]
            # A setting measurable in full but not in the re-analysis (e.g. a speed target no run reaches within
            # half its steps) says nothing about the verdict's robustness: it is left out of the comparison and
            # named, not counted as a change of verdict.
            unmeasurable = [
                k
                for k in present
                if shown[variant][k] == "not measurable" and shown[VARIANT_FULL][k] != "not measurable"
            ]
            if unmeasurable and variant != VARIANT_QUARTER_BUDGET:
                details_unmeasurable = ", ".join(k[1] for k in unmeasurable)
                notes_unmeasurable.append(f"not measurable with {variant} in {details_unmeasurable}")
            present = [k for k in present if k not in unmeasurable] if variant != VARIANT_QUARTER_BUDGET else present
            if not present:
                continue
            other = overall_verdict([SettingVerdict(k[1], shown[variant][k]) for k in present])  # type: ignore[arg-type]
            reanalyses[variant] = other
            if variant == VARIANT_QUARTER_BUDGET:
                continue  # shown, not part of the robustness test
            baseline = (
                full
                if len(present) == len(keys)
                else overall_verdict([SettingVerdict(k[1], shown[VARIANT_FULL][k]) for k in present])  # type: ignore[arg-type]
            )
            subset = "" if len(present) == len(keys) else f" (on the {len(present)}/{len(keys)} settings re-analysable)"
            if fragile(baseline.verdict, other.verdict):
                changed.append(f"{other.verdict} with {variant}{subset}, {baseline.verdict} in full")
            else:
                details.append(f"{variant}{subset}")
        skipped = [item for item in items if item.budget_skipped]
        if changed:
            detail = "; ".join(changed)
        elif details:
            detail = f"{full.verdict} also with " + " and with ".join(details)
        else:
            detail = "no re-analysis could be made"
        if notes_unmeasurable:
            detail += "; " + "; ".join(notes_unmeasurable) + " (left out of the robustness comparison)"
        if skipped:
            detail += f"; budget not re-analysed in {len(skipped)}/{len(items)} settings: {skipped[0].budget_skipped}"
        scoped_results.append(ScopedClaimResult(claim, items, full, bool(changed), detail, reanalyses))
    return scoped_results, family_size[VARIANT_FULL]


def analyze_claim(
    plan: ClaimPlan,
    setting: StudySetting,
    results: Mapping[str, RunResult],
    others: Mapping[str, ClaimResult],
    *,
    budget: float = 1.0,
    draw: bool = True,
    whole: Mapping[str, RunResult] | None = None,
) -> ClaimResult:
    """One claim's result in one setting: its analysis, or a not-measurable result saying why (missing probe,
    analysis error). ``budget`` and ``draw`` are passed on in :class:`ClaimData` (re-analyses: ``draw=False``), and
    so is ``whole`` (a budget re-analysis: the uncut runs, on which the claim makes its choices)."""
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
        analysis = _unmeasurable(claim, f"needs probes that are not available: {reason}", draw)
    else:
        try:
            uncut = None if whole is None else {run_id: whole[run_id] for run_id in mine}
            data = ClaimData(setting, plan.experiment, mine, dict(others), budget=budget, draw=draw, whole=uncut)
            with contextlib.nullcontext() if draw else not_rendered():
                analysis = claim.analyze(data)
        except Exception as error:
            detail = "".join(traceback.format_exception_only(error)).strip()
            analysis = _unmeasurable(claim, f"the analysis failed in setting {setting.name}: {detail}", draw)
    primary = analysis.primary
    n_seeds = primary.estimate.n if primary.estimate is not None else len(primary.per_seed)
    return ClaimResult(
        claim=claim,
        analysis=analysis,
        runs=counts,
        n_seeds=n_seeds,
        analysis_seconds=time.perf_counter() - started,
        configuration=_common_fields(specs) if draw else {},
        experiment_description=plan.experiment.description,
        setting=setting.name,
    )


def _unmeasurable(claim: Claim, reason: str, draw: bool = True) -> Analysis:
    return Analysis(
        primary=not_measurable("primary effect", "not measured", "increase", reason),
        figures=[message_figure(claim.title, reason)] if draw else [],
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
