"""Batch norm on the numba backend: the per-channel sums and per-element passes, serial and parallel, and
the forward / backward functions with composite's signatures (see :mod:`normdrop.nn.kernels.numba_cpu`)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from torch import Tensor

from normdrop.nn.kernels import composite
from normdrop.nn.kernels.numba_cpu.memory import (
    BN_MATH,
    _address,
    _array_at,
    _channel_vector,
    _empty_like,
    _layout,
    _others_plain,
    _parallel,
    _plain_type,
    _plane_size,
    _with_layout,
    parallel_blocks,
)

# ------------------------------------------------------------------------------------------ batch norm kernels
# Two memory layouts, both walked in memory order:
# - planes: a contiguous (N, C, S) input, S > 1, is N * C planes of S contiguous values, plane p of channel p % C;
# - rows: an (N, C) input, or a channels_last one, is rows of C values, one per channel (``spatial`` = 1).
# Each pass handles a range of units (planes or rows); the sums of a range go to a (2, C) float64 array, and the
# parallel kernels give each thread a range and add the ranges' sums before computing the per-channel coefficients.


@njit(cache=True, fastmath=BN_MATH)
def _moment_sums(x, first, last, channels, spatial, pivot, sums):
    """Add units first..last-1 into sums[0, c] = sum(x - pivot_c), sums[1, c] = sum((x - pivot_c)^2)."""
    if spatial == 1:
        for r in range(first, last):
            row = x[r * channels : (r + 1) * channels]
            for c in range(channels):
                d = np.float64(row[c]) - pivot[c]
                sums[0, c] += d
                sums[1, c] += d * d
        return
    for p in range(first, last):
        c = p % channels
        plane = x[p * spatial : (p + 1) * spatial]
        center = pivot[c]
        total = 0.0
        total_sq = 0.0
        for i in range(spatial):
            d = np.float64(plane[i]) - center
            total += d
            total_sq += d * d
        sums[0, c] += total
        sums[1, c] += total_sq


@njit(cache=True, fastmath=BN_MATH)
def _grad_sums(grad, x, first, last, channels, spatial, center, sums):
    """Add units first..last-1 into sums[0, c] = sum(g), sums[1, c] = sum(g * (x - center_c))."""
    if spatial == 1:
        for r in range(first, last):
            row = slice(r * channels, (r + 1) * channels)
            grad_row, x_row = grad[row], x[row]
            for c in range(channels):
                g = np.float64(grad_row[c])
                sums[0, c] += g
                sums[1, c] += g * (np.float64(x_row[c]) - center[c])
        return
    for p in range(first, last):
        c = p % channels
        plane = slice(p * spatial, (p + 1) * spatial)
        grad_plane, x_plane = grad[plane], x[plane]
        mu = center[c]
        total = 0.0
        total_centered = 0.0
        for i in range(spatial):
            g = np.float64(grad_plane[i])
            total += g
            total_centered += g * (np.float64(x_plane[i]) - mu)
        sums[0, c] += total
        sums[1, c] += total_centered


@njit(cache=True, fastmath=BN_MATH)
def _normalize(x, y, first, last, channels, spatial, coefficients):
    """y = (x - center_c) * scale_c + offset_c on units first..last-1; coefficients = [center, scale, offset]."""
    center, scale, offset = coefficients[0], coefficients[1], coefficients[2]
    if spatial == 1:
        for r in range(first, last):
            row = slice(r * channels, (r + 1) * channels)
            x_row, y_row = x[row], y[row]
            for c in range(channels):
                y_row[c] = (x_row[c] - center[c]) * scale[c] + offset[c]
        return
    for p in range(first, last):
        c = p % channels
        plane = slice(p * spatial, (p + 1) * spatial)
        x_plane, y_plane = x[plane], y[plane]
        center_c, scale_c, offset_c = center[c], scale[c], offset[c]
        for i in range(spatial):
            y_plane[i] = (x_plane[i] - center_c) * scale_c + offset_c


@njit(cache=True, fastmath=BN_MATH)
def _grad_input(grad, x, grad_x, first, last, channels, spatial, coefficients, training):
    """grad_x = g * gain_c + (x - center_c) * slope_c + offset_c in training, g * gain_c in inference, on units
    first..last-1; coefficients = [center, gain, slope, offset]."""
    center, gain, slope, offset = coefficients[0], coefficients[1], coefficients[2], coefficients[3]
    if spatial == 1:
        for r in range(first, last):
            row = slice(r * channels, (r + 1) * channels)
            g, x_row, out = grad[row], x[row], grad_x[row]
            if training:
                for c in range(channels):
                    out[c] = g[c] * gain[c] + (x_row[c] - center[c]) * slope[c] + offset[c]
            else:
                for c in range(channels):
                    out[c] = g[c] * gain[c]
        return
    for p in range(first, last):
        c = p % channels
        plane = slice(p * spatial, (p + 1) * spatial)
        g, x_plane, out = grad[plane], x[plane], grad_x[plane]
        gain_c = gain[c]
        if training:
            center_c, slope_c, offset_c = center[c], slope[c], offset[c]
            for i in range(spatial):
                out[i] = g[i] * gain_c + (x_plane[i] - center_c) * slope_c + offset_c
        else:
            for i in range(spatial):
                out[i] = g[i] * gain_c


@njit(cache=True, fastmath=BN_MATH)
def _forward_coefficients(pivot, count, sums, weight, bias, mean, var, training, eps):
    """[center, scale, offset] of the normalizing map per channel, in the input's dtype (that of ``mean``); in
    training also the batch mean and biased variance, written to ``mean`` and ``var``."""
    channels = pivot.size
    coefficients = np.zeros((3, channels), mean.dtype)
    for c in range(channels):
        if training:
            shift = sums[0, c] / count
            center = pivot[c] + shift
            variance = max(sums[1, c] / count - shift * shift, 0.0)
            mean[c] = center
            var[c] = variance
        else:
            center = np.float64(mean[c])
            variance = np.float64(var[c])
        scale = 1.0 / np.sqrt(variance + eps)
        if weight.size > 0:
            scale *= weight[c]
        coefficients[0, c] = center
        coefficients[1, c] = scale
        if bias.size > 0:
            coefficients[2, c] = bias[c]
    return coefficients


@njit(cache=True, fastmath=BN_MATH)
def _backward_coefficients(count, sums, weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias):
    """[center, gain, slope, offset] of grad_x per channel, in the input's dtype; fills grad_weight / grad_bias."""
    channels = mean.size
    coefficients = np.zeros((4, channels), mean.dtype)
    for c in range(channels):
        inv_std = 1.0 / np.sqrt(np.float64(var[c]) + eps)
        d_weight = sums[1, c] * inv_std
        grad_bias[c] = sums[0, c]
        grad_weight[c] = d_weight
        gain = inv_std * weight[c] if weight.size > 0 else inv_std
        coefficients[0, c] = mean[c]
        coefficients[1, c] = gain
        if training:
            slope = -gain * d_weight * inv_std / count
            offset = -gain * sums[0, c] / count
            if grad_var.size > 0:
                slope += 2.0 * grad_var[c] / count
            if grad_mean.size > 0:
                offset += grad_mean[c] / count
            coefficients[2, c] = slope
            coefficients[3, c] = offset
    return coefficients


@njit(cache=True)
def _units(size, channels, spatial):
    """How many units (rows or planes) an array of ``size`` values has."""
    return size // (channels if spatial == 1 else spatial)


@njit(cache=True)
def _float64_values(values, channels, stride):
    """values[c * stride] for each channel, in float64: the first value of each channel (the statistics' pivot),
    or a copy of a per-channel vector (stride 1)."""
    out = np.empty(channels)
    for c in range(channels):
        out[c] = values[c * stride]
    return out


@njit(cache=True)
def _pivots(x, channels, spatial):
    """The statistics' pivot per channel: its first value, in float64, or 0 where that is not finite (an inf or
    NaN pivot would make every deviation inf or NaN, and an input with one -inf value a NaN mean, not -inf)."""
    pivot = _float64_values(x, channels, spatial)
    for c in range(channels):
        if not np.isfinite(pivot[c]):
            pivot[c] = 0.0
    return pivot


@njit(cache=True)
def _add_blocks(partial_sums):
    """Sum per-block partial sums (blocks, 2, C) into (2, C)."""
    total = partial_sums[0].copy()
    for b in range(1, partial_sums.shape[0]):
        total += partial_sums[b]
    return total


@njit(cache=True)
def _forward_arrays(y, x_at, weight_at, bias_at, mean_at, var_at, channels):
    """The forward's input arrays: x (as many elements as y), weight, bias, mean, var (per channel)."""
    return (
        _array_at(x_at, y.size, y),
        _array_at(weight_at, channels, y),
        _array_at(bias_at, channels, y),
        _array_at(mean_at, channels, y),
        _array_at(var_at, channels, y),
    )


@njit(cache=True)
def _backward_arrays(
    grad_x, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, grad_mean_at, grad_var_at,
    channels,
):  # fmt: skip
    """The backward's arrays but grad_x: grad_weight and grad_bias (outputs), grad and x (as many elements as
    grad_x), then the per-channel inputs."""
    return (
        _array_at(grad_weight_at, channels, grad_x),
        _array_at(grad_bias_at, channels, grad_x),
        _array_at(grad_at, grad_x.size, grad_x),
        _array_at(x_at, grad_x.size, grad_x),
        _array_at(weight_at, channels, grad_x),
        _array_at(mean_at, channels, grad_x),
        _array_at(var_at, channels, grad_x),
        _array_at(grad_mean_at, channels, grad_x),
        _array_at(grad_var_at, channels, grad_x),
    )


@njit(cache=True)
def _forward(y, x_at, weight_at, bias_at, mean_at, var_at, channels, spatial, training, eps):
    x, weight, bias, mean, var = _forward_arrays(y, x_at, weight_at, bias_at, mean_at, var_at, channels)
    units = _units(y.size, channels, spatial)
    pivot = _pivots(x, channels, spatial)
    sums = np.zeros((2, channels))
    if training:
        _moment_sums(x, 0, units, channels, spatial, pivot, sums)
    coefficients = _forward_coefficients(pivot, y.size // channels, sums, weight, bias, mean, var, training, eps)
    _normalize(x, y, 0, units, channels, spatial, coefficients)


@njit(cache=True, parallel=True)
def _forward_parallel(y, x_at, weight_at, bias_at, mean_at, var_at, channels, spatial, training, eps, blocks):
    x, weight, bias, mean, var = _forward_arrays(y, x_at, weight_at, bias_at, mean_at, var_at, channels)
    units = _units(y.size, channels, spatial)
    pivot = _pivots(x, channels, spatial)
    partial_sums = np.zeros((blocks, 2, channels))
    if training:
        for b in prange(blocks):
            first, last = b * units // blocks, (b + 1) * units // blocks
            _moment_sums(x, first, last, channels, spatial, pivot, partial_sums[b])
    coefficients = _forward_coefficients(
        pivot, y.size // channels, _add_blocks(partial_sums), weight, bias, mean, var, training, eps
    )
    for b in prange(blocks):
        _normalize(x, y, b * units // blocks, (b + 1) * units // blocks, channels, spatial, coefficients)


@njit(cache=True)
def _backward(
    grad_x, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, grad_mean_at, grad_var_at,
    channels, spatial, training, eps,
):  # fmt: skip
    grad_weight, grad_bias, grad, x, weight, mean, var, grad_mean, grad_var = _backward_arrays(
        grad_x, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, grad_mean_at, grad_var_at,
        channels,
    )  # fmt: skip
    units = _units(grad_x.size, channels, spatial)
    sums = np.zeros((2, channels))
    _grad_sums(grad, x, 0, units, channels, spatial, _float64_values(mean, channels, 1), sums)
    coefficients = _backward_coefficients(
        grad_x.size // channels, sums, weight, mean, var, grad_mean, grad_var, training, eps, grad_weight, grad_bias
    )
    _grad_input(grad, x, grad_x, 0, units, channels, spatial, coefficients, training)


@njit(cache=True, parallel=True)
def _backward_parallel(
    grad_x, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, grad_mean_at, grad_var_at,
    channels, spatial, training, eps, blocks,
):  # fmt: skip
    grad_weight, grad_bias, grad, x, weight, mean, var, grad_mean, grad_var = _backward_arrays(
        grad_x, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, grad_mean_at, grad_var_at,
        channels,
    )  # fmt: skip
    units = _units(grad_x.size, channels, spatial)
    center = _float64_values(mean, channels, 1)
    partial_sums = np.zeros((blocks, 2, channels))
    for b in prange(blocks):
        first, last = b * units // blocks, (b + 1) * units // blocks
        _grad_sums(grad, x, first, last, channels, spatial, center, partial_sums[b])
    coefficients = _backward_coefficients(
        grad_x.size // channels, _add_blocks(partial_sums), weight, mean, var, grad_mean, grad_var, training, eps,
        grad_weight, grad_bias,
    )  # fmt: skip
    for b in prange(blocks):
        first, last = b * units // blocks, (b + 1) * units // blocks
        _grad_input(grad, x, grad_x, first, last, channels, spatial, coefficients, training)


# ------------------------------------------------------------------------------------------- batch norm API


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
    layout = _layout(x)
    if layout is None or x.numel() == 0 or not _others_plain(weight, bias, running_mean, running_var):
        return composite.batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
    channels = x.shape[1]
    out, y = _empty_like(x, layout)
    if training:
        mean, var = x.new_empty(channels), x.new_empty(channels)
    else:
        assert running_mean is not None and running_var is not None
        mean, var = _channel_vector(running_mean, x.dtype, channels), _channel_vector(running_var, x.dtype, channels)
    weight, bias = _channel_vector(weight, x.dtype, channels), _channel_vector(bias, x.dtype, channels)
    addresses = (x.data_ptr(), _address(weight), _address(bias), mean.data_ptr(), var.data_ptr())
    spatial = _plane_size(y.size, x, layout)
    if _parallel(y.size):
        blocks = parallel_blocks(y.size // (channels if spatial == 1 else spatial))
        _forward_parallel(y, *addresses, channels, spatial, training, eps, blocks)
    else:
        _forward(y, *addresses, channels, spatial, training, eps)
    if not training:
        return out, x.new_empty(0), x.new_empty(0)
    return out, mean, var


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
    layout = _layout(x)
    # A lazily-zero output gradient is fine: ``_with_layout`` materializes it.
    plain = _plain_type(grad_out) and _others_plain(weight, mean, var, grad_mean, grad_var)
    if layout is None or x.numel() == 0 or not plain:
        return composite.batch_norm_backward(grad_out, x, weight, mean, var, training, eps, grad_mean, grad_var)
    channels = x.shape[1]
    grad_out = _with_layout(grad_out, x, layout)
    grad_input, grad_x = _empty_like(x, layout)
    grad_weight, grad_bias = x.new_empty(channels), x.new_empty(channels)
    param_dtype = x.dtype if weight is None else weight.dtype
    weight, mean, var, grad_mean, grad_var = (
        _channel_vector(t, x.dtype, channels) for t in (weight, mean, var, grad_mean, grad_var)
    )
    tensors = (grad_weight, grad_bias, grad_out, x, weight, mean, var, grad_mean, grad_var)
    addresses = tuple(map(_address, tensors))
    spatial = _plane_size(grad_x.size, x, layout)
    if _parallel(grad_x.size):
        blocks = parallel_blocks(grad_x.size // (channels if spatial == 1 else spatial))
        _backward_parallel(grad_x, *addresses, channels, spatial, training, eps, blocks)
    else:
        _backward(grad_x, *addresses, channels, spatial, training, eps)
    if param_dtype != x.dtype:
        grad_weight, grad_bias = grad_weight.to(param_dtype), grad_bias.to(param_dtype)
    return grad_input, grad_weight, grad_bias
