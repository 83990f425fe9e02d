"""Shared fixtures: every layer test runs once per available kernel path.

The paths: ``composite`` (torch ops), ``numba`` (numba kernels through Python autograd.Functions) and
``numba+fastpath`` (small CPU inputs through the C++ autograd nodes of ``kernels/fastpath.py``, which the tests
insist is built: make test builds it first).
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from normdrop.nn import kernels
from normdrop.nn.kernels import fastpath


def available_backends() -> list[str]:
    """composite always; numba and numba+fastpath when numba and normdrop's numba kernels import."""
    names = ["composite"]
    if importlib.util.find_spec("numba") is not None and importlib.util.find_spec("normdrop.nn.kernels.numba_cpu"):
        names += ["numba", "numba+fastpath"]
    return names


def use_path(path: str | None) -> None:
    """Force a kernel path (one of ``available_backends()``): the backend, and the C++ fast path on or off;
    None goes back to the defaults."""
    if path is None:
        kernels.set_backend(None)
        fastpath.set_enabled(None)
        return
    name, _, fast = path.partition("+")
    kernels.set_backend(name)
    fastpath.set_enabled(bool(fast))


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest):
    """Force one kernel path for the duration of a test."""
    use_path(request.param)
    yield request.param
    use_path(None)


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """Tests are small: one intra-op thread (pytest-xdist runs one worker per core) and a fixed seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---- one real `normdrop study --quick` per session (tests/test_study.py, tests/report/) ---------------------


def _normdrop_command() -> list[str]:
    script = shutil.which("normdrop", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from normdrop.cli import app; app()"]


@pytest.fixture(scope="session")
def normdrop_cli() -> list[str]:
    """The command that runs this checkout's ``normdrop`` CLI."""
    return _normdrop_command()


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[Path]:
    """One real ``normdrop study --quick`` per test session, shared by the tests (and pytest-xdist workers) that
    need its output: the first to get the lock runs it, the others wait and reuse it."""
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "quick-study"
    root.mkdir(exist_ok=True)
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "report" / "summary.json").exists():
            started = time.perf_counter()
            completed = subprocess.run(
                [*_normdrop_command(), "study", "--quick", "--store", "runs.sqlite", "--out", "report"],
                cwd=root,
                capture_output=True,
                text=True,
                check=False,
            )
            (root / "study.log").write_text(completed.stdout + completed.stderr)
            (root / "elapsed.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
            assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        fcntl.flock(lock, fcntl.LOCK_UN)
    yield root
