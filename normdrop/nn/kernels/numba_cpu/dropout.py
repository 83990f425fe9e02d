"""Dropout and random fields on the numba backend: counter-hash bits, element / unit / channels_last masks,
uniform fields and multiplicative noise (see :mod:`normdrop.nn.kernels.numba_cpu`)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import Tensor

from normdrop.nn.kernels import composite
from normdrop.nn.kernels.numba_cpu.memory import (
    _CHANNELS_LAST,
    _CONTIGUOUS,
    _UINT32,
    PARALLEL_BLOCK,
    _array_at,
    _empty_like,
    _layout,
    _parallel,
)
from normdrop.nn.rng import MIX_MULTIPLIER_1, MIX_MULTIPLIER_2, drop_threshold, round_keys

# ------------------------------------------------------------------------------------------------- dropout


@intrinsic
def _mix32(typingctx, h):
    """``normdrop.nn.rng.mix32`` on a uint32, emitted as 32-bit LLVM operations.

    Written in numba, the products would be typed 64-bit (numba widens integer arithmetic) and truncated after:
    the same bits, but the loops then vectorize with emulated 64-bit multiplies (AVX2 has none); with native 32-bit
    ones (``vpmulld``) and ``_bits_in_run``, element-wise dropout runs about 1.7x faster on an AVX2 CPU."""
    if h != types.uint32:
        return None
    signature = types.uint32(types.uint32)

    def codegen(context, builder, sig, args):
        (x,) = args
        word = ir.IntType(32)
        x = builder.xor(x, builder.lshr(x, ir.Constant(word, 16)))
        x = builder.mul(x, ir.Constant(word, MIX_MULTIPLIER_1))
        x = builder.xor(x, builder.lshr(x, ir.Constant(word, 15)))
        x = builder.mul(x, ir.Constant(word, MIX_MULTIPLIER_2))
        return builder.xor(x, builder.lshr(x, ir.Constant(word, 15)))

    return signature, codegen


@njit(inline="always")
def _counter_bits(counter, k0, k1, k2):
    """``normdrop.nn.rng.counter_bits`` for an int64 counter, with the seed's round keys precomputed (uint32)."""
    h = _mix32(_UINT32(_UINT32(counter) ^ k0))
    h = _mix32(_UINT32(h ^ _UINT32(counter >> 32) ^ k1))
    return _mix32(_UINT32(h ^ k2))


@njit(inline="always")
def _bits_in_run(low, key0, high_key1, key2):
    """``_counter_bits`` for a counter given as its low word and ``high word ^ k1``, both uint32: a run of counters
    that share their high word hashes in 32-bit arithmetic only."""
    h = _mix32(_UINT32(low ^ key0))
    h = _mix32(_UINT32(h ^ high_key1))
    return _mix32(_UINT32(h ^ key2))


@njit(cache=True)
def _drop_elements(x, y, first, last, counter0, k0, k1, k2, threshold, coefficients, shift):
    """Element-wise dropout of x[first:last], element i taking counter ``counter0 + i``.

    The counters are walked in runs that share their high 32-bit word (one run unless the range crosses a multiple
    of 2**32), so the inner loops hash 32-bit lanes and vectorize."""
    drop_scale, keep_scale, drop_shift, keep_shift = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    start = first
    while start < last:
        counter = counter0 + start
        low = _UINT32(counter)
        stop = min(last, start + ((1 << 32) - np.int64(low)))
        high_key1 = _UINT32(_UINT32(counter >> 32) ^ key1)
        x_run, y_run = x[start:stop], y[start:stop]
        if shift:
            for i in range(stop - start):
                keep = _bits_in_run(_UINT32(low + _UINT32(i)), key0, high_key1, key2) >= bound
                y_run[i] = x_run[i] * (keep_scale if keep else drop_scale) + (keep_shift if keep else drop_shift)
        else:
            for i in range(stop - start):
                keep = _bits_in_run(_UINT32(low + _UINT32(i)), key0, high_key1, key2) >= bound
                y_run[i] = x_run[i] * (keep_scale if keep else drop_scale)
        start = stop


@njit(cache=True)
def _dropout_flat(y, x_at, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    _drop_elements(x, y, 0, y.size, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True, parallel=True)
def _dropout_flat_parallel(y, x_at, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    blocks = (y.size + PARALLEL_BLOCK - 1) // PARALLEL_BLOCK
    for b in prange(blocks):
        first = b * PARALLEL_BLOCK
        last = min(first + PARALLEL_BLOCK, y.size)
        _drop_elements(x, y, first, last, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True)
def _uniform_elements(out, first, last, counter0, k0, k1, k2):
    """out[i] = (bits(counter0 + i) + 1/2) * 2**-32 for i in first..last-1, in runs sharing the high word."""
    key0, key1, key2 = _UINT32(k0), _UINT32(k1), _UINT32(k2)
    start = first
    while start < last:
        counter = counter0 + start
        low = _UINT32(counter)
        stop = min(last, start + ((1 << 32) - np.int64(low)))
        high_key1 = _UINT32(_UINT32(counter >> 32) ^ key1)
        run = out[start:stop]
        for i in range(stop - start):
            run[i] = (np.float64(_bits_in_run(_UINT32(low + _UINT32(i)), key0, high_key1, key2)) + 0.5) * 2.0**-32
        start = stop


@njit(cache=True, parallel=True)
def _uniform_parallel(out, counter0, k0, k1, k2):
    blocks = (out.size + PARALLEL_BLOCK - 1) // PARALLEL_BLOCK
    for b in prange(blocks):
        first = b * PARALLEL_BLOCK
        _uniform_elements(out, first, min(first + PARALLEL_BLOCK, out.size), counter0, k0, k1, k2)


def uniform(seed: int, offset: int, count: int, device: torch.device) -> Tensor:
    """Float64 uniforms in (0, 1); same contract and bits as ``composite.uniform`` (CPU only)."""
    if torch.device(device).type != "cpu":
        return composite.uniform(seed, offset, count, device)
    out = np.empty(count, np.float64)
    _fill_uniform(out, round_keys(seed), offset)
    return torch.from_numpy(out)


@njit(cache=True)
def _uniform_noise_elements(x, y, first, last, counter0, k0, k1, k2, scale):
    """y[i] = x[i] * eps_i, eps_i = 1 + scale * (2 u_i - 1) in float64 (no fused multiply-adds, as composite),
    rounded to y's dtype before the product; i in first..last-1."""
    key0, key1, key2 = _UINT32(k0), _UINT32(k1), _UINT32(k2)
    for i in range(first, last):
        u = (np.float64(_counter_bits(counter0 + i, key0, key1, key2)) + 0.5) * 2.0**-32
        y[i] = x[i] * y.dtype.type(1.0 + scale * (2.0 * u - 1.0))


@njit(cache=True, parallel=True)
def _uniform_noise_parallel(x, y, counter0, k0, k1, k2, scale):
    blocks = (y.size + PARALLEL_BLOCK - 1) // PARALLEL_BLOCK
    for b in prange(blocks):
        first = b * PARALLEL_BLOCK
        _uniform_noise_elements(x, y, first, min(first + PARALLEL_BLOCK, y.size), counter0, k0, k1, k2, scale)


NOISE_CHUNK = 1 << 16
"""Gaussian noise is made this many elements at a time, in two float64 buffers that stay in the L2 cache."""


def _fill_uniform(out: np.ndarray, seed_keys: tuple[int, int, int], offset: int) -> None:
    if _parallel(out.size):
        _uniform_parallel(out, offset, *seed_keys)
    else:
        _uniform_elements(out, 0, out.size, offset, *seed_keys)


def multiplicative_noise(x: Tensor, seed: int, offset: int, gaussian: bool, scale: float) -> Tensor:
    """``composite.multiplicative_noise``, bit for bit, for contiguous CPU float32/float64 inputs (others go to
    composite). Uniform noise is one fused pass. Gaussian noise runs chunk by chunk: the kernel hashes two uniform
    fields into cache-resident float64 buffers and torch's vectorized log/sqrt/cos (the very ops composite calls,
    in place) turn them into noise; scalar libm calls in the kernel were 10x slower, and whole-tensor float64
    temporaries cost page faults."""
    if _layout(x) != _CONTIGUOUS or x.numel() == 0:
        return composite.multiplicative_noise(x, seed, offset, gaussian, scale)
    count = x.numel()
    keys = round_keys(seed)
    if not gaussian:
        out, y = _empty_like(x, _CONTIGUOUS)
        source = x.detach().numpy().reshape(-1)
        if _parallel(count):
            _uniform_noise_parallel(source, y, offset, *keys, float(scale))
        else:
            _uniform_noise_elements(source, y, 0, count, offset, *keys, float(scale))
        return out
    flat_x = x.detach().reshape(-1)
    out = torch.empty_like(flat_x)
    first_buffer = np.empty(min(count, NOISE_CHUNK), np.float64)
    second_buffer = np.empty_like(first_buffer)
    for start in range(0, count, NOISE_CHUNK):
        size = min(NOISE_CHUNK, count - start)
        u1, u2 = first_buffer[:size], second_buffer[:size]
        _fill_uniform(u1, keys, offset + start)
        _fill_uniform(u2, keys, offset + count + start)
        radius, angle = torch.from_numpy(u1), torch.from_numpy(u2)
        torch.log(radius, out=radius).mul_(-2.0).sqrt_()  # sqrt(-2 ln u1)
        torch.cos(angle.mul_(2.0 * math.pi), out=angle)  # cos(2 pi u2)
        noise = radius.mul_(angle).mul_(scale).add_(1.0)  # 1 + scale * z
        torch.mul(flat_x[start : start + size], noise.to(x.dtype), out=out[start : start + size])
    return out.view(x.shape)


@njit(cache=True)
def _drop_channels_last_rows(
    x, y, first, last, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
):
    """Element-wise dropout of rows first..last-1 of a channels_last array seen as (N * S, C); the element at
    (n, s, c) takes the counter of its logical row-major index (n * C + c) * S + s."""
    drop_scale, keep_scale, drop_shift, keep_shift = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    for r in range(first, last):
        n = r // spatial
        base = counter0 + n * channels * spatial + (r - n * spatial)
        x_row, y_row = x[r * channels : (r + 1) * channels], y[r * channels : (r + 1) * channels]
        for c in range(channels):
            keep = _counter_bits(base + c * spatial, key0, key1, key2) >= bound
            value = x_row[c] * (keep_scale if keep else drop_scale)
            if shift:
                value += keep_shift if keep else drop_shift
            y_row[c] = value


@njit(cache=True)
def _dropout_channels_last(y, x_at, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    rows = y.size // channels
    _drop_channels_last_rows(
        x, y, 0, rows, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
    )  # fmt: skip


@njit(cache=True, parallel=True)
def _dropout_channels_last_parallel(y, x_at, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    rows = y.size // channels
    rows_per_block = max(PARALLEL_BLOCK // channels, 1)
    blocks = (rows + rows_per_block - 1) // rows_per_block
    for b in prange(blocks):
        first = b * rows_per_block
        last = min(first + rows_per_block, rows)
        _drop_channels_last_rows(
            x, y, first, last, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
        )  # fmt: skip


UNIT_BLOCK = 512
"""Unit dropout hashes the counters of this many units at a time into a buffer before it scales their elements."""


@njit(cache=True)
def _unit_keeps(keeps, counter0, k0, k1, k2, threshold):
    """keeps[u] = 1 if bits(counter0 + u) >= threshold else 0: the hash of ``_drop_elements`` in 32-bit runs that
    share their high word, a loop that vectorizes (one scalar hash per unit in the scaling loop did not)."""
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    start, last = 0, keeps.size
    while start < last:
        counter = counter0 + start
        low = _UINT32(counter)
        stop = min(last, start + ((1 << 32) - np.int64(low)))
        high_key1 = _UINT32(_UINT32(counter >> 32) ^ key1)
        run = keeps[start:stop]
        for i in range(stop - start):
            run[i] = 1 if _bits_in_run(_UINT32(low + _UINT32(i)), key0, high_key1, key2) >= bound else 0
        start = stop


@njit(cache=True)
def _drop_units(x, y, first, last, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    """Dropout of mask units first..last-1, unit u being the contiguous x[u * unit_size : (u + 1) * unit_size]
    (a channel of a contiguous (N, C, *) input, or a sample of a channels_last one), taking counter
    ``counter0 + u``: y = x * scale[keep] (+ shift[keep]).

    The keep flags of ``UNIT_BLOCK`` units are hashed first (``_unit_keeps``), then their elements scaled: with
    small units (a 2x2 feature map) the hash is most of the work, and hashed one unit at a time it ran 3x slower
    than element-wise dropout of the same tensor."""
    keeps = np.empty(min(UNIT_BLOCK, max(last - first, 0)), np.uint8)
    for block in range(first, last, UNIT_BLOCK):
        count = min(UNIT_BLOCK, last - block)
        block_keeps = keeps[:count]
        _unit_keeps(block_keeps, counter0 + block, k0, k1, k2, threshold)
        for j in range(count):
            keep = np.int64(block_keeps[j])
            scale = coefficients[keep]
            offset = coefficients[2 + keep]
            base = (block + j) * unit_size
            x_unit, y_unit = x[base : base + unit_size], y[base : base + unit_size]
            if shift:
                for i in range(unit_size):
                    y_unit[i] = x_unit[i] * scale + offset
            else:
                for i in range(unit_size):
                    y_unit[i] = x_unit[i] * scale


@njit(cache=True)
def _dropout_units(y, x_at, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    _drop_units(x, y, 0, y.size // unit_size, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True, parallel=True)
def _dropout_units_parallel(y, x_at, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    units = y.size // unit_size
    units_per_block = max(PARALLEL_BLOCK // unit_size, 1)
    blocks = (units + units_per_block - 1) // units_per_block
    for b in prange(blocks):
        first = b * units_per_block
        last = min(first + units_per_block, units)
        _drop_units(x, y, first, last, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift)


@njit(cache=True)
def _drop_channels_last_units(
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
        for r in range(n * spatial, (n + 1) * spatial):
            x_row, y_row = x[r * channels : (r + 1) * channels], y[r * channels : (r + 1) * channels]
            if shift:
                for c in range(channels):
                    y_row[c] = x_row[c] * scale[c] + offset[c]
            else:
                for c in range(channels):
                    y_row[c] = x_row[c] * scale[c]


@njit(cache=True)
def _dropout_channels_last_units(y, x_at, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift):
    x = _array_at(x_at, y.size, y)
    n_batch = y.size // (spatial * channels)
    _drop_channels_last_units(
        x, y, 0, n_batch, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
    )  # fmt: skip


@njit(cache=True, parallel=True)
def _dropout_channels_last_units_parallel(
    y, x_at, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
):
    x = _array_at(x_at, y.size, y)
    n_batch = y.size // (spatial * channels)
    for n in prange(n_batch):
        _drop_channels_last_units(
            x, y, n, n + 1, spatial, channels, counter0, k0, k1, k2, threshold, coefficients, shift
        )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _dropout_constants(p: float, alpha: bool, shift: bool, dtype: torch.dtype) -> tuple[int, np.ndarray]:
    """The uint32 drop threshold and [drop_scale, keep_scale, drop_shift, keep_shift] in ``dtype``.

    The four constants come from running composite's own expressions on a keep mask [0, 1], so the kernels'
    ``x * scale + shift`` rounds exactly as composite's ``x * (keep * scale) + shift_term`` does.
    """
    keep = torch.tensor([0.0, 1.0], dtype=dtype, device="cpu")
    offset = torch.zeros(2, dtype=dtype, device="cpu")
    if not alpha:
        scale = keep * (1.0 / (1.0 - p))
    else:
        a = 1.0 / ((composite.SELU_SATURATION**2 * p + 1.0) * (1.0 - p)) ** 0.5
        scale = keep * a
        if shift:
            offset = (keep - 1.0) * (composite.SELU_SATURATION * a) + composite.SELU_SATURATION * a * p
    coefficients = torch.cat([scale, offset]).numpy()
    threshold = drop_threshold(p)
    if threshold >= 2**32:  # every unit dropped: no uint32 threshold does that, so "keep" gets the drop constants
        threshold = 0
        coefficients[1], coefficients[3] = coefficients[0], coefficients[2]
    coefficients.flags.writeable = False  # shared by every call through the cache
    return threshold, coefficients


def dropout_forward(x: Tensor, seed: int, offset: int, p: float, mask_dims: int, alpha: bool, shift: bool) -> Tensor:
    """Dropout with the mask regenerated from ``(seed, offset)``; same contract as ``composite.dropout_forward``."""
    layout = _layout(x)
    elementwise = mask_dims >= x.ndim
    channels_last = layout == _CHANNELS_LAST
    if layout is None or x.numel() == 0 or (channels_last and not elementwise and mask_dims not in (1, 2)):
        return composite.dropout_forward(x, seed, offset, p, mask_dims, alpha, shift)
    threshold, coefficients = _dropout_constants(p, alpha, shift, x.dtype)
    out, y = _empty_like(x, layout)
    key = (offset, *round_keys(seed), threshold, coefficients, shift)
    parallel = _parallel(y.size)
    if not channels_last and elementwise:
        (_dropout_flat_parallel if parallel else _dropout_flat)(y, x.data_ptr(), *key)
    elif not channels_last or mask_dims == 1:  # each mask unit is a contiguous block: a channel, or a sample
        unit_size = y.size // math.prod(x.shape[:mask_dims])
        (_dropout_units_parallel if parallel else _dropout_units)(y, x.data_ptr(), unit_size, *key)
    else:
        channels = x.shape[1]
        spatial = y.size // (x.shape[0] * channels)
        if elementwise:
            kernel = _dropout_channels_last_parallel if parallel else _dropout_channels_last
        else:
            kernel = _dropout_channels_last_units_parallel if parallel else _dropout_channels_last_units
        kernel(y, x.data_ptr(), spatial, channels, *key)
    return out
