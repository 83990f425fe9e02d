"""Arithmetic over lists of tensors (a network's parameters or gradients taken as one vector)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    r"""The norm of the tensors taken together, :math:`\sqrt{\sum_i \lVert x_i \rVert^2}`, as a 0-dim float64
    tensor (summed in float64 whatever the tensors' dtype; 0 for an empty list)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return torch.sqrt(sum(t.detach().double().pow(2).sum() for t in tensors))
