"""Tensor memory for the numba kernels: layouts, plain-memory checks, raw addresses viewed as arrays inside
compiled code, and when a kernel may run in parallel (see :mod:`normdrop.nn.kernels.numba_cpu`)."""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import numba
import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic
from torch import Tensor

NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# Below this many elements an op runs serially: waking the thread pool costs more than it saves. Measured with 2
# threads (2026-11-29, AVX-512 Zen 4): at 128Ki elements serial wins every batch norm op by 1.4-1.7x and ties dropout;
# at 256Ki it is mixed; from 512Ki parallel wins all, up to 2x.
PARALLEL_MIN_NUMEL = 1 << 18
# Work unit of the parallel dropout loops, in elements.
PARALLEL_BLOCK = 1 << 14

# Batch norm may reassociate sums (SIMD reductions), fuse multiply-adds and divide by reciprocals: it changes
# results within float tolerance only. No "nnan"/"ninf": NaN and inf in the input propagate as in composite.
BN_MATH = {"reassoc", "contract", "arcp", "nsz"}

_CONTIGUOUS = 0
_CHANNELS_LAST = 1
# From the memory order of a channels_last tensor, (N, *spatial, C), to its logical order (N, C, *spatial).
_FROM_CHANNELS_LAST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}

_UINT32 = np.uint32


# ----------------------------------------------------------------------------------- layouts and tensor memory


def _layout(x: Tensor) -> int | None:
    """_CONTIGUOUS or _CHANNELS_LAST where the kernels take ``x`` (a CPU float32/float64 tensor in one of those
    layouts), else None."""
    if not x.is_cpu or x.dtype not in NUMPY_DTYPES or x.layout != torch.strided or x.is_neg():
        return None
    if not _plain_memory(x):
        return None
    if x.is_contiguous():
        return _CONTIGUOUS
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return _CHANNELS_LAST
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return _CHANNELS_LAST
    return None


def _plain_type(x: Tensor) -> bool:
    """Not a tensor subclass (FakeTensor, wrapper subclasses: no storage, or values elsewhere)."""
    return type(x) is torch.Tensor or type(x) is torch.nn.Parameter


def _plain_memory(x: Tensor) -> bool:
    """Whether ``x``'s data address is real memory holding its values: a plain type and not a lazily-zero tensor
    (``_efficientzerotensor``)."""
    return _plain_type(x) and not x._is_zerotensor()


def _others_plain(*tensors: Tensor | None) -> bool:
    """Whether every given tensor besides the input (parameters, statistics) may be read through its address."""
    return all(t is None or _plain_memory(t) for t in tensors)


def supports(x: Tensor) -> bool:
    """True for CPU float32/float64 strided tensors that are contiguous or channels_last(_3d) contiguous."""
    return _layout(x) is not None


def _with_layout(t: Tensor, like: Tensor, layout: int) -> Tensor:
    """``t`` (shaped like ``like``) in ``like``'s dtype and memory layout, a copy only where they differ."""
    if t.shape != like.shape:
        raise ValueError(f"expected a gradient of shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t._is_zerotensor():  # a lazily-zero gradient: no memory behind its data address
        t = torch.zeros_like(like)
    if t.dtype != like.dtype or t.is_neg():
        t = t.to(like.dtype).resolve_neg()
    if layout == _CONTIGUOUS:
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)


def _channel_vector(t: Tensor | None, dtype: torch.dtype, channels: int) -> Tensor | None:
    """A per-channel tensor as a contiguous vector of ``dtype`` (itself when it is one already).

    The kernels read ``channels`` values from its memory, so any other size is refused here."""
    if t is None:
        return None
    if t.numel() != channels or not t.is_cpu:
        raise ValueError(f"expected a per-channel CPU tensor of {channels} values, got {tuple(t.shape)} on {t.device}")
    if t.dtype == dtype and t.is_contiguous() and not t.is_neg():
        return t
    return t.to(dtype).resolve_neg().contiguous()


def _address(t: Tensor | None) -> int:
    """The data address the kernels read a tensor from; 0 for None (an empty array in the kernel)."""
    return 0 if t is None else t.data_ptr()


def _empty_like(x: Tensor, layout: int) -> tuple[Tensor, np.ndarray]:
    """A new tensor shaped and laid out like ``x``, and a flat numpy view of it in memory order (its memory from
    :func:`_empty_array`: a large one may be an idle pooled buffer; the kernels overwrite every value)."""
    shape = x.shape
    if layout == _CONTIGUOUS:
        array = _empty_array(tuple(shape), NUMPY_DTYPES[x.dtype])
        return torch.from_numpy(array), array.reshape(-1)
    array = _empty_array((shape[0], *shape[2:], shape[1]), NUMPY_DTYPES[x.dtype])
    return torch.from_numpy(array).permute(_FROM_CHANNELS_LAST[x.ndim]), array.reshape(-1)


POOL_ENV = "NORMDROP_OUTPUT_POOL_MB"
POOL_MIN_BYTES = 4 << 20
"""Outputs this large reuse idle buffers (:func:`_empty_array`); smaller ones come from ``np.empty``."""
DEFAULT_POOL_MB = 256


class _OutputPool:
    """Idle large output buffers kept for reuse, so a training loop's outputs do not pay for fresh pages each step.

    A fresh 32 MiB buffer costs the kernel's first touch of every page (the OS zeroes it: ~5 ms here, measured
    2026-12-02 on the 2-core Zen 3 machine, 128x64x32x32 float32 dropout forward 15 ms fresh vs 9.7 ms on warm
    memory), on every call, since the allocator returns such buffers to the OS when they are freed. The pool keeps
    up to ``limit`` bytes of buffers (exact byte sizes). A buffer is handed out only when nothing but the pool
    refers to it: an output tensor (``torch.from_numpy`` of a view of it) holds a reference to it for as long as the
    tensor, any view of it or its storage lives, so memory in use is never handed out twice. Eviction: idle buffers,
    oldest first, to make room; when the buffers in use fill the limit, a new output is a plain ``np.empty``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffers: list[np.ndarray] = []  # flat uint8 arrays, oldest first
        self.lock = threading.Lock()

    # References to an idle buffer as sys.getrefcount sees it inside the loops of take(): the list, the name
    # ``buffer`` (rebound at each step, so it never holds two) and getrefcount's argument. The loops index the list
    # (no enumerate: its result tuple holds one more reference) and remove by position (list.remove compares arrays
    # with ==, elementwise).
    _IDLE_REFS = 3

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 buffer of ``nbytes`` that nothing else uses (a pooled one when one is idle)."""
        with self.lock:
            buffers = self.buffers
            for i in range(len(buffers)):
                buffer = buffers[i]
                if buffer.nbytes == nbytes and sys.getrefcount(buffer) == self._IDLE_REFS:
                    del buffers[i]
                    buffers.append(buffer)  # most recently used last
                    return buffer
            held = sum(b.nbytes for b in buffers)
            i = 0
            while i < len(buffers) and held + nbytes > self.limit:
                buffer = buffers[i]
                if sys.getrefcount(buffer) == self._IDLE_REFS:
                    del buffers[i]
                    held -= buffer.nbytes
                else:
                    i += 1
            buffer = np.empty(nbytes, np.uint8)
            if held + nbytes <= self.limit:
                buffers.append(buffer)
            return buffer

    def idle_bytes(self) -> int:
        """Bytes of pooled buffers that nothing else refers to now."""
        with self.lock:
            return sum(b.nbytes for b in self.buffers if sys.getrefcount(b) == self._IDLE_REFS)


def _pool_limit() -> int:
    """``$NORMDROP_OUTPUT_POOL_MB`` (default 256; 0 turns the pool off) in bytes."""
    text = os.environ.get(POOL_ENV, str(DEFAULT_POOL_MB))
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"{POOL_ENV}={text!r}: expected a number of MiB (0 turns the pool off)") from None
    if megabytes < 0:
        raise ValueError(f"{POOL_ENV}={text!r}: expected a number of MiB >= 0 (0 turns the pool off)")
    return int(megabytes * (1 << 20))


_output_pool: _OutputPool | None = None


def _fresh_pool_in_child() -> None:
    """A forked child starts its own pool (its lock may have been held by another thread at the fork); buffers it
    inherited stay with the tensors that use them."""
    global _output_pool
    _output_pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_pool_in_child)


def output_pool() -> _OutputPool:
    """This process's pool of large output buffers (created on first use with :func:`_pool_limit`)."""
    global _output_pool
    if _output_pool is None:
        _output_pool = _OutputPool(_pool_limit())
    return _output_pool


def _empty_array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An uninitialised C-contiguous array; from :class:`_OutputPool` when it is at least :data:`POOL_MIN_BYTES`."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    pool = output_pool()
    if nbytes < POOL_MIN_BYTES or pool.limit < nbytes:
        return np.empty(shape, dtype)
    return pool.take(nbytes).view(dtype).reshape(shape)


def _plane_size(numel: int, x: Tensor, layout: int) -> int:
    """The kernels' ``spatial``: S for a contiguous (N, C, S) input with S > 1 (planes), else 1 (rows of C)."""
    if layout == _CHANNELS_LAST:
        return 1
    return numel // (x.shape[0] * x.shape[1])


# Without TBB, numba's parallel kernels run on OpenMP, and GNU's cannot start again in a process forked after its
# pool started: numba terminates such a child. So a child forked from a process that ran a parallel kernel keeps to
# the serial kernels (same results).
_pool = {"started": False, "forked_after_start": False, "threads": 1}


def _note_fork_in_child() -> None:
    _pool["forked_after_start"] = _pool["started"]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork_in_child)


# Contention: every parallel loop ends at a barrier that waits for each of its threads, so a thread that another
# process keeps off its core stalls the loop until the scheduler runs it again (measured on 2 cores with a busy
# process on one: a 256Ki-element batch norm fwd+bwd took 50x its serial time, 0.43x torch.nn's). Handing out small
# blocks dynamically does not help (the barrier still waits for the descheduled thread, and numba's dynamic
# schedule costs 3-4x on one thread). So the loops run on the cores other processes leave free: every
# CONTENTION_WINDOW seconds, the CPU time spent on this process's cores (/proc/stat) minus this process's own
# (os.times) gives the cores others used; each begun core past CONTENTION_SLACK is taken off the thread count (at
# least one thread stays). The blocks a loop splits into follow the requested count only (parallel_blocks).
CONTENTION_WINDOW = 0.25
CONTENTION_SLACK = 0.25
"""A core counts as taken once others used more than this fraction of it (a stall costs far more than a thread)."""
_contention = {"checked": -math.inf, "busy": 0.0, "own": 0.0, "free": 0}


def _busy_seconds(cores: set[int]) -> float | None:
    """CPU seconds spent (not idle or waiting for I/O) on ``cores`` since boot, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat", "rb") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines[1:]:
        if not line.startswith(b"cpu"):
            break
        name, *fields = line.split()
        if int(name[3:]) in cores:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy += sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _cores() -> set[int]:
    """The cores this process may run on."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def free_cores() -> int:
    """This process's cores less those other processes kept busy over the last :data:`CONTENTION_WINDOW` seconds
    (rounded, at least 0; cached for one window; all of them where /proc/stat cannot be read)."""
    now = time.monotonic()
    state = _contention
    if now - state["checked"] < CONTENTION_WINDOW:
        return int(state["free"])
    cores = _cores()
    busy = _busy_seconds(cores)
    times = os.times()
    own = times.user + times.system
    others = 0.0
    if busy is not None and math.isfinite(state["checked"]):
        others = (busy - state["busy"] - (own - state["own"])) / (now - state["checked"])
    taken = max(0, math.ceil(others - CONTENTION_SLACK))
    state.update(checked=now, busy=busy or 0.0, own=own, free=max(0, len(cores) - taken))
    return int(state["free"])


def _parallel(numel: int) -> bool:
    """Whether an op on ``numel`` elements should run threaded; if so, size numba's pool like torch's, less the
    cores other processes keep busy (:func:`free_cores`; one thread when none is free)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or numel < PARALLEL_MIN_NUMEL or _pool["forked_after_start"]:
        return False
    _pool["threads"] = threads
    free = max(1, min(threads, free_cores()))
    if numba.get_num_threads() != free:
        numba.set_num_threads(free)
    _pool["started"] = True
    return True


def parallel_blocks(units: int) -> int:
    """How many blocks a parallel batch-norm loop over ``units`` rows or planes splits into (at least one): one per
    thread asked for (torch's count), not per thread that runs (fewer under contention: :func:`_parallel`), so the
    per-block sums, and the results, do not depend on the machine's load."""
    return max(1, min(units, int(_pool["threads"])))


@intrinsic
def _pointer_at(typingctx, address, like):
    """An integer address as a pointer to elements of ``like``'s dtype."""
    signature = types.CPointer(like.dtype)(address, like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@njit(cache=True)
def _array_at(address, size, like):
    """The ``size`` elements of ``like``'s dtype at ``address`` as a 1-D array; empty for address 0 (None)."""
    return numba.carray(_pointer_at(address, like), size if address != 0 else 0)
