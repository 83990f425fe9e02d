"""Train/eval modes of a whole model, set per kind of layer for one block of code and restored after.

A measurement (a probe), a Monte-Carlo dropout prediction and a PreciseBN recalibration each want the model in a
mode that ``model.train()`` / ``model.eval()`` cannot express: batch norm on batch statistics but no dropout, or
dropout sampling with batch norm on running statistics. :func:`layer_modes` is the one place that sets such a
mode and puts every module's ``training`` flag (and, unless told to keep them, every batch norm buffer) back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normdrop.nn.dropout_variants import DROPOUT_LAYER_TYPES

__all__ = ["batch_norms", "dropouts", "layer_modes"]


def batch_norms(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The batch norm layers of ``model`` (torch's, normdrop's and their subclasses), by qualified name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


def dropouts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` whose train mode drops at random (``normdrop.nn.dropout_variants.DROPOUT_LAYER_TYPES``:
    torch's and normdrop's dropout and normdrop's variants), by qualified name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, DROPOUT_LAYER_TYPES)]


@contextlib.contextmanager
def layer_modes(
    model: nn.Module, *, batch_norm: bool, dropout: bool, keep_statistics: bool = False
) -> Iterator[nn.Module]:
    """Within the block every module of ``model`` is in eval mode, except that batch norm layers are in train mode
    iff ``batch_norm`` (normalize with the batch's statistics) and dropout layers iff ``dropout`` (drop at random).

    On exit every module's ``training`` flag is restored, and so are the batch norms' buffers (running statistics,
    batch counts) that a train-mode forward pass updated, unless ``keep_statistics`` (PreciseBN writes them on
    purpose). Modes and buffers are restored on an error too.
    """
    modes = {module: module.training for module in model.modules()}
    norms = [module for _, module in batch_norms(model)]
    saved = (
        []
        if keep_statistics
        else [{key: buffer.clone() for key, buffer in bn.named_buffers(recurse=False)} for bn in norms]
    )
    try:
        model.eval()
        for bn in norms:
            bn.train(batch_norm)
        for _, layer in dropouts(model):
            layer.train(dropout)
        yield model
    finally:
        with torch.no_grad():
            for bn, buffers in zip(norms, saved, strict=False):
                for key, value in buffers.items():
                    getattr(bn, key).copy_(value)
        for module, training in modes.items():
            module.training = training
