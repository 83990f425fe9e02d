"""Tensor memory for the numba kernels: layouts, plain-memory checks, raw addresses viewed as arrays inside
compiled code, and when a kernel may run in parallel (see :mod:`normdrop.nn.kernels.numba_cpu`)."""

from __future__ import annotations

import os

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
# Blocks per thread of the parallel batch-norm loops, handed out one at a time (dynamic schedule: numba's
# ``parallel_chunksize(1)``). With one block per thread (a static split), a thread descheduled by another process
# on the machine holds half the work while the others wait at the loop's end; with several small blocks the running
# threads take the descheduled one's share. The block count depends on the thread count only, not on which thread
# ran a block, so results stay deterministic (the per-block float64 sums are added in block order).
PARALLEL_BLOCKS_PER_THREAD = 8

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
    """A new tensor shaped and laid out like ``x``, and a flat numpy view of it in memory order."""
    shape = x.shape
    if layout == _CONTIGUOUS:
        array = np.empty(shape, NUMPY_DTYPES[x.dtype])
        return torch.from_numpy(array), array.reshape(-1)
    array = np.empty((shape[0], *shape[2:], shape[1]), NUMPY_DTYPES[x.dtype])
    return torch.from_numpy(array).permute(_FROM_CHANNELS_LAST[x.ndim]), array.reshape(-1)


def _plane_size(numel: int, x: Tensor, layout: int) -> int:
    """The kernels' ``spatial``: S for a contiguous (N, C, S) input with S > 1 (planes), else 1 (rows of C)."""
    if layout == _CHANNELS_LAST:
        return 1
    return numel // (x.shape[0] * x.shape[1])


# Without TBB, numba's parallel kernels run on OpenMP, and GNU's cannot start again in a process forked after its
# pool started: numba terminates such a child. So a child forked from a process that ran a parallel kernel keeps to
# the serial kernels (same results).
_pool = {"started": False, "forked_after_start": False}


def _note_fork_in_child() -> None:
    _pool["forked_after_start"] = _pool["started"]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_note_fork_in_child)


def _parallel(numel: int) -> bool:
    """Whether an op on ``numel`` elements should run threaded; if so, size numba's pool like torch's."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or numel < PARALLEL_MIN_NUMEL or _pool["forked_after_start"]:
        return False
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    _pool["started"] = True
    return True


def parallel_blocks(units: int) -> int:
    """How many blocks a parallel batch-norm loop over ``units`` rows or planes splits into (at least one)."""
    return max(1, min(units, PARALLEL_BLOCKS_PER_THREAD * numba.get_num_threads()))


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
