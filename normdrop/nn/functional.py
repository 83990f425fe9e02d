"""normdrop.nn.functional: batch norm and dropout, with torch.nn.functional's signatures and semantics.

The math is normdrop's own (``normdrop.nn.kernels``), registered as custom ops (``normdrop.nn.ops``);
this module checks arguments the way torch does, and updates running statistics.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from normdrop.nn import ops
from normdrop.nn.checks import InputDimError, check_batch_norm, empty_batch_norm
from normdrop.nn.checks import check_floating as _check_floating
from normdrop.nn.checks import check_p as _check_p
from normdrop.nn.kernels import fastpath
from normdrop.nn.rng import draw_rng_state_tensor, draw_seed, rng_state

_DRAW_SEED = draw_seed

__all__ = [
    "InputDimError",
    "alpha_dropout",
    "batch_norm",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "feature_alpha_dropout",
]


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization over dim 1 of an (N, C, \*) input (Ioffe & Szegedy 2015).

    Training: normalize with the batch's mean and biased variance per channel, and, when running statistics are
    given, update them in place with the batch mean and the *unbiased* batch variance:
    ``running = (1 - momentum) * running + momentum * batch``.
    Inference (``training=False``): normalize with ``running_mean`` / ``running_var``.
    ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    ``momentum`` may be a 0-dim tensor (``BatchNorm(momentum=None)`` passes ``1 / num_batches_tracked``).
    """
    check_batch_norm(input, running_mean, running_var, weight, bias, training, eps)  # torch's checks, in its order
    if input.numel() == 0:
        return empty_batch_norm(input, weight, bias)

    compiling = ops.graph_capture()
    if compiling and torch.onnx.is_in_onnx_export():
        # ONNX has its own BatchNormalization: emit torch's op with the same arguments (the same function of them),
        # which both ONNX exporters translate to it. The file then runs on the ONNX runtime's kernels.
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if not compiling:  # small CPU inputs: one C++ autograd node that also updates the running statistics
        y = fastpath.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
        if y is not None:
            return y
    update = training and running_mean is not None and input.numel() > 0
    y, _mean, _var = ops.batch_norm(
        input, weight, bias, running_mean, running_var, training, eps, compiling, momentum if update else None
    )
    return y


def _apply_dropout(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    mask_dims: int,
    alpha: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Shared path of every dropout flavour: identity, zeros, or the custom op, in place or not."""
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        # times a zero of the input's own dtype, as torch: NaN and inf become NaN, a bool input stays bool
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    if mask_dims > input.ndim:  # channel dropout on a 0D/1D input; checked only when dropping, as torch does
        raise InputDimError(f"channel dropout needs at least 2 dimensions (N, C), got a {input.ndim}D input")
    _check_floating(input, "dropout")
    compiling = ops.graph_capture()
    if compiling and torch.onnx.is_in_onnx_export():
        return _onnx_dropout(input, p, inplace, mask_dims, alpha)
    if compiling or ops.functorch_active():
        # The seed stays a tensor: the graph (or the vmapped function) draws it on each call, with no .item().
        y = ops.dropout(input, draw_rng_state_tensor(generator), float(p), mask_dims, alpha, True, compiling)
        return input.copy_(y) if inplace else y
    # Small CPU inputs: one C++ autograd node, which also draws the seed (as draw_seed would). A draw_seed replaced
    # on this module (a caller pinning the seed) is honoured: its seed goes to the node instead.
    y = None
    if draw_seed is _DRAW_SEED:
        y = fastpath.dropout_drawing_seed(input, generator, float(p), mask_dims, alpha)
        if y is None:
            seed = draw_seed(generator)
    else:
        seed = draw_seed(generator)
        y = fastpath.dropout(input, seed, float(p), min(mask_dims, input.ndim), alpha)
    if y is None:
        y = ops.dropout(input, rng_state(seed), float(p), mask_dims, alpha, True, compiling)
    return input.copy_(y) if inplace else y


def _onnx_dropout(input: Tensor, p: float, inplace: bool, mask_dims: int, alpha: bool) -> Tensor:
    """Training-mode dropout while exporting to ONNX: torch's op of the same kind (element-wise or per channel,
    standard or alpha), which the exporters translate to ONNX's Dropout (or its equivalent); the exported masks
    are then the ONNX runtime's."""
    if mask_dims >= input.ndim:
        y = torch.alpha_dropout(input, p, True) if alpha else torch.dropout(input, p, True)
    else:
        batched = input if mask_dims == 2 else input.unsqueeze(0)
        y = torch.feature_alpha_dropout(batched, p, True) if alpha else torch.feature_dropout(batched, p, True)
        y = y if mask_dims == 2 else y.squeeze(0)
    return input.copy_(y) if inplace else y


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Element-wise dropout (Srivastava et al. 2014): each element is zeroed with probability ``p`` and the
    survivors are scaled by ``1 / (1 - p)`` in training, so E[y] = x; the identity in inference.

    The mask comes from a counter-based generator seeded from ``generator`` (or torch's default generator), so
    ``torch.manual_seed`` reproduces it, and backward regenerates it instead of storing it.
    """
    _check_p(p)
    return _apply_dropout(input, p, training, inplace, input.ndim, False, generator)


def _feature_dropout(
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    batched: bool,
    alpha: bool,
    generator: torch.Generator | None,
) -> Tensor:
    # The mask covers (N, C) of a batched input and (C,) of an unbatched one, broadcast over the spatial dims.
    return _apply_dropout(input, p, training, inplace, 2 if batched else 1, alpha, generator)


def dropout1d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Channel dropout for (N, C, L) or (C, L) inputs (Tompson et al. 2015): whole channels are zeroed with
    probability ``p``, survivors scaled by ``1 / (1 - p)``."""
    _check_p(p)
    if input.ndim not in (2, 3):
        raise InputDimError(f"dropout1d expects a 2D (C, L) or 3D (N, C, L) input, but received a {input.ndim}D input")
    return _feature_dropout(input, p, training, inplace, input.ndim == 3, False, generator)


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Channel dropout for (N, C, H, W) inputs (Tompson et al. 2015); as torch does, a 3D input is read as
    (N, C, L) with a warning, and other ranks warn and drop over their first two dims."""
    _check_p(p)
    if input.ndim not in (3, 4):
        warnings.warn(
            f"dropout2d: received a {input.ndim}D input; dropout2d is meant for 3D or 4D inputs, "
            "use dropout for others",
            stacklevel=2,
        )
    if input.ndim == 3:
        warnings.warn(
            "dropout2d: received a 3D input and treats it as (N, C, L) (channel-wise 1D dropout), as torch does; "
            "use dropout1d for that",
            stacklevel=2,
        )
    return _feature_dropout(input, p, training, inplace, True, False, generator)


def dropout3d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Channel dropout for (N, C, D, H, W) or (C, D, H, W) inputs; as torch does, any rank but 5 is read as
    unbatched (one mask value per index of dim 0), with a warning for ranks other than 4."""
    _check_p(p)
    if input.ndim not in (4, 5):
        warnings.warn(
            f"dropout3d: received a {input.ndim}D input; dropout3d is meant for 4D or 5D inputs, "
            "use dropout for others",
            stacklevel=2,
        )
    return _feature_dropout(input, p, training, inplace, input.ndim == 5, False, generator)


def alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Alpha dropout for SELU networks (Klambauer et al. 2017): dropped units are set to SELU's saturation value
    and an affine map ``a * y + b`` restores zero mean and unit variance; identity in inference."""
    _check_p(p)
    return _apply_dropout(input, p, training, inplace, input.ndim, True, generator)


def feature_alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Alpha dropout of whole channels of an (N, C, \*) input (Klambauer et al. 2017)."""
    _check_p(p)
    return _feature_dropout(input, p, training, inplace, True, True, generator)
