"""Landscape probe: on a quadratic loss the loss along the gradient, the gradient predictiveness and the effective
beta-smoothness have closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normdrop.nn as nd
from normdrop.probes import LandscapeProbe
from normdrop.spec import RunSpec
from normdrop.train import HookContext

DOUBLE = torch.float64


class Quadratic(nn.Module):
    """A "model" whose output is its parameter vector w, so that loss_fn(w) can be any function of w."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def context(model: nn.Module, batch, loss_fn, lr: float = 0.1) -> HookContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return HookContext(RunSpec(), 3, lr, model, optimizer, loss_fn, batch, None)  # type: ignore[arg-type]


NO_BATCH = (torch.zeros(1, 1), torch.zeros(1))


def test_quadratic_landscape_matches_the_closed_form() -> None:
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=generator, dtype=DOUBLE)
    a = m @ m.T + 0.5 * torch.eye(5, dtype=DOUBLE)
    b = torch.randn(5, generator=generator, dtype=DOUBLE)
    w = torch.randn(5, generator=generator, dtype=DOUBLE)

    def loss_fn(out: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * out @ a @ out - b @ out

    etas = [0.01, 0.03, 0.1]
    records = LandscapeProbe(etas=etas)(context(Quadratic(w), NO_BATCH, loss_fn))
    g = a @ w - b
    loss_w = float(loss_fn(w, None))
    expected_losses = []
    for record, eta in zip(records, etas, strict=False):
        moved = w - eta * g
        expected_loss = float(loss_fn(moved, None))
        expected_losses.append(expected_loss)
        assert record["eta"] == eta and record["lr_multiplier"] is None
        assert record["loss"] == pytest.approx(expected_loss, rel=1e-12)
        assert record["loss_change"] == pytest.approx(expected_loss - loss_w, rel=1e-10)
        # grad L(w) - grad L(w - eta g) = eta A g, exactly
        assert record["grad_change"] == pytest.approx(eta * float((a @ g).norm()), rel=1e-10)
        assert record["beta"] == pytest.approx(float((a @ g).norm() / g.norm()), rel=1e-10)
    summary = records[-1]
    assert summary["eta"] is None and len(records) == len(etas) + 1
    assert summary["loss"] == pytest.approx(loss_w, rel=1e-12)
    assert summary["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert summary["loss_range"] == pytest.approx(max(expected_losses) - min(expected_losses), rel=1e-9)
    assert summary["grad_change_max"] == pytest.approx(etas[-1] * float((a @ g).norm()), rel=1e-10)
    assert summary["bn_mode"] == "no_bn"


def test_beta_smoothness_along_an_eigenvector_is_its_eigenvalue() -> None:
    a = torch.diag(torch.tensor([7.0, 2.0, 0.5], dtype=DOUBLE))
    w = torch.tensor([1.0, 0.0, 0.0], dtype=DOUBLE)  # the gradient A w is along the top eigenvector

    def loss_fn(out: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * out @ a @ out

    records = LandscapeProbe(lr_multipliers=(0.5, 1.0, 2.0))(context(Quadratic(w), NO_BATCH, loss_fn, lr=0.04))
    assert [r["eta"] for r in records[:-1]] == pytest.approx([0.02, 0.04, 0.08])
    assert [r["lr_multiplier"] for r in records[:-1]] == [0.5, 1.0, 2.0]
    assert records[-1]["beta_smoothness"] == pytest.approx(7.0, rel=1e-12)
    # L(w - eta g) = (1 - 7 eta)^2 * 7/2 along this direction
    assert records[1]["loss"] == pytest.approx(3.5 * (1 - 7 * 0.04) ** 2, rel=1e-12)


def test_probe_leaves_the_model_as_found_and_is_repeatable_with_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nd.BatchNorm1d(16), nn.ReLU(), nd.Dropout(0.3), nn.Linear(16, 4))
    model.train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    batch = (torch.randn(64, 6), torch.randint(0, 4, (64,)))
    first = LandscapeProbe()(context(model, batch, F.cross_entropy))
    second = LandscapeProbe()(context(model, batch, F.cross_entropy))
    assert first == second, "with fixed masks the landscape of one thinned network is deterministic"
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert model.training and all(module.training for module in model.modules())
    assert first[-1]["bn_mode"] == "batch" and first[-1]["dropout"] is True
    # small steps along the negative gradient lower the loss
    assert first[0]["loss_change"] < 0
    running = LandscapeProbe(bn_mode="running", dropout=False)(context(model, batch, F.cross_entropy))
    assert running[-1]["bn_mode"] == "running" and running[-1]["loss"] != pytest.approx(first[-1]["loss"])


def test_bad_step_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        LandscapeProbe(etas=[0.1, -1.0])
    with pytest.raises(ValueError, match="positive"):
        LandscapeProbe(lr_multipliers=())
