"""Batch norm at inference time: re-estimating population statistics, and folding BN into the layer before it.

- ``recalibrate_bn``: precise population statistics after training (PreciseBN; Wu & Johnson 2021, "Rethinking
  'Batch' in BatchNorm"), e.g. after weight averaging or when the EMA lags behind the weights.
- ``fold_batch_norm`` / ``fold_batch_norm_into``: an eval-mode BN after a Linear or Conv is an affine map per
  channel, so it folds into that layer's weight and bias (Jacob et al. 2018, "Quantization and Training of Neural
  Networks for Efficient Integer-Arithmetic-Only Inference", section 3.2).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from normdrop.nn.batchnorm_variants import _FrozenBatchNorm
from normdrop.nn.kernels.composite import reduce_dims
from normdrop.nn.modes import layer_modes

__all__ = ["FOLDABLE_LAYERS", "fold_batch_norm", "fold_batch_norm_into", "recalibrate_bn"]

FOLDABLE_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
"""Layers a following batch norm folds into: their output channel is dim 0 of the weight (and dim 1 of the output)."""


# ------------------------------------------------------------------------------------------------ recalibration


class _ChannelMoments:
    """Running count, mean and sum of squared deviations per channel, merged batch by batch exactly (Chan et al.
    1979), in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        values = x.detach().to(torch.float64)
        dims = reduce_dims(x.ndim)
        batch_mean = values.mean(dims)
        view = (1, -1) + (1,) * (x.ndim - 2)
        batch_m2 = ((values - batch_mean.view(view)) ** 2).sum(dims)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total


def _batch_inputs(batch: Any) -> Tensor:
    """The model input of a batch: the batch itself, or the first item of an (inputs, targets, ...) sequence."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"recalibrate_bn expects batches that are tensors or (inputs, ...) sequences, got {type(batch)}")


def recalibrate_bn(model: torch.nn.Module, data: Iterable[Any], n_samples: int | None = None) -> torch.nn.Module:
    """Re-estimate the running statistics of every batch norm in ``model`` (with running statistics) from ``data``.

    ``data`` yields batches (tensors, or sequences whose first item is the input, as a DataLoader does); the first
    ``n_samples`` samples are used (the last batch is cut to fit; ``None``: all of ``data``). During the pass the
    weights are frozen (no gradient, no parameter changes), dropout and every other layer are in eval mode, and the
    batch norms are in train mode, as in PreciseBN: each normalizes with its batch's statistics while the inputs it
    sees are accumulated exactly over all samples. Afterwards, per channel over the N samples (and spatial dims),

        running_mean = mean of the BN input,   running_var = its unbiased variance (denominator n - 1),

    the population statistics themselves, not an average of batch statistics. ``num_batches_tracked`` and every
    module's train/eval mode are restored; on an error the running statistics are restored too. Returns ``model``.

    Batches go to the device of the model's first parameter or buffer. A SyncBatchNorm is recalibrated from this
    process's data only (all processes must still run the same number of batches). A model without batch norm is
    returned unchanged.
    """
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2):
        raise ValueError(f"n_samples must be an int >= 2 (or None for all the data), got {n_samples!r}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), None)
    device = reference.device if reference is not None else None
    saved = {bn: {name: buffer.clone() for name, buffer in bn.named_buffers(recurse=False)} for bn in norms}
    moments = {bn: _ChannelMoments() for bn in norms}
    hooks = [bn.register_forward_pre_hook(lambda module, args: moments[module].add(args[0])) for bn in norms]
    seen = 0
    try:
        with layer_modes(model, batch_norm=True, dropout=False, keep_statistics=True), torch.no_grad():
            for batch in data:
                inputs = _batch_inputs(batch)
                if n_samples is not None:
                    inputs = inputs[: n_samples - seen]
                if device is not None:
                    inputs = inputs.to(device)
                model(inputs)
                seen += inputs.shape[0]
                if n_samples is not None and seen >= n_samples:
                    break
        if n_samples is not None and seen < n_samples:
            raise ValueError(f"recalibrate_bn: data ran out after {seen} samples, n_samples={n_samples} asked for")
        for bn in norms:
            stats = moments[bn]
            if stats.count < 2:
                raise ValueError(f"recalibrate_bn: {type(bn).__name__} saw {stats.count} values per channel, need >= 2")
        with torch.no_grad():
            for bn in norms:
                stats = moments[bn]
                bn.running_mean.copy_(stats.mean)
                bn.running_var.copy_(stats.m2 / (stats.count - 1))
                bn.num_batches_tracked.copy_(saved[bn]["num_batches_tracked"])
    except BaseException:
        for bn in norms:
            bn.load_state_dict(saved[bn], strict=False)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    return model


# ------------------------------------------------------------------------------------------------------ folding


def _foldable_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, _FrozenBatchNorm) or (
        isinstance(module, _BatchNorm) and module.running_mean is not None and module.running_var is not None
    )


def fold_batch_norm_into(layer: torch.nn.Module, bn: torch.nn.Module) -> torch.nn.Module:
    r"""A copy of ``layer`` (Linear, Conv1d/2d/3d) that computes ``bn(layer(x))`` for an eval-mode ``bn``.

    With s = gamma / sqrt(running_var + eps) per output channel (gamma = 1, beta = 0 without affine):

        W' = s * W   (scaling output channel c's filter),   b' = (b - running_mean) * s + beta   (b = 0 if none)

    computed in float64 and stored in the layer's dtype; a layer without bias gets one. ValueError if ``bn`` is in
    training mode or has no running statistics, or the channel counts differ. For a Linear, the BN must normalize
    its output features, i.e. the Linear's output is (N, out_features).
    """
    if not isinstance(layer, FOLDABLE_LAYERS):
        names = ", ".join(cls.__name__ for cls in FOLDABLE_LAYERS)
        raise ValueError(f"can fold batch norm into {names}; got {type(layer).__name__}")
    if not _foldable_norm(bn):
        raise ValueError(f"can fold only a batch norm with running statistics, got {type(bn).__name__}")
    if isinstance(bn, _BatchNorm) and bn.training:
        raise ValueError(f"{type(bn).__name__} is in training mode: folding uses running statistics; call eval()")
    out_channels = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels
    if bn.num_features != out_channels:
        raise ValueError(
            f"{type(bn).__name__}({bn.num_features}) cannot follow {type(layer).__name__} with {out_channels} "
            "output channels"
        )
    with torch.no_grad():
        mean = bn.running_mean.to(torch.float64)
        scale = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(torch.float64)
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(torch.float64)
        weight = layer.weight.to(torch.float64) * scale.view((-1,) + (1,) * (layer.weight.ndim - 1))
        bias = shift if layer.bias is None else layer.bias.to(torch.float64) * scale + shift
        folded = copy.deepcopy(layer)
        folded.weight = torch.nn.Parameter(weight.to(layer.weight.dtype), layer.weight.requires_grad)
        folded.bias = torch.nn.Parameter(bias.to(layer.weight.dtype), layer.weight.requires_grad)
    return folded


def fold_batch_norm(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Fold every eval-mode batch norm that directly follows a Linear/Conv1d/2d/3d in an ``nn.Sequential`` into
    that layer (see ``fold_batch_norm_into``), replacing the BN by ``nn.Identity``; outputs are unchanged up to
    rounding (1e-5 in float32).

    Only pairs adjacent inside one Sequential are found (the module tree says nothing about the data flow
    elsewhere); fold other pairs with ``fold_batch_norm_into``. BNs without running statistics are left alone.
    ValueError if a BN to fold is in training mode. Returns a folded copy, or ``model`` itself if ``inplace``.
    """
    model = model if inplace else copy.deepcopy(model)
    for container in list(model.modules()):
        if not isinstance(container, torch.nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in itertools.pairwise(names):
            layer, bn = container._modules[first], container._modules[second]
            if isinstance(layer, FOLDABLE_LAYERS) and _foldable_norm(bn):
                container._modules[first] = fold_batch_norm_into(layer, bn)
                container._modules[second] = torch.nn.Identity()
    return model
