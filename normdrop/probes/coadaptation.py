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

**Individual usefulness** (the paper's "each hidden unit ... creating useful features on its own"), measured when the
context carries the run's dataset, on the activations of every activation layer in inference mode (a conv layer's unit
is a channel, its value per example the mean over positions):

- single-unit linear probe: for each unit u alone, a Gaussian class-conditional classifier with one variance shared
  by the classes (one-feature linear discriminant analysis, fitted in closed form on the run's training examples),

      score_c(x) = x mu_cu / s_u^2 - mu_cu^2 / (2 s_u^2) + ln pi_c,   predict argmax_c score_c(x_u)

  with pi_c the class frequencies, mu_cu the class means and s_u^2 = (1/N) sum_i (x_iu - mu_{y_i u})^2 the pooled
  within-class variance (floored at 1e-12 of the unit's total variance, so a unit that separates the classes
  exactly predicts the nearest class mean); its accuracy on the test set (``unit_probe_accuracy``, mean over the
  layer's units). A constant unit (a dead ReLU) predicts the most frequent training class. The score is linear in
  x, so this is a linear probe of one unit; sklearn's ``LinearDiscriminantAnalysis(solver="lsqr")`` fits the same
  rule (the tests compare them).
- ablation: the test accuracy of the whole network minus its accuracy with unit u zeroed (``ablation_drop``, mean
  over the layer's units, in accuracy fraction): how much the network relies on that unit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import BNMode, Probe, Record, bn_mode_label, capture_units, measurement_mode
from normdrop.probes.layer_inputs import ACTIVATION_TYPES
from normdrop.train import HookContext

FIT_EXAMPLES = 2048
"""At most this many training examples fit the single-unit probes."""
TEST_EXAMPLES = 1024
"""The first this many test examples score the single-unit probes."""
ABLATION_EXAMPLES = 256
"""The first this many test examples score the ablations (cost: about one pass of them per unit)."""


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


def single_unit_probe_accuracy(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, num_classes: int
) -> Tensor:
    """Test accuracy of the one-feature linear discriminant of every unit (see the module docstring).

    Args:
        train, test: activations of shape (examples, units).
        train_labels, test_labels: class indices in ``[0, num_classes)``.
    Returns: a float64 tensor of shape (units,): the mean over test examples of
    :func:`single_unit_probe_correct`.
    """
    return single_unit_probe_correct(train, train_labels, test, test_labels, num_classes).mean(dim=0)


def single_unit_probe_correct(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, num_classes: int
) -> Tensor:
    """Per test example and unit, 1.0 where the unit's one-feature linear discriminant (fitted on ``train``)
    predicts the label, else 0.0: float64 of shape (test examples, units); arguments as
    :func:`single_unit_probe_accuracy`."""
    x = train.double()
    onehot = torch.nn.functional.one_hot(train_labels.long(), num_classes).double()  # (N, C)
    counts = onehot.sum(dim=0)  # (C,)
    present = counts > 0
    means = (onehot.T @ x) / counts.clamp_min(1.0)[:, None]  # (C, U)
    residual = x - means[train_labels.long()]
    variance = residual.pow(2).mean(dim=0)  # (U,) pooled within-class variance
    total = x.var(dim=0, unbiased=False)  # (U,)
    log_prior = torch.where(present, counts.clamp_min(1.0).log() - math.log(len(x)), -math.inf)  # (C,)
    tiny = torch.finfo(torch.float64).tiny
    live = total > 1e-12 * total.max().clamp_min(tiny)  # a constant unit predicts from the priors alone
    # a unit that separates the classes exactly (no within-class spread) is scored as nearest class mean
    variance = torch.maximum(variance, 1e-12 * total).clamp_min(tiny)
    inverse = torch.where(live, 1.0 / variance, 0.0)
    # score_c(x) = x a_uc + b_uc with a = mu / s^2 and b = -mu^2 / (2 s^2) + ln pi, shapes (U, C)
    slope = means.T * inverse[:, None]
    offset = -means.T.pow(2) * inverse[:, None] / 2 + log_prior[None, :]
    predicted = torch.addcmul(offset[None], test.double()[:, :, None], slope[None]).argmax(dim=2)  # (M, U)
    return (predicted == test_labels.long()[:, None]).double()


def _unit_values(model: nn.Module, inputs: Tensor, module_types: tuple[type[nn.Module], ...]) -> dict[str, Tensor]:
    """Each watched module's output per example and unit, (examples, units): a conv channel's mean over positions;
    inference mode (BN on running statistics, dropout off)."""
    watched = [(name, m) for name, m in model.named_modules() if isinstance(m, module_types)]
    captured: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _a, out, name=name: captured.__setitem__(
                name, out.detach().flatten(2).mean(dim=2) if out.dim() > 2 else out.detach()
            )
        )
        for name, module in watched
    ]
    try:
        with torch.no_grad(), measurement_mode(model, "running", dropout=False):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


ABLATION_CHUNK = 32
"""Units ablated per forward pass (one copy of the batch per ablated unit)."""


def ablation_drops(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    module_types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES,
    *,
    repeat_inputs: bool = False,
) -> tuple[float, dict[str, Tensor]]:
    """``(accuracy, {layer: drops})``: the network's accuracy on ``inputs`` in inference mode, and per watched
    layer the accuracy minus the accuracy with each unit (a conv channel) of that layer's output set to 0, shape
    (units,).

    :data:`ABLATION_CHUNK` units are ablated per forward pass: the watched layer's output is repeated once per
    ablated unit, the j-th copy with unit j zeroed, and the rest of the network runs on the larger batch (what
    comes after the layer computed once per copy, what comes before it once). A network in which that output
    meets an un-repeated tensor (a residual sum) raises there; for it (or with ``repeat_inputs``) the inputs
    themselves are repeated instead.
    """
    widths = {name: values.shape[1] for name, values in _unit_values(model, inputs[:2], module_types).items()}
    modules = dict(model.named_modules())
    examples = len(inputs)
    state: dict[str, Any] = {"repeat_inputs": repeat_inputs}

    def masked(copies: Tensor) -> Tensor:
        """(copies, examples, units, ...) with unit j of copy j zeroed."""
        mask = state["mask"]  # (copies, units): 0 at (j, unit of copy j)
        return copies * mask.view(mask.shape[0], 1, mask.shape[1], *([1] * (copies.dim() - 3)))

    def grow(_module: nn.Module, _args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return masked(output[None].expand(state["mask"].shape[0], *output.shape)).flatten(0, 1)

    def in_place(_module: nn.Module, _args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return masked(output.reshape(state["mask"].shape[0], examples, *output.shape[1:])).reshape(output.shape)

    def correct(logits: Tensor, copies: int) -> Tensor:
        return (logits.argmax(dim=1).view(copies, examples) == labels[None]).double().mean(dim=1)

    def chunk_accuracy(module: nn.Module, copies: int) -> Tensor:
        if state.get("repeat_inputs"):
            return repeated(module, copies)
        handle = module.register_forward_hook(grow)
        try:
            return correct(model(inputs), copies)
        except RuntimeError:
            pass
        finally:
            handle.remove()
        return repeated(module, copies)

    def repeated(module: nn.Module, copies: int) -> Tensor:
        handle = module.register_forward_hook(in_place)
        try:
            return correct(model(inputs.repeat(copies, *([1] * (inputs.dim() - 1)))), copies)
        finally:
            handle.remove()

    drops: dict[str, Tensor] = {}
    with torch.no_grad(), measurement_mode(model, "running", dropout=False):
        base = float(correct(model(inputs), 1)[0])
        for name, units in widths.items():
            values = []
            for start in range(0, units, ABLATION_CHUNK):
                ablated = torch.arange(start, min(units, start + ABLATION_CHUNK))
                mask = torch.ones(len(ablated), units, dtype=inputs.dtype)
                mask[torch.arange(len(ablated)), ablated] = 0
                state["mask"] = mask
                values.append(base - chunk_accuracy(modules[name], len(ablated)))
            drops[name] = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return base, drops


def _probe_sets(dataset: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """``(x_train, y_train, x_test, y_test, num_classes)`` the single-unit probes are fitted and scored on: the first
    :data:`FIT_EXAMPLES` training and :data:`TEST_EXAMPLES` test examples."""
    x_train, y_train = dataset.x_train[:FIT_EXAMPLES], dataset.y_train[:FIT_EXAMPLES]
    x_test, y_test = dataset.x_test[:TEST_EXAMPLES], dataset.y_test[:TEST_EXAMPLES]
    num_classes = int(getattr(dataset, "num_classes", 0) or int(max(y_train.max(), y_test.max())) + 1)
    return x_train, y_train, x_test, y_test, num_classes


def unit_probe_example_scores(
    model: nn.Module, dataset: Any, module_types: tuple[type[nn.Module], ...] = ACTIVATION_TYPES
) -> Tensor:
    """Per probe test example, the share of all hidden units (every watched layer's, pooled) whose single-unit
    probe classifies it right: float64 of shape (test examples,), in inference mode.

    Its mean over the examples is the mean over all units of the single-unit probe accuracy, i.e. the layers'
    ``unit_probe_accuracy`` of :class:`CoadaptationProbe` weighted by their numbers of units,
    ``(1/M) sum_i (1/U) sum_u c_iu = (1/U) sum_u (1/M) sum_i c_iu``; what a bootstrap over test examples resamples.
    """
    x_train, y_train, x_test, y_test, num_classes = _probe_sets(dataset)
    train_values = _unit_values(model, x_train, module_types)
    test_values = _unit_values(model, x_test, module_types)
    correct = [
        single_unit_probe_correct(train_values[layer], y_train, test_values[layer], y_test, num_classes)
        for layer in train_values
    ]
    if not correct:
        raise ValueError("the model has no watched layer to probe")
    return torch.cat(correct, dim=1).mean(dim=1)


class CoadaptationProbe(Probe):
    """Correlation, DeCov and sparsity of the output of every activation layer, on the probe batch.

    Measured like inference by default (``bn_mode="running"``, dropout off), the network the paper's figures show.
    A conv layer's unit is a channel, its samples taken over examples and positions. Records (one per layer, and one
    per unit when ``per_unit``): ``layer``, ``unit`` (None for a layer row), and for a layer row the fields of
    :func:`coadaptation_stats`; a unit row has ``mean_activation`` and ``active_fraction`` of that unit. All rows
    have ``bn_mode`` and ``threshold``.

    With ``usefulness`` (default), at the run's last step (``step == spec.steps``: it costs about one forward pass
    of :data:`ABLATION_EXAMPLES` test examples per unit) and in a context that carries the dataset (the trainer's
    always does), a layer row adds ``unit_probe_accuracy`` / ``unit_probe_accuracy_max`` (mean / max over units of
    the single-unit probe's test accuracy), ``ablation_drop`` / ``ablation_drop_max`` (mean / max over units of the
    test-accuracy drop when the unit is zeroed), ``test_accuracy`` (the network's on the ablation examples, in
    inference mode), ``fit_examples``, ``test_examples`` and ``ablation_examples``; a unit row adds its
    ``probe_accuracy`` and ``ablation_drop``. These are always measured in inference mode, whatever ``bn_mode``
    says for the statistics above.
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
        usefulness: bool = True,
    ) -> None:
        super().__init__(every, when)
        self.with_usefulness = usefulness
        self.bn_mode: BNMode = bn_mode
        self.threshold = threshold
        self.per_unit = per_unit
        self.module_types = module_types

    def activations(self, model: nn.Module, inputs: Tensor) -> dict[str, Tensor]:
        """The output of every watched module as (samples, units), in forward order."""
        return capture_units(model, inputs, self.module_types, self.bn_mode, "output")

    def usefulness(self, model: nn.Module, dataset: Any) -> dict[str, dict[str, Any]]:
        """Per layer: single-unit probe accuracies and ablation drops (tensors of shape (units,)), the network's
        test accuracy and the numbers of examples used (see the module docstring)."""
        x_train, y_train, x_test, y_test, num_classes = _probe_sets(dataset)
        train_values = _unit_values(model, x_train, self.module_types)
        test_values = _unit_values(model, x_test, self.module_types)
        accuracy, drops = ablation_drops(
            model, x_test[:ABLATION_EXAMPLES], y_test[:ABLATION_EXAMPLES], self.module_types
        )
        return {
            layer: {
                "probe_accuracy": single_unit_probe_accuracy(
                    train_values[layer], y_train, test_values[layer], y_test, num_classes
                ),
                "ablation_drop": drops[layer],
                "test_accuracy": accuracy,
                "fit_examples": len(y_train),
                "test_examples": len(y_test),
                "ablation_examples": min(len(y_test), ABLATION_EXAMPLES),
            }
            for layer in train_values
        }

    def measure(self, ctx: HookContext) -> list[Record]:
        common = {"bn_mode": bn_mode_label(ctx.model, self.bn_mode), "threshold": self.threshold}
        last = ctx.step >= ctx.spec.steps
        measure_usefulness = self.with_usefulness and ctx.dataset is not None and last
        useful = self.usefulness(ctx.model, ctx.dataset) if measure_usefulness else {}
        records: list[Record] = []
        for layer, values in self.activations(ctx.model, ctx.probe_batch[0]).items():
            row: Record = {"layer": layer, "unit": None, **coadaptation_stats(values, self.threshold), **common}
            unit_rows = useful.get(layer)
            if unit_rows is not None:
                row.update(
                    unit_probe_accuracy=float(unit_rows["probe_accuracy"].mean()),
                    unit_probe_accuracy_max=float(unit_rows["probe_accuracy"].max()),
                    ablation_drop=float(unit_rows["ablation_drop"].mean()),
                    ablation_drop_max=float(unit_rows["ablation_drop"].max()),
                    test_accuracy=unit_rows["test_accuracy"],
                    fit_examples=unit_rows["fit_examples"],
                    test_examples=unit_rows["test_examples"],
                    ablation_examples=unit_rows["ablation_examples"],
                )
            records.append(row)
            if self.per_unit:
                means = values.double().mean(dim=0).tolist()
                active = (values > self.threshold).double().mean(dim=0).tolist()
                for unit, (m, f) in enumerate(zip(means, active, strict=True)):
                    unit_row: Record = {"layer": layer, "unit": unit, "mean_activation": m, "active_fraction": f}
                    if unit_rows is not None:
                        unit_row["probe_accuracy"] = float(unit_rows["probe_accuracy"][unit])
                        unit_row["ablation_drop"] = float(unit_rows["ablation_drop"][unit])
                    records.append({**unit_row, **common})
        return records
