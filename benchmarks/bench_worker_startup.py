"""What a spawned sweep worker pays before its first run: CPU seconds and the heavy modules it has imported, at
three points, in workers started exactly as ``normdrop.sweep`` starts them (a spawn pool with its initializer):

- ``empty task``: the worker's own start (interpreter, the re-imported main module, ``normdrop.sweep``);
- ``run_fn unpickled``: a task that carries ``normdrop.lab.run_spec``, as ``execute_run`` does (the trainer, probes
  and torch: what a run needs);
- ``after a first run``: the same worker after ``execute_run`` trained one tiny run (blobs, 20 steps), and a fleet
  worker after ``execute_fleet`` trained a fleet of two;

beside ``python -c "import torch"`` measured in CPU seconds in a fresh process.

    python -m benchmarks.bench_worker_startup
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import normdrop.cli  # noqa: F401 (the main module of `normdrop sweep` is the CLI: workers re-import it)

HEAVY = ("torch", "numpy", "numba", "scipy", "pandas", "matplotlib", "sklearn", "pyarrow", "rich", "pydantic")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _state(label: str) -> tuple[str, float, list[str]]:
    return label, _cpu_seconds(), [name for name in HEAVY if name in sys.modules]


def empty_task() -> tuple[str, float, list[str]]:
    """Measured at the entry of a task that carries nothing."""
    return _state("empty task")


def carrying(run_fn: object) -> tuple[str, float, list[str]]:
    """Measured at the entry of a task that carries ``run_fn`` (already unpickled, so imported)."""
    del run_fn
    return _state("run_fn unpickled")


def first_run(spec_fields: dict, fleet: bool) -> tuple[str, float, list[str]]:
    """Train one run (or a fleet of two) as the sweep's executors do, then measure."""
    from normdrop.lab import run_fleet_specs, run_spec
    from normdrop.spec import RunSpec
    from normdrop.sweep import execute_fleet, execute_run

    spec = RunSpec(**spec_fields)
    if fleet:
        execute_fleet((spec, spec.model_copy(update={"seed": 1})), run_fleet_specs)
        return _state("after a first fleet of 2")
    execute_run(spec, run_spec)
    return _state("after a first run")


def _in_fresh_worker(function, *args) -> tuple[str, float, list[str]]:
    from normdrop.sweep import _start_worker

    with ProcessPoolExecutor(
        1, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(os.getpid(),)
    ) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    from normdrop.lab import run_spec

    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    torch_cpu = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, torch; u = resource.getrusage(resource.RUSAGE_SELF); print(u.ru_utime + u.ru_stime)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    reference = float(torch_cpu.stdout)
    print(f"{'python -c import torch':28s} {reference:6.2f} CPU-s")
    fields = {"dataset": "blobs", "steps": 20, "eval_every": 10, "norm": "batch", "dropout": 0.1}
    for label, seconds, heavy in (
        _in_fresh_worker(empty_task),
        _in_fresh_worker(carrying, run_spec),
        _in_fresh_worker(first_run, fields, False),
        _in_fresh_worker(first_run, fields, True),
    ):
        print(
            f"{label:28s} {seconds:6.2f} CPU-s ({seconds / reference:.2f}x import torch)  imported: {', '.join(heavy)}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
