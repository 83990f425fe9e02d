"""Model builders with normalization and dropout knobs: MLP, 1-D CNN, 2-D CNN and a pre-activation ResNet.

Every hidden layer is an affine map (``Linear`` or ``Conv``) followed by one *unit* of norm, activation and dropout,
ordered by the spec:

==================  ===========================  ===========================
dropout_position    norm_position="before_act"   norm_position="after_act"
==================  ===========================  ===========================
``after_norm``      norm -> act -> dropout       act -> norm -> dropout
``before_norm``     dropout -> norm -> act       act -> dropout -> norm
``before_head``     norm -> act; one dropout before the classifier only
==================  ===========================  ===========================

``before_norm`` is the setting of Li et al. (2019, "Understanding the disharmony between dropout and batch
normalization"), whose variance shift the ``after_norm`` / ``before_head`` placements avoid or reduce.

Architectures
-------------
- ``mlp``: ``depth`` hidden layers of ``width`` units. With depth 2 and width 100 it is the MNIST-1D MLP of
  Greydanus (2020).
- ``cnn1d``: ``depth`` conv layers of ``width`` channels, stride 2, padding 1, kernel 5 for the first layer and
  3 after it, then a linear classifier on the flattened features. With depth 3 and width 25 it is the MNIST-1D CNN
  of Greydanus (2020).
- ``cnn2d``: the same in two dimensions with 3x3 kernels throughout.
- ``resnet``: the pre-activation ResNet-(6n+2) of He et al. (2016, "Identity mappings in deep residual networks")
  with n = ``depth`` blocks in each of three stages of ``width``, ``2 width`` and ``4 width`` channels.

``layers="torch"`` builds the same modules from ``torch.nn`` instead of ``normdrop.nn``; weights are drawn under a
private RNG seeded from ``spec.seed``, so both builds start from identical parameters.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from normdrop.nn.factory import ACTIVATIONS, make_dropout, make_norm, norm_defaults
from normdrop.seeds import derive_seed
from normdrop.spec import RunSpec


def _norm(spec: RunSpec, num_features: int, spatial_dims: int) -> list[tuple[str, nn.Module]]:
    """The spec's norm layer from ``normdrop.nn.factory`` (the one registry of norm kinds), or none."""
    if spec.norm == "none":
        return []
    options = {**norm_defaults(spec.norm, momentum=spec.norm_momentum, eps=spec.norm_eps), **dict(spec.norm_options)}
    return [("norm", make_norm(spec.norm, num_features, spatial_dims, layers=spec.layers, **options))]


def _dropout(spec: RunSpec, spatial_dims: int) -> nn.Module:
    """The spec's dropout layer from ``normdrop.nn.factory``; channel kinds are per-unit on flat (N, C) features."""
    return make_dropout(spec.dropout_kind, spec.dropout, spatial_dims, layers=spec.layers, **dict(spec.dropout_options))


def _affine_has_bias(spec: RunSpec) -> bool:
    """A bias right before a norm that subtracts the mean is redundant, so it is left out there."""
    return spec.norm == "none" or spec.norm_position == "after_act"


def _unit(spec: RunSpec, num_features: int, spatial_dims: int) -> list[tuple[str, nn.Module]]:
    """The norm / activation / dropout ops that follow one affine layer, in the order the spec asks for."""
    norm = _norm(spec, num_features, spatial_dims)
    act = [("act", ACTIVATIONS[spec.activation]())]
    dropout_here = spec.dropout > 0 and spec.dropout_position != "before_head"
    dropout = [("dropout", _dropout(spec, spatial_dims))] if dropout_here else []
    before, after = (dropout, []) if spec.dropout_position == "before_norm" else ([], dropout)
    if spec.norm_position == "before_act":
        return before + norm + act + after
    return act + before + norm + after


def _head(spec: RunSpec, in_features: int, num_classes: int) -> list[tuple[str, nn.Module]]:
    """The classifier, preceded by the single dropout layer of ``dropout_position="before_head"``."""
    head: list[tuple[str, nn.Module]] = []
    if spec.dropout > 0 and spec.dropout_position == "before_head":
        head.append(("dropout", _dropout(spec, spatial_dims=0)))
    head.append(("classifier", nn.Linear(in_features, num_classes)))
    return head


def _mlp(spec: RunSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    blocks: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    in_features = math.prod(input_shape)
    for index in range(1, spec.depth + 1):
        linear = nn.Linear(in_features, spec.width, bias=_affine_has_bias(spec))
        hidden = [("linear", linear), *_unit(spec, spec.width, spatial_dims=0)]
        blocks.append((f"hidden{index}", nn.Sequential(OrderedDict(hidden))))
        in_features = spec.width
    blocks += _head(spec, in_features, num_classes)
    return nn.Sequential(OrderedDict(blocks))


def _channels_first(input_shape: Sequence[int], spatial_dims: int, model: str) -> tuple[int, tuple[int, ...]]:
    """(in_channels, spatial size) from a per-example shape ``(*spatial)`` or ``(channels, *spatial)``."""
    shape = tuple(input_shape)
    if len(shape) == spatial_dims:
        return 1, shape
    if len(shape) == spatial_dims + 1:
        return shape[0], shape[1:]
    raise ValueError(
        f"model={model!r} needs inputs of shape {'(L,) or (C, L)' if spatial_dims == 1 else '(H, W) or (C, H, W)'}"
        f" per example, got {shape}"
    )


def _add_channel_axis(size: Sequence[int]) -> nn.Module:
    """(N, *spatial) -> (N, 1, *spatial), by splitting the first spatial axis into (1, size[0])."""
    return nn.Unflatten(1, (1, size[0]))


def _conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """floor((size + 2 padding - kernel_size) / stride) + 1, the length of a convolution's output."""
    return (size + 2 * padding - kernel_size) // stride + 1


def _cnn(spec: RunSpec, input_shape: Sequence[int], num_classes: int, spatial_dims: int) -> nn.Module:
    conv_class = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    in_channels, size = _channels_first(input_shape, spatial_dims, spec.model)
    blocks: list[tuple[str, nn.Module]] = []
    if len(input_shape) == spatial_dims:
        blocks.append(("add_channel", _add_channel_axis(size)))
    for index in range(1, spec.depth + 1):
        kernel_size = 5 if spatial_dims == 1 and index == 1 else 3
        conv = conv_class(in_channels, spec.width, kernel_size, stride=2, padding=1, bias=_affine_has_bias(spec))
        size = tuple(_conv_output_size(s, kernel_size, stride=2, padding=1) for s in size)
        if min(size) < 1:
            raise ValueError(f"input of shape {tuple(input_shape)} is too small for {spec.depth} conv layers")
        block = [("conv", conv), *_unit(spec, spec.width, spatial_dims)]
        blocks.append((f"conv{index}", nn.Sequential(OrderedDict(block))))
        in_channels = spec.width
    blocks.append(("flatten", nn.Flatten()))
    blocks += _head(spec, in_channels * math.prod(size), num_classes)
    return nn.Sequential(OrderedDict(blocks))


class PreActBlock(nn.Module):
    """Pre-activation residual block: ``x + conv2(unit2(conv1(unit1(x))))`` (He et al. 2016b).

    When the block changes resolution or width, the shortcut is a strided 1x1 convolution of ``x``.
    """

    def __init__(self, spec: RunSpec, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        bias = _affine_has_bias(spec)
        self.unit1 = nn.Sequential(OrderedDict(_unit(spec, in_channels, spatial_dims=2)))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.unit2 = nn.Sequential(OrderedDict(_unit(spec, out_channels, spatial_dims=2)))
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(self.unit2(self.conv1(self.unit1(x))))
        return residual + (x if self.shortcut is None else self.shortcut(x))


def _resnet(spec: RunSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    in_channels, size = _channels_first(input_shape, 2, spec.model)
    blocks: list[tuple[str, nn.Module]] = []
    if len(input_shape) == 2:
        blocks.append(("add_channel", _add_channel_axis(size)))
    bias = _affine_has_bias(spec)
    blocks.append(("stem", nn.Conv2d(in_channels, spec.width, 3, stride=1, padding=1, bias=bias)))
    channels = spec.width
    for stage in range(3):
        out_channels = spec.width * 2**stage
        for index in range(spec.depth):
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append((f"stage{stage + 1}_block{index + 1}", PreActBlock(spec, channels, out_channels, stride)))
            channels = out_channels
    blocks.append(("final", nn.Sequential(OrderedDict(_unit(spec, channels, spatial_dims=2)))))
    blocks += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    blocks += _head(spec, channels, num_classes)
    return nn.Sequential(OrderedDict(blocks))


def _initialize(model: nn.Module, init: str) -> None:
    """Re-draw the weights of every Linear/Conv layer (biases set to 0); ``"default"`` keeps torch's init.

    - ``kaiming``: N(0, 2 / fan_in) (He et al. 2015, for ReLU networks);
    - ``xavier``: N(0, 2 / (fan_in + fan_out)) (Glorot & Bengio 2010);
    - ``lecun``: N(0, 1 / fan_in) (LeCun et al. 1998; the init of self-normalizing SELU networks);
    - ``orthogonal``: a (semi-)orthogonal matrix over (out, fan_in) (Saxe et al. 2014).
    """
    if init == "default":
        return
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        if init == "kaiming":
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_normal_(module.weight)
        elif init == "lecun":
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="linear")
        elif init == "orthogonal":
            nn.init.orthogonal_(module.weight)
        else:
            raise ValueError(f"unknown init {init!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_model(spec: RunSpec | Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build the model a spec describes, for examples of shape ``input_shape`` and ``num_classes`` classes.

    ``spec`` is a :class:`RunSpec` or a mapping of its fields (validated the same way). The weights depend only on
    the spec (its seed included) and not on the caller's global RNG, which is left untouched.
    """
    spec = spec if isinstance(spec, RunSpec) else RunSpec.model_validate(dict(spec))
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, "init"))
        if spec.model == "mlp":
            model = _mlp(spec, input_shape, num_classes)
        elif spec.model == "cnn1d":
            model = _cnn(spec, input_shape, num_classes, spatial_dims=1)
        elif spec.model == "cnn2d":
            model = _cnn(spec, input_shape, num_classes, spatial_dims=2)
        else:
            model = _resnet(spec, input_shape, num_classes)
        _initialize(model, spec.init)
    return model
