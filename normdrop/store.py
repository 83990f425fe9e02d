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

One writer at a time, checkpoints included: every connection that writes to a store (a :class:`Store` opened for
writing, a :class:`LeaseKeeper`'s heartbeats) holds the store's writer lock, an exclusive lock on the file
``<store>-normdrop.lock`` next to it (:class:`WriterLock`; threads and processes alike), for each write transaction
(whose commit may run SQLite's automatic checkpoint) and for closing (the last connection to close checkpoints the
WAL into the file). SQLite 3.7.0-3.51.2 have a documented race, the *WAL-reset bug*
(https://www.sqlite.org/wal.html#walresetbug): a checkpoint that starts right after another has emptied the WAL,
while a second connection commits and so restarts the WAL, can mark frames as copied that were not, which damages
the file. It needs two connections writing or checkpointing at the same moment, which the lock rules out on one
machine (readers take no part in it). Python here links SQLite 3.40.1, and no fixed build was installable.

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
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import filelock

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

LEASE_SECONDS = 60.0
"""A sweep's claim on a run lapses when its heartbeat is older than this (its owner is taken for dead); a live
sweep renews its leases every quarter of it. ``$NORMDROP_LEASE_SECONDS`` overrides it for sweeps."""

_LEASES_TABLE = (
    "CREATE TABLE IF NOT EXISTS leases (run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, heartbeat REAL NOT NULL)"
)
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
    def collect(cls, started: float, finished: float, cpu_seconds: float | None = None) -> RunProvenance:
        """Provenance of a run in this process that ran from ``started`` to ``finished`` (Unix seconds).

        ``cpu_seconds``: the CPU time the run's process spent on it (user + system), recorded in
        ``versions["accounting"]`` beside the 1/5/15-minute load averages at its end. On a shared machine a run's
        wall time also counts the time it waited for a core; its CPU time does not, so the two together tell a slow
        run from a starved one.
        """
        versions: dict[str, Any] = {**package_versions(RUN_PACKAGES), "training_semantics": TRAINING_SEMANTICS_VERSION}
        versions["numeric_path"] = numeric_path()
        versions["accounting"] = {"cpu_seconds": cpu_seconds, "load_average": _load_average()}
        return cls(socket.gethostname(), versions, _iso_utc(started), _iso_utc(finished))


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def numeric_path() -> dict[str, Any]:
    """Which code computed this process's layer calls: the backends and the fast path agree only to rounding, so
    two runs of one spec are bitwise equal only on the same path. ``backend``: the backend asked for (auto,
    composite, numba); ``numba``: whether numba imports; ``fastpath``: whether the C++ fast path is enabled and,
    if this process has loaded it, whether it was built (None: not tried yet); ``torch_threads``."""
    import sys

    import torch

    path: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    kernels = sys.modules.get("normdrop.nn.kernels")
    if kernels is None:  # no normdrop layer was used in this process
        path.update(backend=os.environ.get("NORMDROP_BACKEND") or "auto", numba=None, fastpath=None)
        return path
    try:
        path["backend"] = kernels.requested_backend()
    except ValueError:
        path["backend"] = os.environ.get("NORMDROP_BACKEND")
    path["numba"] = kernels._numba_module.cache_info().currsize > 0 and kernels._numba_module() is not None
    fastpath = sys.modules.get("normdrop.nn.kernels.fastpath")
    if fastpath is None or not fastpath.enabled():
        path["fastpath"] = False if fastpath is not None else None
    elif fastpath.extension.cache_info().currsize:
        path["fastpath"] = fastpath.extension() is not None
    else:
        path["fastpath"] = None
    return path


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


WRITER_LOCK_SUFFIX = "-normdrop.lock"
"""The writer lock's file is the store's path with this appended (see :class:`WriterLock`)."""


def writer_lock_path(path: str | Path) -> Path:
    """The file whose exclusive lock a connection holds while it writes to or checkpoints the store at ``path``."""
    path = Path(path)
    return path.with_name(path.name + WRITER_LOCK_SUFFIX)


class WriterLock:
    """The store's writer lock: an exclusive OS lock on :func:`writer_lock_path` (``flock`` on POSIX, through the
    ``filelock`` package), re-entrant within one holder. Each instance opens its own lock file descriptor, so two
    instances exclude each other whether they live in one process (threads) or in two. Held around every write
    transaction and connection close of :class:`Store` and :class:`LeaseKeeper`, so that no two SQLite connections
    ever write or checkpoint at the same time (see the module docstring: the WAL-reset bug).

    A lock left by a killed process is released by the kernel with its descriptors; the file itself stays (it holds
    no data) and is reused."""

    def __init__(self, store_path: str | Path, timeout: float = _DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = writer_lock_path(store_path)
        self.timeout = timeout
        self._lock = filelock.FileLock(self.path, timeout=timeout, thread_local=False)
        # Threads sharing this instance queue here (re-entrant, as the FileLock's own hold count is).
        self._mutex = threading.RLock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block (waiting up to ``timeout`` seconds for another holder to let go)."""
        with self._mutex:
            try:
                self._lock.acquire()
            except filelock.Timeout as error:
                raise StoreError(
                    f"{self.path}: another process has held the store's writer lock for over {self.timeout:g} s"
                ) from error
            except OSError as error:
                raise StoreError(f"{self.path}: cannot take the store's writer lock ({error.strerror})") from error
            try:
                yield
            finally:
                self._lock.release()


class Store:
    """A run store in one SQLite file; created on first use.

    Each process (and thread) opens its own ``Store``: a connection is not shared. Use as a context
    manager, or call :meth:`close`.

    Args:
        path: the SQLite file. Missing or empty: a new store is created there.
        busy_timeout: seconds a write waits for another process's write to finish before giving up.
        readonly: open for reading only (a read-only connection: nothing is ever written, and a read-only file
            or file system is fine); the file must already be a store.
        quick_check: run SQLite's ``PRAGMA quick_check`` on an existing file and refuse it if damaged (it reads
            every page: 0.7 s on a 127 MB store, against 3.0 s for the full integrity_check, on 2 busy cores).

    Before anything is written the file is inspected through a read-only connection: SQLite's header, the
    application id ("NDRS"), the schema version and the tables' columns. A file that fails is never modified.

    Raises:
        StoreError: the path cannot hold a store; the file is not SQLite, is damaged, is a SQLite file of another
            application or another schema; or (for writing) the file, its directory or its file system is
            read-only.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = _DEFAULT_BUSY_TIMEOUT_S,
        readonly: bool = False,
        quick_check: bool = True,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self._check_path()
        if not readonly:
            self._check_writable()
        # Nothing is written to the file before it is known to be a normdrop store (or empty): its header and
        # schema are read through a read-only connection first.
        is_new = self._inspect(quick_check=quick_check)
        self._writer_lock = None
        if readonly:
            if is_new:
                raise StoreError(f"{self.path}: no run store here (an empty or missing file)")
            with self._reporting_corruption():
                self._connection = sqlite3.connect(
                    self._read_only_uri(), uri=True, timeout=busy_timeout, isolation_level=None
                )
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_lock: WriterLock | None = WriterLock(self.path, timeout=busy_timeout)
        with self._reporting_corruption():
            # isolation_level=None: no implicit transactions; writes use explicit BEGIN IMMEDIATE.
            self._connection = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        try:
            with self._reporting_corruption():
                self._retrying(self._initialise_locked)
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
        """Close the connection; the file stays consistent whether or not this is called. (A writer closes under
        the writer lock: the last connection to close checkpoints the WAL.)"""
        if self._writer_lock is None:
            self._connection.close()
            return
        with contextlib.suppress(StoreError), self._writer_lock.held():
            self._connection.close()
        self._connection.close()  # a no-op when closed above; closes anyway if the lock could not be had

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

    # ---- leases: which sweep is training a run right now --------------------------------------------------
    #
    # Two sweeps on one store (two terminals, two machines on a shared file system, a crashed sweep and its resume)
    # must not train the same run at once. Before training, a sweep claims its runs: a row in ``leases`` with its
    # owner id and a heartbeat time, renewed while it works (:class:`LeaseKeeper`). A lease whose heartbeat is older
    # than ``lease_seconds`` belongs to a dead owner (killed, or its machine gone) and may be taken over. The table
    # is created on first use, so stores written before it keep their schema; it holds nothing a run's result needs.

    def claim(self, run_ids: Iterable[str], owner: str, lease_seconds: float = LEASE_SECONDS) -> list[str]:
        """Claim the runs of ``run_ids`` that are not completed and not held by a live other owner; returns the
        ids ``owner`` now holds, in the given order (runs it already held included). One write transaction, so two
        sweeps claiming at once never both get a run."""
        wanted = list(dict.fromkeys(run_ids))

        def transaction() -> list[str]:
            with self._write_transaction() as connection:
                connection.execute(_LEASES_TABLE)
                now = time.time()
                connection.execute("DELETE FROM leases WHERE heartbeat < ?", (now - lease_seconds,))
                completed = self.completed_ids()
                held = {
                    run_id: holder
                    for run_id, holder in connection.execute("SELECT run_id, owner FROM leases").fetchall()
                    if holder == owner or _owner_may_be_alive(holder)
                }
                mine = []
                for run_id in wanted:
                    if run_id in completed or held.get(run_id, owner) != owner:
                        continue
                    connection.execute(
                        "INSERT OR REPLACE INTO leases (run_id, owner, heartbeat) VALUES (?, ?, ?)",
                        (run_id, owner, now),
                    )
                    mine.append(run_id)
                return mine

        with self._reporting_corruption():
            return self._retrying(transaction)

    def release(self, owner: str) -> None:
        """Drop every lease ``owner`` holds (the end of its sweep, whatever became of its runs)."""

        def transaction() -> None:
            with self._write_transaction() as connection:
                connection.execute(_LEASES_TABLE)
                connection.execute("DELETE FROM leases WHERE owner = ?", (owner,))

        with self._reporting_corruption():
            self._retrying(transaction)

    def leases(self) -> dict[str, tuple[str, float]]:
        """run id -> (owner, last heartbeat in Unix seconds) of every lease in the store."""
        exists = self._query("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'leases'")[0][0]
        if not exists:
            return {}
        return {run_id: (owner, beat) for run_id, owner, beat in self._query("SELECT * FROM leases")}

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

    def counts(self, run_id: str) -> dict[str, Any]:
        """How much a run recorded: metric rows, probe records, and its artifacts' names."""
        metrics = self._query("SELECT count(*) FROM metrics WHERE run_id = ?", (run_id,))[0][0]
        records = self._query("SELECT count(*) FROM probe_records WHERE run_id = ?", (run_id,))[0][0]
        names = [name for (name,) in self._query("SELECT name FROM artifacts WHERE run_id = ?", (run_id,))]
        return {"metric_rows": metrics, "probe_records": records, "artifacts": names}

    def readable_ids(self) -> list[str]:
        """Ids of the runs that read back whole (row, metrics, probe records) from a possibly damaged file: each
        run is read through the indexes and, where that fails (a damaged index page), by scanning the tables.

        Raises:
            StoreError: not even the list of run ids can be read.
        """
        try:
            run_ids = [run_id for (run_id,) in self._query("SELECT run_id FROM runs ORDER BY rowid")]
        except StoreError:
            run_ids = [run_id for (run_id,) in self._query("SELECT run_id FROM runs NOT INDEXED ORDER BY rowid")]
        return [run_id for run_id in run_ids if self._reads_whole(run_id)]

    def _reads_whole(self, run_id: str) -> bool:
        """Whether the run's rows read back and decode, through the indexes or, failing that, by table scans."""
        for hint in ("", "NOT INDEXED"):
            try:
                rows = self._query(f"SELECT * FROM runs {hint} WHERE run_id = ?", (run_id,))
                RunSpec.model_validate(_stored_run(rows[0]).spec)
                self._query(f"SELECT step, name, value FROM metrics {hint} WHERE run_id = ?", (run_id,))
                for (record,) in self._query(f"SELECT record FROM probe_records {hint} WHERE run_id = ?", (run_id,)):
                    json.loads(record)
            except (StoreError, ValueError, IndexError):
                continue
            return True
        return False

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

    def runs_frame(
        self, status: str | Iterable[str] | None = None, *, run_ids: Iterable[str] | None = None, **spec_filters: Any
    ) -> pd.DataFrame:
        """Runs as a flat table: one row per run, spec, summary and versions fields as ``spec.<field>``,
        ``summary.<key>``, ``versions.<package>`` columns. Takes the filters of :meth:`runs`.

        A spec field whose value is a list or mapping is written as its JSON text.
        """
        keep = None if run_ids is None else set(run_ids)
        rows = [_flat_run(run) for run in self.runs(status, **spec_filters) if keep is None or run.run_id in keep]
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

    def export(self, out_dir: str | Path, file_format: ExportFormat, *, salvage: bool = False) -> list[Path]:
        """Write the runs, metrics and probe records tables to ``out_dir`` as ``<table>.csv`` or
        ``<table>.parquet``; artifacts are not exported.

        Args:
            salvage: read run by run and leave out the runs whose rows are damaged (see :meth:`readable_ids`),
                instead of failing on the first damaged page.

        Returns:
            the files written, in :data:`EXPORT_TABLES` order.
        """
        if file_format not in get_args(ExportFormat):
            raise ValueError(f"export format must be one of {get_args(ExportFormat)}, got {file_format!r}")
        # pandas needs pyarrow for Parquet: fail before writing anything.
        if file_format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise ImportError("Parquet export needs pyarrow: pip install 'normdrop[parquet]'")
        if salvage:
            frames = self._salvaged_frames()
        else:
            frames = {
                "runs": self.runs_frame(),
                "metrics": self.metrics(),
                "probe_records": self.probe_records_frame(),
            }
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

    def _salvaged_frames(self) -> dict[str, pd.DataFrame]:
        """The export tables of the runs that still read whole (see :meth:`readable_ids`), read run by run."""
        import pandas as pd

        readable = self.readable_ids()
        runs, metrics, records = [], [], []
        for run_id in readable:
            for hint in ("", "NOT INDEXED"):
                try:
                    row = self._query(f"SELECT * FROM runs {hint} WHERE run_id = ?", (run_id,))[0]
                    run_metrics = self._query(
                        f"SELECT run_id, step, name, value FROM metrics {hint} WHERE run_id = ? ORDER BY name, step",
                        (run_id,),
                    )
                    run_records = self._query(
                        f"SELECT run_id, probe, step, record FROM probe_records {hint} WHERE run_id = ? "
                        "ORDER BY probe, step, rowid",
                        (run_id,),
                    )
                except StoreError:
                    continue
                runs.append(_flat_run(_stored_run(row)))
                metrics += run_metrics
                records += run_records
                break
        return {
            "runs": pd.DataFrame(runs),
            "metrics": pd.DataFrame(metrics, columns=["run_id", "step", "name", "value"]),
            "probe_records": pd.DataFrame(records, columns=["run_id", "probe", "step", "record"]),
        }

    def _check_path(self) -> None:
        """Refuse a path that cannot hold a store file: a directory, a parent that is a file, or a non-empty file
        that does not start with SQLite's magic header."""
        for parent in self.path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise StoreError(f"{self.path}: {parent} is a file, not a directory")
                break
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a store file")
        try:
            with self.path.open("rb") as file:
                header = file.read(len(_SQLITE_HEADER))
        except OSError as error:
            raise StoreError(f"{self.path}: cannot read the store file ({error.strerror})") from error
        if header and header != _SQLITE_HEADER:
            raise StoreError(f"{self.path}: not a SQLite database (its first bytes are {header[:8]!r})")

    def _inspect(self, quick_check: bool) -> bool:
        """Whether the file is a new store (missing, empty, or a SQLite file with nothing in it); raise
        :class:`StoreError` unless it is otherwise a normdrop store of this schema. Reads only (a read-only
        connection, which sees a WAL file's committed pages too)."""
        wal = self.path.with_name(self.path.name + "-wal")
        if not self.path.exists() or (self.path.stat().st_size == 0 and not wal.exists()):
            return True
        with self._reporting_corruption():
            connection = sqlite3.connect(
                self._read_only_uri(), uri=True, timeout=self.busy_timeout, isolation_level=None
            )
            try:
                application_id, schema_version, has_tables = self._retrying(
                    lambda: (
                        connection.execute("PRAGMA application_id").fetchone()[0],
                        connection.execute("PRAGMA user_version").fetchone()[0],
                        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0,
                    )
                )
                if application_id == 0 and schema_version == 0 and not has_tables:
                    return True
                if application_id != _APPLICATION_ID:
                    raise StoreError(f"{self.path}: a SQLite database, but not a normdrop run store")
                if schema_version != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: store schema version {schema_version}, this normdrop reads {SCHEMA_VERSION}"
                    )
                problems = _schema_problems(connection)
                if problems:
                    raise StoreError(
                        f"{self.path}: normdrop's application id, but not its schema: {'; '.join(problems)}"
                    )
                if quick_check:  # before the writer lock's file is made: a refused store gains no file beside it
                    _quick_check(self.path, connection)
            finally:
                connection.close()
        return False

    def _read_only_uri(self) -> str:
        """A read-only connection's URI; on a read-only file system also ``immutable=1``, since SQLite cannot
        create a WAL store's -shm file there (and nobody can change the file meanwhile)."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            if os.statvfs(self.path.parent).f_flag & os.ST_RDONLY:
                uri += "&immutable=1"
        except OSError:
            pass
        return uri

    def _check_writable(self) -> None:
        """Refuse, before any work, a store that cannot be written: a read-only file, directory or file system.
        (A WAL store also needs to create its -wal and -shm files next to the file.)"""
        target = self.path if self.path.exists() else next(p for p in self.path.absolute().parents if p.exists())
        directory = self.path.parent if self.path.exists() else target
        for item in {target, directory}:
            if not os.access(item, os.W_OK):
                raise StoreError(f"{self.path}: the store is read-only ({item} is not writable)")
        try:
            read_only_fs = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
        except OSError:
            read_only_fs = False
        if read_only_fs:
            raise StoreError(f"{self.path}: the store is read-only (on a read-only file system)")

    def _initialise_locked(self) -> None:
        assert self._writer_lock is not None
        with self._writer_lock.held():
            self._initialise()

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
        upgrade a read lock, which SQLite answers with an immediate busy error instead of waiting. Held under the
        writer lock, commit (and the automatic checkpoint it may run) included."""
        if self._writer_lock is None:
            raise StoreError(f"{self.path}: the store is open read-only")
        with self._writer_lock.held():
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
            if code == sqlite3.SQLITE_FULL:
                raise StoreError(f"{self.path}: the disk is full ({error})") from error
            if code == sqlite3.SQLITE_READONLY:
                raise StoreError(f"{self.path}: the store is read-only ({error})") from error
            if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_PERM):
                raise StoreError(f"{self.path}: cannot read or write the store file ({error})") from error
            raise


def _quick_check(path: Path, connection: sqlite3.Connection) -> None:
    """SQLite's ``PRAGMA quick_check``: every page of the file is read and its b-tree structure checked (not the
    indexes against their tables, which ``integrity_check`` adds); a damaged store is refused."""
    problems = [message for (message,) in connection.execute("PRAGMA quick_check") if message != "ok"]
    if problems:
        raise StoreError(
            f"{path}: the store file is damaged ({'; '.join(problems[:3])}); run `normdrop check` to see what can be "
            "saved"
        )


def _table_columns(connection: sqlite3.Connection) -> dict[str, list[tuple[str, str, int, int]]]:
    """Each table's columns as ``(name, type, not null, primary key position)``."""
    tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        table: [
            (name, kind.upper(), notnull, pk)
            for _, name, kind, notnull, _, pk in connection.execute(f"PRAGMA table_info({json.dumps(table)})")
        ]
        for table in tables
    }


def _expected_columns() -> dict[str, list[tuple[str, str, int, int]]]:
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(_SCHEMA)
        return _table_columns(connection)
    finally:
        connection.close()


def _schema_problems(connection: sqlite3.Connection) -> list[str]:
    """What differs between a file's tables and :data:`_SCHEMA` (extra tables are allowed)."""
    actual = _table_columns(connection)
    problems = []
    for table, columns in _expected_columns().items():
        if table not in actual:
            problems.append(f"no table {table!r}")
        elif actual[table] != columns:
            have, want = {c[0]: c for c in actual[table]}, {c[0]: c for c in columns}
            missing = [name for name in want if name not in have]
            differing = [name for name in want if name in have and have[name] != want[name]]
            extra = [name for name in have if name not in want]
            parts = [
                f"{label} {', '.join(names)}"
                for label, names in (
                    ("missing column(s)", missing),
                    ("different column(s)", differing),
                    ("unknown column(s)", extra),
                )
                if names
            ]
            problems.append(f"table {table!r}: {'; '.join(parts) or 'columns in another order'}")
    return problems


@dataclass
class CheckReport:
    """What :func:`check_store` found: SQLite's integrity problems and how many runs still read whole."""

    path: Path
    problems: list[str]
    total: int | None
    readable: int | None

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def lines(self) -> list[str]:
        """A human-readable account, one finding per line."""
        if self.ok:
            return [f"{self.path}: integrity check ok; {self.total} runs, all read whole"]
        lines = [f"{self.path}: integrity check found {len(self.problems)} problem(s):"]
        lines += [f"  {problem}" for problem in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        if self.total is None:
            lines.append("the list of runs cannot be read: nothing can be saved run by run")
        else:
            lines.append(f"{self.readable} of {self.total} runs still read whole")
        return lines


def check_store(path: str | Path) -> CheckReport:
    """Run SQLite's full ``PRAGMA integrity_check`` and the foreign-key check on a store (read-only), then try to
    read every run back; the report says what is damaged and how many runs can be saved
    (``Store.export(..., salvage=True)``).

    Raises:
        StoreError: the file is not a normdrop store at all (not SQLite, foreign, another schema).
    """
    with Store(path, readonly=True, quick_check=False) as store:
        problems = []
        try:
            problems += [message for (message,) in store._query("PRAGMA integrity_check") if message != "ok"]
            problems += [
                f"{table} row {rowid} names no stored run"
                for table, rowid, *_ in store._query("PRAGMA foreign_key_check")
            ]
        except StoreError as error:
            # integrity_check stops at some damage that quick_check (no index checks) reports page by page
            with contextlib.suppress(StoreError):
                problems += [message for (message,) in store._query("PRAGMA quick_check") if message != "ok"]
            if not problems:
                problems.append(str(error).removeprefix(f"{store.path}: "))
        total = readable = None
        try:
            total = store._query("SELECT count(*) FROM runs")[0][0]
            readable = len(store.readable_ids())
        except StoreError as error:
            if not problems:
                problems.append(str(error).removeprefix(f"{store.path}: "))
        if total is not None and readable is not None and readable < total and not problems:
            problems.append(f"{total - readable} runs do not read back whole")
        return CheckReport(Path(path), problems, total, readable)


def _flat_run(run: StoredRun) -> dict[str, Any]:
    """One run as a flat export row: spec, summary and versions fields as ``spec.<field>`` etc. columns."""
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
    return row


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


def _owner_may_be_alive(owner: str) -> bool:
    """False only when ``owner`` (``host:pid:token``, as sweeps name themselves) is a process on this host that no
    longer exists: a killed sweep's leases are then taken over at once instead of after they lapse."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class LeaseKeeper:
    """Renews ``owner``'s leases in the store file at ``path`` every ``lease_seconds / 4`` from a thread of its own
    (with its own SQLite connection), until closed; then releases them. Use as a context manager around the work."""

    def __init__(self, path: str | Path, owner: str, lease_seconds: float = LEASE_SECONDS) -> None:
        import threading

        self.path, self.owner, self.lease_seconds = Path(path), owner, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="normdrop-lease", daemon=True)

    def _beat(self) -> None:
        lock = WriterLock(self.path, timeout=30.0)
        connection = sqlite3.connect(self.path, timeout=30.0)
        try:
            while not self._stop.wait(self.lease_seconds / 4):
                # a missed beat is retried at the next; a lapse lets another sweep take the runs over
                with contextlib.suppress(sqlite3.Error, StoreError), lock.held(), connection:
                    connection.execute("UPDATE leases SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner))
        finally:
            with contextlib.suppress(StoreError), lock.held():
                connection.close()
            connection.close()

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
