"""Model builders: shapes for every architecture and placement, layer order, init, torch/normdrop equivalence."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import normdrop.nn as ndnn
from normdrop.models import build_model
from normdrop.nn import factory
from normdrop.spec import RunSpec

# (model, per-example input shape, extra spec fields): small versions of every architecture.
ARCHITECTURES = [
    ("mlp", (1, 40), {"depth": 2, "width": 16}),
    ("mlp", (5,), {"depth": 1, "width": 8}),
    ("cnn1d", (1, 40), {"depth": 3, "width": 6}),
    ("cnn1d", (40,), {"depth": 2, "width": 4}),
    ("cnn2d", (1, 8, 8), {"depth": 3, "width": 4}),
    ("cnn2d", (28, 28), {"depth": 2, "width": 4}),
    ("resnet", (3, 8, 8), {"depth": 1, "width": 4}),
]
PLACEMENTS = list(
    itertools.product(["none", "batch"], ["before_act", "after_act"], ["after_norm", "before_norm", "before_head"])
)


def _spec(**fields: object) -> RunSpec:
    return RunSpec(**fields)


@pytest.mark.parametrize(("model", "input_shape", "extra"), ARCHITECTURES)
@pytest.mark.parametrize(("norm", "norm_position", "dropout_position"), PLACEMENTS)
def test_output_shape_for_every_architecture_and_placement(
    model: str, input_shape: tuple[int, ...], extra: dict, norm: str, norm_position: str, dropout_position: str
) -> None:
    spec = _spec(
        model=model,
        norm=norm,
        norm_position=norm_position,
        dropout=0.3,
        dropout_position=dropout_position,
        **extra,
    )
    net = build_model(spec, input_shape, num_classes=7)
    x = torch.randn(6, *input_shape)
    for mode in (net.train, net.eval):
        mode()
        out = net(x)
        assert out.shape == (6, 7)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["standard", "alpha", "channel", "feature_alpha"])
@pytest.mark.parametrize(("model", "input_shape"), [("cnn1d", (1, 40)), ("cnn2d", (1, 8, 8)), ("resnet", (1, 8, 8))])
def test_dropout_kinds_in_conv_models(kind: str, model: str, input_shape: tuple[int, ...]) -> None:
    spec = _spec(model=model, depth=1, width=4, dropout=0.2, dropout_kind=kind, activation="selu")
    net = build_model(spec, input_shape, num_classes=3)
    expected = {
        "standard": ndnn.Dropout,
        "alpha": ndnn.AlphaDropout,
        "channel": ndnn.Dropout1d if model == "cnn1d" else ndnn.Dropout2d,
        "feature_alpha": ndnn.FeatureAlphaDropout,
    }[kind]
    dropouts = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts and all(type(m) is expected for m in dropouts)
    assert net(torch.randn(4, *input_shape)).shape == (4, 3)


def test_channel_dropout_before_head_falls_back_to_unit_dropout() -> None:
    spec = _spec(model="cnn1d", depth=2, width=4, dropout=0.2, dropout_kind="channel", dropout_position="before_head")
    net = build_model(spec, (1, 40), num_classes=3)
    assert type(net.dropout) is ndnn.Dropout


def _names(block: nn.Module) -> list[str]:
    return [name for name, _ in block.named_children()]


@pytest.mark.parametrize(
    ("norm_position", "dropout_position", "order"),
    [
        ("before_act", "after_norm", ["linear", "norm", "act", "dropout"]),
        ("before_act", "before_norm", ["linear", "dropout", "norm", "act"]),
        ("after_act", "after_norm", ["linear", "act", "norm", "dropout"]),
        ("after_act", "before_norm", ["linear", "act", "dropout", "norm"]),
        ("before_act", "before_head", ["linear", "norm", "act"]),
    ],
)
def test_unit_order(norm_position: str, dropout_position: str, order: list[str]) -> None:
    spec = _spec(norm="batch", norm_position=norm_position, dropout=0.5, dropout_position=dropout_position, depth=3)
    net = build_model(spec, (10,), num_classes=2)
    for index in (1, 2, 3):
        assert _names(getattr(net, f"hidden{index}")) == order


def test_before_head_has_one_dropout_right_before_the_classifier() -> None:
    spec = _spec(norm="batch", dropout=0.5, dropout_position="before_head", depth=3)
    net = build_model(spec, (10,), num_classes=2)
    names = _names(net)
    assert names[-2:] == ["dropout", "classifier"]
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 1


def test_no_dropout_layers_when_p_is_zero() -> None:
    net = build_model(_spec(model="resnet", depth=1, width=4, norm="batch"), (3, 8, 8), num_classes=2)
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in net.modules())


def test_bias_left_out_only_right_before_a_norm() -> None:
    def biases(spec: RunSpec) -> set[bool]:
        net = build_model(spec, (10,), num_classes=2)
        return {net.hidden1.linear.bias is not None, net.hidden2.linear.bias is not None}

    assert biases(_spec(norm="batch", norm_position="before_act")) == {False}
    assert biases(_spec(norm="batch", norm_position="after_act")) == {True}
    assert biases(_spec(norm="none")) == {True}


def test_greydanus_architectures_have_the_published_sizes() -> None:
    # MNIST-1D baselines (Greydanus 2020): MLP 40-100-100-10; CNN of three stride-2 convs of 25 channels
    # (kernels 5, 3, 3) and a linear classifier on the 25 x 5 flattened features.
    mlp = build_model(_spec(model="mlp", depth=2, width=100), (1, 40), num_classes=10)
    cnn = build_model(_spec(model="cnn1d", depth=3, width=25), (1, 40), num_classes=10)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(mlp) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert count(cnn) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    assert cnn.classifier.in_features == 125


def test_resnet_is_pre_activation_6n_plus_2() -> None:
    net = build_model(_spec(model="resnet", depth=2, width=4, norm="batch"), (3, 16, 16), num_classes=10)
    convs = [m for name, m in net.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in name]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 6 * 2 + 2
    assert [m.out_channels for m in (net.stage1_block1.conv1, net.stage2_block1.conv1, net.stage3_block1.conv1)] == [
        4,
        8,
        16,
    ]
    assert net.stage1_block1.shortcut is None and net.stage2_block1.shortcut is not None


@pytest.mark.parametrize(
    ("model", "input_shape"), [("cnn1d", (2,)), ("cnn2d", (1, 1, 2, 2)), ("cnn1d", (2, 3, 40)), ("resnet", (40,))]
)
def test_bad_input_shapes_raise(model: str, input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"shape|small"):
        build_model(_spec(model=model, depth=3, width=2), input_shape, num_classes=2)


def test_accepts_a_mapping_and_validates_it() -> None:
    net = build_model({"model": "mlp", "depth": 1, "width": 3}, (4,), num_classes=2)
    assert net.hidden1.linear.out_features == 3
    with pytest.raises(ValidationError, match="width"):
        build_model({"width": 0}, (4,), num_classes=2)
    with pytest.raises(ValidationError, match="extra"):
        build_model({"widht": 3}, (4,), num_classes=2)


def test_weights_depend_on_the_seed_only_and_leave_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    first = build_model(_spec(seed=3), (10,), num_classes=2)
    torch.manual_seed(12345)
    again = build_model(_spec(seed=3), (10,), num_classes=2)
    other = build_model(_spec(seed=4), (10,), num_classes=2)
    torch.random.set_rng_state(state)
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.hidden1.linear.weight, other.hidden1.linear.weight)
    build_model(_spec(seed=5), (10,), num_classes=2)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    ("init", "variance"),
    [
        ("kaiming", lambda fan_in, fan_out: 2 / fan_in),
        ("xavier", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
        ("lecun", lambda fan_in, fan_out: 1 / fan_in),
    ],
)
def test_init_variance(init: str, variance) -> None:
    net = build_model(_spec(init=init, depth=1, width=400), (300,), num_classes=2)
    weight = net.hidden1.linear.weight
    expected = variance(300, 400)
    assert weight.var().item() == pytest.approx(expected, rel=0.03)
    assert torch.count_nonzero(net.hidden1.linear.bias) == 0


def test_orthogonal_init_has_orthonormal_rows() -> None:
    net = build_model(_spec(init="orthogonal", depth=1, width=50), (80,), num_classes=2)
    weight = net.hidden1.linear.weight
    torch.testing.assert_close(weight @ weight.T, torch.eye(50), atol=1e-5, rtol=0)


def test_register_norm_makes_a_new_kind_valid() -> None:
    with pytest.raises(ValidationError, match="unknown norm 'group1'"):
        _spec(norm="group1")
    factory.register_norm("group1", {1: lambda features, **_: nn.GroupNorm(1, features)})
    try:
        net = build_model(_spec(model="cnn1d", depth=2, width=4, norm="group1"), (1, 40), num_classes=2)
        assert isinstance(net.conv1.norm, nn.GroupNorm)
        with pytest.raises(ValueError, match="already registered"):
            factory.register_norm("group1", {1: lambda *args, **kwargs: nn.Identity()})
    finally:
        del factory._NORMS["group1"]


def test_norm_and_dropout_variants_with_their_options() -> None:
    net = build_model(
        _spec(norm="ghost", norm_options={"ghost_batch_size": 10}, dropout=0.2, dropout_kind="gaussian"),
        (40,),
        num_classes=3,
    )
    assert isinstance(net.hidden1.norm, ndnn.GhostBatchNorm1d) and net.hidden1.norm.ghost_batch_size == 10
    assert isinstance(net.hidden1.dropout, ndnn.GaussianDropout)
    conv = build_model(
        _spec(
            model="cnn2d", depth=2, width=4, dropout=0.1, dropout_kind="dropblock", dropout_options={"block_size": 3}
        ),
        (1, 8, 8),
        num_classes=3,
    )
    assert isinstance(conv.conv1.dropout, ndnn.DropBlock2d)
    with pytest.raises(ValidationError, match="unknown dropout kind 'nope'"):
        _spec(dropout_kind="nope")


@pytest.mark.parametrize(("model", "input_shape", "extra"), ARCHITECTURES)
def test_torch_and_normdrop_layers_build_the_same_network(
    model: str, input_shape: tuple[int, ...], extra: dict
) -> None:
    """Same seed -> same parameters; with batch norm in training mode (and dropout in eval mode) the outputs agree."""
    fields = {"model": model, "norm": "batch", "dropout": 0.3, "seed": 7, **extra}
    ours = build_model(_spec(layers="normdrop", **fields), input_shape, num_classes=5)
    theirs = build_model(_spec(layers="torch", **fields), input_shape, num_classes=5)
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]
    assert any(type(m).__module__.startswith("normdrop.nn") for m in ours.modules())
    assert not any(type(m).__module__.startswith("normdrop.nn") for m in theirs.modules())
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    x = torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0))
    for net in (ours, theirs):
        for module in net.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()  # masks differ by design (counter-based vs torch's generator)
    torch.testing.assert_close(ours(x), theirs(x))
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # running statistics updated alike
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


def test_dropout_is_active_in_training_and_identity_in_eval() -> None:
    net = build_model(_spec(dropout=0.5, depth=1, width=64), (10,), num_classes=2)
    x = torch.randn(16, 10)
    net.train()
    hidden = net.hidden1(x)
    assert (hidden == 0).float().mean().item() > 0.5  # relu zeros plus dropped units
    net.eval()
    torch.testing.assert_close(net.hidden1.dropout(hidden), hidden)
    assert math.isclose(net.hidden1.dropout.p, 0.5)
