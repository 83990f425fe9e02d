"""Co-adaptation and sparsity of hidden units.

Srivastava et al. (2014, "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", section 7) argue that
dropout stops units from co-adapting and show it makes hidden activations sparser (figure 8: the histogram of mean
activations per unit, and of activations, with and without dropout). Measured on a layer's activations a (N samples
x U units) over a probe set:

    mean_abs_correlation = mean over unit pairs i < j of |corr(a_i, a_j)|     (constant units left out)
    decov                = (||C||_F^2 - ||diag(C)||^2) / 2,  C = cov(a)        (Cogswell et al. 2016, "Reducing
                                                                                Overfitting in Deep Networks by
                                                                                Decorrelating Representations")
    mean_activation      = mean over units of the unit's mean activation
    active_fraction      = mean over samples of the fraction of units with a > threshold

Independent units have correlations near 0 (about sqrt(2 / (pi N)) in absolute value from sampling alone) and
duplicated units exactly 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import BNMode, Probe, Record, bn_mode_label, capture_units
from normdrop.probes.layer_inputs import ACTIVATION_TYPES
from normdrop.train import HookContext


def coadaptation_stats(activations: Tensor, threshold: float = 0.0) -> Record:
    """The statistics above for one layer's activations of shape (samples, units)."""
    a = activations.double()
    samples, units = a.shape
    centered = a - a.mean(dim=0)
    covariance = centered.T @ centered / samples
    variance = covariance.diagonal()
    # A unit is constant (e.g. a dead ReLU) when its variance is rounding noise next to the largest one.
    live = variance > 1e-12 * variance.max().clamp_min(torch.finfo(torch.float64).tiny) if units else variance > 0
    live_count = int(live.sum())
    if live_count >= 2:
        std = variance[live].sqrt()
        correlation = covariance[live][:, live] / (std[:, None] * std[None, :])
        off_diagonal = ~torch.eye(live_count, dtype=torch.bool)
        mean_abs_correlation = float(correlation[off_diagonal].abs().mean())
    else:
        mean_abs_correlation = math.nan
    decov = 0.5 * float(covariance.pow(2).sum() - variance.pow(2).sum())
    unit_means = a.mean(dim=0)
    return {
        "units": units,
        "samples": samples,
        "constant_units": units - live_count,
        "mean_abs_correlation": mean_abs_correlation,
        "decov": decov,
        "mean_activation": float(unit_means.mean()),
        "median_unit_mean": float(unit_means.median()),
        "active_fraction": float((a > threshold).double().mean()),
    }


class CoadaptationProbe(Probe):
    """Correlation, DeCov and sparsity of the output of every activation layer, on the probe batch.

    Measured like inference by default (``bn_mode="running"``, dropout off), the network the paper's figures show.
    A conv layer's unit is a channel, its samples taken over examples and positions. Records (one per layer, and one
    per unit when ``per_unit``): ``layer``, ``unit`` (None for a layer row), and for a layer row the fields of
    :func:`coadaptation_stats`; a unit row has ``mean_activation`` and ``active_fraction`` of that unit. All rows
    have ``bn_mode`` and ``threshold``.
    """

    name = "coadaptation"
    needs = frozenset({"model", "probe_batch"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        bn_mode: BNMode = "running",
        threshold: float = 0.0,
        per_unit: bool = False,
        module_types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES,
    ) -> None:
        super().__init__(every, when)
        self.bn_mode: BNMode = bn_mode
        self.threshold = threshold
        self.per_unit = per_unit
        self.module_types = module_types

    def activations(self, model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
        """The output of every watched module as (samples, units), in forward order."""
        return capture_units(model, inputs, self.module_types, self.bn_mode, "output")

    def measure(self, ctx: HookContext) -> list[Record]:
        common = {"bn_mode": bn_mode_label(ctx.model, self.bn_mode), "threshold": self.threshold}
        records: list[Record] = []
        for layer, values in self.activations(ctx.model, ctx.probe_batch[0]).items():
            records.append({"layer": layer, "unit": None, **coadaptation_stats(values, self.threshold), **common})
            if self.per_unit:
                means = values.double().mean(dim=0).tolist()
                active = (values > self.threshold).double().mean(dim=0).tolist()
                records.extend(
                    {"layer": layer, "unit": unit, "mean_activation": m, "active_fraction": f, **common}
                    for unit, (m, f) in enumerate(zip(means, active, strict=True))
                )
        return records
