"""Arms of an ablation, made by surgery on the user's model (:mod:`normdrop.nn.surgery`), never by rebuilding it.

An arm is a sequence of *knobs* applied in order to a fresh ``model_fn()``; its name joins them with ``+``
(``"given"``: none). Each knob checks that it applies to the model as it is at that point and otherwise raises
:class:`NotApplicable` with the reason; the claims that need it are then not applicable, never run without it.

=========================  ===================================================================================
knob                       what it does
=========================  ===================================================================================
``remove_bn``              every batch norm -> ``nn.Identity`` (a BN with a built-in activation keeps it)
``add_bn``                 a BatchNorm after each Linear / Conv that has none, except the classifier (the last
                           weight layer called); for models without BN
``remove_dropout``         every dropout layer removed
``add_dropout=P``          one standard dropout of rate P right before the classifier; for models without dropout
``dropout_p=P``            every dropout layer's rate set to P
``dropout_after_last_bn``  dropout layers that feed a BN removed, one dropout (their largest rate) put right
                           before the classifier, after the last BN (Li et al. 2019's fix)
``ghost_bn=G``             every BatchNorm1d/2d -> ghost batch norm with ghost batches of G examples
=========================  ===================================================================================

The order of the layers is the order in which a forward pass on a few training inputs calls them (forward
pre-hooks), so it follows ``forward`` and not the order of registration.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from normdrop.nn import surgery
from normdrop.nn.batchnorm_variants import _FrozenBatchNorm
from normdrop.nn.dropout_variants import DROPOUT_LAYER_TYPES
from normdrop.nn.inference import recalibrate_bn

GIVEN = "given"
PRECISE_BN = "precise_bn"
"""End-of-training measurement: test accuracy after re-estimating the BN statistics (PreciseBN)."""
VARIANCE_SHIFT = "variance_shift"
"""End-of-training measurement: per BN layer, running variance vs the variance it sees at inference."""
MEASURE_EXAMPLES = 1024
"""Training examples the end-of-training measurements use."""


class NotApplicable(Exception):
    """A knob cannot be applied to this model; the message is the reason."""


@dataclass
class Layer:
    """One call of a weight, norm or dropout layer in a forward pass."""

    name: str
    kind: str  # "weight", "norm" or "dropout"
    module: nn.Module
    output_ndim: int = 0


@dataclass
class Layout:
    """Where the weight, norm and dropout layers of a model sit, in call order."""

    layers: list[Layer] = field(default_factory=list)

    def of(self, kind: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == kind]

    @property
    def head(self) -> Layer | None:
        """The classifier: the last weight layer called."""
        weights = self.of("weight")
        return weights[-1] if weights else None

    def dropout_before_bn(self) -> list[Layer]:
        """Dropout layers called before some BN."""
        last_norm = max((i for i, layer in enumerate(self.layers) if layer.kind == "norm"), default=0)
        return [layer for layer in self.layers[:last_norm] if layer.kind == "dropout"]

    def weights_without_bn(self) -> list[Layer]:
        """Weight layers (the classifier excepted) whose next weight or norm layer is not a norm."""
        found = []
        for index, layer in enumerate(self.layers):
            if layer.kind != "weight" or layer is self.head:
                continue
            following = [later for later in self.layers[index + 1 :] if later.kind in ("weight", "norm")]
            if not following or following[0].kind != "norm":
                found.append(layer)
        return found

    def dropout_rates(self) -> list[float]:
        return [float(layer.module.p) for layer in self.of("dropout") if hasattr(layer.module, "p")]

    def describe(self) -> list[str]:
        """One line per layer, e.g. ``"features.1  BatchNorm2d (norm)"``."""
        return [f"{layer.name}  {type(layer.module).__name__} ({layer.kind})" for layer in self.layers]


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, _BatchNorm | _FrozenBatchNorm):
        return "norm"
    if isinstance(module, DROPOUT_LAYER_TYPES):
        return "dropout"
    if isinstance(module, nn.Linear | _ConvNd):
        return "weight"
    return None


def trace(model: nn.Module, sample: Tensor) -> Layout:
    """The layout of ``model`` from one forward pass on ``sample`` in eval mode (state and modes restored)."""
    names = {module: name for name, module in model.named_modules()}
    layout = Layout()
    order: list[nn.Module] = []  # modules in the order they are called (pre-hooks), outputs come later
    seen: set[str] = set()
    handles = []

    def after(module: nn.Module, _args: Any, output: Any) -> None:
        name = names[module]
        if name in seen:
            return
        seen.add(name)
        ndim = output.ndim if isinstance(output, Tensor) else 0
        layout.layers.append(Layer(name, _kind(module) or "", module, ndim))

    for module in model.modules():
        if _kind(module) is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a: order.append(m)))
            handles.append(module.register_forward_hook(after))
    state = copy.deepcopy(model.state_dict())
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
        model.load_state_dict(state)
        for module, training in modes.items():
            module.training = training
    by_module = {layer.module: layer for layer in layout.layers}
    ordered, placed = [], set()
    for module in order:
        if module in by_module and module not in placed:
            placed.add(module)
            ordered.append(by_module[module])
    return Layout(ordered)


# ---- knobs ------------------------------------------------------------------------------------------------------


def _surgery(operation: Callable[[], nn.Module]) -> nn.Module:
    try:
        return operation()
    except ValueError as error:
        raise NotApplicable(str(error)) from None


def remove_bn(model: nn.Module, layout: Layout, _value: str | None, _settings: dict[str, Any]) -> nn.Module:
    if not layout.of("norm"):
        raise NotApplicable("the model has no batch norm to remove")
    return _surgery(lambda: surgery.remove_norm(model, inplace=True))


def add_bn(model: nn.Module, layout: Layout, _value: str | None, _settings: dict[str, Any]) -> nn.Module:
    if layout.of("norm"):
        raise NotApplicable("the model already has batch norm (BN is removed instead, not added)")
    places = layout.weights_without_bn()
    if not places:
        raise NotApplicable("the model has no Linear or Conv layer besides the classifier to put a BN after")
    for layer in places:
        if isinstance(layer.module, nn.Linear) and layer.output_ndim != 2:
            raise NotApplicable(
                f"{layer.name} is a Linear with a {layer.output_ndim}-D output; BN after it would normalize the "
                "wrong dim"
            )
    return _surgery(lambda: surgery.add_norm(model, [layer.name for layer in places], inplace=True))


def remove_dropout(model: nn.Module, layout: Layout, _value: str | None, _settings: dict[str, Any]) -> nn.Module:
    if not layout.of("dropout"):
        raise NotApplicable("the model has no dropout to remove")
    return surgery.remove_dropout(model, inplace=True)


def _before_head(model: nn.Module, layout: Layout, p: float) -> nn.Module:
    head = layout.head
    if head is None:
        raise NotApplicable("the model has no Linear or Conv layer to put dropout before")
    return surgery.add_dropout(model, [head.name], p=p, before=True, dims=0, inplace=True)


def add_dropout(model: nn.Module, layout: Layout, value: str | None, _settings: dict[str, Any]) -> nn.Module:
    if layout.of("dropout"):
        raise NotApplicable("the model already has dropout (dropout is removed instead, not added)")
    return _before_head(model, layout, float(value or 0.5))


def dropout_p(model: nn.Module, layout: Layout, value: str | None, _settings: dict[str, Any]) -> nn.Module:
    layers = [layer for layer in layout.of("dropout") if hasattr(layer.module, "p")]
    if not layers:
        raise NotApplicable("the model has no dropout layer with a rate p to change")
    for layer in layers:
        model.get_submodule(layer.name).p = float(value or 0.5)
    return model


def dropout_after_last_bn(model: nn.Module, layout: Layout, _value: str | None, _settings: dict[str, Any]) -> nn.Module:
    feeding = layout.dropout_before_bn()
    if not feeding:
        reason = "the model has no batch norm" if not layout.of("norm") else "no dropout layer comes before a BN"
        raise NotApplicable(f"{reason}: there is no dropout to move after the last BN")
    rates = [float(getattr(layer.module, "p", 0.5)) for layer in feeding]
    model = surgery.remove_dropout(model, [layer.name for layer in feeding], inplace=True)
    head = layout.head
    norms = [i for i, layer in enumerate(layout.layers) if layer.kind == "norm"]
    between = [layer for layer in layout.layers[norms[-1] + 1 :] if layer.kind == "dropout"]
    if between or head is None:
        return model
    return _before_head(model, layout, max(rates))


def ghost_bn(model: nn.Module, layout: Layout, value: str | None, settings: dict[str, Any]) -> nn.Module:
    norms = layout.of("norm")
    if not norms:
        raise NotApplicable("the model has no batch norm to make ghost batch norm of")
    unsupported = [layer.name for layer in norms if isinstance(layer.module, nn.BatchNorm3d | _FrozenBatchNorm)]
    if unsupported:
        raise NotApplicable(f"ghost batch norm has no 3-D or frozen form ({', '.join(unsupported)})")
    size = int(value or 0)
    for batch in settings.get("batch_sizes", ()):
        if batch % size:
            raise NotApplicable(f"a training batch of {batch} examples does not split into ghost batches of {size}")
    return _surgery(lambda: surgery.replace_norm(model, "ghost", ghost_batch_size=size, inplace=True))


KNOBS: dict[str, Callable[[nn.Module, Layout, str | None, dict[str, Any]], nn.Module]] = {
    "remove_bn": remove_bn,
    "add_bn": add_bn,
    "remove_dropout": remove_dropout,
    "add_dropout": add_dropout,
    "dropout_p": dropout_p,
    "dropout_after_last_bn": dropout_after_last_bn,
    "ghost_bn": ghost_bn,
}


def apply_arm(model: nn.Module, arm: str, sample: Tensor, settings: dict[str, Any]) -> nn.Module:
    """``model`` (changed in place) with the arm's knobs applied in order; :class:`NotApplicable` if one cannot."""
    if arm == GIVEN:
        return model
    for knob in arm.split("+"):
        name, _, value = knob.partition("=")
        if name not in KNOBS:
            raise ValueError(f"unknown knob {name!r}; expected one of {sorted(KNOBS)}")
        model = KNOBS[name](model, trace(model, sample), value or None, settings)
    return model


def arm_name(*knobs: str) -> str:
    """The arm of these knobs (none: :data:`GIVEN`)."""
    kept = [knob for knob in knobs if knob]
    return "+".join(kept) if kept else GIVEN


# ---- end-of-training measurements -------------------------------------------------------------------------------


class FinalMeasurements:
    """A trainer hook at the final step: PreciseBN test accuracy and the per-layer variance shift (for models
    with BN), on up to :data:`MEASURE_EXAMPLES` training inputs. Records ``probe`` = :data:`PRECISE_BN`
    (``test_accuracy``, ``test_accuracy_recalibrated``) and :data:`VARIANCE_SHIFT` (the per-layer records of
    :class:`normdrop.probes.variance_shift.VarianceShiftProbe`)."""

    name = "final_measurements"
    every = 0

    def __init__(self, inputs: Tensor, test: Any) -> None:
        self.inputs = inputs
        self.test = test

    def __call__(self, ctx: Any) -> list[dict[str, Any]]:
        from normdrop.probes.variance_shift import VarianceShiftProbe
        from normdrop.train import evaluate_batches

        model = ctx.model
        if not any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules()):
            return []
        records = [{"probe": VARIANCE_SHIFT, **r} for r in VarianceShiftProbe.layer_records(model, self.inputs)]
        _, accuracy = evaluate_batches(model, self.test)
        recalibrated = recalibrate_bn(copy.deepcopy(model), self.inputs.split(256))
        _, recalibrated_accuracy = evaluate_batches(recalibrated, self.test)
        records.append(
            {"probe": PRECISE_BN, "test_accuracy": accuracy, "test_accuracy_recalibrated": recalibrated_accuracy}
        )
        return records
