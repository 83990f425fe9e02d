"""The fast CPU backend: batch norm and dropout as fused loops compiled with numba.

Every public function has the signature, the return convention and the math of its namesake in
``kernels/composite.py`` (the oracle these kernels are tested against); read the formulas there. What differs is how
the work is done:

- Batch norm (Ioffe & Szegedy 2015) makes two passes over memory in memory order: one for the per-channel sums
  (training forward: the statistics; backward: sum(g) and sum(g * (x - mean))), one that writes every element from
  per-channel coefficients. A contiguous (N, C, *spatial) input is N * C planes of S contiguous values; an (N, C)
  input, and a channels_last one, is rows of C values. Threads take ranges of planes or rows and add their sums.
  The sums are of ``x - pivot`` and ``(x - pivot)^2`` in float64 around a per-channel pivot (the channel's first
  value), which keeps the one-pass variance accurate when the mean is large next to the spread; the per-element
  pass runs in the input's dtype with per-channel coefficients rounded to it once, as composite computes them.
- Dropout (Srivastava et al. 2014; alpha dropout, Klambauer et al. 2017) hashes each counter and scales its
  element in one pass. The bits are ``normdrop.nn.rng``'s counter hash, and the element of a channels_last input
  takes the counter of its *logical* row-major index, so masks are bit-identical to composite's whatever the
  layout. The output is ``x * scale[keep] (+ shift[keep])`` with the two per-class constants computed once by the
  very torch ops composite applies, so results are bit-identical too (no fused multiply-add in these loops).

Inputs that are not CPU float32/float64 tensors, contiguous or channels_last(_3d) contiguous, go to composite
(``supports``). Large inputs run on ``torch.get_num_threads()`` threads (numba's ``prange``), less the cores other
processes keep busy (``memory.free_cores``: a loop's end waits for every thread, so one descheduled thread stalls it);
small ones, or one thread, take serial loops that never start numba's thread pool.

Tensors reach the kernels as their data address (``Tensor.data_ptr()``), viewed as arrays inside the compiled code
(``_array_at``): converting a tensor with ``Tensor.numpy()`` costs about 2 us, a tenth of a small op, for each of
the up to seven tensors an op reads. Every address is of a dense tensor in the expected dtype and layout that the
calling Python function holds a reference to until the kernel returns; outputs are numpy arrays the kernels write
and ``torch.from_numpy`` wraps without a copy.

One module per concern: :mod:`~normdrop.nn.kernels.numba_cpu.memory` (layouts, tensor memory, the parallel
switch), :mod:`~normdrop.nn.kernels.numba_cpu.batchnorm`, :mod:`~normdrop.nn.kernels.numba_cpu.dropout` and the C
entry points of the fast path, :mod:`~normdrop.nn.kernels.numba_cpu.entries`; this module is the backend's API.
"""

from __future__ import annotations

# first: numba reads its cache directory when the kernels below are defined
from normdrop.nn.kernels.numba_cpu.cache import NUMBA_CACHE_ENV, numba_cache_dir  # isort: skip
from normdrop.nn.kernels.numba_cpu.batchnorm import batch_norm_backward, batch_norm_forward
from normdrop.nn.kernels.numba_cpu.dropout import _dropout_constants as _dropout_constants
from normdrop.nn.kernels.numba_cpu.dropout import dropout_forward, multiplicative_noise, uniform
from normdrop.nn.kernels.numba_cpu.entries import entry_points
from normdrop.nn.kernels.numba_cpu.memory import PARALLEL_BLOCK, PARALLEL_MIN_NUMEL, supports
from normdrop.nn.kernels.numba_cpu.memory import _parallel as _parallel

__all__ = [
    "NUMBA_CACHE_ENV",
    "PARALLEL_BLOCK",
    "PARALLEL_MIN_NUMEL",
    "batch_norm_backward",
    "batch_norm_forward",
    "dropout_forward",
    "entry_points",
    "multiplicative_noise",
    "numba_cache_dir",
    "supports",
    "uniform",
]
