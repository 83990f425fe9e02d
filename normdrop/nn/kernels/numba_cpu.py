"""The fast CPU backend: batch norm and dropout as fused loops compiled with numba.

Every public function has the signature, the return convention and the math of its namesake in
``kernels/composite.py`` (the oracle these kernels are tested against); read the formulas there. What differs is how
the work is done:

- Batch norm (Ioffe & Szegedy 2015) reads an (N, C, *spatial) contiguous input as (N, C, S) and does all the work
  of one channel at a time (statistics, then the normalizing pass while the channel is still in cache), one channel
  per thread. An (N, C) input, and a channels_last one, is read as (rows, C) with the channel innermost: the
  statistics are accumulated over blocks of rows, then every row is normalized. Statistics are sums of
  ``x - pivot`` and ``(x - pivot)^2`` in float64 around a per-channel pivot (the channel's first value), which
  keeps the one-pass variance accurate when the mean is large next to the spread.
- Dropout (Srivastava et al. 2014; alpha dropout, Klambauer et al. 2017) hashes each counter and scales its
  element in one pass. The bits are ``normdrop.nn.rng``'s counter hash, and the element of a channels_last input
  takes the counter of its *logical* row-major index, so masks are bit-identical to composite's whatever the
  layout. The output is ``x * scale[keep] (+ shift[keep])`` with the two per-class constants computed once by the
  very torch ops composite applies, so results are bit-identical too (no fused multiply-add in these loops).

Inputs that are not CPU float32/float64 tensors, contiguous or channels_last(_3d) contiguous, go to composite
(``supports``). Large inputs run on ``torch.get_num_threads()`` threads (numba's ``prange``); small ones, or one
thread, take serial loops that never start numba's thread pool.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from normdrop.nn.kernels import composite
from normdrop.nn.rng import MIX_MULTIPLIER_1, MIX_MULTIPLIER_2, drop_threshold, round_keys

__all__ = ["PARALLEL_MIN_NUMEL", "batch_norm_backward", "batch_norm_forward", "dropout_forward", "supports"]

NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# Below this many elements an op runs serially: starting the thread pool costs more than it saves.
PARALLEL_MIN_NUMEL = 1 << 16
# Work unit of the parallel element-wise loops (elements, or rows of the channels_last loops).
PARALLEL_BLOCK = 1 << 14

# Batch norm may reassociate sums (SIMD reductions), fuse multiply-adds and divide by reciprocals: it changes
# results within float tolerance only. No "nnan"/"ninf": NaN and inf in the input propagate as in composite.
BN_MATH = {"reassoc", "contract", "arcp", "nsz"}

_CONTIGUOUS = 0
_CHANNELS_LAST = 1
# From (N, C, *spatial) to the memory order of a channels_last tensor (N, *spatial, C), and back.
_TO_CHANNELS_LAST = {4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_FROM_CHANNELS_LAST = {4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
_NO_ARRAY = {dtype: np.empty(0, dtype) for dtype in (np.float32, np.float64)}  # stands for a None tensor argument

_UINT32 = np.uint32
_MIX_1 = np.uint32(MIX_MULTIPLIER_1)
_MIX_2 = np.uint32(MIX_MULTIPLIER_2)


# ------------------------------------------------------------------------------------------ layout and arrays


def _layout(x: Tensor) -> int | None:
    """_CONTIGUOUS, _CHANNELS_LAST, or None for any other memory layout."""
    if x.is_contiguous():
        return _CONTIGUOUS
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return _CHANNELS_LAST
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return _CHANNELS_LAST
    return None


def supports(x: Tensor) -> bool:
    """True for CPU float32/float64 strided tensors that are contiguous or channels_last(_3d) contiguous."""
    return x.is_cpu and x.dtype in NUMPY_DTYPES and x.layout == torch.strided and _layout(x) is not None


def _memory_view(t: Tensor, layout: int) -> np.ndarray:
    """A flat numpy view of ``t``'s elements in memory order (``t`` must have the given layout)."""
    array = (t.detach() if t.requires_grad else t).numpy()
    if layout == _CHANNELS_LAST:
        array = array.transpose(_TO_CHANNELS_LAST[t.ndim])
    return array.reshape(-1)


def _with_layout(t: Tensor, like: Tensor, layout: int) -> Tensor:
    """``t`` in ``like``'s dtype and memory layout (a copy only where they differ)."""
    if layout == _CONTIGUOUS:
        return t.to(like.dtype).contiguous()
    memory_format = torch.channels_last if t.ndim == 4 else torch.channels_last_3d
    return t.to(like.dtype).contiguous(memory_format=memory_format)


def _tensor_from_memory(flat: np.ndarray, like: Tensor, layout: int) -> Tensor:
    """A tensor shaped like ``like``, with ``like``'s memory layout, over a flat array in memory order."""
    t = torch.from_numpy(flat)
    if layout == _CONTIGUOUS:
        return t.view(like.shape)
    shape = like.shape
    return t.view((shape[0], *shape[2:], shape[1])).permute(_FROM_CHANNELS_LAST[like.ndim])


def _vector(t: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A per-channel tensor as a contiguous numpy vector of ``dtype``; None becomes an empty array."""
    if t is None:
        return _NO_ARRAY[NUMPY_DTYPES[dtype]]
    return _memory_view(t.to(dtype).contiguous(), _CONTIGUOUS)


def _parallel(numel: int) -> bool:
    """Whether an op on ``numel`` elements should run threaded; if so, size numba's pool like torch's."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or numel < PARALLEL_MIN_NUMEL:
        return False
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return True


# ------------------------------------------------------------------------------- batch norm: (N, C, S) layout


@njit(cache=True, fastmath=BN_MATH)
def _channel_moments(x, c, n_batch, channels, spatial):
    """Mean and biased variance of channel ``c`` of an (N, C, S) array, in float64."""
    pivot = np.float64(x[c * spatial])
    total = 0.0
    total_sq = 0.0
    for n in range(n_batch):
        start = (n * channels + c) * spatial
        for i in range(start, start + spatial):
            d = np.float64(x[i]) - pivot
            total += d
            total_sq += d * d
    count = n_batch * spatial
    shift = total / count
    return pivot + shift, max(total_sq / count - shift * shift, 0.0)


@njit(cache=True, fastmath=BN_MATH)
def _forward_channel(x, y, c, n_batch, channels, spatial, weight, bias, mean, var, training, eps):
    """Normalize channel ``c``; in training first compute its statistics into ``mean``/``var``."""
    if training:
        center, variance = _channel_moments(x, c, n_batch, channels, spatial)
        mean[c] = center
        var[c] = variance
    else:
        center = np.float64(mean[c])
        variance = np.float64(var[c])
    scale = 1.0 / np.sqrt(variance + eps)
    if weight.size > 0:
        scale *= weight[c]
    offset = np.float64(bias[c]) if bias.size > 0 else 0.0
    for n in range(n_batch):
        start = (n * channels + c) * spatial
        for i in range(start, start + spatial):
            y[i] = (np.float64(x[i]) - center) * scale + offset


@njit(cache=True)
def _forward_ncs(x, y, n_batch, channels, spatial, weight, bias, mean, var, training, eps):
    for c in range(channels):
        _forward_channel(x, y, c, n_batch, channels, spatial, weight, bias, mean, var, training, eps)


@njit(cache=True, parallel=True)
def _forward_ncs_parallel(x, y, n_batch, channels, spatial, weight, bias, mean, var, training, eps):
    for c in prange(channels):
        _forward_channel(x, y, c, n_batch, channels, spatial, weight, bias, mean, var, training, eps)


@njit(cache=True, fastmath=BN_MATH)
def _backward_channel(
    grad, x, grad_x, c, n_batch, channels, spatial, weight, mean, var, grad_mean, grad_var, training, eps,
    grad_weight, grad_bias,
):  # fmt: skip
    """Channel ``c`` of batch norm's backward (the formulas of ``composite.batch_norm_backward``)."""
    center = np.float64(mean[c])
    inv_std = 1.0 / np.sqrt(np.float64(var[c]) + eps)
    sum_g = 0.0
    sum_g_centered = 0.0
    for n in range(n_batch):
        start = (n * channels + c) * spatial
        for i in range(start, start + spatial):
            g = np.float64(grad[i])
            sum_g += g
            sum_g_centered += g * (np.float64(x[i]) - center)
    d_weight = sum_g_centered * inv_std
    grad_bias[c] = sum_g
    grad_weight[c] = d_weight
    gain = inv_std * weight[c] if weight.size > 0 else inv_std
    if training:
        count = n_batch * spatial
        slope = -gain * d_weight * inv_std / count
        offset = -gain * sum_g / count
        if grad_var.size > 0:
            slope += 2.0 * grad_var[c] / count
        if grad_mean.size > 0:
            offset += grad_mean[c] / count
        for n in range(n_batch):
            start = (n * channels + c) * spatial
            for i in range(start, start + spatial):
                grad_x[i] = np.float64(grad[i]) * gain + (np.float64(x[i]) - center) * slope + offset
    else:
        for n in range(n_batch):
            start = (n * channels + c) * spatial
            for i in range(start, start + spatial):
                grad_x[i] = np.float64(grad[i]) * gain


@njit(cache=True)
def _backward_ncs(
    grad, x, grad_x, n_batch, channels, spatial, weight, mean, var, grad_mean, grad_var, training, eps,
    grad_weight, grad_bias,
):  # fmt: skip
    for c in range(channels):
        _backward_channel(
            grad, x, grad_x, c, n_batch, channels, spatial, weight, mean, var, grad_mean, grad_var, training, eps,
            grad_weight, grad_bias,
        )  # fmt: skip


@njit(cache=True, parallel=True)
def _backward_ncs_parallel(
    grad, x, grad_x, n_batch, channels, spatial, weight, mean, var, grad_mean, grad_var, training, eps,
    grad_weight, grad_bias,
):  # fmt: skip
    for c in prange(channels):
        _backward_channel(
            grad, x, grad_x, c, n_batch, channels, spatial, weight, mean, var, grad_mean, grad_var, training, eps,
            grad_weight, grad_bias,
        )  # fmt: skip


# ---------------------------------------------------------------------------- batch norm: (rows, C) layout


@njit(cache=True, fastmath=BN_MATH)
def _row_moment_sums(x, first, last, channels, pivot, sums):
    """Add rows first..last-1 of a (rows, C) array into sums[0] = sum(x - pivot), sums[1] = sum((x - pivot)^2)."""
    for r in range(first, last):
        start = r * channels
        for c in range(channels):
            d = np.float64(x[start + c]) - pivot[c]
            sums[0, c] += d
            sums[1, c] += d * d


@njit(cache=True, fastmath=BN_MATH)
def _row_affine(x, y, first, last, channels, center, scale, offset):
    """y = (x - center) * scale + offset, per channel, on rows first..last-1."""
    for r in range(first, last):
        start = r * channels
        for c in range(channels):
            y[start + c] = (np.float64(x[start + c]) - center[c]) * scale[c] + offset[c]


@njit(cache=True, fastmath=BN_MATH)
def _row_grad_sums(grad, x, first, last, channels, center, sums):
    """Add rows first..last-1 into sums[0] = sum(g), sums[1] = sum(g * (x - center))."""
    for r in range(first, last):
        start = r * channels
        for c in range(channels):
            g = np.float64(grad[start + c])
            sums[0, c] += g
            sums[1, c] += g * (np.float64(x[start + c]) - center[c])


@njit(cache=True, fastmath=BN_MATH)
def _row_grad_input(grad, x, grad_x, first, last, channels, center, gain, slope, offset, training):
    """grad_x = g * gain + (x - center) * slope + offset in training, g * gain in inference."""
    for r in range(first, last):
        start = r * channels
        if training:
            for c in range(channels):
                i = start + c
                grad_x[i] = np.float64(grad[i]) * gain[c] + (np.float64(x[i]) - center[c]) * slope[c] + offset[c]
        else:
            for c in range(channels):
                grad_x[start + c] = np.float64(grad[start + c]) * gain[c]


@njit(cache=True, fastmath=BN_MATH)
def _row_forward_coefficients(x, rows, channels, sums, weight, bias, mean, var, training, eps):
    """Per-channel center, scale and offset of the normalizing map; in training also the batch mean/var."""
    center = np.empty(channels)
    scale = np.empty(channels)
    offset = np.zeros(channels)
    for c in range(channels):
        if training:
            shift = sums[0, c] / rows
            center[c] = np.float64(x[c]) + shift
            variance = max(sums[1, c] / rows - shift * shift, 0.0)
            mean[c] = center[c]
            var[c] = variance
        else:
            center[c] = mean[c]
            variance = np.float64(var[c])
        scale[c] = 1.0 / np.sqrt(variance + eps)
        if weight.size > 0:
            scale[c] *= weight[c]
        if bias.size > 0:
            offset[c] = bias[c]
    return center, scale, offset


@njit(cache=True)
def _first_row(x, channels):
    """The pivot of the row layout's statistics: each channel's value in the first row, in float64."""
    pivot = np.empty(channels)
    for c in range(channels):
        pivot[c] = x[c]
    return pivot


@njit(cache=True)
def _forward_rows(x, y, rows, channels, weight, bias, mean, var, training, eps):
    sums = np.zeros((2, channels))
    if training:
        _row_moment_sums(x, 0, rows, channels, _first_row(x, channels), sums)
    center, scale, offset = _row_forward_coefficients(x, rows, channels, sums, weight, bias, mean, var, training, eps)
    _row_affine(x, y, 0, rows, channels, center, scale, offset)


@njit(cache=True, parallel=True)
def _forward_rows_parallel(x, y, rows, channels, weight, bias, mean, var, training, eps):
    blocks = numba.get_num_threads()
    sums = np.zeros((blocks, 2, channels))
    if training:
        pivot = _first_row(x, channels)
        for b in prange(blocks):
            _row_moment_sums(x, b * rows // blocks, (b + 1) * rows // blocks, channels, pivot, sums[b])
    center, scale, offset = _row_forward_coefficients(
        x, rows, channels, sums.sum(axis=0), weight, bias, mean, var, training, eps
    )
    for b in prange(blocks):
        _row_affine(x, y, b * rows // blocks, (b + 1) * rows // blocks, channels, center, scale, offset)


@njit(cache=True, fastmath=BN_MATH)
def _row_backward_coefficients(
    rows, channels, sums, weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias
):
    """Per-channel gain, slope and offset of grad_x, and grad_weight / grad_bias."""
    gain = np.empty(channels)
    slope = np.zeros(channels)
    offset = np.zeros(channels)
    for c in range(channels):
        inv_std = 1.0 / np.sqrt(np.float64(var[c]) + eps)
        d_weight = sums[1, c] * inv_std
        grad_bias[c] = sums[0, c]
        grad_weight[c] = d_weight
        gain[c] = inv_std * weight[c] if weight.size > 0 else inv_std
        if training:
            slope[c] = -gain[c] * d_weight * inv_std / rows
            offset[c] = -gain[c] * sums[0, c] / rows
            if grad_var.size > 0:
                slope[c] += 2.0 * grad_var[c] / rows
            if grad_mean.size > 0:
                offset[c] += grad_mean[c] / rows
    return gain, slope, offset


@njit(cache=True)
def _center(mean, channels):
    center = np.empty(channels)
    for c in range(channels):
        center[c] = mean[c]
    return center


@njit(cache=True)
def _backward_rows(
    grad, x, grad_x, rows, channels, weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias
):
    center = _center(mean, channels)
    sums = np.zeros((2, channels))
    _row_grad_sums(grad, x, 0, rows, channels, center, sums)
    gain, slope, offset = _row_backward_coefficients(
        rows, channels, sums, weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias
    )
    _row_grad_input(grad, x, grad_x, 0, rows, channels, center, gain, slope, offset, training)


@njit(cache=True, parallel=True)
def _backward_rows_parallel(
    grad, x, grad_x, rows, channels, weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias
):
    center = _center(mean, channels)
    blocks = numba.get_num_threads()
    sums = np.zeros((blocks, 2, channels))
    for b in prange(blocks):
        _row_grad_sums(grad, x, b * rows // blocks, (b + 1) * rows // blocks, channels, center, sums[b])
    gain, slope, offset = _row_backward_coefficients(
        rows, channels, sums.sum(axis=0), weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias
    )
    for b in prange(blocks):
        _row_grad_input(
            grad, x, grad_x, b * rows // blocks, (b + 1) * rows // blocks, channels, center, gain, slope, offset,
            training,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------- batch norm API


def _shape_nc_s(x: Tensor) -> tuple[int, int, int]:
    n_batch, channels = x.shape[0], x.shape[1]
    return n_batch, channels, x.numel() // (n_batch * channels)


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm forward; same contract as ``composite.batch_norm_forward``."""
    if x.numel() == 0:
        return composite.batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
    layout = _layout(x)
    np_dtype = NUMPY_DTYPES[x.dtype]
    n_batch, channels, spatial = _shape_nc_s(x)
    xs = _memory_view(x, layout)
    y = np.empty(xs.size, np_dtype)
    if training:
        mean = np.empty(channels, np_dtype)
        var = np.empty(channels, np_dtype)
    else:
        assert running_mean is not None and running_var is not None
        mean, var = _vector(running_mean, x.dtype), _vector(running_var, x.dtype)
    w, b = _vector(weight, x.dtype), _vector(bias, x.dtype)
    parallel = _parallel(xs.size)
    if layout == _CONTIGUOUS and spatial > 1:
        kernel = _forward_ncs_parallel if parallel else _forward_ncs
        kernel(xs, y, n_batch, channels, spatial, w, b, mean, var, training, eps)
    else:
        kernel = _forward_rows_parallel if parallel else _forward_rows
        kernel(xs, y, xs.size // channels, channels, w, b, mean, var, training, eps)
    out = _tensor_from_memory(y, x, layout)
    if not training:
        return out, torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype)
    return out, torch.from_numpy(mean), torch.from_numpy(var)


def batch_norm_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    training: bool,
    eps: float,
    grad_mean: Tensor | None = None,
    grad_var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm backward; same contract as ``composite.batch_norm_backward`` (not differentiable itself)."""
    if x.numel() == 0:
        return composite.batch_norm_backward(grad_out, x, weight, mean, var, training, eps, grad_mean, grad_var)
    layout = _layout(x)
    np_dtype = NUMPY_DTYPES[x.dtype]
    n_batch, channels, spatial = _shape_nc_s(x)
    xs = _memory_view(x, layout)
    gs = _memory_view(_with_layout(grad_out, x, layout), layout)
    grad_x = np.empty(xs.size, np_dtype)
    grad_weight = np.empty(channels, np_dtype)
    grad_bias = np.empty(channels, np_dtype)
    w = _vector(weight, x.dtype)
    m, v = _vector(mean, x.dtype), _vector(var, x.dtype)
    gm, gv = _vector(grad_mean, x.dtype), _vector(grad_var, x.dtype)
    parallel = _parallel(xs.size)
    if layout == _CONTIGUOUS and spatial > 1:
        kernel = _backward_ncs_parallel if parallel else _backward_ncs
        kernel(gs, xs, grad_x, n_batch, channels, spatial, w, m, v, gm, gv, training, eps, grad_weight, grad_bias)
    else:
        kernel = _backward_rows_parallel if parallel else _backward_rows
        kernel(gs, xs, grad_x, xs.size // channels, channels, w, m, v, gm, gv, training, eps, grad_weight, grad_bias)
    param_dtype = weight.dtype if weight is not None else x.dtype
    return (
        _tensor_from_memory(grad_x, x, layout),
        torch.from_numpy(grad_weight).to(param_dtype),
        torch.from_numpy(grad_bias).to(param_dtype),
    )


# ------------------------------------------------------------------------------------------------- dropout


@njit(inline="always")
def _mix32(h):
    """``normdrop.nn.rng.mix32`` on a uint32 (each step truncated to 32 bits, so it vectorizes in 32-bit lanes)."""
    h = _UINT32(h ^ (h >> _UINT32(16)))
    h = _UINT32(h * _MIX_1)
    h = _UINT32(h ^ (h >> _UINT32(15)))
    h = _UINT32(h * _MIX_2)
    return _UINT32(h ^ (h >> _UINT32(15)))


@njit(inline="always")
def _counter_bits(counter, k0, k1, k2):
    """``normdrop.nn.rng.counter_bits`` for an int64 counter, with the seed's round keys precomputed."""
    h = _mix32(_UINT32(_UINT32(counter) ^ k0))
    h = _mix32(_UINT32(h ^ _UINT32(counter >> 32) ^ k1))
    return _mix32(_UINT32(h ^ k2))


@njit(cache=True)
def _dropout_elements(x, y, first, last, counter0, k0, k1, k2, threshold, coefficients, shift):
    """Element-wise dropout of x[first:last], element i taking counter ``counter0 + i``."""
    drop_scale, keep_scale, drop_shift, keep_shift = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    if shift:
        for i in range(first, last):
            keep = _counter_bits(counter0 + i, key0, key1, key2) >= bound
            y[i] = x[i] * (keep_scale if keep else drop_scale) + (keep_shift if keep else drop_shift)
    else:
        for i in range(first, last):
            keep = _counter_bits(counter0 + i, key0, key1, key2) >= bound
            y[i] = x[i] * (keep_scale if keep else drop_scale)


@njit(cache=True)
def _dropout_flat(x, y, counter0, k0, k1, k2, threshold, coefficients, shift):
    _dropout_elements(x, y, 0, x.size, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True, parallel=True)
def _dropout_flat_parallel(x, y, counter0, k0, k1, k2, threshold, coefficients, shift):
    blocks = (x.size + PARALLEL_BLOCK - 1) // PARALLEL_BLOCK
    for b in prange(blocks):
        first = b * PARALLEL_BLOCK
        last = min(first + PARALLEL_BLOCK, x.size)
        _dropout_elements(x, y, first, last, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True)
def _dropout_channels_last_rows(
    x, y, first, last, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
):
    """Element-wise dropout of rows first..last-1 of a channels_last array seen as (N * S, C); the element at
    (n, s, c) takes the counter of its logical row-major index (n * C + c) * S + s."""
    drop_scale, keep_scale, drop_shift, keep_shift = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    for r in range(first, last):
        n = r // spatial
        base = counter0 + n * channels * spatial + (r - n * spatial)
        start = r * channels
        for c in range(channels):
            keep = _counter_bits(base + c * spatial, key0, key1, key2) >= bound
            value = x[start + c] * (keep_scale if keep else drop_scale)
            if shift:
                value += keep_shift if keep else drop_shift
            y[start + c] = value


@njit(cache=True)
def _dropout_channels_last(x, y, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift):
    rows = x.size // channels
    _dropout_channels_last_rows(
        x, y, 0, rows, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
    )  # fmt: skip


@njit(cache=True, parallel=True)
def _dropout_channels_last_parallel(x, y, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift):
    rows = x.size // channels
    rows_per_block = max(PARALLEL_BLOCK // channels, 1)
    blocks = (rows + rows_per_block - 1) // rows_per_block
    for b in prange(blocks):
        first = b * rows_per_block
        last = min(first + rows_per_block, rows)
        _dropout_channels_last_rows(
            x, y, first, last, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
        )  # fmt: skip


@njit(cache=True)
def _dropout_units(x, y, first, last, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    """Dropout of mask units first..last-1, unit u being the contiguous x[u * unit_size : (u + 1) * unit_size]
    (a channel of a contiguous (N, C, *) input) and taking counter ``counter0 + u``."""
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    for u in range(first, last):
        keep = 1 if _counter_bits(counter0 + u, key0, key1, key2) >= bound else 0
        scale = coefficients[keep]
        offset = coefficients[2 + keep]
        start = u * unit_size
        if shift:
            for i in range(start, start + unit_size):
                y[i] = x[i] * scale + offset
        else:
            for i in range(start, start + unit_size):
                y[i] = x[i] * scale


@njit(cache=True)
def _dropout_units_serial(x, y, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    _dropout_units(x, y, 0, x.size // unit_size, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True, parallel=True)
def _dropout_units_parallel(x, y, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    units = x.size // unit_size
    units_per_block = max(PARALLEL_BLOCK // unit_size, 1)
    blocks = (units + units_per_block - 1) // units_per_block
    for b in prange(blocks):
        first = b * units_per_block
        last = min(first + units_per_block, units)
        _dropout_units(x, y, first, last, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True)
def _dropout_channels_last_units(
    x, y, first, last, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
):
    """Channel dropout of samples first..last-1 of a channels_last array seen as (N, S, C): the mask unit of
    (n, c) takes counter ``counter0 + n * C + c`` and covers all S positions."""
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    scale = np.empty(channels, x.dtype)
    offset = np.empty(channels, x.dtype)
    for n in range(first, last):
        for c in range(channels):
            keep = 1 if _counter_bits(counter0 + n * channels + c, key0, key1, key2) >= bound else 0
            scale[c] = coefficients[keep]
            offset[c] = coefficients[2 + keep]
        for s in range(spatial):
            start = (n * spatial + s) * channels
            if shift:
                for c in range(channels):
                    y[start + c] = x[start + c] * scale[c] + offset[c]
            else:
                for c in range(channels):
                    y[start + c] = x[start + c] * scale[c]


@njit(cache=True)
def _dropout_channels_last_units_serial(x, y, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift):
    n_batch = x.size // (spatial * channels)
    _dropout_channels_last_units(
        x, y, 0, n_batch, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
    )  # fmt: skip


@njit(cache=True, parallel=True)
def _dropout_channels_last_units_parallel(
    x, y, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
):
    n_batch = x.size // (spatial * channels)
    for n in prange(n_batch):
        _dropout_channels_last_units(
            x, y, n, n + 1, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
        )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _dropout_constants(p: float, alpha: bool, shift: bool, dtype: torch.dtype) -> tuple[int, np.ndarray]:
    """The uint32 drop threshold and [drop_scale, keep_scale, drop_shift, keep_shift] in ``dtype``.

    The four constants come from running composite's own expressions on a keep mask [0, 1], so the kernels'
    ``x * scale + shift`` rounds exactly as composite's ``x * (keep * scale) + shift_term`` does.
    """
    keep = torch.tensor([0.0, 1.0], dtype=dtype)
    if not alpha:
        scale = keep * (1.0 / (1.0 - p))
        offset = torch.zeros(2, dtype=dtype)
    else:
        a = 1.0 / ((composite.SELU_SATURATION**2 * p + 1.0) * (1.0 - p)) ** 0.5
        scale = keep * a
        offset = (keep - 1.0) * (composite.SELU_SATURATION * a) + composite.SELU_SATURATION * a * p
        if not shift:
            offset = torch.zeros(2, dtype=dtype)
    coefficients = torch.cat([scale, offset]).numpy()
    threshold = drop_threshold(p)
    if threshold >= 2**32:  # every unit dropped: no uint32 threshold does that, so "keep" gets the drop constants
        threshold = 0
        coefficients[1], coefficients[3] = coefficients[0], coefficients[2]
    return threshold, coefficients


def dropout_forward(x: Tensor, seed: int, offset: int, p: float, mask_dims: int, alpha: bool, shift: bool) -> Tensor:
    """Dropout with the mask regenerated from ``(seed, offset)``; same contract as ``composite.dropout_forward``."""
    layout = _layout(x)
    ndim = x.ndim
    elementwise = mask_dims >= ndim
    channels_last = layout == _CHANNELS_LAST
    if x.numel() == 0 or (channels_last and not elementwise and mask_dims != 1 and mask_dims != 2):
        return composite.dropout_forward(x, seed, offset, p, mask_dims, alpha, shift)
    threshold, coefficients = _dropout_constants(p, alpha, shift, x.dtype)
    k0, k1, k2 = round_keys(seed)
    xs = _memory_view(x, layout)
    y = np.empty(xs.size, NUMPY_DTYPES[x.dtype])
    parallel = _parallel(xs.size)
    key = (offset, k0, k1, k2, threshold, coefficients, shift)
    if elementwise and not channels_last:
        (_dropout_flat_parallel if parallel else _dropout_flat)(xs, y, *key)
    elif elementwise:
        channels = x.shape[1]
        spatial = xs.size // (x.shape[0] * channels)
        (_dropout_channels_last_parallel if parallel else _dropout_channels_last)(xs, y, spatial, channels, *key)
    elif channels_last and mask_dims == 2:
        channels = x.shape[1]
        spatial = xs.size // (x.shape[0] * channels)
        kernel = _dropout_channels_last_units_parallel if parallel else _dropout_channels_last_units_serial
        kernel(xs, y, spatial, channels, *key)
    else:  # the mask's units are contiguous blocks: channels of a contiguous input, samples of a channels_last one
        unit_size = xs.size // math.prod(x.shape[:mask_dims])
        (_dropout_units_parallel if parallel else _dropout_units_serial)(xs, y, unit_size, *key)
    return _tensor_from_memory(y, x, layout)
