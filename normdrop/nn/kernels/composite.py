"""The torch-composite backend: batch norm and dropout written with elementary torch ops.

It runs on any device torch supports (CPU, CUDA, ...), it is differentiable as written (so double backward works
through it), and it is the oracle the fast kernels are tested against. It never calls torch's own batch_norm,
dropout or bernoulli ops: those are the oracle for *this* file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normdrop.nn.rng import MASK32, MIX_MULTIPLIER_1, MIX_MULTIPLIER_2, drop_threshold, round_keys

# SELU's negative saturation value, lambda * alpha (Klambauer et al. 2017): alpha dropout sets dropped units to
# -SELU_SATURATION before its affine correction.
SELU_SATURATION = 1.7580993408473766


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reduced-precision inputs are normalized in float32, as torch does; float32/float64 in their own type."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_view(stat: Tensor, ndim: int) -> Tensor:
    """Reshape a per-channel vector (C,) so it broadcasts against an (N, C, *) input."""
    return stat.view((1, -1) + (1,) * (ndim - 2))


def reduce_dims(ndim: int) -> list[int]:
    """All dims but the channel dim 1: batch norm's statistics are per channel over (N, *spatial)."""
    return [0, *range(2, ndim)]


# ----------------------------------------------------------------------------------------------- batch norm


def batch_norm_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm forward (Ioffe & Szegedy 2015).

    Training:   mu_c = mean_{n,s} x[n,c,s],  var_c = mean_{n,s} (x[n,c,s] - mu_c)^2   (biased)
    Inference:  mu_c = running_mean_c,       var_c = running_var_c
    Both:       y = (x - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c

    Returns ``(y, mean, var)``; ``mean`` and ``var`` are the batch statistics in training and empty tensors in
    inference (the caller already holds the running statistics).
    """
    compute = opmath_dtype(x.dtype)
    channels = x.shape[1]
    xc = x.to(compute)
    if x.numel() == 0:
        stats = torch.zeros(channels, dtype=compute, device=x.device)
        return torch.empty_like(x), stats, stats.clone()
    if not training:
        assert running_mean is not None and running_var is not None
        mean, var = running_mean.to(compute), running_var.to(compute)
        scale = _scale(var, weight, eps, compute)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(compute)
        y = torch.addcmul(channel_view(shift, x.ndim), xc, channel_view(scale, x.ndim)).to(x.dtype)
        empty = x.new_empty(0, dtype=compute)
        return y, empty, empty.clone()
    # Shifted data (Chan, Golub & LeVeque 1983): d = x - pivot_c, the channel's first value (0 where that is not
    # finite: an inf pivot would make every deviation NaN, where torch gives an inf mean), then mean = pivot +
    # mean(d), var = mean(d^2) - mean(d)^2 and y = d * scale + (beta - mean(d) * scale). A constant channel has
    # d = 0 exactly, so its variance is 0 and its output exactly beta; the rounding error relative to the variance
    # grows with (pivot - mean)^2 / var, at most n (the values per channel), not with mean^2 / var as the plain
    # one-pass formula's, and the passes over x are as many as a two-pass formula's (subtract, two reductions,
    # one fused multiply-add), two of them fused reductions that run several times faster on CPU than
    # torch.var_mean's Welford reduction over the non-contiguous batch dim.
    dims = reduce_dims(x.ndim)
    pivot = xc.detach()[(0, slice(None)) + (0,) * (x.ndim - 2)]
    pivot = torch.nan_to_num(pivot, nan=0.0, posinf=0.0, neginf=0.0)
    deviation = xc - channel_view(pivot, x.ndim)
    shift_mean = deviation.mean(dims)
    var = ((deviation * deviation).mean(dims) - shift_mean * shift_mean).clamp_min(0.0)
    mean = pivot + shift_mean
    scale = _scale(var, weight, eps, compute)
    offset = -shift_mean * scale
    if bias is not None:
        offset = offset + bias.to(compute)
    y = torch.addcmul(channel_view(offset, x.ndim), deviation, channel_view(scale, x.ndim)).to(x.dtype)
    return y, mean, var


def _scale(var: Tensor, weight: Tensor | None, eps: float, compute: torch.dtype) -> Tensor:
    """gamma_c / sqrt(var_c + eps) (1 / sqrt(var_c + eps) without affine weights), in the compute dtype."""
    scale = torch.rsqrt(var + eps)
    return scale if weight is None else scale * weight.to(compute)


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
    """Closed-form batch norm backward; returns ``(grad_input, grad_weight, grad_bias)``.

    With x_hat = (x - mu) * r, r = 1 / sqrt(var + eps), g = dL/dy, n = N * prod(spatial), per channel:

        dL/dbeta  = sum g                    dL/dgamma = sum g * x_hat
        training:  dL/dx = gamma * r * (g - sum(g) / n - x_hat * sum(g * x_hat) / n)
                           + dL/dmu / n + dL/dvar * 2 (x - mu) / n
        inference: dL/dx = gamma * r * g

    The dL/dmu and dL/dvar terms are zero in a first backward; they carry the gradients that reach the batch
    statistics (which the op also returns) in a double backward. Written with differentiable torch ops only,
    so the backward itself can be differentiated.
    """
    compute = opmath_dtype(x.dtype)
    ndim = x.ndim
    param_dtype = weight.dtype if weight is not None else x.dtype
    if x.numel() == 0:  # no values: every gradient is zero (and n = 0 would divide by zero below)
        zeros = torch.zeros(x.shape[1], dtype=param_dtype, device=x.device)
        return torch.zeros_like(x), zeros, zeros.clone()
    dims = reduce_dims(ndim)
    g = grad_out.to(compute)
    centered = x.to(compute) - channel_view(mean.to(compute), ndim)
    inv_std = torch.rsqrt(var.to(compute) + eps)
    grad_bias = g.sum(dims)
    grad_weight = (g * centered).sum(dims) * inv_std
    gain = inv_std if weight is None else inv_std * weight.to(compute)
    if not training:
        grad_input = g * channel_view(gain, ndim)
    else:
        n = x.numel() // x.shape[1]
        # dL/dx = g * gain + (x - mu) * slope + offset, with per-channel slope and offset.
        slope = -gain * grad_weight * inv_std / n
        offset = -gain * grad_bias / n
        if grad_var is not None:
            slope = slope + 2.0 * grad_var.to(compute) / n
        if grad_mean is not None:
            offset = offset + grad_mean.to(compute) / n
        grad_input = torch.addcmul(
            torch.addcmul(channel_view(offset, ndim), g, channel_view(gain, ndim)),
            centered,
            channel_view(slope, ndim),
        )
    return grad_input.to(x.dtype), grad_weight.to(param_dtype), grad_bias.to(param_dtype)


# -------------------------------------------------------------------------------------------------- dropout


def _mix32_(x: Tensor) -> Tensor:
    """``normdrop.nn.rng.mix32`` in place on an int64 tensor of values < 2**32 (in place: it runs ~30 times per
    mask, and allocation is a good part of an int64 op's cost on small tensors)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(MIX_MULTIPLIER_1).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(MIX_MULTIPLIER_2).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 15)


def counter_bits(seed: int, offset: int, count: int, device: torch.device) -> Tensor:
    """32 random bits (as int64 values in [0, 2**32)) for counters offset .. offset + count - 1."""
    k0, k1, k2 = round_keys(seed)
    counter = torch.arange(offset, offset + count, dtype=torch.int64, device=device)
    high = counter >> 32
    h = _mix32_(counter.bitwise_and_(MASK32).bitwise_xor_(k0))
    h = _mix32_(h.bitwise_xor_(high).bitwise_xor_(k1))
    return _mix32_(h.bitwise_xor_(k2))


def _signed64(value: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits (constants above 2**63 wrap to negatives)."""
    return value - 2**64 if value >= 2**63 else value


def _shift_right_logical(x: Tensor, bits: int) -> Tensor:
    """x >>> bits on int64 (torch's ``>>`` is arithmetic: the sign bits it shifts in are masked off)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_SPLITMIX_1 = _signed64(0xBF58476D1CE4E5B9)
_SPLITMIX_2 = _signed64(0x94D049BB133111EB)


def _splitmix64_output(state: Tensor) -> Tensor:
    """``rng.splitmix64``'s output for an already advanced int64 state (products wrap mod 2**64, as the spec's)."""
    z = (state ^ _shift_right_logical(state, 30)) * _SPLITMIX_1
    z = (z ^ _shift_right_logical(z, 27)) * _SPLITMIX_2
    return z ^ _shift_right_logical(z, 31)


def round_keys_tensor(seed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``rng.round_keys`` on an int64 tensor of seeds: (k0, k1, k2), each in [0, 2**32), without leaving the
    device or reading the seed on the host (so it works on a seed that is a graph value or batched by vmap)."""
    state = seed + _GOLDEN
    a = _splitmix64_output(state)
    b = _splitmix64_output(state + _GOLDEN)
    return a & MASK32, _shift_right_logical(a, 32), b & MASK32


def _mix32(x: Tensor) -> Tensor:
    """``rng.mix32`` out of place (``_mix32_``'s twin for operands that must not be written, e.g. vmap's)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIER_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MULTIPLIER_2) & MASK32
    return x ^ (x >> 15)


def counter_bits_from_state(rng_state: Tensor, count: int) -> Tensor:
    """``counter_bits`` for the ``(seed, offset)`` pair given as an int64 tensor of shape (2,): the same bits, from
    tensor ops only, out of place (no host read of the pair)."""
    k0, k1, k2 = round_keys_tensor(rng_state[0:1])
    counter = torch.arange(count, dtype=torch.int64, device=rng_state.device) + rng_state[1:2]
    h = _mix32((counter & MASK32) ^ k0)
    h = _mix32(h ^ (counter >> 32) ^ k1)
    return _mix32(h ^ k2)


UNIFORM_SCALE = 2.0**-32
"""Uniforms are (bits + 1/2) * 2**-32: strictly inside (0, 1), so their logarithms are finite."""


def uniform(seed: int, offset: int, count: int, device: torch.device) -> Tensor:
    """Float64 uniforms in (0, 1) for counters offset .. offset + count - 1: u_i = (bits_i + 1/2) / 2**32 (exact
    in float64: a 32-bit integer plus a half, times a power of two)."""
    return (counter_bits(seed, offset, count, device).to(torch.float64) + 0.5) * UNIFORM_SCALE


def multiplicative_noise(x: Tensor, seed: int, offset: int, gaussian: bool, scale: float) -> Tensor:
    """y = x * eps, element i of x (row-major) taking eps_i from counters offset + i (and offset + numel + i):

    gaussian: eps = 1 + scale * sqrt(-2 ln u1) cos(2 pi u2)   (Box-Muller on two uniform fields)
    uniform:  eps = 1 + scale * (2 u1 - 1)

    with the float64 uniforms of ``uniform``; eps is rounded to x's dtype before the product."""
    count = x.numel()
    u1 = uniform(seed, offset, count, x.device)
    if gaussian:
        u2 = uniform(seed, offset + count, count, x.device)
        unit = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    else:
        unit = 2.0 * u1 - 1.0
    return x * (1.0 + scale * unit).to(x.dtype).view(x.shape)


def keep_mask(shape: tuple[int, ...], seed: int, offset: int, p: float, device: torch.device) -> Tensor:
    """Boolean mask of the given logical shape: True where the unit is kept (probability 1 - p)."""
    count = 1
    for size in shape:
        count *= size
    return (counter_bits(seed, offset, count, device) >= drop_threshold(p)).view(shape)


def mask_shape(x: Tensor, mask_dims: int) -> tuple[int, ...]:
    """The shape of the mask: x's first ``mask_dims`` dims, broadcast (size 1) over the rest."""
    return tuple(x.shape[:mask_dims]) + (1,) * (x.ndim - mask_dims)


def dropout_forward(x: Tensor, seed: int, offset: int, p: float, mask_dims: int, alpha: bool, shift: bool) -> Tensor:
    """Apply a dropout mask regenerated from ``(seed, offset)``; 0 < p < 1.

    Standard (Srivastava et al. 2014):  y = x * m / (1 - p),                    m ~ Bernoulli(1 - p)
    Alpha (Klambauer et al. 2017):      y = a * (x * m + s' * (1 - m)) + b,    s' = -lambda * alpha of SELU,
        a = ((1 - p) (1 + p s'^2))^(-1/2),  b = -a s' p, which keeps zero mean / unit variance inputs so.
    ``shift=False`` drops the additive part of alpha dropout: y = a * x * m. That is the map backward applies
    (alpha dropout is affine in x), and for standard dropout backward is the forward map itself.
    The mask covers x's first ``mask_dims`` dims (all of them for element-wise dropout, (N, C) for channel
    dropout) and is broadcast over the rest.
    """
    keep = keep_mask(mask_shape(x, mask_dims), seed, offset, p, x.device).to(x.dtype)
    return apply_keep(x, keep, p, alpha, shift)


def dropout_forward_from_state(
    x: Tensor, rng_state: Tensor, p: float, mask_dims: int, alpha: bool, shift: bool
) -> Tensor:
    """``dropout_forward`` with ``(seed, offset)`` as an int64 tensor, in tensor ops only: the path under
    ``torch.func`` transforms, where the pair may be batched (``vmap(randomness="different")``) and cannot be read
    on the host. Same mask as ``dropout_forward`` for the same pair."""
    shape = mask_shape(x, mask_dims)
    count = 1
    for size in shape:
        count *= size
    keep = (counter_bits_from_state(rng_state, count) >= drop_threshold(p)).view(shape).to(x.dtype)
    return apply_keep(x, keep, p, alpha, shift)


def apply_keep(x: Tensor, keep: Tensor, p: float, alpha: bool, shift: bool) -> Tensor:
    """Scale (and, for alpha dropout with ``shift``, shift) ``x`` by a 0/1 ``keep`` mask of x's dtype that
    broadcasts against it; the formulas are ``dropout_forward``'s."""
    if not alpha:
        return x * (keep * (1.0 / (1.0 - p)))
    a = 1.0 / ((SELU_SATURATION**2 * p + 1.0) * (1.0 - p)) ** 0.5
    y = x * (keep * a)
    if shift:
        y = y + ((keep - 1.0) * (SELU_SATURATION * a) + SELU_SATURATION * a * p)
    return y
