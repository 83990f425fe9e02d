"""Shared fixtures: every layer test runs once per available kernel path.

The paths: ``composite`` (torch ops), ``numba`` (numba kernels through Python autograd.Functions) and
``numba+fastpath`` (small CPU inputs through the C++ autograd nodes of ``kernels/fastpath.py``, which the tests
insist is built: make test builds it first).
"""

from __future__ import annotations

import importlib.util

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
