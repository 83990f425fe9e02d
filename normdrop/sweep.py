"""Sweeps: a sweep file becomes a list of run specs; an executor runs the missing ones into the store.

A sweep file is TOML::

    seeds = 3                    # or a list: seeds = [0, 1, 2]; top-level keys come before any [table]
    name = "bn-vs-lr"            # optional
    description = "..."          # optional

    [fixed]                      # spec fields shared by every run
    dataset = "mnist1d"
    steps = 2000

    [grid]                       # one axis per field; runs are the cartesian product of the axes
    lr = [0.001, 0.01, 0.1]
    norm = ["none", "batch"]

gives 3 x 2 x 3 = 18 specs. Two executors move the runs around and do nothing else: ``"local"`` (a pool of
spawned processes, one per core, one torch thread each) and ``"ray"`` (tasks on a Ray cluster). Either way
the sweeping process writes each result to the store as it arrives, one transaction per run, so killing a
sweep loses at most the runs in flight, and a re-run does only the runs the store does not hold.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import threading
import time
import tomllib
import traceback
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from normdrop.spec import RunResult, RunSpec
from normdrop.store import LEASE_SECONDS, LeaseKeeper, RunProvenance, Store, StoreError

ExecutorName = Literal["local", "ray"]
RunFunction = Callable[[RunSpec], RunResult]
FleetFunction = Callable[[Sequence[RunSpec]], list[RunResult]]
Task = RunSpec | tuple[RunSpec, ...]  # one run, or a fleet of runs trained together (normdrop.fleet)
MAX_FLEET = 64  # members per fleet task: bounds a task's memory and keeps the pool busy near the end of a sweep

_SWEEP_FILE_KEYS = ("name", "description", "seeds", "fixed", "grid")
_PARENT_POLL_S = 1.0


class SweepFileError(ValueError):
    """A sweep file that cannot be turned into specs; the message names the file, key and value."""


class SweepError(RuntimeError):
    """A sweep that could not go on (e.g. a worker process died); finished runs are already saved."""


@dataclass
class SweepReport:
    """What a sweep did: how many runs it found already stored and how the runs it executed ended."""

    total: int
    reused: int
    finished: int = 0
    diverged: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)

    @property
    def executed(self) -> int:
        """Runs this sweep trained and saved."""
        return self.finished + self.diverged + self.failed


# ---- sweep files ---------------------------------------------------------------------------------------


def load_sweep_file(path: str | Path) -> list[RunSpec]:
    """Read a sweep file and expand it into run specs: grid product (in file order) times seeds.

    Raises:
        SweepFileError: unreadable or invalid TOML, an unknown key, a malformed grid or seeds, or a spec value
            the spec rejects; the message names the file, the key and the value.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except OSError as error:
        raise SweepFileError(f"{path}: cannot read the sweep file ({error.strerror})") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SweepFileError(f"{path}: not valid TOML ({error})") from error
    return expand_sweep_file(document, source=str(path))


def expand_sweep_file(document: Mapping[str, Any], source: str = "<sweep file>") -> list[RunSpec]:
    """Expand a parsed sweep file (the TOML document as a mapping) into run specs; see :func:`load_sweep_file`.

    Args:
        document: mapping with optional keys ``name``, ``description``, ``seeds``, ``fixed``, ``grid``.
        source: how error messages name the sweep file, usually its path.
    """
    unknown = [key for key in document if key not in _SWEEP_FILE_KEYS]
    if unknown:
        raise SweepFileError(
            f"{source}: {unknown[0]} = {document[unknown[0]]!r}: unknown top-level key; "
            f"expected some of {_SWEEP_FILE_KEYS}"
        )
    fixed = _table(document, "fixed", source)
    grid = _table(document, "grid", source)
    if "seeds" in grid or "seeds" in fixed:
        section = "grid" if "seeds" in grid else "fixed"
        raise SweepFileError(
            f"{source}: [{section}] seeds: `seeds` is a top-level key; write it before any [table] in the file"
        )
    for section, table in (("fixed", fixed), ("grid", grid)):
        for key in table:
            if key not in RunSpec.model_fields:
                raise SweepFileError(
                    f"{source}: [{section}] {key} = {table[key]!r}: unknown spec field; "
                    f"spec fields are {', '.join(sorted(RunSpec.model_fields))}"
                )
    both = sorted(fixed.keys() & grid.keys())
    if both:
        raise SweepFileError(f"{source}: {both[0]!r} is both in [fixed] and in [grid]; keep one")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepFileError(f"{source}: [grid] {key} = {values!r}: a grid axis must be a non-empty list of values")
        for value in values:
            if values.count(value) > 1:
                raise SweepFileError(f"{source}: [grid] {key} = {values!r}: the value {value!r} is listed twice")
    seeds = _seeds(document, fixed, grid, source)

    specs = []
    for combination in itertools.product(*grid.values()):
        point = dict(zip(grid, combination, strict=True))
        for seed in seeds:
            fields = {**fixed, **point} if seed is None else {**fixed, **point, "seed": seed}
            try:
                specs.append(RunSpec(**fields))
            except ValidationError as error:
                raise SweepFileError(_describe_validation_error(error, source, fixed, point)) from error
    return specs


def _table(document: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    table = document.get(key, {})
    if not isinstance(table, dict):
        raise SweepFileError(f"{source}: {key} = {table!r}: expected a table [{key}]")
    return table


def _seeds(document: Mapping[str, Any], fixed: dict[str, Any], grid: dict[str, Any], source: str) -> list[int | None]:
    """The seeds each grid point runs with; ``[None]`` when the sweep file leaves the seed to [fixed], [grid] or
    the spec's default."""
    if "seeds" not in document:
        return [None]
    seeds = document["seeds"]
    if "seed" in fixed or "seed" in grid:
        raise SweepFileError(f"{source}: seeds = {seeds!r} and a `seed` spec field both set the seed; keep one")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise SweepFileError(f"{source}: seeds = {seeds!r}: a number of seeds must be at least 1")
        return list(range(seeds))
    if isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        if len(set(seeds)) < len(seeds):
            raise SweepFileError(f"{source}: seeds = {seeds!r}: a seed is listed twice")
        return list(seeds)
    raise SweepFileError(f"{source}: seeds = {seeds!r}: expected a number of seeds or a non-empty list of integers")


def _describe_validation_error(
    error: ValidationError, source: str, fixed: Mapping[str, Any], point: Mapping[str, Any]
) -> str:
    """One line per problem: where the value came from ([fixed], [grid] or seeds), the key, the value."""
    lines = []
    for problem in error.errors():
        location = problem["loc"]
        message = problem["msg"]
        if not location:  # a check across fields: name the whole grid point
            where = f"[grid] point {dict(point)!r}" if point else "[fixed]"
            lines.append(f"{source}: {where}: {message}")
            continue
        key = str(location[0])
        where = "[grid]" if key in point else "[fixed]" if key in fixed else "seeds:"
        value = point.get(key, fixed.get(key, problem.get("input")))
        lines.append(f"{source}: {where} {key} = {value!r}: {message}")
    return "\n".join(lines)


# ---- running ---------------------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_run_function() -> RunFunction:
    """A spec's run with its probes, :func:`normdrop.lab.run_spec` (imported here: importing the trainer imports
    torch, which a sweep with nothing left to run never needs)."""
    from normdrop.lab import run_spec

    return run_spec


def execute_run(spec: RunSpec, run_fn: RunFunction) -> tuple[RunResult, RunProvenance]:
    """Train one run in this process with one torch thread; an exception becomes a failed result.

    This is what every executor runs on its workers.
    """
    import torch

    torch.set_num_threads(1)
    started, cpu_started = time.time(), time.process_time()
    try:
        result = run_fn(spec)
        if result.run_id != spec.run_id:
            raise ValueError(f"the run function returned run {result.run_id!r} for spec {spec.run_id!r}")
    except Exception:
        result = failed_result(spec, traceback.format_exc(), time.time() - started)
    return result, RunProvenance.collect(started, time.time(), time.process_time() - cpu_started)


def fleet_twin(run_fn: RunFunction) -> FleetFunction | None:
    """The fleet function whose members are the runs ``run_fn`` trains: :func:`normdrop.lab.run_fleet_specs` for
    :func:`normdrop.lab.run_spec`, :func:`normdrop.fleet.run_fleet` for :func:`normdrop.train.run`; None for any other
    function (a custom or patched run function is not the trainer, so its runs are trained one by one)."""
    from normdrop.fleet import run_fleet
    from normdrop.lab import run_fleet_specs, run_spec
    from normdrop.train import run

    twins: dict[Any, FleetFunction] = {run_spec: run_fleet_specs, run: run_fleet}
    return twins.get(run_fn)


def execute_fleet(specs: tuple[RunSpec, ...], fleet_fn: FleetFunction) -> list[tuple[RunResult, RunProvenance]]:
    """Train one fleet in this process with one torch thread (what an executor runs for a fleet task). Each member's
    provenance records the fleet in ``versions["fleet"]``: ``{"id": ..., "size": K, "member": k}``."""
    import hashlib

    import torch

    torch.set_num_threads(1)
    started, cpu_started = time.time(), time.process_time()
    try:
        results = fleet_fn(specs)
        if [r.run_id for r in results] != [s.run_id for s in specs]:
            raise ValueError("the fleet function returned other runs than the specs it was given")
    except Exception:
        results = [failed_result(spec, traceback.format_exc(), time.time() - started) for spec in specs]
    finished, cpu_seconds = time.time(), time.process_time() - cpu_started
    fleet_id = hashlib.sha256(",".join(spec.run_id for spec in specs).encode()).hexdigest()[:16]
    outcomes = []
    for member, result in enumerate(results):
        provenance = RunProvenance.collect(started, finished, cpu_seconds / len(specs))  # the fleet's CPU, shared
        provenance.versions["fleet"] = {"id": fleet_id, "size": len(specs), "member": member}
        outcomes.append((result, provenance))
    return outcomes


def plan_tasks(specs: Sequence[RunSpec], workers: int) -> list[Task]:
    """Fleets (tuples) of the specs :func:`normdrop.fleet.group_specs` groups, each split into at most ``workers``
    near-equal parts of at most :data:`MAX_FLEET` members so the pool stays busy, and the other specs alone."""
    from normdrop.fleet import group_specs

    fleets, solo = group_specs(specs)
    tasks: list[Task] = []
    for group in fleets:
        parts = max(1, min(workers, len(group) // 2), -(-len(group) // MAX_FLEET))
        for part in range(parts):
            members = tuple(group[part::parts])
            tasks.append(members if len(members) > 1 else members[0])
    return tasks + list(solo)


def _task_specs(task: Task) -> tuple[RunSpec, ...]:
    return task if isinstance(task, tuple) else (task,)


def failed_result(spec: RunSpec, error: str, wall_time: float = 0.0) -> RunResult:
    """The result recorded for a run that raised (or whose worker died): status failed, with the error text."""
    return RunResult(run_id=spec.run_id, spec=spec, status="failed", error=error, wall_time=wall_time)


def _lost_run(spec: RunSpec, error: str) -> tuple[RunResult, RunProvenance]:
    """A failed result, noted by the sweeping process, for a run whose result never came back."""
    now = time.time()
    return failed_result(spec, error), RunProvenance.collect(now, now)


def run_sweep(
    specs: Sequence[RunSpec],
    store: Store | str | Path,
    executor: ExecutorName = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    run_fn: RunFunction | None = None,
    fleet: bool = True,
    fleet_fn: FleetFunction | None = None,
    pool: WorkerPool | None = None,
) -> SweepReport:
    """Run every spec the store does not already hold as finished or diverged, saving each as it completes.

    Duplicate specs run once. Failed runs are saved as failed and retried by the next sweep; a run that
    raises never stops the sweep.

    Args:
        specs: the runs of the sweep (see :func:`load_sweep_file`).
        store: a :class:`~normdrop.store.Store` or the path of its file.
        executor: ``"local"``: a process pool on this machine; ``"ray"``: tasks on a Ray cluster.
        workers: parallel runs (local: processes, default one per core; ray: ignored, the cluster's CPUs
            decide, one per run).
        ray_address: Ray cluster to join (default ``$RAY_ADDRESS``; neither: start a local Ray instance
            with one CPU per core and shut it down afterwards).
        progress: show a progress bar with ETA on stderr.
        run_fn: trains one spec (default :func:`normdrop.lab.run_spec`); must be picklable by reference
            (a module-level function) for the process pool.
        fleet: train specs that share a shape as fleets (:mod:`normdrop.fleet`, one task each; the stored runs are
            the same bit for bit, the fleet is noted in their provenance). Used with the default ``run_fn``, or
            with a ``fleet_fn``: the fleet twin of a custom ``run_fn`` (module-level, like it).
        pool: local worker processes kept across sweeps (:class:`WorkerPool`; e.g. the study's adaptive rounds, many
            small sweeps in a row, each of which would otherwise start its workers again). Default: a pool for
            this sweep alone, shut down at its end. Its size wins over ``workers``.

    Raises:
        SweepError: a local worker process died abruptly (runs saved so far stay; re-run to resume).
        ImportError: ``executor="ray"`` without Ray installed.
    """
    if executor not in get_args(ExecutorName):
        raise ValueError(f"executor must be one of {get_args(ExecutorName)}, got {executor!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    owns_store = not isinstance(store, Store)
    store = Store(store) if owns_store else store
    try:
        unique = list({spec.run_id: spec for spec in specs}.values())
        completed = store.completed_ids()
        pending = [spec for spec in unique if spec.run_id not in completed]
        report = SweepReport(total=len(unique), reused=len(unique) - len(pending))
        if not pending:
            return report
        run_fn = run_fn or default_run_function()  # imports the trainer (torch): only when there is a run to train
        if fleet and fleet_fn is None:
            fleet_fn = fleet_twin(run_fn)
        if not fleet:
            fleet_fn = None
        lease_seconds = _lease_seconds()
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with LeaseKeeper(store.path, owner, lease_seconds), _SweepProgress(len(pending), enabled=progress) as bar:
            try:
                while pending:
                    # Train only what no live sweep holds; wait for the rest (another sweep is training it, or its
                    # owner died and its lease lapses), then take over what is still missing.
                    claimed = set(store.claim([spec.run_id for spec in pending], owner, lease_seconds))
                    mine = [spec for spec in pending if spec.run_id in claimed]
                    if mine:
                        _execute(
                            mine, store, report, bar, executor, workers, ray_address, progress, run_fn, fleet_fn, pool
                        )
                    elsewhere = [spec for spec in pending if spec.run_id not in claimed]
                    if not elsewhere:
                        break
                    time.sleep(min(2.0, lease_seconds / 4))
                    completed = store.completed_ids()
                    done_elsewhere = [spec for spec in elsewhere if spec.run_id in completed]
                    report.reused += len(done_elsewhere)
                    for _ in done_elsewhere:
                        bar.advance("done by another sweep")
                    pending = [spec for spec in elsewhere if spec.run_id not in completed]
            finally:
                with contextlib.suppress(StoreError):
                    store.release(owner)
        return report
    finally:
        if owns_store:
            store.close()


def _lease_seconds() -> float:
    """``$NORMDROP_LEASE_SECONDS`` or :data:`normdrop.store.LEASE_SECONDS`."""
    text = os.environ.get("NORMDROP_LEASE_SECONDS")
    if text is None:
        return LEASE_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"$NORMDROP_LEASE_SECONDS={text!r} is not a positive number of seconds")
    return value


def _execute(
    pending: list[RunSpec],
    store: Store,
    report: SweepReport,
    bar: _SweepProgress,
    executor: ExecutorName,
    workers: int | None,
    ray_address: str | None,
    progress: bool,
    run_fn: RunFunction,
    fleet_fn: FleetFunction | None,
    pool: WorkerPool | None = None,
) -> None:
    """Train ``pending`` (runs this sweep holds) on the executor and save each result as it comes."""
    if pool is not None and executor == "local":
        workers = pool.workers
    tasks: list[Task] = list(pending)
    if fleet_fn is not None:
        tasks = plan_tasks(pending, workers or available_cores())
    if executor == "local":
        results = _local_results(tasks, run_fn, workers or available_cores(), fleet_fn, pool)
    else:
        results = _ray_results(tasks, run_fn, ray_address, fleet_fn, quiet=not progress)
    with contextlib.closing(results):
        for result, provenance in results:
            try:
                saved = store.save(result, provenance)
            except StoreError as error:  # disk full, file gone read-only or damaged: say what was kept
                raise StoreError(
                    f"{error}; {report.executed} runs of this sweep were saved before it "
                    f"({report.reused} were already there); re-run the sweep to resume"
                ) from error
            if saved:
                setattr(report, result.status, getattr(report, result.status) + 1)
                if result.status == "failed":
                    report.failed_ids.append(result.run_id)
            else:  # another sweep on the same store completed it first
                report.reused += 1
            bar.advance(result.status)


class _SweepProgress:
    """A rich progress bar on stderr: runs done of total, how they ended, elapsed time and ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._outcomes: Counter[str] = Counter()
        self._progress = Progress(
            TextColumn("[bold]sweep"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[outcomes]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task = self._progress.add_task("sweep", total=total, outcomes="")

    def __enter__(self) -> _SweepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def advance(self, status: str) -> None:
        """Count one more run that ended with ``status``."""
        self._outcomes[status] += 1
        outcomes = " ".join(f"{status} {count}" for status, count in sorted(self._outcomes.items()))
        self._progress.update(self._task, advance=1, outcomes=outcomes)


# ---- executors ------------------------------------------------------------------------------------------


class WorkerPool:
    """Spawned worker processes for local sweeps, kept from one sweep to the next until closed.

    A worker's start costs ~2 CPU-seconds (the interpreter, torch, normdrop's kernels), paid once per pool rather
    than once per sweep. Workers are started when the first sweep submits its tasks; a sweep that is interrupted or
    whose worker dies stops the pool's processes, and the next sweep starts a fresh set. Use as a context manager::

        with WorkerPool(2) as pool:
            for round_specs in rounds:
                run_sweep(round_specs, store, pool=pool)
    """

    def __init__(self, workers: int | None = None) -> None:
        workers = available_cores() if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def executor(self) -> ProcessPoolExecutor:
        """The pool's executor (made on first use; it spawns its workers as tasks arrive, up to ``workers``)."""
        if self._executor is None:
            self._executor = _spawn_pool(self.workers)
        return self._executor

    def terminate(self) -> None:
        """Stop the workers now (runs in flight are lost) and forget them: the next sweep starts new ones."""
        if self._executor is not None:
            _terminate(self._executor)
            self._executor = None

    def close(self) -> None:
        """Let the workers exit (they are idle between sweeps)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(),),
    )


def _terminate(pool: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no public way to do this before Python 3.14's terminate_workers().
    for process in list(pool._processes.values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _local_results(
    specs: Sequence[Task],
    run_fn: RunFunction,
    workers: int,
    fleet_fn: FleetFunction | None = None,
    shared: WorkerPool | None = None,
) -> Iterator[tuple[RunResult, RunProvenance]]:
    """Run specs on a pool of spawned processes (``shared``'s, kept afterwards, or one of this sweep's own); yield
    each result as it completes."""
    try:
        pickle.dumps(run_fn)
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        raise TypeError(
            f"run_fn {run_fn!r} cannot be sent to worker processes; pass a module-level function"
        ) from error
    from normdrop.nn.kernels import fastpath

    fastpath.prepare()  # compile the C++ fast path here once, not in every worker at its first layer call
    pool = shared.executor() if shared is not None else _spawn_pool(min(workers, len(specs)))
    running: dict = {}
    try:
        for spec in specs:
            if isinstance(spec, tuple):
                running[pool.submit(execute_fleet, spec, fleet_fn)] = spec
            else:
                running[pool.submit(execute_run, spec, run_fn)] = spec
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = None
            for future in done:
                spec = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool as error:
                    broken = error
                    continue
                except Exception:  # the result could not travel back, e.g. it does not pickle
                    outcome = [_lost_run(member, traceback.format_exc()) for member in _task_specs(spec)]
                yield from outcome if isinstance(outcome, list) else [outcome]
            if broken is not None:
                if shared is not None:
                    shared.terminate()
                raise SweepError(
                    "a worker process died abruptly (killed, out of memory, or crashed in native code); "
                    "the runs saved so far stay in the store, re-run the sweep to resume"
                ) from broken
    finally:
        if running:  # interrupted (Ctrl-C, an error in this process): stop the runs in flight too, now
            if shared is not None:
                shared.terminate()
            else:
                _terminate(pool)
        elif shared is None:
            pool.shutdown(wait=False, cancel_futures=True)


def _start_worker(parent_pid: int) -> None:
    """Pool worker set-up. Ctrl-C is for the sweeping process, which stops the workers itself; and a
    worker exits when the sweeping process is gone (e.g. killed by SIGKILL), rather than finish a run
    nobody will save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, name="normdrop-parent-watch", daemon=True).start()


def _ray_results(
    specs: Sequence[Task],
    run_fn: RunFunction,
    address: str | None,
    fleet_fn: FleetFunction | None = None,
    quiet: bool = False,
) -> Iterator[tuple[RunResult, RunProvenance]]:
    """Run specs as Ray tasks (one CPU each); yield each result as it completes. ``quiet`` (the sweep without a
    progress bar: the CLI's ``-q``) silences Ray's own output too: its log lines below errors and its warnings."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("the Ray executor needs Ray: pip install 'normdrop[ray]'") from error
    address = address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"log_to_driver": False}
        if quiet:
            options["logging_level"] = logging.ERROR
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=available_cores(), include_dashboard=False, **options)
    running: dict[Any, Task] = {}  # object ref -> spec or fleet
    try:
        remote_run = ray.remote(num_cpus=1)(execute_run)
        remote_fleet = ray.remote(num_cpus=1)(execute_fleet)
        for spec in specs:
            if isinstance(spec, tuple):
                running[remote_fleet.remote(spec, fleet_fn)] = spec
            else:
                running[remote_run.remote(spec, run_fn)] = spec
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            spec = running.pop(ready)
            try:
                outcome = ray.get(ready)
            except ray.exceptions.RayError as error:  # the task's worker died, or the result was lost
                outcome = [_lost_run(member, f"{type(error).__name__}: {error}") for member in _task_specs(spec)]
            yield from outcome if isinstance(outcome, list) else [outcome]
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


# The names of the sweep-file API before "study" was kept for the claims study (normdrop.study) alone.
StudyError = SweepFileError
load_study = load_sweep_file
expand_study = expand_sweep_file
