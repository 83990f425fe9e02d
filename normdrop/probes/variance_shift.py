"""Variance shift between dropout and batch norm (Li, Chen, Hu & Yang 2019, "Understanding the Disharmony between
Dropout and Batch Normalization by Variance Shift").

Inverted dropout with keep probability q multiplies a unit x (mean c, variance v) by m / q, m ~ Bernoulli(q). A BN
layer right after it therefore sees, per channel,

    in training:   Var[m x / q] = E[m^2] E[x^2] / q^2 - c^2 = (c^2 + v) / q - c^2
    at inference:  Var[x]       = v

so its running variance, accumulated in training, overestimates the variance it normalizes at inference by the
ratio ((c^2 + v) / q - c^2) / v >= 1, and the shift compounds through later layers. The two fixes compared in
docs/claims.md (dropout-bn-shift): re-estimate BN's statistics with dropout off after training (here with
``normdrop.nn.inference.recalibrate_bn``, PreciseBN), or place dropout after the last BN (``RunSpec.dropout_position
= "before_head"``), which is a different run.

The measurement, per BN layer, on training examples: the variance of its input in eval mode (``eval_var``: what it
really sees at inference), in train mode (``train_var``: dropout on, BN on batch statistics: what running_var
estimates), its ``running_var``, and for a BN whose input comes straight from a dropout layer, the closed form above
with c and v that dropout's input mean and variance in eval mode (exact for the first such layer; deeper layers
also see the shift of the layers below, which is the compounding the paper describes).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from normdrop.nn.inference import recalibrate_bn
from normdrop.nn.modes import batch_norms
from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import MASK_SEED, Probe, Record, measurement_mode, units_last
from normdrop.train import HookContext

BERNOULLI_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
"""Dropout layers that multiply by m / q with m ~ Bernoulli(q), for which the closed form holds (not alpha
dropout, whose affine correction changes the variance differently)."""

RECALIBRATION_BATCH = 256


def predicted_train_variance(mean: Tensor, variance: Tensor, keep_prob: float) -> Tensor:
    """(c^2 + v) / q - c^2: the variance of inverted dropout's output for an input of mean c and variance v."""
    return (mean.pow(2) + variance) / keep_prob - mean.pow(2)


def _bn_inputs(
    model: nn.Module, inputs: Tensor, train_mode: bool
) -> tuple[dict[str, Tensor], dict[str, tuple[str, nn.Module] | None]]:
    """Each BN layer's input as (samples, channels), and the leaf module called right before it (None if none).

    ``train_mode``: BN on batch statistics and dropout on (fixed seed); else BN on running statistics, dropout off.
    """
    names = dict((module, name) for name, module in model.named_modules())
    norms = {module for _, module in batch_norms(model)}
    captured: dict[str, Tensor] = {}
    previous: dict[str, tuple[str, nn.Module] | None] = {}
    last_leaf: list[nn.Module | None] = [None]

    def before_call(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if module in norms:
            name = names[module]
            captured[name] = units_last(args[0].detach()).double()
            leaf = last_leaf[0]
            previous[name] = None if leaf is None else (names[leaf], leaf)
        last_leaf[0] = module

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_pre_hook(before_call) for module in leaves]
    try:
        bn_mode = "batch" if train_mode else "running"
        with torch.no_grad(), measurement_mode(model, bn_mode, dropout=train_mode), torch.random.fork_rng(devices=[]):
            torch.manual_seed(MASK_SEED)
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured, previous


def _accuracy(model: nn.Module, inputs: Tensor, labels: Tensor) -> float:
    with torch.no_grad(), measurement_mode(model, "running", dropout=False):
        return float((model(inputs).argmax(dim=1) == labels).double().mean())


class VarianceShiftProbe(Probe):
    """Per BN layer: running variance vs the input variance in eval and in train mode, and the closed-form
    prediction where dropout comes right before; per call: test accuracy before and after re-estimating BN.

    Uses the first ``max_examples`` training examples (inputs only). Records, one per BN layer (values are means
    over channels): ``layer``, ``channels``, ``running_var``, ``eval_var``, ``train_var``, ``running_to_eval`` (mean
    of running_var / eval_var, Li et al.'s shift), ``train_to_eval`` (mean of train_var / eval_var),
    ``dropout_before`` (the dropout layer's name or None), ``keep_prob``, ``predicted_train_var`` and
    ``predicted_ratio`` (mean of the closed-form (c^2+v)/q - c^2 over v; None without dropout right before).
    With ``recalibrate``, one more record with ``layer=None``: ``test_accuracy`` (current running statistics),
    ``test_accuracy_recalibrated`` (after ``recalibrate_bn`` on the same examples, dropout off) and
    ``running_to_eval_recalibrated`` (mean over layers: exactly 1 for a first BN layer, close to 1 after it, where
    BN below normalizes each recalibration batch with its own statistics).
    """

    name = "variance_shift"
    needs = frozenset({"model", "dataset"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        max_examples: int = 2048,
        recalibrate: bool = True,
    ) -> None:
        super().__init__(every, when)
        if max_examples < 2:
            raise ValueError(f"max_examples must be >= 2, got {max_examples}")
        self.max_examples = max_examples
        self.recalibrate = recalibrate

    @staticmethod
    def layer_records(model: nn.Module, inputs: Tensor) -> list[Record]:
        """The per-BN-layer records on ``inputs`` (the model's modes and statistics are left as found)."""
        eval_inputs, previous = _bn_inputs(model, inputs, train_mode=False)
        train_inputs, _ = _bn_inputs(model, inputs, train_mode=True)
        records: list[Record] = []
        for name, bn in batch_norms(model):
            if name not in eval_inputs or bn.running_var is None:
                continue
            eval_values, train_values = eval_inputs[name], train_inputs[name]
            eval_var, train_var = eval_values.var(dim=0), train_values.var(dim=0)
            running_var = bn.running_var.detach().double()
            before = previous.get(name)
            dropout = before if before is not None and isinstance(before[1], BERNOULLI_DROPOUTS) else None
            predicted_var = predicted_ratio = keep_prob = None
            if dropout is not None:
                keep_prob = 1.0 - float(dropout[1].p)
                prediction = predicted_train_variance(eval_values.mean(dim=0), eval_var, keep_prob)
                predicted_var = float(prediction.mean())
                predicted_ratio = float((prediction / eval_var).mean())
            records.append(
                {
                    "layer": name,
                    "channels": int(running_var.numel()),
                    "running_var": float(running_var.mean()),
                    "eval_var": float(eval_var.mean()),
                    "train_var": float(train_var.mean()),
                    "running_to_eval": float((running_var / eval_var).mean()),
                    "train_to_eval": float((train_var / eval_var).mean()),
                    "dropout_before": None if dropout is None else dropout[0],
                    "keep_prob": keep_prob,
                    "predicted_train_var": predicted_var,
                    "predicted_ratio": predicted_ratio,
                }
            )
        return records

    def measure(self, ctx: HookContext) -> list[Record]:
        data = ctx.dataset
        inputs = data.x_train[: self.max_examples]
        records = self.layer_records(ctx.model, inputs)
        if self.recalibrate and records:
            recalibrated = copy.deepcopy(ctx.model)
            recalibrate_bn(recalibrated, inputs.split(RECALIBRATION_BATCH))
            eval_inputs, _ = _bn_inputs(recalibrated, inputs, train_mode=False)
            ratios = [
                float((bn.running_var.double() / eval_inputs[name].var(dim=0)).mean())
                for name, bn in batch_norms(recalibrated)
                if name in eval_inputs and bn.running_var is not None
            ]
            records.append(
                {
                    "layer": None,
                    "test_accuracy": _accuracy(ctx.model, data.x_test, data.y_test),
                    "test_accuracy_recalibrated": _accuracy(recalibrated, data.x_test, data.y_test),
                    "running_to_eval_recalibrated": sum(ratios) / len(ratios),
                }
            )
        return records
