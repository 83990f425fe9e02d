"""Kernel backends for normdrop's ops, and how one is chosen.

- ``composite``: elementary torch ops; any device; differentiable; the oracle for the fast kernels.
- ``numba``: fused CPU kernels (see ``kernels/numba_cpu.py``), used for CPU tensors when numba imports.

``auto`` (the default) picks ``numba`` for CPU tensors where it is available and ``composite`` otherwise.
Force one with ``normdrop.nn.kernels.set_backend(name)`` or the environment variable ``NORMDROP_BACKEND`` (read once,
at the first call: this is asked several times per layer call, and reading ``os.environ`` costs about 1.5 us).
Every backend implements the same functions with the same signatures as ``composite``.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from normdrop.nn.kernels import composite

BACKEND_ENV = "NORMDROP_BACKEND"
BACKENDS = ("auto", "composite", "numba")

_forced: str | None = None


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown normdrop backend {name!r} from {source}; expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for all later calls (``None`` returns to the environment variable / ``auto``)."""
    global _forced
    _forced = None if name is None else _check_name(name, "set_backend()")


@functools.cache
def _environment_backend() -> str:
    return _check_name(os.environ.get(BACKEND_ENV, "auto") or "auto", f"${BACKEND_ENV}")


def requested_backend() -> str:
    """The backend asked for: ``set_backend``'s choice, else ``$NORMDROP_BACKEND``, else ``auto``."""
    if _forced is not None:
        return _forced
    return _environment_backend()


@functools.cache
def _numba_module() -> ModuleType | None:
    """The numba backend, imported once (None when numba is missing); cached: this runs several times per layer."""
    try:
        from normdrop.nn.kernels import numba_cpu
    except ImportError:
        return None
    return numba_cpu


def backend_for_device(device: torch.device) -> ModuleType:
    """The backend for work on ``device`` (random fields, say): numba on the CPU if available (or forced), else
    composite. Both give the same bits."""
    name = requested_backend()
    if name == "composite" or torch.device(device).type != "cpu":
        return composite
    numba_cpu = _numba_module()
    if numba_cpu is None:
        if name == "numba":
            raise RuntimeError("the numba backend was requested but numba cannot be imported")
        return composite
    return numba_cpu


def backend_for(x: torch.Tensor) -> ModuleType:
    """The backend module that computes on ``x``: numba for CPU tensors it supports if available (or forced), else
    composite."""
    backend = backend_for_device(x.device)
    return backend if backend is composite or backend.supports(x) else composite
