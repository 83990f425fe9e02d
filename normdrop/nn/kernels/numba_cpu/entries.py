"""C entry points of the numba kernels for the C++ fast path (``kernels/fastpath.cpp``)."""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, types

from normdrop.nn.kernels.numba_cpu.batchnorm import _backward, _forward
from normdrop.nn.kernels.numba_cpu.dropout import _drop_elements, _drop_units, _uniform_noise_elements
from normdrop.nn.kernels.numba_cpu.memory import BN_MATH, _array_at

# ----------------------------------------------------------------------------- C entry points for the fast path
# ``kernels/fastpath.cpp`` runs small ops as C++ autograd nodes (no Python between the layer call and the kernel,
# nor in backward) and calls these serial kernels through C function pointers: every argument is an integer
# address, a count or a float. They are the same loops as above, so results are bit-identical to
# ``batch_norm_forward`` / ``batch_norm_backward`` / ``dropout_forward`` on inputs small enough to run serially.


@njit(cache=True, fastmath=BN_MATH)
def _update_running(mean, var, running_mean, running_var, momentum, count):
    """running <- momentum * batch + (1 - momentum) * running, with the unbiased batch variance var * n / (n - 1):
    torch's form, in float64 (so infinities combine as in torch's update; a lerp would make inf running
    statistics NaN)."""
    correction = count / (count - 1.0)
    for c in range(mean.size):
        running_mean[c] = momentum * np.float64(mean[c]) + (1.0 - momentum) * np.float64(running_mean[c])
        running_var[c] = momentum * (np.float64(var[c]) * correction) + (1.0 - momentum) * np.float64(running_var[c])


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


def _uniform_noise_entry(dtype):
    like = np.empty(0, dtype)

    def entry(y_at, x_at, numel, counter0, k0, k1, k2, scale):
        x, y = _array_at(x_at, numel, like), _array_at(y_at, numel, like)
        _uniform_noise_elements(x, y, 0, numel, counter0, k0, k1, k2, scale)

    return entry


_I64, _F64 = types.int64, types.float64
_ENTRY_SIGNATURES = {
    "batch_norm_forward": (_batch_norm_forward_entry, types.void(*[_I64] * 12, _F64, _F64)),
    "batch_norm_backward": (_batch_norm_backward_entry, types.void(*[_I64] * 12, _F64)),
    "dropout": (_dropout_entry, types.void(*[_I64] * 9, *[_F64] * 4)),
    "uniform_noise": (_uniform_noise_entry, types.void(*[_I64] * 7, _F64)),
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
