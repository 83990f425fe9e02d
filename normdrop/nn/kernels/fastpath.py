"""The fast path: small batch norm and dropout calls as C++ autograd nodes around the numba kernels.

A Python ``torch.autograd.Function`` costs about 20 us per call plus as much again in backward, which on a 64x128
input is as long as torch's whole native batch norm. ``fastpath.cpp`` holds two C++ autograd nodes (batch norm;
dropout, element-wise or per channel/sample) that call numba's serial kernels through C function pointers
(``numba_cpu.entry_points()``), so a small layer costs one pybind call, two allocations and the kernel; a third node
does Uout's uniform noise, and two fleet nodes (:mod:`normdrop.fleet`) run the batch norm and dropout kernels on
each member's (B, C) slice of a (K, B, C) input with the member's own settings and seed (no double backward
through those). The dropout and noise calls also draw the layer's seed in C++, as
``normdrop.nn.rng.draw_seed`` draws it (the same ``torch.randint`` distribution on the same generator: the same seed
and the same generator state after), which saves the ~4 us of a Python ``torch.randint(...).item()``. Results are
the numba backend's: the same bits for dropout; for batch norm equal to rounding (an ulp in the running statistics,
and LLVM may reassociate the sums of a kernel inlined into a C entry point). Double backward works (see the C++
file's header).

The extension is compiled with ``torch.utils.cpp_extension`` on first use (about 30 s on 2 cores; needs a C++
compiler, and ninja, which the ``ninja`` package provides) into ``$NORMDROP_EXT_DIR`` (default: the user cache dir's
``ext/``), keyed by the source's hash and the torch and Python versions, and loaded from there afterwards (about
0.5 s per process). ``normdrop build-fastpath`` builds it ahead of time (``make`` does).
Where it cannot be built, one warning says why and every call takes the Python path (slower, and equal to the fast path
only to rounding, not bitwise; each stored run records which path computed it).

It is taken only where it pays and is safe: eager mode (not while compiling, not under functorch transforms), the
numba backend, CPU float32/float64 contiguous inputs small enough that the kernels would run serially anyway
(``numba_cpu.PARALLEL_MIN_NUMEL``, or one thread) and below ``MAX_NUMEL``, per-channel tensors in the input's
dtype, dropout and alpha dropout (element-wise, per channel or per sample), and Uout's uniform noise.
``NORMDROP_FASTPATH=0`` or ``set_enabled(False)`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import platformdirs
import torch
from torch import Tensor

from normdrop.nn import kernels
from normdrop.nn.rng import round_keys

__all__ = [
    "EXT_DIR_ENV",
    "FASTPATH_ENV",
    "batch_norm",
    "build_dir",
    "dropout",
    "dropout_drawing_seed",
    "extension",
    "fleet_batch_norm",
    "fleet_dropout_drawing_seeds",
    "prepare",
    "set_enabled",
    "uniform_noise_drawing_seed",
]

FASTPATH_ENV = "NORMDROP_FASTPATH"
EXT_DIR_ENV = "NORMDROP_EXT_DIR"
SOURCE = Path(__file__).with_name("fastpath.cpp")
_DTYPES = (torch.float32, torch.float64)

MAX_NUMEL = 1 << 20
"""Inputs this large take the Python path even with one thread: there the per-call overhead is small, and the fast
path's outputs come from torch's allocator, which on a 32 MiB tensor spends ~10 ms on fresh pages where numpy's
(the Python path's) asks for huge pages (measured: 128x64x32x32 batch norm forward, 1 thread, 15 ms vs 5 ms)."""

_forced: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force the fast path on or off for later calls (``None``: back to ``$NORMDROP_FASTPATH``, default on)."""
    global _forced
    _forced = enabled


@functools.cache
def _environment_enabled() -> bool:
    return os.environ.get(FASTPATH_ENV, "1") != "0"


def enabled() -> bool:
    """Whether calls may take the fast path (``set_enabled``'s choice, else ``$NORMDROP_FASTPATH``, read once);
    it is also skipped where the extension cannot be built."""
    if _forced is not None:
        return _forced
    return _environment_enabled()


def build_dir() -> Path:
    """Where the extension is built: per source hash, torch version and Python version."""
    root = os.environ.get(EXT_DIR_ENV) or Path(platformdirs.user_cache_dir("normdrop")) / "ext"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"
    return Path(root) / tag.replace("+", "_")


MODULE_NAME = "normdrop_fastpath"
CFLAGS = ("-O2",)


@functools.cache
def extension() -> ModuleType | None:
    """The compiled extension with the numba kernels registered, or None (with one warning) if it cannot be had."""
    numba_cpu = kernels._numba_module()
    if numba_cpu is None:
        return None
    try:
        module = _load_or_build(build_dir())
    except Exception as error:  # no compiler, no headers, a failed build: the Python path still works
        warnings.warn(
            f"normdrop: the C++ fast path could not be built ({type(error).__name__}: {error}); small layers run "
            f"through Python autograd.Functions instead (more overhead per call, and results that agree with the fast "
            f"path only to rounding, not bitwise). "
            f"Set {FASTPATH_ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    entries = numba_cpu.entry_points()
    module.register_kernels(
        *(entries[f"{name}_{dtype}"]
          for name in ("batch_norm_forward", "batch_norm_backward", "dropout", "uniform_noise")
          for dtype in ("float32", "float64"))
    )  # fmt: skip
    return module


def _wanted() -> bool:
    """Whether calls may use the fast path at all: enabled, and a backend that can be numba."""
    return enabled() and kernels.requested_backend() != "composite"


def prepare() -> None:
    """Build the extension now if calls may use it: a process that is about to start workers calls this so the
    library is compiled once, not once per worker at its first layer call."""
    if _wanted():
        extension()


def _load_or_build(directory: Path) -> ModuleType:
    """Import the built library from ``directory``, building it first if it is missing or does not import.

    A build runs in a fresh temporary directory beside it and its library is moved in with one atomic rename, so
    the final directory only ever holds a complete library, and no lock file: cpp_extension's own lock, left
    behind by a process killed mid-build, would make every later load wait forever. Two processes building at once
    each build; the last rename wins, with an identical file."""
    library = directory / f"{MODULE_NAME}.so"
    if library.exists():
        try:
            return _import_library(library)
        except ImportError as error:  # truncated or foreign: say so, and rebuild over it
            warnings.warn(f"normdrop: rebuilding the fast path: {library} does not import ({error})", stacklevel=3)
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="build-") as scratch:
        module = cpp_extension.load(
            name=MODULE_NAME, sources=[str(SOURCE)], build_directory=scratch, extra_cflags=list(CFLAGS), verbose=False
        )
        # The loaded library stays mapped after the rename (same file system, same file).
        os.replace(Path(scratch) / library.name, library)
    return module


def _import_library(path: Path) -> ModuleType:
    """Import a compiled extension module from a file."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; a venv's ninja (the ``ninja`` package) is not on it unless the venv
    is activated, so add its directory."""
    try:
        import ninja
    except ImportError:  # a system ninja may still be on PATH
        return
    directory = str(ninja.BIN_DIR)
    if directory not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([directory, os.environ.get("PATH", "")])


def _usable(x: Tensor, numel: int | None = None) -> ModuleType | None:
    """The extension if calls on ``x`` may take the fast path, else None; the extension itself then checks that
    the tensors are what the kernels take (CPU, float32/float64, contiguous, per-channel sizes). ``numel``: the
    size of one kernel call when it is not ``x.numel()`` (a fleet member's slice)."""
    if not _wanted() or torch._C._are_functorch_transforms_active():
        return None
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:  # subclasses keep their own dispatch
        return None
    numba_cpu = kernels._numba_module()
    numel = x.numel() if numel is None else numel
    if (
        numba_cpu is None
        or numel >= MAX_NUMEL
        or (numel >= numba_cpu.PARALLEL_MIN_NUMEL and numba_cpu._parallel(numel))
    ):
        return None
    return extension()


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
) -> Tensor | None:
    """Batch norm through the C++ node (running statistics updated in training, as ``F.batch_norm`` does), or
    None where the fast path does not apply. Arguments are ``normdrop.nn.functional.batch_norm``'s, already
    checked there."""
    module = _usable(x)
    if module is None:
        return None
    return module.batch_norm(x, weight, bias, running_mean, running_var, training, float(momentum), eps)


def dropout(x: Tensor, seed: int, p: float, mask_dims: int, alpha: bool) -> Tensor | None:
    """Dropout (``alpha``: alpha dropout) of ``x`` with the mask of ``(seed, offset 0)`` over its first
    ``mask_dims`` dims (all of them: element-wise; 1 or 2: per sample or per channel) through the C++ node, or None
    where the fast path does not apply (``0 < p < 1``)."""
    module = _usable(x)
    if module is None or x.dtype not in _DTYPES:
        return None
    units = math.prod(x.shape[:mask_dims])
    unit_size = x.numel() // units if units else 1
    threshold, coefficients = _constants(p, alpha, x.dtype)
    return module.dropout(x, unit_size, 0, *round_keys(seed), threshold, *coefficients)


def dropout_drawing_seed(
    x: Tensor, generator: torch.Generator | None, p: float, mask_dims: int, alpha: bool
) -> Tensor | None:
    """:func:`dropout` with the seed drawn in C++ from ``generator`` (None: torch's default CPU generator) exactly
    as ``normdrop.nn.rng.draw_seed(generator)`` draws it, or None, having drawn nothing, where the fast path does
    not apply (the caller then draws the seed itself: one draw per call either way)."""
    module = _usable(x)
    if module is None or x.dtype not in _DTYPES:
        return None
    threshold, coefficients = _constants(p, alpha, x.dtype)
    return module.dropout_drawing_seed(x, generator, mask_dims, threshold, *coefficients)


def uniform_noise_drawing_seed(x: Tensor, generator: torch.Generator | None, scale: float) -> Tensor | None:
    """Uout's y = x * (1 + scale * (2 u - 1)) (``kernels.composite.multiplicative_noise``, uniform kind, offset 0)
    through the C++ node, the seed drawn as ``normdrop.nn.rng.draw_rng_state(generator)`` draws it, or None, having
    drawn nothing, where the fast path does not apply."""
    module = _usable(x)
    if module is None or x.dtype not in _DTYPES:
        return None
    return module.uniform_noise_drawing_seed(x, generator, scale)


def fleet_batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momenta: list[float],
    eps: list[float],
) -> Tensor | None:
    """Batch norm of a fleet's (K, B, C) activations: member k's contiguous (B, C) slice through the kernel that
    :func:`batch_norm` calls on a solo (B, C) input, with its (K, C) rows of ``weight``, ``bias`` and running
    statistics (updated in place in training) and its ``momenta[k]`` and ``eps[k]``. None where a solo (B, C)
    input would not take the fast path (the caller then takes the solo path member by member)."""
    if x.dim() != 3 or x.shape[0] == 0 or (training and x.shape[1] < 2):
        return None  # (one row per member in training: the solo call raises, member by member, as it should)
    module = _usable(x, x[0].numel())
    if module is None or x.dtype not in _DTYPES:
        return None
    return module.fleet_batch_norm(x, weight, bias, running_mean, running_var, training, momenta, eps)


def fleet_dropout_drawing_seeds(x: Tensor, generators: list[torch.Generator | None], ps: list[float]) -> Tensor | None:
    """Element-wise dropout of a fleet's (K, B, C) activations: member k's slice masked as :func:`dropout_drawing_seed`
    masks a solo (B, C) input with probability ``ps[k]`` (``0 < p < 1``), its seed drawn in C++ from
    ``generators[k]`` (in member order; None: torch's default CPU generator, as the solo layer's None). None,
    having drawn nothing, where a solo input would not take the fast path."""
    if x.dim() != 3 or x.shape[0] == 0 or not all(0.0 < p < 1.0 for p in ps):
        return None
    module = _usable(x, x[0].numel())
    if module is None or x.dtype not in _DTYPES:
        return None
    constants = [_constants(float(p), False, x.dtype) for p in ps]
    return module.fleet_dropout_drawing_seeds(
        x, generators, [c[0] for c in constants], [c[1][0] for c in constants], [c[1][1] for c in constants]
    )


@functools.lru_cache(maxsize=256)
def _constants(p: float, alpha: bool, dtype: torch.dtype) -> tuple[int, tuple[float, float, float, float]]:
    """The drop threshold and (drop_scale, keep_scale, drop_shift, keep_shift), rounded to ``dtype``, exactly as
    the numba kernels' Python path computes them (p within 2**-33 of 1 drops everything there too)."""
    numba_cpu = kernels._numba_module()
    assert numba_cpu is not None
    threshold, coefficients = numba_cpu._dropout_constants(p, alpha, True, dtype)
    drop_scale, keep_scale, drop_shift, keep_shift = (float(c) for c in coefficients)
    return threshold, (drop_scale, keep_scale, drop_shift, keep_shift)
