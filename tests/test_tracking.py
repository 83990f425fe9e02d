"""``normdrop export --format tensorboard|mlflow`` and the live TensorBoard hook, read back with TensorBoard's own
event reader and MLflow's client."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from typer.testing import CliRunner

from normdrop import tracking
from normdrop.cli import app
from normdrop.cli.lab import OutputFormat
from normdrop.spec import RunResult, RunSpec
from normdrop.store import ExportFormat, RunProvenance, Store

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
plugin_data_pb2 = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")


def make_store(path: Path) -> Store:
    store = Store(path)
    finished = RunSpec(steps=4, lr=0.05, seed=1)
    failed = RunSpec(steps=4, lr=0.5, seed=2)
    store.save(
        RunResult(
            run_id=finished.run_id,
            spec=finished,
            status="finished",
            metrics=[(step, name, 1.0 / (step + 1) + k) for step in range(4) for k, name in enumerate(("a", "b"))],
            summary={"test_accuracy": 0.75, "diverged": False, "train_loss": None},
            wall_time=1.5,
        ),
        RunProvenance.collect(0.0, 1.5),
        artifacts={"weights.pt": b"\x00weights"},
    )
    store.save(
        RunResult(run_id=failed.run_id, spec=failed, status="failed", error="boom", wall_time=0.1),
        RunProvenance.collect(0.0, 0.1),
    )
    return store


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_output_formats_are_the_stores_and_the_trackers():
    assert set(get_args(OutputFormat)) == set(get_args(ExportFormat)) | set(get_args(tracking.TrackingFormat))


def test_tensorboard_export_reads_back(tmp_path):
    with make_store(tmp_path / "runs.db") as store:
        written = tracking.export(store, tmp_path / "tb", "tensorboard")
        runs = {run.run_id: run for run in store.runs()}
        assert sorted(p.name for p in written) == sorted(runs)
        for run_dir in written:
            got = scalars(run_dir)
            metrics = store.metrics([run_dir.name])
            for name, group in metrics.groupby("name"):
                expected = [(int(s), float(np.float32(v))) for s, v in zip(group["step"], group["value"], strict=True)]
                assert got[name] == expected
            summary = {k: v for k, v in runs[run_dir.name].summary.items() if isinstance(v, int | float)}
            for key, value in summary.items():
                assert got[f"summary/{key}"] == [(0, float(np.float32(value)))]
            accumulator = event_accumulator.EventAccumulator(str(run_dir))
            accumulator.Reload()
            content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
            hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
            for key, value in tracking.hyperparameters(runs[run_dir.name].spec).items():
                field = hparams[key]
                if isinstance(value, int | float):  # torch's writer stores booleans as numbers 0 / 1
                    assert field.number_value == value, key
                else:
                    assert field.string_value == value, key


@pytest.mark.slow  # MLflow creates its SQLite schema with alembic migrations: ~10 s
def test_mlflow_export_reads_back(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    with make_store(tmp_path / "runs.db") as store:
        (out,) = tracking.export(store, tmp_path / "mlruns", "mlflow")
        client = MlflowClient(tracking_uri=tracking.mlflow_tracking_uri(out))
        experiment = client.get_experiment_by_name(tracking.MLFLOW_EXPERIMENT)
        mlflow_runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        stored = {run.run_id: run for run in store.runs()}
        assert set(mlflow_runs) == set(stored)
        for run_id, run in stored.items():
            mlflow_run = mlflow_runs[run_id]
            assert mlflow_run.data.tags["normdrop.status"] == run.status
            assert mlflow_run.info.status == ("FAILED" if run.status == "failed" else "FINISHED")
            assert mlflow_run.data.params == {k: str(v) for k, v in tracking.hyperparameters(run.spec).items()}
            metrics = store.metrics([run_id])
            for name, group in metrics.groupby("name"):
                history = client.get_metric_history(mlflow_run.info.run_id, name)
                assert [(m.step, m.value) for m in history] == list(zip(group["step"], group["value"], strict=True))
            artifacts = [a.path for a in client.list_artifacts(mlflow_run.info.run_id)]
            assert artifacts == store.artifact_names(run_id)
            for name in artifacts:
                local = client.download_artifacts(mlflow_run.info.run_id, name, str(tmp_path))
                assert Path(local).read_bytes() == store.artifact(run_id, name)
        finished = mlflow_runs[next(i for i, r in stored.items() if r.status == "finished")]
        assert finished.data.metrics["summary.test_accuracy"] == 0.75
        assert "summary.train_loss" not in finished.data.metrics  # None is not a number


def test_cli_export_and_refusal_of_a_non_empty_target(tmp_path):
    make_store(tmp_path / "runs.db").close()
    runner = CliRunner()
    out = tmp_path / "tb"
    args = ["export", "--format", "tensorboard", "--out", str(out), "--store", str(tmp_path / "runs.db")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(list(out.iterdir())) == 2
    again = runner.invoke(app, args)
    assert again.exit_code != 0
    assert "not empty" in again.output
    bad = runner.invoke(app, ["export", "--format", "wandb", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0


def test_tensorboard_hook_logs_the_runs_metrics_live(tmp_path):
    from normdrop.train import run

    spec = RunSpec(steps=5, eval_every=2, seed=3)
    with tracking.TensorBoardHook(tmp_path / "live", every=2) as hook:
        seen_at_call = []
        original = hook.__call__

        def spy(ctx):
            seen_at_call.append(len(scalars(tmp_path / "live")))
            return original(ctx)

        hook.__call__ = spy  # type: ignore[method-assign]
        result = run(spec, hooks=[_Forward(hook, spy)])
    assert result.status == "finished"
    got = scalars(tmp_path / "live")
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, name, value in result.metrics:
        if math.isfinite(value):
            expected.setdefault(name, []).append((step, float(np.float32(value))))
    assert {k: v for k, v in got.items() if k in expected} == expected
    assert len(seen_at_call) == 3  # steps 0, 2, 4
    assert seen_at_call[-1] > 0  # written during training, not only at the end


class _Forward:
    """A hook that forwards to a callable (the spy above) with the wrapped hook's ``every`` and name."""

    def __init__(self, hook: tracking.TensorBoardHook, fn) -> None:
        self.every, self.name, self._fn = hook.every, hook.name, fn

    def __call__(self, ctx):
        return self._fn(ctx)
