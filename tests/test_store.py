"""The SQLite run store: round trips, WAL, reuse rules, filters, concurrent writers, damaged files, export."""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.synchronize
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from normdrop.spec import RunResult, RunSpec
from normdrop.store import DEFAULT_STORE_FILENAME, STORE_ENV_VAR, RunProvenance, Store, StoreError, default_store_path


def make_result(spec: RunSpec, status: str = "finished", metric_steps: int = 5) -> RunResult:
    """A result with a few metrics and probe records derived from the spec, as the trainer would give."""
    metrics = [(step, name, spec.lr * step + len(name)) for step in range(metric_steps) for name in ("loss", "acc")]
    return RunResult(
        run_id=spec.run_id,
        spec=spec,
        status=status,
        diverged_step=3 if status == "diverged" else None,
        error="Traceback: boom" if status == "failed" else None,
        metrics=metrics,
        probe_records=[{"probe": "weight_norm", "step": step, "norms": [1.0, 2.5], "layer": "fc1"} for step in (0, 2)],
        summary={"test_accuracy": 0.75, "diverged": status == "diverged", "test_loss": None},
        wall_time=1.25,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "runs.sqlite") as opened:
        yield opened


def test_round_trip_keeps_every_field(store: Store, tmp_path: Path) -> None:
    spec = RunSpec(dataset="blobs", lr=0.05, norm="batch", probes=("layer_inputs",), seed=3)
    result = make_result(spec)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00\x01")
    provenance = RunProvenance(
        host="node-7", versions={"torch": "x"}, started_at="2026-01-01T00:00:00", finished_at="2026-01-01T00:00:01"
    )

    assert store.save(result, provenance, artifacts={"log": b"step 0\n", "weights": weights})

    assert store.result(spec.run_id) == result
    kept = make_result(RunSpec(dataset="blobs", seed=4, keep=("final_weights",)))
    kept.artifacts["final_weights"] = b"state"
    assert store.save(kept)
    assert store.result(kept.run_id).artifacts == {"final_weights": b"state"}
    assert store.artifact(kept.run_id, "final_weights") == b"state"
    (stored, _) = store.runs()
    assert (stored.host, stored.versions, stored.started_at, stored.finished_at) == (
        "node-7",
        {"torch": "x"},
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:01",
    )
    assert stored.spec == spec.model_dump(mode="json")
    assert store.artifact(spec.run_id, "log") == b"step 0\n"
    assert store.artifact(spec.run_id, "weights") == weights.resolve()
    with pytest.raises(KeyError, match="no artifact"):
        store.artifact(spec.run_id, "missing")
    with pytest.raises(KeyError, match="no run"):
        store.result("0" * 16)


def test_default_provenance_is_this_process(store: Store) -> None:
    store.save(make_result(RunSpec()))
    (stored,) = store.runs()
    assert stored.host
    assert stored.versions["training_semantics"] >= 1
    assert stored.started_at < stored.finished_at


def test_non_finite_metrics_read_back(store: Store) -> None:
    spec = RunSpec()
    result = make_result(spec)
    result.metrics = [(0, "loss", float("nan")), (1, "loss", float("inf")), (2, "loss", -float("inf"))]
    store.save(result)

    values = store.result(spec.run_id).metrics
    assert math.isnan(values[0][2])
    assert values[1:] == [(1, "loss", float("inf")), (2, "loss", -float("inf"))]
    assert store.metrics()["value"].isna().tolist() == [True, False, False]


def test_file_is_in_wal_mode(store: Store) -> None:
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_completed_run_is_kept_and_failed_run_replaced(store: Store) -> None:
    spec = RunSpec(lr=0.3)
    failed = make_result(spec, "failed", metric_steps=2)
    assert store.save(failed)
    assert store.has(spec.run_id)
    assert store.completed_ids() == set()

    finished = make_result(spec, "finished", metric_steps=4)
    assert store.save(finished)
    assert store.completed_ids() == {spec.run_id}
    assert len(store.metrics()) == 8  # the failed run's rows are gone

    assert not store.save(make_result(spec, "failed"))
    assert not store.save(make_result(spec, "finished", metric_steps=9))
    assert store.result(spec.run_id) == finished
    assert len(store.runs()) == 1


def test_diverged_run_counts_as_completed(store: Store) -> None:
    spec = RunSpec(lr=10.0)
    store.save(make_result(spec, "diverged"))
    assert store.completed_ids() == {spec.run_id}
    assert store.runs()[0].diverged_step == 3


def test_save_rejects_a_result_of_another_spec(store: Store) -> None:
    result = make_result(RunSpec(lr=0.1))
    result.spec = RunSpec(lr=0.2)
    with pytest.raises(ValueError, match="is not its spec's run_id"):
        store.save(result)
    assert not store.runs()


def test_runs_filters_by_status_and_spec_fields(store: Store) -> None:
    specs = [
        RunSpec(lr=lr, norm=norm, train_size=size)
        for lr in (0.01, 0.1)
        for norm in ("none", "batch")
        for size in (None, 50)
    ]
    for index, spec in enumerate(specs):
        store.save(make_result(spec, "failed" if index == 0 else "finished"))

    def ids(**filters: object) -> set[str]:
        return {run.run_id for run in store.runs(**filters)}

    assert ids(lr=0.01) == {s.run_id for s in specs if s.lr == 0.01}
    assert ids(norm="batch", lr=0.1) == {s.run_id for s in specs if s.norm == "batch" and s.lr == 0.1}
    assert ids(train_size=None) == {s.run_id for s in specs if s.train_size is None}
    assert ids(standardize=True) == {s.run_id for s in specs}
    assert ids(probes=[]) == {s.run_id for s in specs}
    assert ids(status="failed") == {specs[0].run_id}
    assert ids(status=["failed", "finished"], train_size=50) == {s.run_id for s in specs if s.train_size == 50}
    with pytest.raises(ValueError, match="unknown spec field 'learning_rate'"):
        store.runs(learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown run status"):
        store.runs(status="done")


def test_metrics_and_probe_records_filters(store: Store) -> None:
    first, second = RunSpec(seed=0), RunSpec(seed=1)
    store.save(make_result(first, metric_steps=3))
    store.save(make_result(second, metric_steps=2))

    frame = store.metrics(run_ids=[second.run_id], names=["loss"])
    assert frame.to_dict("list") == {
        "run_id": [second.run_id] * 2,
        "step": [0, 1],
        "name": ["loss", "loss"],
        "value": [4.0, 4.01],
    }
    assert len(store.metrics()) == 10
    assert store.metrics(run_ids=[]).empty
    records = store.probe_records(run_ids=[first.run_id])
    assert records == [
        {"run_id": first.run_id, "probe": "weight_norm", "step": step, "norms": [1.0, 2.5], "layer": "fc1"}
        for step in (0, 2)
    ]
    assert store.probe_records(probes=["other"]) == []


def _write_runs(
    path: str, start: multiprocessing.synchronize.Barrier, writer: int, runs: int, metric_steps: int
) -> None:
    """One writer process: when all writers are up, open the store (the first creates it) and save runs one by one."""
    start.wait(timeout=60)
    with Store(path) as store:
        for run in range(runs):
            store.save(make_result(RunSpec(seed=writer * 1000 + run), metric_steps=metric_steps))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    writers, runs, metric_steps = 4, 25, 250
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(writers)
    processes = [context.Process(target=_write_runs, args=(path, start, w, runs, metric_steps)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0

    with Store(path) as store:
        store.check()
        assert len(store.completed_ids()) == writers * runs
        per_run = store.metrics().groupby("run_id").size()
        assert len(per_run) == writers * runs
        assert (per_run == 2 * metric_steps).all()


def test_a_file_that_is_not_sqlite_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database\n" * 10)
    with pytest.raises(StoreError, match=f"{path}: not a SQLite database"):
        Store(path)
    assert path.read_text().startswith("these are my notes")


def test_a_damaged_store_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    with Store(path) as store:
        store.save(make_result(RunSpec()))
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # page 1 after the file header: the schema's root page
    path.write_bytes(bytes(data))

    with pytest.raises(StoreError, match=f"{path}: the store file is damaged"):
        Store(path).runs()


def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE orders (id INTEGER)")
    with pytest.raises(StoreError, match=f"{path}: a SQLite database, but not a normdrop run store"):
        Store(path)


def test_check_reports_rows_without_their_run(store: Store) -> None:
    store.save(make_result(RunSpec()))
    store.check()
    with sqlite3.connect(store.path) as connection:
        connection.execute("INSERT INTO metrics VALUES ('feedfacefeedface', 0, 'loss', 1.0)")
    with pytest.raises(StoreError, match=r"metrics row \d+ names no stored run"):
        store.check()


def test_default_store_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(STORE_ENV_VAR, raising=False)
    assert default_store_path() == Path(DEFAULT_STORE_FILENAME)
    monkeypatch.setenv(STORE_ENV_VAR, str(tmp_path / "elsewhere.sqlite"))
    assert default_store_path() == tmp_path / "elsewhere.sqlite"


def _nulls_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    """CSV has one kind of empty cell: read back, a missing value is NaN whether it was None or NaN."""
    return frame.astype(object).where(frame.notna(), None)


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_round_trips(store: Store, tmp_path: Path, file_format: str) -> None:
    store.save(make_result(RunSpec(lr=0.1, probes=("layer_inputs",))))
    store.save(make_result(RunSpec(lr=0.2), "failed"))
    store.save(make_result(RunSpec(lr=0.3), "diverged"))

    written = store.export(tmp_path / "out", file_format)

    assert [path.name for path in written] == [f"{t}.{file_format}" for t in ("runs", "metrics", "probe_records")]
    read = pd.read_csv if file_format == "csv" else pd.read_parquet
    runs, metrics, probe_records = (read(path) for path in written)
    expected_runs = store.runs_frame()
    assert len(runs) == 3
    assert {"spec.lr", "summary.test_accuracy", "versions.torch"} <= set(runs.columns)
    pd.testing.assert_frame_equal(_nulls_as_none(runs), _nulls_as_none(expected_runs), check_dtype=False)
    pd.testing.assert_frame_equal(metrics, store.metrics(), check_dtype=False)
    pd.testing.assert_frame_equal(probe_records, store.probe_records_frame(), check_dtype=False)
    assert len(metrics) == 30
