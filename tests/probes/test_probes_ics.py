"""ICS probe (Santurkar et al. 2018): a deep linear network where G and G' are computed by hand, for SGD and Adam."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normdrop.nn as nd
from normdrop.probes import ICSProbe
from normdrop.spec import RunSpec
from normdrop.train import HookContext

DOUBLE = torch.float64


def squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L = (1/2N) sum ||out - target||^2, so dL/d out = (out - target) / N."""
    return 0.5 * (out - target).pow(2).sum(dim=1).mean()


def deep_linear(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths)]
    return nn.Sequential(*layers).double()


def context(model: nn.Module, optimizer: torch.optim.Optimizer, batch, lr: float, loss_fn=squared_error) -> HookContext:
    return HookContext(RunSpec(), 5, lr, model, optimizer, loss_fn, batch, None)  # type: ignore[arg-type]


def gradients_by_hand(weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Backpropagation written out for out = x W1' W2' ... Wk', L = ||out - y||^2 / 2N."""
    activations = [x]
    for w in weights:
        activations.append(activations[-1] @ w.T)
    delta = (activations[-1] - y) / len(x)
    grads = []
    for i in reversed(range(len(weights))):
        grads.append(delta.T @ activations[i])
        delta = delta @ weights[i]
    return grads[::-1]


def shifted_gradient(weights, updated, x, y, layer: int) -> torch.Tensor:
    """G'_layer: the gradient of layer ``layer`` after only the layers below it took their update."""
    mixed = [updated[i] if i < layer else weights[i] for i in range(len(weights))]
    return gradients_by_hand(mixed, x, y)[layer]


def batch(n: int = 32, d_in: int = 4, d_out: int = 2):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, d_in, generator=generator, dtype=DOUBLE), torch.randn(
        n, d_out, generator=generator, dtype=DOUBLE
    )


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_deep_linear_network_ics_matches_the_hand_computation(optimizer_name: str) -> None:
    model = deep_linear([4, 5, 3, 2])
    x, y = batch()
    lr = 0.05
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if optimizer_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    weights = [layer.weight.detach().clone() for layer in model]
    grads = gradients_by_hand(weights, x, y)
    if optimizer_name == "sgd":
        updated = [w - lr * g for w, g in zip(weights, grads, strict=True)]
    else:  # Adam's first step, bias-corrected: m_hat = g, v_hat = g^2, so the update is lr g / (|g| + eps)
        updated = [w - lr * g / (g.abs() + 1e-8) for w, g in zip(weights, grads, strict=True)]
    records = ICSProbe()(context(model, optimizer, (x, y), lr))
    assert [r["layer"] for r in records] == ["0", "1", "2"] and [r["index"] for r in records] == [1, 2, 3]
    assert records[0]["ics_l2"] == 0.0 and records[0]["ics_cosine"] == pytest.approx(1.0)
    for layer in (1, 2):
        g, g_shifted = grads[layer], shifted_gradient(weights, updated, x, y, layer)
        record = records[layer]
        assert record["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
        assert record["shifted_grad_norm"] == pytest.approx(float(g_shifted.norm()), rel=1e-8)
        assert record["ics_l2"] == pytest.approx(float((g - g_shifted).norm()), rel=1e-8)
        cosine = float((g * g_shifted).sum() / (g.norm() * g_shifted.norm()))
        assert record["ics_cosine"] == pytest.approx(cosine, rel=1e-10)
        assert record["ics_relative"] == pytest.approx(record["ics_l2"] / record["grad_norm"])
        assert record["ics_l2"] > 1e-4, "the update below must move this layer's gradient"
    # The wrong definition (all layers updated, including layer i itself) gives a different number.
    all_updated = gradients_by_hand(updated, x, y)[2]
    assert records[2]["ics_l2"] != pytest.approx(float((grads[2] - all_updated).norm()), rel=1e-3)


def test_probe_works_on_copies_and_leaves_model_and_optimizer_untouched() -> None:
    model = deep_linear([4, 5, 2])
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    squared_error(model(x), y).backward()
    optimizer.step()  # momentum buffers exist now
    optimizer.zero_grad()
    weights = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    records = ICSProbe()(context(model, optimizer, (x, y), 0.1))
    assert len(records) == 2 and records[1]["ics_l2"] > 0
    assert all(torch.equal(weights[key], value) for key, value in model.state_dict().items())
    after = optimizer.state_dict()
    for key, state in optimizer_state["state"].items():
        assert torch.equal(state["momentum_buffer"], after["state"][key]["momentum_buffer"])
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_momentum_state_of_the_run_is_used_for_the_update() -> None:
    model = deep_linear([4, 5, 2])
    x, y = batch()
    fresh = ICSProbe()(context(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), (x, y), 0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.ones_like(p)
    with_momentum = ICSProbe()(context(model, optimizer, (x, y), 0.1))
    assert with_momentum[1]["ics_l2"] != pytest.approx(fresh[1]["ics_l2"], rel=1e-3)


def test_bn_dropout_network_groups_layers_by_block_and_is_deterministic() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(
        "hidden1", nn.Sequential(nn.Linear(6, 8, bias=False), nd.BatchNorm1d(8), nn.ReLU(), nd.Dropout(0.2))
    )
    model.add_module(
        "hidden2", nn.Sequential(nn.Linear(8, 8, bias=False), nd.BatchNorm1d(8), nn.ReLU(), nd.Dropout(0.2))
    )
    model.add_module("classifier", nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = (torch.randn(40, 6), torch.randint(0, 3, (40,)))
    first = ICSProbe()(context(model, optimizer, data, 1e-2, F.cross_entropy))
    second = ICSProbe()(context(model, optimizer, data, 1e-2, F.cross_entropy))
    assert [r["layer"] for r in first] == ["hidden1", "hidden2", "classifier"]
    assert first == second
    assert all(r["bn_mode"] == "batch" and r["dropout"] is True for r in first)
    assert all(r["ics_l2"] > 0 for r in first[1:])
    by_module = ICSProbe(group_by="module")(context(model, optimizer, data, 1e-2, F.cross_entropy))
    assert [r["layer"] for r in by_module] == [
        "hidden1.0",
        "hidden1.1",
        "hidden2.0",
        "hidden2.1",
        "classifier",
    ]


def test_optimizer_with_several_parameter_groups_is_shadowed_group_by_group() -> None:
    model = deep_linear([4, 5, 3, 2])
    x, y = batch()
    lr = 0.05
    groups = [{"params": [model[0].weight], "weight_decay": 0.5}, {"params": [model[1].weight, model[2].weight]}]
    optimizer = torch.optim.SGD(groups, lr=lr)
    weights = [layer.weight.detach().clone() for layer in model]
    grads = gradients_by_hand(weights, x, y)
    # SGD with weight decay wd on layer 1 only: W1 <- W1 - lr (g1 + wd W1)
    updated = [weights[0] - lr * (grads[0] + 0.5 * weights[0])] + [
        w - lr * g for w, g in zip(weights[1:], grads[1:], strict=True)
    ]
    records = ICSProbe()(context(model, optimizer, (x, y), lr))
    g_shifted = shifted_gradient(weights, updated, x, y, 1)
    assert records[1]["ics_l2"] == pytest.approx(float((grads[1] - g_shifted).norm()), rel=1e-8)
    adamw = torch.optim.AdamW(model.parameters(), lr=lr)
    assert len(ICSProbe()(context(model, adamw, (x, y), lr))) == 3
