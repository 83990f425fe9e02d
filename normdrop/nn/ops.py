"""normdrop's ops registered with ``torch.library``: custom op + autograd formula + fake (meta) implementation.

Registering them makes the ops opaque, single nodes to ``torch.compile`` (no graph break, fake tensors propagate
shapes), while the math lives in the chosen kernel backend (``normdrop.nn.kernels``). A custom op costs about
100 us of Python dispatch per call, more than the whole layer on the lab's small models, so eager mode goes through
equivalent ``torch.autograd.Function``s instead; ``batch_norm`` and ``dropout`` below pick the path.

- ``normdrop::batch_norm(x, weight, bias, running_mean, running_var, training, eps) -> (y, mean, var)``
  is functional: it never writes the running statistics (the caller updates them from ``mean``/``var``).
- ``normdrop::dropout(x, rng_state, p, mask_dims, alpha, shift) -> y`` takes the mask's ``(seed, offset)`` pair
  as an int64 tensor, so the op is a pure function of its inputs and backward regenerates the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normdrop.nn.kernels import backend_for, composite


@torch.library.custom_op("normdrop::batch_norm", mutates_args=())
def batch_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm forward; see ``kernels.composite.batch_norm_forward`` for the math."""
    return backend_for(x).batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)


@batch_norm_op.register_fake
def _batch_norm_fake(x, weight, bias, running_mean, running_var, training, eps):
    stats_shape = (x.shape[1],) if training else (0,)
    compute = composite.opmath_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(stats_shape, dtype=compute), x.new_empty(stats_shape, dtype=compute)


def _batch_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, training, eps = inputs
    _y, mean, var = output
    if training:
        ctx.save_for_backward(x, weight, mean, var)
    else:
        ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.training = training
    ctx.eps = eps
    ctx.has_bias = bias is not None


@torch.library.custom_op("normdrop::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    training: bool,
    eps: float,
    grad_mean: Tensor | None,
    grad_var: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """First-order batch norm backward as an opaque op, so a compiled graph can call the fast kernels."""
    return backend_for(x).batch_norm_backward(grad_y, x, weight, mean, var, training, eps, grad_mean, grad_var)


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(grad_y, x, weight, mean, var, training, eps, grad_mean, grad_var):
    param_dtype = weight.dtype if weight is not None else x.dtype
    channels = x.shape[1]
    return torch.empty_like(x), x.new_empty(channels, dtype=param_dtype), x.new_empty(channels, dtype=param_dtype)


def _batch_norm_backward(ctx, grad_y, grad_mean, grad_var):
    x, weight, mean, var = ctx.saved_tensors
    args = (grad_y, x, weight, mean, var, ctx.training, ctx.eps, grad_mean, grad_var)
    if torch.is_grad_enabled():
        # A double backward is being recorded: the composite formula is differentiable.
        grads = composite.batch_norm_backward(*args)
    elif torch.compiler.is_compiling():
        grads = batch_norm_backward_op(*args)
    else:
        grads = backend_for(x).batch_norm_backward(*args)
    grad_x, grad_weight, grad_bias = grads
    return (
        grad_x,
        grad_weight if weight is not None else None,
        grad_bias if ctx.has_bias else None,
        None,
        None,
        None,
        None,
    )


batch_norm_op.register_autograd(_batch_norm_backward, setup_context=_batch_norm_setup_context)


def graph_capture() -> bool:
    """Whether a graph is being captured: torch.compile, or torch.jit.trace (which would not see a kernel called
    through a pointer or from numba). Then the registered custom ops are called, which both record."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is running. Then the ops run as the composite
    formulas written in elementary torch ops, which functorch differentiates and batches as it does any torch code
    (the autograd.Functions and custom ops call kernels functorch cannot see into). The running statistics are
    then updated in place as torch's batch norm updates them under functorch: in ``grad``, as in eager mode; in
    ``vmap`` only if they are batched too (``torch.func.stack_module_state``), else the in-place update of an
    unbatched buffer with batched statistics raises, as torch's does (``torch.func.replace_all_batch_norm_modules_``
    is torch's way out)."""
    return torch._C._are_functorch_transforms_active()


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int, momentum: float | Tensor
) -> None:
    """running <- momentum * batch + (1 - momentum) * running in place, with the batch mean and the *unbiased* batch
    variance var * count / (count - 1); the running statistics never join the graph. torch's form, computed in the
    batch statistics' dtype (float32 for half inputs) and rounded once into the running statistics' dtype, as
    torch does: a lerp (running + momentum * (batch - running)) turns inf running statistics into NaN, and a
    float16 one overflows where torch's does not."""
    mean, var = mean.detach(), var.detach() * (count / (count - 1))
    running_mean.copy_(mean * momentum + running_mean.to(mean.dtype) * (1 - momentum))
    running_var.copy_(var * momentum + running_var.to(var.dtype) * (1 - momentum))


class _BatchNormFunction(torch.autograd.Function):
    """The eager twin of ``normdrop::batch_norm``: same kernels, same saved tensors, same backward; and, given a
    ``momentum``, it updates the running statistics inside its forward, as torch's native op does (so a
    checkpoint's recomputation that stops once the saved tensors exist still updates them, as torch's would)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, momentum):
        output = backend_for(x).batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
        if momentum is not None:
            update_running_stats(running_mean, running_var, output[1], output[2], x.numel() // x.shape[1], momentum)
        ctx.set_materialize_grads(False)
        _batch_norm_setup_context(ctx, (x, weight, bias, running_mean, running_var, training, eps), output)
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):
        if grad_y is None:
            grad_y = torch.zeros_like(ctx.saved_tensors[0])
        return *_batch_norm_backward(ctx, grad_y, grad_mean, grad_var), None


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
    compiling: bool | None = None,
    momentum: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch norm forward through the custom op when compiling or tracing, through the autograd.Function in eager
    mode (``compiling``: the caller's ``graph_capture()``, if it has it).
    With ``momentum`` (training, running statistics given, a non-empty input) the running statistics are updated
    in place (``update_running_stats``)."""
    if functorch_active():
        y, mean, var = composite.batch_norm_forward(x, weight, bias, running_mean, running_var, training, eps)
        if momentum is not None:
            is_batched = torch._C._functorch.is_batchedtensor
            if is_batched(mean) and not (is_batched(running_mean) and is_batched(running_var)):
                raise RuntimeError(
                    "batch_norm under vmap got a batched input but running_mean / running_var, which training "
                    "updates in place, are not batched: batch them too (torch.func.stack_module_state), or use "
                    "eval(), track_running_stats=False or torch.func.replace_all_batch_norm_modules_, as for "
                    "torch's batch norm"
                )
            # running += momentum * (batch - running), as update_running_stats but with ops vmap has batching
            # rules for (lerp_ has none: it would warn and loop over the batch)
            count = x.numel() // x.shape[1]
            for running, batch in ((running_mean, mean), (running_var, var * (count / (count - 1)))):
                running.add_((batch.detach().to(running.dtype) - running) * momentum)
        return y, mean, var
    if graph_capture() if compiling is None else compiling:
        y, mean, var = batch_norm_op(x, weight, bias, running_mean, running_var, training, eps)
        if momentum is not None:
            update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
        return y, mean, var
    return _BatchNormFunction.apply(x, weight, bias, running_mean, running_var, training, eps, momentum)


@torch.library.custom_op("normdrop::dropout", mutates_args=())
def dropout_op(x: Tensor, rng_state: Tensor, p: float, mask_dims: int, alpha: bool, shift: bool) -> Tensor:
    """Dropout with the mask regenerated from ``rng_state = (seed, offset)``; see ``composite.dropout_forward``."""
    seed, offset = (int(v) for v in rng_state.tolist())
    return backend_for(x).dropout_forward(x, seed, offset, p, mask_dims, alpha, shift)


@dropout_op.register_fake
def _dropout_fake(x, rng_state, p, mask_dims, alpha, shift):
    return torch.empty_like(x)


def _dropout_setup_context(ctx, inputs, output) -> None:
    _x, rng_state, p, mask_dims, alpha, _shift = inputs
    ctx.save_for_backward(rng_state)
    ctx.params = (p, mask_dims, alpha)


def _dropout_backward(ctx, grad_y):
    (rng_state,) = ctx.saved_tensors
    p, mask_dims, alpha = ctx.params
    # dy/dx is the same mask times the same scale: backward is the op itself without the additive shift.
    return dropout_op(grad_y, rng_state, p, mask_dims, alpha, False), None, None, None, None, None


dropout_op.register_autograd(_dropout_backward, setup_context=_dropout_setup_context)


class _DropoutFunction(torch.autograd.Function):
    """The eager twin of ``normdrop::dropout``; its backward is itself (without shift), so it is twice
    differentiable."""

    @staticmethod
    def forward(ctx, x, rng_state, p, mask_dims, alpha, shift):
        seed, offset = (int(v) for v in rng_state.tolist())
        ctx.save_for_backward(rng_state)
        ctx.params = (p, mask_dims, alpha)
        return backend_for(x).dropout_forward(x, seed, offset, p, mask_dims, alpha, shift)

    @staticmethod
    def backward(ctx, grad_y):
        (rng_state,) = ctx.saved_tensors
        p, mask_dims, alpha = ctx.params
        if torch.is_grad_enabled():  # recording a double backward: go through the differentiable Function
            grad_x = _DropoutFunction.apply(grad_y, rng_state, p, mask_dims, alpha, False)
        else:
            seed, offset = (int(v) for v in rng_state.tolist())
            grad_x = backend_for(grad_y).dropout_forward(grad_y, seed, offset, p, mask_dims, alpha, False)
        return grad_x, None, None, None, None, None


def dropout(
    x: Tensor, rng_state: Tensor, p: float, mask_dims: int, alpha: bool, shift: bool, compiling: bool | None = None
) -> Tensor:
    """Dropout through the custom op when compiling or tracing, through the autograd.Function in eager mode, as
    tensor ops under ``torch.func`` transforms (``functorch_active``)."""
    if functorch_active():
        return composite.dropout_forward_from_state(x, rng_state, p, mask_dims, alpha, shift)
    if graph_capture() if compiling is None else compiling:
        return dropout_op(x, rng_state, p, mask_dims, alpha, shift)
    return _DropoutFunction.apply(x, rng_state, p, mask_dims, alpha, shift)
