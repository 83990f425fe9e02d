"""`normdrop sweep`, `normdrop runs`, `normdrop export` through the Typer app, with a stand-in trainer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normdrop.cli import app
from normdrop.spec import RunResult, RunSpec
from normdrop.store import STORE_ENV_VAR, Store
from normdrop.sweep import load_sweep_file

FAILING_WIDTH = 13


def fake_run(spec: RunSpec) -> RunResult:
    """Stands in for the trainer: ``steps`` batch losses, a test accuracy from the seed; raises for width 13."""
    if spec.width == FAILING_WIDTH:
        raise RuntimeError("unlucky width")
    return RunResult(
        run_id=spec.run_id,
        spec=spec,
        status="finished",
        metrics=[(step, "batch_loss", spec.lr / (step + 1)) for step in range(spec.steps)],
        summary={"test_accuracy": 0.5 + spec.seed / 100, "diverged": False},
        wall_time=0.5,
    )


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner whose sweeps train with :func:`fake_run`, on a wide terminal so tables do not wrap."""
    monkeypatch.setattr("normdrop.sweep.default_run_function", lambda: fake_run)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv(STORE_ENV_VAR, raising=False)
    return CliRunner()


def write_sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent(text))
    return path


STUDY = """
seeds = 2

[fixed]
steps = 4

[grid]
lr = [0.01, 0.1]
"""


@pytest.fixture(scope="module")
def swept_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the four runs of STUDY, saved in this process (the sweep itself is tested below)."""
    directory = tmp_path_factory.mktemp("swept")
    path = directory / "runs.sqlite"
    with Store(path) as store:
        for spec in load_sweep_file(write_sweep_file(directory, STUDY)):
            store.save(fake_run(spec))
    return path


def test_sweep_fills_the_store_and_a_rerun_reuses_it(runner: CliRunner, tmp_path: Path) -> None:
    study = write_sweep_file(tmp_path, STUDY)
    store = tmp_path / "runs.sqlite"

    quiet = runner.invoke(app, ["sweep", str(study), "--store", str(store), "--workers", "1", "--quiet"])

    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""
    with Store(store) as opened:
        assert opened.completed_ids() == {spec.run_id for spec in load_sweep_file(study)}
        assert len(opened.metrics()) == 4 * 4

    again = runner.invoke(app, ["sweep", str(study), "--store", str(store)])

    assert again.exit_code == 0, again.output
    assert f"4 runs in {study}: 4 already in the store, 0 finished, 0 diverged, 0 failed -> {store}" in again.output


def test_sweep_with_a_failing_run_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    study = write_sweep_file(tmp_path, f"[grid]\nwidth = [8, {FAILING_WIDTH}]\n[fixed]\nsteps = 3\n")
    store = tmp_path / "runs.sqlite"

    result = runner.invoke(app, ["sweep", str(study), "--store", str(store), "--workers", "1"])

    assert result.exit_code == 1
    assert "1 finished, 0 diverged, 1 failed" in result.output
    assert "1 runs failed; see `normdrop runs --status failed" in result.output
    with Store(store) as opened:
        assert "unlucky width" in opened.runs(status="failed")[0].error


def test_a_bad_study_exits_2_naming_file_key_and_value(runner: CliRunner, tmp_path: Path) -> None:
    study = write_sweep_file(tmp_path, "[fixed]\nlr = 'fast'\n")
    result = runner.invoke(app, ["sweep", str(study), "--store", str(tmp_path / "runs.sqlite")])
    assert result.exit_code == 2
    assert f"error: {study}: [fixed] lr = 'fast': Input should be a valid number" in result.output
    assert not (tmp_path / "runs.sqlite").exists()


def test_runs_lists_and_filters(runner: CliRunner, swept_store: Path) -> None:
    with Store(swept_store) as store:
        by_lr = {lr: {run.run_id for run in store.runs(lr=lr)} for lr in (0.01, 0.1)}

    listing = runner.invoke(app, ["runs", "--store", str(swept_store)])
    assert listing.exit_code == 0, listing.output
    assert "4 runs in" in listing.output
    header = next(line for line in listing.output.splitlines() if "run_id" in line)
    assert [word for word in header.replace("┃", " ").split()] == [
        "run_id",
        "status",
        "lr",
        "seed",
        "test_accuracy",
        "wall",
        "time",
    ]
    assert all(run_id in listing.output for run_id in by_lr[0.01] | by_lr[0.1])

    filtered = runner.invoke(app, ["runs", "--store", str(swept_store), "--filter", "lr=0.1"])
    assert filtered.exit_code == 0, filtered.output
    assert "2 runs in" in filtered.output
    assert all(run_id in filtered.output for run_id in by_lr[0.1])
    assert not any(run_id in filtered.output for run_id in by_lr[0.01])

    failed = runner.invoke(app, ["runs", "--store", str(swept_store), "--status", "failed", "--status", "diverged"])
    assert failed.exit_code == 0, failed.output
    assert "0 runs in" in failed.output


def test_runs_reads_the_store_named_by_the_environment(runner: CliRunner, swept_store: Path) -> None:
    result = runner.invoke(app, ["runs"], env={STORE_ENV_VAR: str(swept_store)})
    assert result.exit_code == 0, result.output
    assert "4 runs in" in result.output


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--filter", "lr"], "expected FIELD=VALUE, got 'lr'"),
        (["--filter", "learning_rate=0.1"], "unknown spec field 'learning_rate'"),
        (["--status", "done"], "'done' is not one of"),
    ],
)
def test_runs_rejects_bad_options(runner: CliRunner, swept_store: Path, arguments: list[str], expected: str) -> None:
    result = runner.invoke(app, ["runs", "--store", str(swept_store), *arguments])
    assert result.exit_code == 2
    assert expected in result.output


def test_runs_and_export_need_an_existing_store(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite"
    for arguments in (["runs"], ["export", "--format", "csv", "--out", str(tmp_path / "out")]):
        result = runner.invoke(app, [*arguments, "--store", str(missing)])
        assert result.exit_code == 2
        assert f"error: {missing}: no run store here" in result.output
    assert not missing.exists()


def test_a_damaged_store_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"not a database at all")
    result = runner.invoke(app, ["runs", "--store", str(path)])
    assert result.exit_code == 2
    assert f"error: {path}: not a SQLite database" in result.output


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_export_writes_every_table(runner: CliRunner, swept_store: Path, tmp_path: Path, file_format: str) -> None:
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", "--store", str(swept_store), "--format", file_format, "--out", str(out)])

    assert result.exit_code == 0, result.output
    paths = [out / f"{table}.{file_format}" for table in ("runs", "metrics", "probe_records")]
    assert result.output.split() == [str(path) for path in paths]
    read = pd.read_csv if file_format == "csv" else pd.read_parquet
    runs, metrics = read(paths[0]), read(paths[1])
    assert sorted(runs["spec.lr"]) == [0.01, 0.01, 0.1, 0.1]
    assert len(metrics) == 16
    assert set(metrics["run_id"]) == set(runs["run_id"])
