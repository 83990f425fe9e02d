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
(``supports``). Large inputs run on ``torch.get_num_threads()`` threads (numba's ``prange``); small ones, or one
thread, take serial loops that never start numba's thread pool.

Tensors reach the kernels as their data address (``Tensor.data_ptr()``), viewed as arrays inside the compiled code
(``_array_at``): converting a tensor with ``Tensor.numpy()`` costs about 2 us, a tenth of a small op, for each of
the up to seven tensors an op reads. Every address is of a dense tensor in the expected dtype and layout that the
calling Python function holds a reference to until the kernel returns; outputs are numpy arrays the kernels write
and ``torch.from_numpy`` wraps without a copy.
"""

from __future__ import annotations

import functools
import math
import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import Tensor

from normdrop.nn.kernels import composite
from normdrop.nn.rng import MIX_MULTIPLIER_1, MIX_MULTIPLIER_2, drop_threshold, round_keys

NUMBA_CACHE_ENV = "NORMDROP_NUMBA_CACHE_DIR"


def numba_cache_dir() -> str:
    """Where numba's ``cache=True`` keeps the compiled kernels: ``$NUMBA_CACHE_DIR`` if the user set numba's own
    variable, else ``$NORMDROP_NUMBA_CACHE_DIR``, else ``<user cache dir>/normdrop/numba`` -- never the installed
    package's ``__pycache__``, which a read-only install (site-packages owned by root, a container image) cannot
    be written to."""
    import platformdirs

    return (
        os.environ.get("NUMBA_CACHE_DIR")
        or os.environ.get(NUMBA_CACHE_ENV)
        or os.path.join(platformdirs.user_cache_dir("normdrop"), "numba")
    )


# numba reads its cache directory when a cached function is defined (below), so set it first.
numba.config.CACHE_DIR = numba_cache_dir()

__all__ = [
    "PARALLEL_MIN_NUMEL",
    "batch_norm_backward",
    "batch_norm_forward",
    "dropout_forward",
    "multiplicative_noise",
    "supports",
    "uniform",
]

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
    pivot = _float64_values(x, channels, spatial)
    sums = np.zeros((2, channels))
    if training:
        _moment_sums(x, 0, units, channels, spatial, pivot, sums)
    coefficients = _forward_coefficients(pivot, y.size // channels, sums, weight, bias, mean, var, training, eps)
    _normalize(x, y, 0, units, channels, spatial, coefficients)


@njit(cache=True, parallel=True)
def _forward_parallel(y, x_at, weight_at, bias_at, mean_at, var_at, channels, spatial, training, eps, blocks):
    x, weight, bias, mean, var = _forward_arrays(y, x_at, weight_at, bias_at, mean_at, var_at, channels)
    units = _units(y.size, channels, spatial)
    pivot = _float64_values(x, channels, spatial)
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
        _forward_parallel(y, *addresses, channels, spatial, training, eps, numba.get_num_threads())
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
        _backward_parallel(grad_x, *addresses, channels, spatial, training, eps, numba.get_num_threads())
    else:
        _backward(grad_x, *addresses, channels, spatial, training, eps)
    if param_dtype != x.dtype:
        grad_weight, grad_bias = grad_weight.to(param_dtype), grad_bias.to(param_dtype)
    return grad_input, grad_weight, grad_bias


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


@njit(cache=True)
def _drop_units(x, y, first, last, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift):
    """Dropout of mask units first..last-1, unit u being the contiguous x[u * unit_size : (u + 1) * unit_size]
    (a channel of a contiguous (N, C, *) input, or a sample of a channels_last one), taking counter
    ``counter0 + u``."""
    key0, key1, key2, bound = _UINT32(k0), _UINT32(k1), _UINT32(k2), _UINT32(threshold)
    for u in range(first, last):
        keep = 1 if _counter_bits(counter0 + u, key0, key1, key2) >= bound else 0
        scale = coefficients[keep]
        offset = coefficients[2 + keep]
        x_unit, y_unit = x[u * unit_size : (u + 1) * unit_size], y[u * unit_size : (u + 1) * unit_size]
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


# ----------------------------------------------------------------------------- C entry points for the fast path
# ``kernels/fastpath.cpp`` runs small ops as C++ autograd nodes (no Python between the layer call and the kernel,
# nor in backward) and calls these serial kernels through C function pointers: every argument is an integer
# address, a count or a float. They are the same loops as above, so results are bit-identical to
# ``batch_norm_forward`` / ``batch_norm_backward`` / ``dropout_forward`` on inputs small enough to run serially.


@njit(cache=True, fastmath=BN_MATH)
def _update_running(mean, var, running_mean, running_var, momentum, count):
    """running <- running + momentum * (batch - running), with the unbiased batch variance var * n / (n - 1)."""
    correction = count / (count - 1.0)
    for c in range(mean.size):
        running_mean[c] += momentum * (np.float64(mean[c]) - running_mean[c])
        running_var[c] += momentum * (np.float64(var[c]) * correction - running_var[c])


def _batch_norm_forward_entry(dtype):
    like = np.empty(0, dtype)

    def entry(y_at, x_at, weight_at, bias_at, mean_at, var_at, rmean_at, rvar_at, numel, channels, spatial,
              training, eps, momentum):  # fmt: skip
        y = _array_at(y_at, numel, like)
        _forward(y, x_at, weight_at, bias_at, mean_at, var_at, channels, spatial, training != 0, eps)
        if training != 0 and rmean_at != 0:
            _update_running(
                _array_at(mean_at, channels, like), _array_at(var_at, channels, like),
                _array_at(rmean_at, channels, like), _array_at(rvar_at, channels, like),
                momentum, numel // channels,
            )  # fmt: skip

    return entry


def _batch_norm_backward_entry(dtype):
    like = np.empty(0, dtype)

    def entry(grad_x_at, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, numel, channels,
              spatial, training, eps):  # fmt: skip
        grad_x = _array_at(grad_x_at, numel, like)
        _backward(grad_x, grad_weight_at, grad_bias_at, grad_at, x_at, weight_at, mean_at, var_at, 0, 0,
                  channels, spatial, training != 0, eps)  # fmt: skip

    return entry


def _dropout_entry(dtype):
    like = np.empty(0, dtype)

    def entry(y_at, x_at, numel, unit_size, counter0, k0, k1, k2, threshold, drop_scale, keep_scale, drop_shift,
              keep_shift):  # fmt: skip
        coefficients = np.empty(4, dtype)
        coefficients[0], coefficients[1], coefficients[2], coefficients[3] = (
            drop_scale, keep_scale, drop_shift, keep_shift
        )  # fmt: skip
        shift = drop_shift != 0.0 or keep_shift != 0.0
        x, y = _array_at(x_at, numel, like), _array_at(y_at, numel, like)
        if unit_size == 1:  # element-wise
            _drop_elements(x, y, 0, numel, counter0, k0, k1, k2, threshold, coefficients, shift)
        else:  # one mask value per contiguous unit (a channel, a sample)
            _drop_units(x, y, 0, numel // unit_size, unit_size, counter0, k0, k1, k2, threshold, coefficients, shift)

    return entry


_I64, _F64 = types.int64, types.float64
_ENTRY_SIGNATURES = {
    "batch_norm_forward": (_batch_norm_forward_entry, types.void(*[_I64] * 12, _F64, _F64)),
    "batch_norm_backward": (_batch_norm_backward_entry, types.void(*[_I64] * 12, _F64)),
    "dropout": (_dropout_entry, types.void(*[_I64] * 9, *[_F64] * 4)),
}


@functools.cache
def entry_points() -> dict[str, int]:
    """C function pointers (as integers) of the fast path's kernels, keyed ``"{name}_{float32|float64}"``.

    Compiled on first use (then loaded from numba's cache), not at import, so code that never takes the fast path
    never pays for them."""
    addresses = {}
    for name, (make, signature) in _ENTRY_SIGNATURES.items():
        for dtype in (np.float32, np.float64):
            compiled = numba.cfunc(signature, cache=True)(make(dtype))
            addresses[f"{name}_{np.dtype(dtype).name}"] = compiled.address
    return addresses
