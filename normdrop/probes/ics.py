"""Internal covariate shift, gradient definition (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch
Normalization Help Optimization?", definition 2.1).

For a network with layers W_1 .. W_k, a batch (x, y) and one optimizer update W -> W^+ computed from it, layer i's
shift is the change of its gradient caused by the update of the layers below it only:

    G_i  = grad_{W_i} L(W_1,   ..., W_{i-1},   W_i, ..., W_k; x, y)
    G'_i = grad_{W_i} L(W_1^+, ..., W_{i-1}^+, W_i, ..., W_k; x, y)
    ICS_i = ||G_i - G'_i||_2,   and the cosine <G_i, G'_i> / (||G_i|| ||G'_i||)

The paper finds BN networks have as large or larger ICS by this measure while training faster, against the
"reduces internal covariate shift" explanation. Nothing lies below layer 1, so ICS_1 = 0 and cosine 1.
"""

from __future__ import annotations

import copy
import inspect
from typing import Literal

import torch

from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import (
    BNMode,
    Probe,
    Record,
    bn_mode_label,
    cosine,
    gradients,
    loss_function,
    measurement_mode,
    parameter_groups,
)
from normdrop.tensors import global_norm
from normdrop.train import HookContext


def shadow_optimizer(optimizer: torch.optim.Optimizer, copies: dict[int, torch.nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer of the same class, parameter groups, hyper-parameters and (deep-copied) state that steps the
    copies of its parameters (``copies``: id of an original parameter -> its copy).

    The state is deep-copied because ``load_state_dict`` keeps tensors that already have the right dtype and
    device, which would let a step on the copy write into the original's momentum buffers.
    """
    groups = [{"params": [copies[id(p)] for p in group["params"]]} for group in optimizer.param_groups]
    # Some defaults are not constructor arguments (AdamW's decoupled_weight_decay); the groups' hyper-parameters
    # come back with load_state_dict anyway.
    accepted = inspect.signature(type(optimizer)).parameters
    shadow = type(optimizer)(groups, **{key: value for key, value in optimizer.defaults.items() if key in accepted})
    shadow.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return shadow


class ICSProbe(Probe):
    """ICS_i = ||G_i - G'_i|| and cos(G_i, G'_i) per layer, for one update of the run's own optimizer on the probe
    batch.

    The update is taken on deep copies of the model and optimizer (state included), with the run's learning rate of
    the next step; the live model and optimizer are never touched. BN is in ``bn_mode`` and dropout, when
    ``dropout`` is on, draws the same masks in every pass, so G and G' differ only by the update.

    Records (one per layer and call): ``layer`` (see ``normdrop.probes.base.parameter_groups``; ``group_by``),
    ``index`` (1-based, forward order), ``ics_l2`` = ||G - G'||, ``ics_cosine``, ``grad_norm`` = ||G||,
    ``shifted_grad_norm`` = ||G'||, ``ics_relative`` = ||G - G'|| / ||G||, ``lr``, ``bn_mode``, ``dropout``.
    """

    name = "ics"
    needs = frozenset({"model", "optimizer", "loss_fn", "probe_batch"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        bn_mode: BNMode = "batch",
        dropout: bool = True,
        group_by: Literal["block", "module"] = "block",
    ) -> None:
        super().__init__(every, when)
        self.bn_mode: BNMode = bn_mode
        self.dropout = dropout
        self.group_by: Literal["block", "module"] = group_by

    def measure(self, ctx: HookContext) -> list[Record]:
        model = copy.deepcopy(ctx.model)
        groups = parameter_groups(model, self.group_by)
        named = dict(model.named_parameters())
        copies = {id(p): named[name] for name, p in ctx.model.named_parameters()}
        loss_at = loss_function(model, ctx.loss_fn, ctx.probe_batch)
        with measurement_mode(model, self.bn_mode, self.dropout):
            before = {name: p.detach().clone().requires_grad_(True) for name, p in named.items()}
            grads = dict(zip(before, gradients(loss_at(before), list(before.values())), strict=True))
            for name, parameter in named.items():
                parameter.grad = grads[name]
            shadow = shadow_optimizer(ctx.optimizer, copies)
            for group in shadow.param_groups:
                group["lr"] = ctx.lr
            shadow.step()
            after = {name: p.detach() for name, p in named.items()}
            records: list[Record] = []
            updated: set[str] = set()
            for index, (layer, names) in enumerate(groups, start=1):
                g = [grads[name] for name in names]
                if updated:
                    mixed = {
                        name: after[name] if name in updated else before[name].detach().requires_grad_(name in names)
                        for name in named
                    }
                    g_shifted = gradients(loss_at(mixed), [mixed[name] for name in names])
                else:
                    g_shifted = g  # no layer below the first: G' = G by definition
                difference = global_norm([a - b for a, b in zip(g, g_shifted, strict=True)])
                grad_norm = global_norm(g)
                records.append(
                    {
                        "layer": layer,
                        "index": index,
                        "ics_l2": float(difference),
                        "ics_cosine": cosine(g, g_shifted),
                        "grad_norm": float(grad_norm),
                        "shifted_grad_norm": float(global_norm(g_shifted)),
                        "ics_relative": float(difference / grad_norm) if grad_norm > 0 else None,
                        "lr": ctx.lr,
                        "bn_mode": bn_mode_label(model, self.bn_mode),
                        "dropout": self.dropout,
                    }
                )
                updated.update(names)
        return records
