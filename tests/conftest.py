"""Shared fixtures: every layer test runs once per available kernel backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from normdrop.nn import kernels


def available_backends() -> list[str]:
    """composite always; numba when numba and normdrop's numba kernels import."""
    names = ["composite"]
    if importlib.util.find_spec("numba") is not None and importlib.util.find_spec("normdrop.nn.kernels.numba_cpu"):
        names.append("numba")
    return names


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest):
    """Force one kernel backend for the duration of a test."""
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(None)


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """Tests are small: one intra-op thread (pytest-xdist runs one worker per core) and a fixed seed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
