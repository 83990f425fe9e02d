"""Argument checks of normdrop's batch norm and dropout, in torch.nn's order and with torch.nn's exception types.

The contract (issue 12, tested by ``tests/test_layer_fuzz.py`` against torch.nn): where torch raises, normdrop
raises an exception of the same type (``isinstance`` of torch's; the message may say more); where torch returns,
normdrop returns the same thing. Some of normdrop's errors are also of the type normdrop raised before (a
``ValueError`` or ``TypeError``), so code written against either keeps catching them.

torch 2.13's order for batch norm (``torch.nn.functional.batch_norm``, then ATen's ``_batch_norm_impl_index`` and
``batch_norm_cpu``), which ``check_batch_norm`` follows:

1. the module's rank check (``_check_input_dim``, a ValueError; the functional form here: fewer than 2 dims);
2. training: more than one value per channel, ``N * prod(spatial) != 1`` (ValueError; checked even on an empty
   input, with this very product);
3. ``eps > 0`` in training, ``eps >= 0`` in inference (ValueError);
4. an empty input returns ``input.clone() * weight[0] + bias[0]`` (so an integer input comes back promoted, and
   nothing else is checked);
5. running_mean, running_var, weight, bias hold one value per channel (RuntimeError; counted by ``numel``);
   running statistics present in inference (RuntimeError);
6. a floating-point input (NotImplementedError for integer, bool and complex inputs);
7. mixed dtypes (RuntimeError): the per-channel tensors may differ from the input's dtype only when all of them
   are float32 and the input is float16/bfloat16.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ChannelCountError",
    "InputDimError",
    "InputDtypeError",
    "MissingStatisticsError",
    "MixedDtypeError",
    "ProbabilityError",
    "check_batch_norm",
    "check_floating",
    "check_p",
    "empty_batch_norm",
]

FLOATING_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


class InputDimError(ValueError, RuntimeError):
    """An input with the wrong number of dimensions.

    It is a ValueError (what normdrop promises) and a RuntimeError (what torch's dropout1d raises), so code written
    against either keeps catching it.
    """


class MissingStatisticsError(ValueError, RuntimeError):
    """Batch norm in inference mode without running statistics: a RuntimeError as in torch (``running_mean must be
    defined in evaluation mode``), and a ValueError as normdrop raised before."""


class InputDtypeError(TypeError, NotImplementedError):
    """An input dtype the op does not compute in (integer, bool, complex).

    A TypeError (what normdrop raised before), a NotImplementedError (torch's batch norm: ``"batch_norm" not
    implemented for 'Long'``) and so a RuntimeError (torch's dropout: ``result type Float can't be cast to the
    desired output type Long``)."""


class ChannelCountError(ValueError, RuntimeError):
    """A per-channel tensor with another number of values than the input has channels: a RuntimeError as in torch
    (``running_mean should contain 5 elements not 3``), and a ValueError as normdrop raised before."""


class MixedDtypeError(TypeError, RuntimeError):
    """Per-channel tensors in a dtype the input's does not combine with: a RuntimeError as in torch (``mixed dtype
    (CPU)``)."""


class ProbabilityError(ValueError, RuntimeError):
    """A dropout probability outside [0, 1]: torch raises a ValueError for a number out of range and a RuntimeError
    for NaN (its Python check lets NaN through, its kernel does not); this is both."""


def check_floating(input: Tensor, op_name: str) -> None:
    """Refuse an input that is not float16/bfloat16/float32/float64 with an ``InputDtypeError``."""
    if input.dtype not in FLOATING_DTYPES:
        raise InputDtypeError(
            f"{op_name} expects a floating-point input (float16/32/64 or bfloat16), got {input.dtype}"
        )


def check_p(p: float) -> None:
    """0 <= p <= 1, NaN refused (a ``ProbabilityError``), as torch.nn.functional.dropout and its kernel do."""
    if not 0.0 <= p <= 1.0:
        raise ProbabilityError(f"dropout probability has to be between 0 and 1, but got {p}")


def check_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """Check batch norm's arguments in torch's order (see the module docstring); returns nothing, raises the first
    problem found. An empty input passes once steps 1-3 hold (``empty_batch_norm`` computes its result)."""
    shape = input.shape
    if len(shape) < 2:
        raise InputDimError(f"batch_norm expects an input of shape (N, C, *), got a {input.ndim}D input")
    if training:
        values_per_channel = shape[0]  # N * prod(spatial), by hand: this runs on every layer call
        for size in shape[2:]:
            values_per_channel *= size
        if values_per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must either both be None or neither be None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'}, "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    if input.numel() == 0:
        return
    if not training and running_mean is None:
        raise MissingStatisticsError("batch_norm in inference mode needs running_mean and running_var, got None")
    channels, dtype = shape[1], input.dtype
    mixed = False
    for name, tensor in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if tensor is not None:
            if tensor.numel() != channels:
                raise ChannelCountError(
                    f"batch_norm {name} should contain {channels} elements (one per channel of an input of shape "
                    f"{tuple(shape)}), not {tensor.numel()} (its shape: {tuple(tensor.shape)})"
                )
            mixed = mixed or tensor.dtype != dtype
    if dtype not in FLOATING_DTYPES:
        raise InputDtypeError(f"batch_norm expects a floating-point input (float16/32/64 or bfloat16), got {dtype}")
    if mixed:
        _check_mixed_dtypes(input, running_mean, running_var, weight, bias)


def _check_mixed_dtypes(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None
) -> None:
    """Per-channel tensors in another dtype than the input: allowed only all in float32 for a half input."""
    given = [
        (name, tensor)
        for name, tensor in (
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        )
        if tensor is not None
    ]
    if input.dtype in REDUCED_DTYPES and all(tensor.dtype == torch.float32 for _, tensor in given):
        return
    dtypes = ", ".join(f"{name} {tensor.dtype}" for name, tensor in given)
    raise MixedDtypeError(
        f"batch_norm: mixed dtypes, input {input.dtype} with {dtypes}; the per-channel tensors must be in the input's "
        "dtype, or all float32 for a float16/bfloat16 input (as in torch); convert the layer with .to(dtype)"
    )


def empty_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Batch norm of an input with no elements, as torch computes it: ``input.clone() * weight[0] + bias[0]``, a new
    tensor (not a view, so the graph stays connected: the parameters get zero gradients) in the dtype that type
    promotion gives (an integer input with float parameters comes back in the parameters' dtype)."""
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out
