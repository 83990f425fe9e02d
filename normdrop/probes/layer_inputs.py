"""Layer-input distributions and their drift over training.

Ioffe & Szegedy (2015, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate
Shift", figure 1b-c) plot the 15th, 50th and 85th percentiles of one unit's input to its nonlinearity over training,
with and without BN, as their picture of internal covariate shift. This probe measures that, for every unit of every
layer, on the fixed probe batch, and adds a number for the shift itself: the Wasserstein-1 distance between a unit's
input distributions at two steps. For two empirical distributions of n values each,

    W1(a, b) = (1/n) sum_i |a_(i) - b_(i)|        (a_(i), b_(i): the sorted values)

so a translation by delta has W1 = |delta| and an unchanged distribution W1 = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normdrop.nn.factory import ACTIVATIONS
from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import BNMode, Probe, Record, bn_mode_label, capture_units
from normdrop.train import HookContext

PERCENTILES = (15, 50, 85)
"""The percentiles of the BN paper's figure 1."""

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = tuple(dict.fromkeys(ACTIVATIONS.values()))  # type: ignore[arg-type]
"""Modules whose input is a layer's pre-activation: the nonlinearities the model builders use."""


def wasserstein1_sorted(a_sorted: Tensor, b_sorted: Tensor) -> Tensor:
    """W1 per column between two samples of equal size, each column already sorted: mean |a_(i) - b_(i)|."""
    return (a_sorted - b_sorted).abs().mean(dim=0)


class LayerInputsProbe(Probe):
    """Per layer and unit: mean, variance, 15/50/85th percentiles of the pre-activation input on the probe batch,
    and its W1 drift since the previous call and since the first call.

    A "layer input" is the input of every module of ``module_types`` (the activation functions by default), so with
    BN before the activation it is BN's output, as in the BN paper. A unit of a conv layer is a channel, its samples
    taken over examples and positions. Measured with BN in ``bn_mode`` and dropout off, so the drift is the change
    of the weights, not mask noise.

    Records (one per layer per call with ``unit=None``, plus one per unit for the first ``max_units`` units):
    ``layer``, ``unit``, ``mean``, ``var``, ``p15``, ``p50``, ``p85`` (a layer row averages the units' values),
    ``w1_prev`` (W1 to the previous call, None at the first), ``w1_init`` (W1 to the first call), ``prev_step``,
    ``bn_mode``, ``units``.
    """

    name = "layer_inputs"
    needs = frozenset({"model", "probe_batch"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        max_units: int = 3,
        bn_mode: BNMode = "batch",
        module_types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES,
    ) -> None:
        super().__init__(every, when)
        if max_units < 0:
            raise ValueError(f"max_units must be >= 0, got {max_units}")
        self.max_units = max_units
        self.bn_mode: BNMode = bn_mode
        self.module_types = module_types
        self._first: dict[str, Tensor] = {}
        self._previous: dict[str, Tensor] = {}
        self._previous_step: int | None = None

    def layer_inputs(self, model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
        """The input of every watched module as (samples, units), in forward order."""
        return capture_units(model, inputs, self.module_types, self.bn_mode, "input")

    def measure(self, ctx: HookContext) -> list[Record]:
        if self._previous_step is not None and ctx.step <= self._previous_step:
            self._first, self._previous, self._previous_step = {}, {}, None  # a new run with the same probe object
        inputs = self.layer_inputs(ctx.model, ctx.probe_batch[0])
        quantiles = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
        bn_mode = bn_mode_label(ctx.model, self.bn_mode)
        records: list[Record] = []
        for layer, values in inputs.items():
            values = values.double()
            ordered = values.sort(dim=0).values
            first = self._first.setdefault(layer, ordered)
            previous = self._previous.get(layer)
            self._previous[layer] = ordered
            w1_init = wasserstein1_sorted(ordered, first)
            w1_prev = wasserstein1_sorted(ordered, previous) if previous is not None else torch.zeros_like(w1_init)
            # rows: mean, var, p15, p50, p85, w1_init, w1_prev; columns: units
            stats = torch.stack(
                [values.mean(0), values.var(0, unbiased=False), *torch.quantile(values, quantiles, 0), w1_init, w1_prev]
            )
            common = {"layer": layer, "bn_mode": bn_mode, "units": values.shape[1], "prev_step": self._previous_step}
            per_layer = stats.mean(dim=1).tolist()
            per_unit = stats[:, : self.max_units].T.tolist()
            for unit, (mean, var, p15, p50, p85, init, prev) in [(None, per_layer), *enumerate(per_unit)]:
                records.append(
                    {
                        **common,
                        "unit": unit,
                        "mean": mean,
                        "var": var,
                        "p15": p15,
                        "p50": p50,
                        "p85": p85,
                        "w1_prev": None if previous is None else prev,
                        "w1_init": init,
                    }
                )
        self._previous_step = ctx.step
        return records
