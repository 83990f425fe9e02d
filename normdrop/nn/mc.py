"""Monte-Carlo dropout prediction (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation: Representing Model
Uncertainty in Deep Learning").

The model runs k times with its dropout layers sampling and everything else in eval mode -- batch norm above all,
which normalizes with its running statistics, so a sample does not depend on which other inputs share its batch.
From the k class-probability vectors p_1..p_k of an input:

    predictive mean       p_bar = (1/k) sum_j p_j
    predictive entropy    H[p_bar] = -sum_c p_bar_c log p_bar_c                     (total uncertainty, nats)
    expected entropy      E[H] = (1/k) sum_j H[p_j]                                 (aleatoric part)
    mutual information    I = H[p_bar] - E[H] >= 0                                  (epistemic part; BALD,
                                                                                     Houlsby et al. 2011)

Samples are batched: each forward pass runs ``samples_per_pass`` copies of the batch stacked along dim 0, which
draws independent masks for every copy of layers that mask per sample (normdrop's and torch's dropout, channel
dropout, Gaussian dropout, Uout, DropPath, DropBlock). A DropConnect with one mask per batch would give every copy
the same weights, so models holding one are sampled one pass per sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from normdrop.nn.dropout_variants import DropConnect
from normdrop.nn.modes import dropouts, layer_modes

__all__ = ["MCPrediction", "mc_dropout_mode", "mc_predict", "mc_samples", "summarize_samples"]

ROWS_PER_PASS = 8192
"""Default cap on the rows (samples_per_pass x batch size) of one batched forward pass."""


@dataclass(frozen=True)
class MCPrediction:
    """MC-dropout summary for N inputs and C classes; entropies in nats."""

    mean: Tensor
    """(N, C) predictive mean of the class probabilities."""
    predictive_entropy: Tensor
    """(N,) entropy of the predictive mean."""
    expected_entropy: Tensor
    """(N,) mean entropy of the individual samples."""
    mutual_information: Tensor
    """(N,) predictive minus expected entropy (clamped at 0 against rounding)."""
    samples: Tensor | None = None
    """(k, N, C) the probability samples, when asked for."""


@contextmanager
def mc_dropout_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model`` is in eval mode except its dropout layers (``DROPOUT_LAYER_TYPES``), which
    sample (:func:`normdrop.nn.modes.layer_modes`); every module's mode is restored on exit. ValueError if the
    model has no dropout layer."""
    if not dropouts(model):
        raise ValueError("MC dropout needs a model with dropout layers; this one has none, so all samples would agree")
    with layer_modes(model, batch_norm=False, dropout=True):
        yield model


def _check_positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def mc_samples(model: torch.nn.Module, input: Tensor, k: int = 32, samples_per_pass: int | None = None) -> Tensor:
    """k outputs of ``model`` on ``input`` (N, ...) with dropout sampling and batch norm in eval mode, stacked into
    (k, N, ...), computed without gradient.

    ``samples_per_pass`` copies of the batch go through the model at once (default: as many as keep a pass within
    ``ROWS_PER_PASS`` rows); it is 1 for models with a DropConnect that shares its mask over the batch.
    """
    _check_positive(k, "k")
    _check_positive(samples_per_pass, "samples_per_pass")
    batch = input.shape[0]
    if samples_per_pass is None:
        samples_per_pass = max(1, min(k, ROWS_PER_PASS // max(batch, 1)))
    if any(isinstance(m, DropConnect) and not m.per_sample for m in model.modules()):
        samples_per_pass = 1
    outputs = []
    with mc_dropout_mode(model), torch.no_grad():
        done = 0
        while done < k:
            copies = min(samples_per_pass, k - done)
            stacked = input.repeat(copies, *([1] * (input.ndim - 1))) if copies > 1 else input
            output = model(stacked)
            outputs.append(output.reshape(copies, batch, *output.shape[1:]))
            done += copies
    return torch.cat(outputs)


def _entropy(probs: Tensor) -> Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def summarize_samples(probs: Tensor, keep_samples: bool = False) -> MCPrediction:
    """Predictive mean, entropies and mutual information from (k, N, C) class-probability samples."""
    if probs.ndim != 3:
        raise ValueError(f"summarize_samples expects (k, N, C) probabilities, got shape {tuple(probs.shape)}")
    mean = probs.mean(0)
    predictive_entropy = _entropy(mean)
    expected_entropy = _entropy(probs).mean(0)
    return MCPrediction(
        mean=mean,
        predictive_entropy=predictive_entropy,
        expected_entropy=expected_entropy,
        mutual_information=(predictive_entropy - expected_entropy).clamp(min=0.0),
        samples=probs if keep_samples else None,
    )


def mc_predict(
    model: torch.nn.Module,
    input: Tensor,
    k: int = 32,
    samples_per_pass: int | None = None,
    keep_samples: bool = False,
) -> MCPrediction:
    """MC-dropout prediction of a classifier whose output is (N, C) logits: k samples (see ``mc_samples``),
    softmax per sample, then ``summarize_samples``."""
    logits = mc_samples(model, input, k, samples_per_pass)
    if logits.ndim != 3:
        raise ValueError(f"mc_predict expects (N, C) logits from the model, got shape {tuple(logits.shape[1:])}")
    return summarize_samples(torch.softmax(logits.to(torch.float64), dim=-1).to(logits.dtype), keep_samples)
