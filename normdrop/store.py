"""The run store: every run of the lab in one SQLite file, no server.

Tables (see ``_SCHEMA``):

- ``runs``: one row per run: spec JSON, status, diverged step, error text, summary JSON, wall time,
  start/finish timestamps (ISO 8601, UTC), host and library versions.
- ``metrics``: long format, one row per ``(run_id, step, name, value)``.
- ``probe_records``: one row per probe record, ``(run_id, probe, step, record JSON)``.
- ``artifacts``: named files of a run, kept inline (bytes) or by reference (an absolute path).

A run is saved in one transaction, so it is either fully present or absent: a process killed mid-save
leaves no partial rows. The file is in WAL mode: readers never block the writer, and writers from several
processes queue on SQLite's write lock (a busy timeout) and retry when SQLite reports the file busy.

Values: SQLite stores a NaN metric as NULL, so it reads back as NaN from :meth:`Store.metrics` and
:meth:`Store.result`; infinities are kept.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import random
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

if TYPE_CHECKING:  # pandas is imported where a table is built: it costs ~0.5 s, and the CLI's --help needs none
    import pandas as pd

from normdrop.spec import TRAINING_SEMANTICS_VERSION, RunResult, RunSpec, RunStatus, parse_spec
from normdrop.versions import RUN_PACKAGES, package_versions

DEFAULT_STORE_FILENAME = "normdrop-runs.sqlite"
"""The store a command uses when neither ``--store`` nor ``$NORMDROP_STORE`` names one."""

STORE_ENV_VAR = "NORMDROP_STORE"
"""Environment variable that overrides :data:`DEFAULT_STORE_FILENAME`."""

RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)

COMPLETED_STATUSES: tuple[str, ...] = ("finished", "diverged")
"""Outcomes a re-run reuses. A diverged run is a result (deterministic given its spec), not an error;
a failed run (an exception in the trainer) is retried."""

ExportFormat = Literal["csv", "parquet"]
EXPORT_TABLES: tuple[str, ...] = ("runs", "metrics", "probe_records")

SCHEMA_VERSION = 1
# PRAGMA application_id marks the file as a normdrop store: the bytes "NDRS".
_APPLICATION_ID = int.from_bytes(b"NDRS", "big")
_SQLITE_HEADER = b"SQLite format 3\x00"
_SQLITE_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_DEFAULT_BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE runs (
    run_id        TEXT PRIMARY KEY,
    spec          TEXT NOT NULL,
    status        TEXT NOT NULL,
    diverged_step INTEGER,
    error         TEXT,
    summary       TEXT NOT NULL,
    wall_time     REAL NOT NULL,
    started_at    TEXT NOT NULL,
    finished_at   TEXT NOT NULL,
    host          TEXT NOT NULL,
    versions      TEXT NOT NULL
);
CREATE INDEX runs_status ON runs (status);
CREATE TABLE metrics (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    step   INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  REAL
);
CREATE INDEX metrics_run_name_step ON metrics (run_id, name, step);
CREATE TABLE probe_records (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    probe  TEXT NOT NULL,
    step   INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX probe_records_run_probe_step ON probe_records (run_id, probe, step);
CREATE TABLE artifacts (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    name   TEXT NOT NULL,
    data   BLOB,
    path   TEXT,
    PRIMARY KEY (run_id, name),
    CHECK ((data IS NULL) <> (path IS NULL))
);
"""

_T = TypeVar("_T")


class StoreError(RuntimeError):
    """The store file cannot be used: not SQLite, corrupt, or not a normdrop store. Names the file."""


def default_store_path() -> Path:
    """The store path from ``$NORMDROP_STORE``, else :data:`DEFAULT_STORE_FILENAME` in the current directory."""
    return Path(os.environ.get(STORE_ENV_VAR) or DEFAULT_STORE_FILENAME)


@dataclass(frozen=True)
class RunProvenance:
    """Where and when a run was computed: recorded next to its result.

    Collected by the process that trained the run (a pool worker or a Ray node), so ``host`` names
    the machine that did the work.
    """

    host: str
    versions: dict[str, Any]
    started_at: str
    finished_at: str

    @classmethod
    def collect(cls, started: float, finished: float) -> RunProvenance:
        """Provenance of a run in this process that ran from ``started`` to ``finished`` (Unix seconds)."""
        versions: dict[str, Any] = {**package_versions(RUN_PACKAGES), "training_semantics": TRAINING_SEMANTICS_VERSION}
        return cls(socket.gethostname(), versions, _iso_utc(started), _iso_utc(finished))


@dataclass(frozen=True)
class StoredRun:
    """One row of the ``runs`` table, with its JSON columns decoded."""

    run_id: str
    spec: dict[str, Any]
    status: RunStatus
    diverged_step: int | None
    error: str | None
    summary: dict[str, float | bool | None]
    wall_time: float
    started_at: str
    finished_at: str
    host: str
    versions: dict[str, Any]


class Store:
    """A run store in one SQLite file; created on first use.

    Each process (and thread) opens its own ``Store``: a connection is not shared. Use as a context
    manager, or call :meth:`close`.

    Args:
        path: the SQLite file. Missing or empty: a new store is created there.
        busy_timeout: seconds a write waits for another process's write to finish before giving up.

    Raises:
        StoreError: the file is not SQLite, is corrupt, or is a SQLite file of another application.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = _DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._check_header()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._reporting_corruption():
            # isolation_level=None: no implicit transactions; writes use explicit BEGIN IMMEDIATE.
            self._connection = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            with self._reporting_corruption():
                self._retrying(self._initialise)
        except BaseException:
            self._connection.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def close(self) -> None:
        """Close the connection; the file stays consistent whether or not this is called."""
        self._connection.close()

    # ---- writing -------------------------------------------------------------------------------------

    def save(
        self,
        result: RunResult,
        provenance: RunProvenance | None = None,
        artifacts: Mapping[str, bytes | Path] | None = None,
    ) -> bool:
        """Save one run (its row, metrics, probe records, artifacts) in one transaction.

        A run already stored as finished or diverged is kept and ``result`` is dropped: a run completes
        once. A stored failed run is replaced by the new result.

        Args:
            result: the run's result.
            provenance: where and when it ran; default: this process, finishing now.
            artifacts: files of the run by name: ``bytes`` are stored inline, a ``Path`` by reference; saved with
                what the run kept (``result.artifacts``, e.g. its final weights, inline).

        Returns:
            whether ``result`` was written (False: a completed run with this id was already there).
        """
        if result.run_id != result.spec.run_id:
            raise ValueError(f"result.run_id {result.run_id!r} is not its spec's run_id {result.spec.run_id!r}")
        if result.status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {result.status!r}")
        if provenance is None:
            now = time.time()
            provenance = RunProvenance.collect(now - result.wall_time, now)
        run_row = (
            result.run_id,
            _dumps(result.spec.model_dump(mode="json")),
            result.status,
            result.diverged_step,
            result.error,
            _dumps(result.summary),
            result.wall_time,
            provenance.started_at,
            provenance.finished_at,
            provenance.host,
            _dumps(provenance.versions),
        )
        metric_rows = [(result.run_id, int(step), name, float(value)) for step, name, value in result.metrics]
        probe_rows = [
            (result.run_id, str(record["probe"]), int(record["step"]), _dumps(record))
            for record in result.probe_records
        ]
        artifact_rows = [
            (result.run_id, name, None, str(item.resolve()))
            if isinstance(item, Path)
            else (result.run_id, name, bytes(item), None)
            for name, item in {**result.artifacts, **(artifacts or {})}.items()
        ]

        def write() -> bool:
            with self._write_transaction() as connection:
                stored = connection.execute("SELECT status FROM runs WHERE run_id = ?", (result.run_id,)).fetchone()
                if stored is not None and stored[0] in COMPLETED_STATUSES:
                    return False
                if stored is not None:
                    for table in ("metrics", "probe_records", "artifacts", "runs"):
                        connection.execute(f"DELETE FROM {table} WHERE run_id = ?", (result.run_id,))
                connection.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(run_row))})", run_row)
                connection.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", metric_rows)
                connection.executemany("INSERT INTO probe_records VALUES (?, ?, ?, ?)", probe_rows)
                connection.executemany("INSERT INTO artifacts VALUES (?, ?, ?, ?)", artifact_rows)
                return True

        with self._reporting_corruption():
            return self._retrying(write)

    # ---- reading -------------------------------------------------------------------------------------

    def has(self, run_id: str) -> bool:
        """Whether a run with this id is stored, whatever its status."""
        return bool(self._query("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)))

    def completed_ids(self) -> set[str]:
        """Ids of runs a re-run reuses: status finished or diverged (see :data:`COMPLETED_STATUSES`)."""
        placeholders = ", ".join("?" * len(COMPLETED_STATUSES))
        rows = self._query(f"SELECT run_id FROM runs WHERE status IN ({placeholders})", COMPLETED_STATUSES)
        return {run_id for (run_id,) in rows}

    def runs(self, status: str | Iterable[str] | None = None, **spec_filters: Any) -> list[StoredRun]:
        """Stored runs, oldest finish first, optionally filtered.

        Args:
            status: keep runs with this status (or any of these statuses).
            **spec_filters: keep runs whose spec field equals the value, e.g. ``norm="batch", lr=0.01``
                (a list field matches a list: ``probes=["weight_norm"]``).

        Raises:
            ValueError: an unknown status or spec field.
        """
        clauses, parameters = [], []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            unknown = sorted(set(statuses) - set(RUN_STATUSES))
            if unknown:
                raise ValueError(f"unknown run status {unknown}; expected some of {RUN_STATUSES}")
            clauses.append(f"status IN ({', '.join('?' * len(statuses))})")
            parameters.extend(statuses)
        for field, value in spec_filters.items():
            if field not in RunSpec.model_fields:
                raise ValueError(f"unknown spec field {field!r}; spec fields are {sorted(RunSpec.model_fields)}")
            clauses.append("json_extract(spec, ?) IS ?")
            parameters.extend([f'$."{field}"', _sql_value(value)])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(f"SELECT * FROM runs {where} ORDER BY finished_at, run_id", parameters)
        return [_stored_run(row) for row in rows]

    def result(self, run_id: str) -> RunResult:
        """The stored run rebuilt as the :class:`~normdrop.spec.RunResult` that was saved, with the artifacts its spec
        keeps (``spec.keep``; others are read with :meth:`artifact`).

        Raises:
            KeyError: no run with this id.
        """
        rows = self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        run = _stored_run(rows[0])
        metrics = self._query("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY rowid", (run_id,))
        records = self._query("SELECT record FROM probe_records WHERE run_id = ? ORDER BY rowid", (run_id,))
        spec = parse_spec(run.spec)
        keep = tuple(getattr(spec, "keep", ()))  # a user-model run (normdrop ablate) keeps nothing
        kept = self._query(
            f"SELECT name, data FROM artifacts WHERE run_id = ? AND name IN ({', '.join('?' * len(keep))})",
            (run_id, *keep),
        )
        return RunResult(
            run_id=run.run_id,
            spec=spec,
            status=run.status,
            diverged_step=run.diverged_step,
            error=run.error,
            metrics=[(step, name, float("nan") if value is None else value) for step, name, value in metrics],
            probe_records=[json.loads(record) for (record,) in records],
            summary=run.summary,
            wall_time=run.wall_time,
            artifacts={name: bytes(data) for name, data in kept},
        )

    def metrics(self, run_ids: Iterable[str] | None = None, names: Iterable[str] | None = None) -> pd.DataFrame:
        """Metrics in long format: columns ``run_id, step, name, value``, sorted by run, name, step.

        Args:
            run_ids: keep these runs (default: all).
            names: keep these metric names (default: all).
        """
        where, parameters = _membership({"run_id": run_ids, "name": names})
        rows = self._query(
            f"SELECT run_id, step, name, value FROM metrics {where} ORDER BY run_id, name, step", parameters
        )
        import pandas as pd

        frame = pd.DataFrame(rows, columns=["run_id", "step", "name", "value"])
        return frame.astype({"run_id": str, "step": "int64", "name": str, "value": "float64"})

    def probe_records(
        self, run_ids: Iterable[str] | None = None, probes: Iterable[str] | None = None
    ) -> list[dict[str, Any]]:
        """Probe records as saved (each has ``probe`` and ``step``), with ``run_id`` added; in run, probe,
        step order.

        Args:
            run_ids: keep these runs (default: all).
            probes: keep records of these probes (default: all).
        """
        where, parameters = _membership({"run_id": run_ids, "probe": probes})
        rows = self._query(
            f"SELECT run_id, record FROM probe_records {where} ORDER BY run_id, probe, step, rowid", parameters
        )
        return [{"run_id": run_id, **json.loads(record)} for run_id, record in rows]

    def artifact_names(self, run_id: str) -> list[str]:
        """The names of a run's saved artifacts, sorted (none: an empty list)."""
        rows = self._query("SELECT name FROM artifacts WHERE run_id = ? ORDER BY name", (run_id,))
        return [name for (name,) in rows]

    def artifact(self, run_id: str, name: str) -> bytes | Path:
        """A saved artifact: its bytes, or the path it was saved by reference.

        Raises:
            KeyError: no such artifact.
        """
        rows = self._query("SELECT data, path FROM artifacts WHERE run_id = ? AND name = ?", (run_id, name))
        if not rows:
            raise KeyError(f"no artifact {name!r} of run {run_id!r} in {self.path}")
        data, path = rows[0]
        return Path(path) if path is not None else bytes(data)

    def check(self) -> None:
        """Run SQLite's full integrity check (reads the whole file).

        Raises:
            StoreError: the file is damaged, or a metric, probe record or artifact names no stored run.
        """
        problems = [message for (message,) in self._query("PRAGMA integrity_check") if message != "ok"]
        problems += [
            f"{table} row {rowid} names no stored run" for table, rowid, *_ in self._query("PRAGMA foreign_key_check")
        ]
        if problems:
            raise StoreError(f"{self.path}: integrity check failed: {'; '.join(problems[:10])}")

    # ---- export --------------------------------------------------------------------------------------

    def runs_frame(self, status: str | Iterable[str] | None = None, **spec_filters: Any) -> pd.DataFrame:
        """Runs as a flat table: one row per run, spec, summary and versions fields as ``spec.<field>``,
        ``summary.<key>``, ``versions.<package>`` columns. Takes the filters of :meth:`runs`.

        A spec field whose value is a list or mapping is written as its JSON text.
        """
        rows = []
        for run in self.runs(status, **spec_filters):
            row: dict[str, Any] = {
                "run_id": run.run_id,
                "status": run.status,
                "diverged_step": run.diverged_step,
                "error": run.error,
                "wall_time": run.wall_time,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "host": run.host,
            }
            for prefix, fields in (("spec", run.spec), ("summary", run.summary), ("versions", run.versions)):
                for key, value in fields.items():
                    row[f"{prefix}.{key}"] = _dumps(value) if isinstance(value, list | dict) else value
            rows.append(row)
        import pandas as pd

        return pd.DataFrame(rows)

    def probe_records_frame(self, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Probe records as a table: columns ``run_id, probe, step, record`` (the record as JSON text)."""
        where, parameters = _membership({"run_id": run_ids})
        rows = self._query(
            f"SELECT run_id, probe, step, record FROM probe_records {where} ORDER BY run_id, probe, step, rowid",
            parameters,
        )
        import pandas as pd

        return pd.DataFrame(rows, columns=["run_id", "probe", "step", "record"]).astype({"step": "int64"})

    def export(self, out_dir: str | Path, file_format: ExportFormat) -> list[Path]:
        """Write the runs, metrics and probe records tables to ``out_dir`` as ``<table>.csv`` or
        ``<table>.parquet``; artifacts are not exported.

        Returns:
            the files written, in :data:`EXPORT_TABLES` order.
        """
        if file_format not in get_args(ExportFormat):
            raise ValueError(f"export format must be one of {get_args(ExportFormat)}, got {file_format!r}")
        # pandas needs pyarrow for Parquet: fail before writing anything.
        if file_format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise ImportError("Parquet export needs pyarrow: pip install 'normdrop[parquet]'")
        frames = {"runs": self.runs_frame(), "metrics": self.metrics(), "probe_records": self.probe_records_frame()}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for table in EXPORT_TABLES:
            path = out_dir / f"{table}.{file_format}"
            if file_format == "csv":
                frames[table].to_csv(path, index=False)
            else:
                frames[table].to_parquet(path, index=False)
            written.append(path)
        return written

    # ---- internals -----------------------------------------------------------------------------------

    def _check_header(self) -> None:
        """Refuse a non-empty file that does not start with SQLite's magic header."""
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a store file")
        with self.path.open("rb") as file:
            header = file.read(len(_SQLITE_HEADER))
        if header and header != _SQLITE_HEADER:
            raise StoreError(f"{self.path}: not a SQLite database (its first bytes are {header[:8]!r})")

    def _initialise(self) -> None:
        """Switch to WAL, then create the schema in an empty file or check that it is a normdrop store."""
        connection = self._connection
        journal_mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if journal_mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite could not switch to WAL mode (journal_mode={journal_mode})")
        # NORMAL is crash-safe in WAL mode: a killed process never corrupts the file.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        with self._write_transaction():
            application_id = connection.execute("PRAGMA application_id").fetchone()[0]
            schema_version = connection.execute("PRAGMA user_version").fetchone()[0]
            has_tables = connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
            if application_id == 0 and not has_tables:
                # One statement at a time: executescript would commit the open transaction first.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    connection.execute(statement)
                connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif application_id != _APPLICATION_ID:
                raise StoreError(f"{self.path}: a SQLite database, but not a normdrop run store")
            elif schema_version != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: store schema version {schema_version}, this normdrop reads {SCHEMA_VERSION}"
                )

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction that takes the write lock at its start (BEGIN IMMEDIATE), so it never has to
        upgrade a read lock, which SQLite answers with an immediate busy error instead of waiting."""
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield self._connection
            self._connection.execute("COMMIT")
        except BaseException:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
            raise

    def _retrying(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation``, retrying with jittered backoff while SQLite reports the file busy, up to
        ``busy_timeout`` seconds (SQLite's own busy wait does not cover every busy case in WAL mode)."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.01
        while True:
            try:
                return operation()
            except sqlite3.OperationalError as error:
                busy = (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_BUSY_CODES
                if not busy or time.monotonic() > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 0.5)

    def _query(self, sql: str, parameters: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._reporting_corruption():
            return self._retrying(lambda: self._connection.execute(sql, tuple(parameters)).fetchall())

    @contextlib.contextmanager
    def _reporting_corruption(self) -> Iterator[None]:
        """Turn SQLite's errors about a damaged file into a :class:`StoreError` naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as error:
            code = getattr(error, "sqlite_errorcode", 0) & 0xFF
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise StoreError(f"{self.path}: the store file is damaged ({error})") from error
            if code == sqlite3.SQLITE_CANTOPEN:
                raise StoreError(f"{self.path}: cannot open the store file ({error})") from error
            raise


def _iso_utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _dumps(value: Any) -> str:
    """JSON text; NaN and infinities are written as JavaScript literals, which :func:`json.loads` reads."""
    return json.dumps(value, sort_keys=True)


def _sql_value(value: Any) -> Any:
    """A filter value as SQLite's json_extract returns it: booleans are 0/1, lists and mappings minified JSON."""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def _membership(columns: Mapping[str, Iterable[str] | None]) -> tuple[str, list[str]]:
    """A WHERE clause keeping rows whose column is in a given set; any number of values in one parameter."""
    clauses, parameters = [], []
    for column, values in columns.items():
        if values is not None:
            clauses.append(f"{column} IN (SELECT value FROM json_each(?))")
            parameters.append(json.dumps(list(values)))
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters


def _stored_run(row: tuple[Any, ...]) -> StoredRun:
    (run_id, spec, status, diverged_step, error, summary, wall_time, started_at, finished_at, host, versions) = row
    return StoredRun(
        run_id=run_id,
        spec=json.loads(spec),
        status=status,
        diverged_step=diverged_step,
        error=error,
        summary=json.loads(summary),
        wall_time=wall_time,
        started_at=started_at,
        finished_at=finished_at,
        host=host,
        versions=json.loads(versions),
    )
