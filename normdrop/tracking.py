"""Experiment tracking: stored runs written as TensorBoard event files or as an MLflow run store, and a trainer hook
that logs a run to TensorBoard while it trains.

Both writers are optional extras (``pip install 'normdrop[tensorboard]'`` / ``'normdrop[mlflow]'``): TensorBoard's
files are written with ``torch.utils.tensorboard`` (which needs the ``tensorboard`` package), MLflow's with
``mlflow-skinny``'s client into a local SQLite tracking store (``<out>/mlflow.db``, artifacts under
``<out>/artifacts``; MLflow's file store is in maintenance mode and refuses new use), no server involved.

What is written, per stored run:

- TensorBoard: one directory ``<out>/<run_id>`` holding every metric as a scalar series by step (tag = the metric's
  name), and the run's hyper-parameters (the spec's scalar fields) with its final summary values through
  TensorBoard's hparams plugin.
- MLflow: one MLflow run per stored run in the experiment ``normdrop`` (run name = run id): the spec's fields as
  params (lists and mappings as JSON), every metric by step, the summary as metrics at the final step, status /
  run id / host / versions as tags, and the run's stored artifacts (weights, where a run kept them) as artifacts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from normdrop.store import Store, StoredRun
    from normdrop.train import HookContext

TrackingFormat = Literal["tensorboard", "mlflow"]
MLFLOW_EXPERIMENT = "normdrop"


def require(file_format: str) -> None:
    """Fail before any work if the package that writes ``file_format`` is missing, naming the extra to install."""
    if file_format not in get_args(TrackingFormat):
        raise ValueError(f"tracking format must be one of {get_args(TrackingFormat)}, got {file_format!r}")
    modules = ("mlflow", "sqlalchemy", "alembic") if file_format == "mlflow" else ("tensorboard",)
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"--format {file_format} needs the {module} package: pip install 'normdrop[{file_format}]'"
            )


def _empty_target(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: export into a new or empty directory (runs would be doubled)")


def hyperparameters(spec: dict[str, Any]) -> dict[str, float | int | str | bool]:
    """The spec as flat hyper-parameters: scalars as they are, None as "None", lists and mappings as JSON text."""
    flat: dict[str, float | int | str | bool] = {}
    for key, value in spec.items():
        if isinstance(value, bool | int | float | str):
            flat[key] = value
        elif value is None:
            flat[key] = "None"
        else:
            flat[key] = json.dumps(value, sort_keys=True)
    return flat


def _numeric_summary(run: StoredRun) -> dict[str, float]:
    """Summary values that are numbers (booleans as 0/1; None and non-finite values left out)."""
    values = {}
    for key, value in run.summary.items():
        if isinstance(value, int | float) and math.isfinite(value):  # bool is an int: True -> 1.0
            values[key] = float(value)
    return values


def _metric_rows(store: Store, run_id: str) -> list[tuple[int, str, float]]:
    frame = store.metrics([run_id])
    return list(zip(frame["step"].tolist(), frame["name"].tolist(), frame["value"].tolist(), strict=True))


def export_tensorboard(store: Store, out_dir: str | Path) -> list[Path]:
    """Write every stored run as TensorBoard event files under ``out_dir/<run_id>``; returns those directories."""
    require("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    out_dir = Path(out_dir)
    _empty_target(out_dir)
    written = []
    for run in store.runs():
        run_dir = out_dir / run.run_id
        writer = SummaryWriter(log_dir=str(run_dir))
        try:
            for step, name, value in _metric_rows(store, run.run_id):
                writer.add_scalar(name, value, global_step=step)
            summary = {f"summary/{key}": value for key, value in _numeric_summary(run).items()}
            writer.add_hparams(hyperparameters(run.spec), summary, run_name=".")
        finally:
            writer.close()
        written.append(run_dir)
    return written


def mlflow_tracking_uri(out_dir: str | Path) -> str:
    """The tracking URI of the MLflow store that :func:`export_mlflow` writes at ``out_dir``."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def export_mlflow(store: Store, out_dir: str | Path) -> list[Path]:
    """Write every stored run into an MLflow tracking store at ``out_dir`` (experiment ``normdrop``); returns
    ``[out_dir]``. Read it with ``mlflow.MlflowClient(tracking_uri=mlflow_tracking_uri(out_dir))`` or ``mlflow ui
    --backend-store-uri sqlite:///<out>/mlflow.db``."""
    require("mlflow")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    out_dir = Path(out_dir).resolve()
    _empty_target(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(out_dir))
    experiment_id = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=(out_dir / "artifacts").as_uri())
    for run in store.runs():
        tags = {
            "normdrop.run_id": run.run_id,
            "normdrop.status": run.status,
            "normdrop.host": run.host,
            "normdrop.versions": json.dumps(run.versions, sort_keys=True),
        }
        if run.error:
            tags["normdrop.error"] = run.error[:5000]
        created = client.create_run(experiment_id, run_name=run.run_id, tags=tags)
        mlflow_id = created.info.run_id
        params = [Param(key, str(value)) for key, value in hyperparameters(run.spec).items()]
        rows = _metric_rows(store, run.run_id)
        last_step = max((step for step, _, _ in rows), default=0)
        timestamp = 0
        metrics = [Metric(name, value, timestamp, step) for step, name, value in rows]
        metrics += [Metric(f"summary.{k}", v, timestamp, last_step) for k, v in _numeric_summary(run).items()]
        for start in range(0, max(len(params), 1), 100):
            client.log_batch(mlflow_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(mlflow_id, metrics=metrics[start : start + 1000])
        client.log_batch(mlflow_id, tags=[RunTag("normdrop.wall_time", str(run.wall_time))])
        for name in store.artifact_names(run.run_id):
            item = store.artifact(run.run_id, name)
            if isinstance(item, Path):
                client.log_artifact(mlflow_id, str(item))
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    path = Path(scratch) / name
                    path.write_bytes(item)
                    client.log_artifact(mlflow_id, str(path))
        client.set_terminated(mlflow_id, status="FAILED" if run.status == "failed" else "FINISHED")
    return [out_dir]


def export(store: Store, out_dir: str | Path, file_format: TrackingFormat) -> list[Path]:
    """``export_tensorboard`` or ``export_mlflow`` by name."""
    require(file_format)
    return export_tensorboard(store, out_dir) if file_format == "tensorboard" else export_mlflow(store, out_dir)


class TensorBoardHook:
    """A trainer hook (``normdrop.train.run(spec, hooks=[...])``) that writes the run's metrics to TensorBoard as
    they are recorded: at each call, every metric recorded since the previous call (``HookContext.metrics``), tag =
    name, at its own step. Observes only (the trainer's hook contract), so the run trains as it would without it.

    Metrics recorded after the last call (the final evaluation, when ``steps`` is not a multiple of ``every``)
    are flushed by :meth:`close`, which the caller runs after training: ``with TensorBoardHook(dir) as hook:``.

    Args:
        log_dir: the run's TensorBoard directory.
        every: call every this many steps (the trainer's ``every``; 0 = once, at the end).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path, every: int = 1) -> None:
        if every < 0:
            raise ValueError(f"TensorBoardHook every must be >= 0, got {every}")
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.every = every
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._written = 0
        self._pending: Sequence[tuple[int, str, float]] = ()

    def __call__(self, ctx: HookContext) -> list[dict[str, Any]]:
        self._pending = ctx.metrics
        self._flush()
        return []

    def _flush(self) -> None:
        for step, name, value in self._pending[self._written :]:
            self._writer.add_scalar(name, value, global_step=step)
        self._written = len(self._pending)
        self._writer.flush()

    def close(self) -> None:
        """Write what the last call did not see (the metrics list is the trainer's own, still growing) and close."""
        self._flush()
        self._writer.close()

    def __enter__(self) -> TensorBoardHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
