"""What normdrop's drop-in layers need to work with torch's program-capture tools as torch.nn's layers do.

- ``torch.fx.symbolic_trace`` (and FX quantization's tracer) keep torch.nn's layers as leaf ``call_module`` nodes
  because their class lives in ``torch.nn``; normdrop's do not, so their forward, given an ``fx.Proxy``, records
  the same leaf node itself (``fx_leaf_call``).
- ``torch.jit.script`` compiles a layer's forward: the scriptable forms below call the registered custom ops
  (``normdrop::batch_norm``, ``normdrop::dropout``) with the same statistics, updates and mask draws as eager mode.
- The layers torch.nn has no twin of (ghost BN, batch renorm, frozen BN, Gaussian dropout, Uout, DropPath,
  DropBlock, concrete dropout, DropConnect) are leaf nodes for FX too (``fx_leaf_layer``), and have no TorchScript
  form: ``torch.jit.script`` refuses them with a message naming the tools that capture them (``torch.jit.trace``,
  ``torch.compile``).

Graph capture by ``torch.compile`` / ``torch.export`` / ``torch.jit.trace``, ``torch.func`` transforms and ONNX
export are handled where the ops are chosen (``normdrop.nn.functional`` and ``normdrop.nn.ops``).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from normdrop.nn import ops as _ops  # noqa: F401  (registers torch.ops.normdrop.* before a script refers to them)
from normdrop.nn.rng import SEED_BOUND

if SEED_BOUND != 4611686018427387904:  # scripted_dropout writes the bound out
    raise ImportError("normdrop.nn.interop: scripted_dropout's seed bound is out of date with rng.SEED_BOUND")

__all__ = ["fx_leaf_call", "fx_leaf_layer", "scripted_batch_norm", "scripted_dropout"]


def fx_leaf_call(module: torch.nn.Module, input: torch.fx.Proxy) -> torch.fx.Proxy:
    """Record ``module(input)`` as one ``call_module`` node of the graph ``input`` belongs to: what FX's tracer
    does for a leaf module. ``module`` must be a submodule of the traced root (as it is when the tracer calls it);
    a root traced on its own is traced through, as torch.nn's own layers are."""
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


def fx_leaf_layer(cls: type) -> type:
    """Class decorator for a layer without a torch.nn twin: its forward, given an ``fx.Proxy``, records one leaf
    ``call_module`` node (``fx_leaf_call``) instead of being traced through (its Python control flow on shapes and
    values cannot be); and ``torch.jit.script`` refuses it with a one-line message, as it has no TorchScript form."""
    forward = cls.forward

    @functools.wraps(forward)
    def leaf_forward(self: torch.nn.Module, input: Tensor, *args: object, **kwargs: object) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf_call(self, input)
        return forward(self, input, *args, **kwargs)

    def refuse_script(self: torch.nn.Module) -> torch.nn.Module:
        raise TypeError(
            f"torch.jit.script does not support {type(self).__name__} (it has no TorchScript form); capture it with "
            "torch.jit.trace or torch.compile, or trace it with torch.fx (a leaf module)"
        )

    cls.forward = leaf_forward
    cls.__prepare_scriptable__ = refuse_script
    return cls


def scripted_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """``normdrop.nn.functional.batch_norm`` in TorchScript: y from ``normdrop::batch_norm``; in training, the
    running statistics (when given) updated in place, running <- running + momentum * (batch - running), with the
    unbiased batch variance var * n / (n - 1)."""
    if training:
        count = input.numel() // max(input.size(1), 1)
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got an input of one value each")
    y, mean, var = torch.ops.normdrop.batch_norm(input, weight, bias, running_mean, running_var, training, eps)
    if training and running_mean is not None and running_var is not None and input.numel() > 0:
        count = input.numel() // input.size(1)
        running_mean.lerp_(mean.detach().to(running_mean.dtype), momentum)
        running_var.lerp_((var.detach() * (count / (count - 1))).to(running_var.dtype), momentum)
    return y


def scripted_dropout(input: Tensor, p: float, training: bool, inplace: bool, mask_dims: int, alpha: bool) -> Tensor:
    """``normdrop.nn.functional``'s dropout in TorchScript: identity in inference or for p = 0, zeros for p = 1,
    else ``normdrop::dropout`` with a ``(seed, 0)`` pair drawn by ``torch.randint`` on each call (as eager mode
    draws it, from torch's default generator)."""
    if p < 0.0 or p > 1.0:
        raise ValueError("dropout probability has to be between 0 and 1")
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        return input.mul_(0) if inplace else input * 0
    seed_bound = 4611686018427387904  # rng.SEED_BOUND = 2**62, written out: TorchScript reads no int globals
    seed = torch.randint(0, seed_bound, [1], dtype=torch.int64)
    state = torch.cat([seed, torch.zeros_like(seed)])
    y = torch.ops.normdrop.dropout(input, state, p, mask_dims, alpha, True)
    return input.copy_(y) if inplace else y
