"""Lab commands: ``normdrop sweep`` runs a sweep file into the store, ``normdrop runs`` lists stored runs,
``normdrop export`` writes the store's tables as CSV or Parquet."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from normdrop.cli.errors import fail, one_line_errors
from normdrop.spec import RunSpec
from normdrop.store import (
    DEFAULT_STORE_FILENAME,
    RUN_STATUSES,
    STORE_ENV_VAR,
    Store,
    StoredRun,
    StoreError,
    check_store,
)
from normdrop.sweep import ExecutorName, SweepError, SweepFileError, load_sweep_file, run_sweep

StoreOption = Annotated[
    Path,
    typer.Option("--store", envvar=STORE_ENV_VAR, show_envvar=True, help="The run store (a SQLite file)."),
]
_DEFAULT_STORE = Path(DEFAULT_STORE_FILENAME)
# The store's table formats, and the trackers' (normdrop.tracking.TrackingFormat: a test keeps the two lists equal).
OutputFormat = Literal["csv", "parquet", "tensorboard", "mlflow"]
# Typer takes a list of Enum members, not of Literal values.
StatusChoice = Enum("StatusChoice", {status: status for status in RUN_STATUSES}, type=str)
# Summary values worth a column in `normdrop runs`, when the runs have them.
_SUMMARY_COLUMNS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")

_stdout = Console()
_stderr = Console(stderr=True)


@one_line_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="The sweep file (TOML: fixed parameters, grid axes, seeds).")],
    store: StoreOption = _DEFAULT_STORE,
    executor: Annotated[ExecutorName, typer.Option(help="Where runs execute.")] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (default $RAY_ADDRESS, else a local instance).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel runs of the local executor (default: one per core).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary line.")] = False,
    fleet: Annotated[
        bool, typer.Option("--fleet/--no-fleet", help="Train MLP runs that share a shape as batched fleets.")
    ] = True,
) -> None:
    """Run every run of a sweep file that the store does not hold yet; exit status 1 if any run failed."""
    try:
        specs = load_sweep_file(sweep_file)
        _check_store_path(store)
        report = run_sweep(
            specs, store, executor=executor, workers=workers, ray_address=ray_address, progress=not quiet, fleet=fleet
        )
    except (SweepFileError, StoreError, SweepError, ImportError) as error:
        _fail(str(error))
    if not quiet:
        _stdout.print(
            f"{report.total} runs in {sweep_file}: {report.reused} already in the store, {report.finished} finished, "
            f"{report.diverged} diverged, {report.failed} failed -> {store}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if report.failed:
        _stderr.print(
            f"{report.failed} runs failed; see `normdrop runs --status failed --store {store}`",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@one_line_errors
def runs(
    what: Annotated[
        list[str] | None,
        typer.Argument(
            help="Nothing: the table of runs; `show RUN_ID`: one run whole (spec, summary, error).", show_default=False
        ),
    ] = None,
    store: StoreOption = _DEFAULT_STORE,
    status: Annotated[list[StatusChoice] | None, typer.Option(help="Keep runs with this status (repeatable).")] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option("--filter", help="Keep runs whose spec has FIELD=VALUE, e.g. norm=batch (repeatable)."),
    ] = None,
) -> None:
    """List stored runs: their status, the spec fields that differ between them, final metrics and the error of a
    failed run; `normdrop runs show RUN_ID` prints one run whole."""
    if what:
        if what[0] != "show" or len(what) != 2:
            raise typer.BadParameter(f"expected nothing or `show RUN_ID`, got {' '.join(what)!r}", param_hint="WHAT")
        with _open_existing(store) as opened:
            _show_run(opened, what[1])
        return
    spec_filters = dict(_parse_filter(text) for text in filters or [])
    try:
        with _open_existing(store) as opened:
            stored = opened.runs(None if status is None else [choice.value for choice in status], **spec_filters)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--filter'") from error
    _stdout.print(_runs_table(stored, title=f"{len(stored)} runs in {store}"))


@one_line_errors
def export(
    file_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            help="csv / parquet: the tables, one file each; tensorboard: event files, one directory per run; "
            "mlflow: an MLflow file store (experiment 'normdrop', one MLflow run per run).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write into.")],
    store: StoreOption = _DEFAULT_STORE,
    salvage: Annotated[
        bool, typer.Option("--salvage", help="Damaged store: export the runs that still read whole, one by one.")
    ] = False,
) -> None:
    """Export the runs, metrics and probe-record tables of the store, one file each."""
    check_out_dir(out, "--out")
    try:
        with _open_existing(store, quick_check=not salvage) as opened:
            if file_format in ("tensorboard", "mlflow"):
                from normdrop import tracking

                written = tracking.export(opened, out, file_format)
            else:
                written = opened.export(out, file_format, salvage=salvage)
    except (ImportError, FileExistsError) as error:
        _fail(str(error))
    for path in written:
        _stdout.print(str(path), markup=False, highlight=False, soft_wrap=True)


def _open_existing(path: Path, quick_check: bool = True) -> Store:
    """Open a store for reading only; a missing file is an error rather than a new empty store."""
    if not path.exists():
        _fail(f"{path}: no run store here (run `normdrop sweep` first, or pass --store / ${STORE_ENV_VAR})")
    try:
        return Store(path, readonly=True, quick_check=quick_check)
    except StoreError as error:
        _fail(str(error))


def _check_store_path(path: Path) -> None:
    """Refuse a store path whose parent is a file, before any work (Store repeats the check when it opens)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                _fail(f"{path}: {parent} is a file, not a directory")
            return


def check_out_dir(out: Path, option: str) -> None:
    """Refuse an output directory that is a file, lies under a file, or cannot be created, before any work."""
    if out.exists() and not out.is_dir():
        _fail(f"{option} {out}: is a file, not a directory")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                _fail(f"{option} {out}: {parent} is a file, not a directory")
            if not out.exists() and not os.access(parent, os.W_OK):
                _fail(f"{option} {out}: cannot create it ({parent} is not writable)")
            break
    if out.is_dir() and not os.access(out, os.W_OK):
        _fail(f"{option} {out}: the directory is not writable")


@one_line_errors
def check(store: StoreOption = _DEFAULT_STORE) -> None:
    """Run SQLite's full integrity check on the store; if it is damaged, say what and which runs still read
    (and export those with `normdrop export`, which reads run by run). Exit 2 if the store is damaged."""
    if not store.exists():
        _fail(f"{store}: no run store here (pass --store / ${STORE_ENV_VAR})")
    report = check_store(store)
    for line in report.lines():
        _stdout.print(line, markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        _fail(
            f"{store}: the store is damaged ({report.problems[0]}); {report.readable} of {report.total} runs "
            "still read whole: `normdrop export --salvage` writes those"
        )


def _parse_filter(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE``; VALUE is read as JSON when it parses (numbers, true/false, null), else as text."""
    field, separator, raw = text.partition("=")
    if not separator or not field:
        raise typer.BadParameter(f"expected FIELD=VALUE, got {text!r}", param_hint="'--filter'")
    try:
        return field.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return field.strip(), raw


def _runs_table(stored: list[StoredRun], title: str) -> Table:
    """One row per run; spec columns only for the fields whose values differ between the runs."""
    varying = [name for name in RunSpec.model_fields if len({json.dumps(run.spec.get(name)) for run in stored}) > 1]
    summary_keys = [key for key in _SUMMARY_COLUMNS if any(run.summary.get(key) is not None for run in stored)]
    table = Table(title=title)
    table.add_column("run_id", no_wrap=True, min_width=len(stored[0].run_id) if stored else None)
    table.add_column("status", no_wrap=True)
    for column in (*varying, *summary_keys, "wall time"):
        table.add_column(column, justify="right")
    with_errors = any(run.error for run in stored)
    if with_errors:
        table.add_column("error", overflow="fold")
    for run in stored:
        status = run.status if run.diverged_step is None else f"{run.status} @{run.diverged_step}"
        table.add_row(
            run.run_id,
            status,
            *(_cell(run.spec.get(name)) for name in varying),
            *(_cell(run.summary.get(key)) for key in summary_keys),
            f"{run.wall_time:.1f}s",
            *([_error_line(run.error)] if with_errors else []),
        )
    return table


def _show_run(store: Store, run_id: str) -> None:
    """Print one stored run whole: its row, spec, summary, provenance, counts of what it recorded, its error."""
    matches = [run for run in store.runs() if run.run_id.startswith(run_id)] if run_id else []
    if len(matches) != 1:
        found = "no run" if not matches else f"{len(matches)} runs"
        _fail(f"{found} with id {run_id!r} in {store.path}")
    run = matches[0]
    counts = store.counts(run.run_id)
    fields = {
        "run_id": run.run_id,
        "status": run.status,
        "diverged_step": run.diverged_step,
        "wall_time": run.wall_time,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "host": run.host,
        **counts,
        "spec": run.spec,
        "summary": run.summary,
        "versions": run.versions,
    }
    _stdout.print(json.dumps(fields, indent=2, sort_keys=False), markup=False, highlight=False, soft_wrap=True)
    if run.error:
        _stdout.print("error:", markup=False)
        _stdout.print(run.error, markup=False, highlight=False, soft_wrap=True)


def _error_line(error: str | None) -> str:
    """The last line of a stored traceback: the exception and its message."""
    lines = [line for line in (error or "").splitlines() if line.strip()]
    return lines[-1][:120] if lines else ""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _fail(message: str) -> NoReturn:
    """Print the error on one line (without reading it as rich markup: sweep file errors contain [fixed]), exit 2."""
    fail(message)
