"""The store and CLI fixes of issue 12 that are not bad-input errors: a rejected file is never modified, damage is
found and what still reads is saved, runs are shown whole with their traceback, `train --store`, option parsing,
and the numeric path recorded with each run."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normdrop.cli import app
from normdrop.spec import RunResult, RunSpec
from normdrop.store import Store, StoreError, check_store


def _result(seed: int, status: str = "finished", error: str | None = None) -> RunResult:
    spec = RunSpec(dataset="blobs", steps=20, eval_every=10, seed=seed)
    metrics = [(step, name, float(seed)) for step in range(300) for name in ("a", "b")]
    return RunResult(run_id=spec.run_id, spec=spec, status=status, error=error, metrics=metrics, wall_time=1.0)


def _store(path: Path, runs: int = 3) -> list[str]:
    with Store(path) as store:
        for seed in range(runs):
            store.save(_result(seed))
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    return [_result(seed).run_id for seed in range(runs)]


def _damage(path: Path, page: int) -> None:
    data = bytearray(path.read_bytes())
    noise = random.Random(page)
    data[(page - 1) * 4096 : page * 4096] = bytes(noise.randrange(256) for _ in range(4096))
    path.write_bytes(bytes(data))


def _root_page(path: Path, name: str) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    finally:
        connection.close()


def test_a_rejected_foreign_file_keeps_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "foreign.sqlite"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    assert before[18:20] == b"\x01\x01"  # rollback journal: opening for writing used to switch it to WAL (2, 2)
    with pytest.raises(StoreError, match="not a normdrop run store"):
        Store(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.sqlite"]


def test_a_damaged_store_is_refused_for_writing_and_check_says_what_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    run_ids = _store(path)
    _damage(path, _root_page(path, "metrics_run_name_step"))  # an index page: every run still reads by scanning
    before = path.read_bytes()
    with pytest.raises(StoreError, match="damaged"):
        Store(path)
    assert path.read_bytes() == before
    report = check_store(path)
    assert not report.ok and report.total == 3 and report.readable == 3
    assert any("Page" in problem for problem in report.problems), report.problems
    with Store(path, readonly=True, quick_check=False) as store:
        written = store.export(tmp_path / "out", "csv", salvage=True)
    import pandas as pd

    runs = pd.read_csv(written[0])
    metrics = pd.read_csv(written[1])
    assert sorted(runs["run_id"]) == sorted(run_ids)
    assert len(metrics) == 3 * 600
    assert path.read_bytes() == before


def test_check_of_a_sound_store_passes_and_a_damaged_data_page_loses_only_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    _store(path, runs=4)
    assert check_store(path).ok
    result = CliRunner().invoke(app, ["check", "--store", str(path)])
    assert result.exit_code == 0 and "integrity check ok; 4 runs" in result.stdout
    connection = sqlite3.connect(path)
    last = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.close()
    _damage(path, last)
    report = check_store(path)
    assert not report.ok and report.total == 4 and report.readable is not None and 0 < report.readable < 4
    result = CliRunner().invoke(app, ["check", "--store", str(path)])
    assert result.exit_code == 2 and f"{report.readable} of 4 runs" in result.stderr


def test_runs_show_prints_a_run_whole_with_its_traceback_and_the_table_shows_the_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: boom here'
    failed = _result(7, status="failed", error=traceback)
    with Store(path) as store:
        store.save(_result(1))
        store.save(failed)
    runner = CliRunner()
    table = runner.invoke(app, ["runs", "--store", str(path)], terminal_width=250)
    assert table.exit_code == 0 and "ValueError: boom here" in table.stdout
    shown = runner.invoke(app, ["runs", "show", failed.run_id[:8], "--store", str(path)])
    assert shown.exit_code == 0, shown.stderr
    assert traceback in shown.stdout
    fields = json.loads(shown.stdout.split("\nerror:\n")[0])
    assert fields["run_id"] == failed.run_id and fields["metric_rows"] == 600 and fields["spec"]["seed"] == 7


def test_train_parses_every_option_tuple_and_stores_the_run(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    argv = ["train", "--dataset", "blobs", "--steps", "6", "--eval-every", "3", "--batch-size", "20", "--norm",
            "ghost", "--norm-options", "ghost_batch_size=10", "--dropout", "0.1", "--dropout-kind", "gaussian",
            "--dataset-options", "n_train=100,noise=0.3", "--store", str(path), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.stdout + result.stderr
    printed = json.loads(result.stdout)
    assert printed["spec"]["norm_options"] == [["ghost_batch_size", 10]]
    with Store(path, readonly=True) as store:
        (stored,) = store.runs()
    assert stored.run_id == printed["run_id"] and stored.status == "finished"
    path_info = stored.versions["numeric_path"]
    assert path_info["torch_threads"] == 1 and path_info["backend"] in ("auto", "numba", "composite")
    listed = CliRunner().invoke(app, ["runs", "--store", str(path)], terminal_width=250)
    assert printed["run_id"] in listed.stdout


def test_a_failed_run_keeps_its_traceback() -> None:
    from normdrop.train import run

    result = run(RunSpec(dataset="blobs", steps=5, batch_size=5000))
    assert result.status == "failed"
    assert result.error.startswith("Traceback (most recent call last):") and "5000" in result.error.splitlines()[-1]
