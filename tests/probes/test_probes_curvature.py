"""Curvature probe: exact answers on a quadratic loss, and the full Hessian of a small BN network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import normdrop.nn as nd
from normdrop.probes import CurvatureProbe, hessian_vector_product, hutchinson_trace, top_eigenvalue
from normdrop.spec import RunSpec
from normdrop.train import HookContext


class Quadratic(nn.Module):
    """A "model" whose output is its parameter vector w, so that loss_fn(w) can be any function of w."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quadratic_loss(a: torch.Tensor, b: torch.Tensor):
    """L(w) = w'Aw/2 - b'w: gradient Aw - b, Hessian A."""
    return lambda w, _labels: 0.5 * w @ a @ w - b @ w


def context(model: nn.Module, batch, loss_fn) -> HookContext:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return HookContext(RunSpec(), 7, 0.1, model, optimizer, loss_fn, batch, None)  # type: ignore[arg-type]


def random_symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def test_quadratic_top_eigenvalue_and_diagonal_trace_are_exact() -> None:
    eigenvalues = [5.0, 2.0, 1.0, 0.5, -0.3, 0.1]
    a = torch.diag(torch.tensor(eigenvalues, dtype=torch.float64))
    model = Quadratic(torch.randn(6, dtype=torch.float64))
    probe = CurvatureProbe(tolerance=1e-12, iterations=200, trace_samples=3)
    (record,) = probe(
        context(model, (torch.zeros(1, 1), torch.zeros(1)), quadratic_loss(a, torch.ones(6, dtype=torch.float64)))
    )
    assert record["top_eigenvalue"] == pytest.approx(5.0, rel=1e-9)
    assert record["converged"] is True and record["power_iterations"] < 200
    # For a diagonal Hessian every Rademacher sample z'Hz = sum_i H_ii z_i^2 is the trace itself.
    assert record["trace"] == pytest.approx(sum(eigenvalues), rel=1e-12)
    assert record["trace_stderr"] == pytest.approx(0.0, abs=1e-12)
    assert record["bn_mode"] == "no_bn" and record["parameters"] == 6
    assert (record["probe"], record["step"]) == ("curvature", 7)


def test_quadratic_general_hessian_trace_within_sampling_error() -> None:
    eigenvalues = [4.0, 3.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.0]
    a = random_symmetric(eigenvalues)
    model = Quadratic(torch.zeros(8, dtype=torch.float64))
    probe = CurvatureProbe(tolerance=1e-12, iterations=300, trace_samples=400)
    (record,) = probe(
        context(model, (torch.zeros(1, 1), torch.zeros(1)), quadratic_loss(a, torch.ones(8, dtype=torch.float64)))
    )
    assert record["top_eigenvalue"] == pytest.approx(4.0, rel=1e-8)
    assert record["trace_stderr"] > 0.01
    assert abs(record["trace"] - sum(eigenvalues)) < 4 * record["trace_stderr"]


def test_power_iteration_says_when_it_stopped_before_converging() -> None:
    # Top eigenvalues 1.0 and 0.99: the error shrinks by 0.99 per iteration, far from 1e-9 after 5 iterations.
    a = random_symmetric([1.0, 0.99, 0.5], seed=2)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    hvp = hessian_vector_product(0.5 * w @ a @ w, [w])
    generator = torch.Generator().manual_seed(3)
    estimate, used, converged = top_eigenvalue(hvp, [w], iterations=5, tolerance=1e-9, generator=generator)
    assert used == 5 and not converged and 0.5 < estimate <= 1.0 + 1e-12
    estimate, used, converged = top_eigenvalue(hvp, [w], iterations=5000, tolerance=1e-9, generator=generator)
    assert converged and used < 5000 and estimate == pytest.approx(1.0, abs=1e-6)


def small_bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nd.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()


def full_hessian(model: nn.Module, batch, train_mode: bool) -> torch.Tensor:
    """The Hessian of the cross-entropy over all parameters, formed explicitly (a few dozen parameters)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    model.train(train_mode)

    def loss(vector: torch.Tensor) -> torch.Tensor:
        pieces, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = math.prod(shape)
            pieces[name] = vector[start : start + size].reshape(shape)
            start += size
        return F.cross_entropy(functional_call(model, pieces, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_bn_network_matches_its_explicit_hessian_and_states_the_bn_mode(bn_mode: str) -> None:
    model = small_bn_net()
    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(16, 3, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=generator),
    )
    with torch.no_grad():  # running statistics different from any batch's, so the two modes differ
        model[1].running_mean.fill_(0.3)
        model[1].running_var.fill_(2.0)
    hessian = full_hessian(model, batch, train_mode=bn_mode == "batch")
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argmax()]
    state = {key: value.clone() for key, value in model.state_dict().items()}
    probe = CurvatureProbe(bn_modes=(bn_mode,), iterations=500, tolerance=1e-10, trace_samples=500)
    (record,) = probe(context(model, batch, F.cross_entropy))
    assert record["bn_mode"] == bn_mode
    assert record["top_eigenvalue"] == pytest.approx(float(top), rel=1e-4)
    assert abs(record["trace"] - float(hessian.trace())) < 4 * record["trace_stderr"]
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items()), "probe changed the model"


def test_batch_and_running_modes_give_different_curvatures() -> None:
    model = small_bn_net()
    with torch.no_grad():
        model[1].running_var.fill_(5.0)
    batch = (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 3, (16,)))
    records = CurvatureProbe(bn_modes=("batch", "running"))(context(model, batch, F.cross_entropy))
    assert [r["bn_mode"] for r in records] == ["batch", "running"]
    assert records[0]["top_eigenvalue"] != pytest.approx(records[1]["top_eigenvalue"], rel=1e-3)


def test_hutchinson_on_a_known_matrix_and_dropout_masks_are_fixed() -> None:
    a = random_symmetric([3.0, 1.0, -1.0, 2.0], seed=5)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    hvp = hessian_vector_product(0.5 * w @ a @ w, [w])
    trace, stderr = hutchinson_trace(hvp, [w], samples=1000, generator=torch.Generator().manual_seed(0))
    assert abs(trace - 5.0) < 4 * stderr
    # With dropout on and masks fixed, the measured Hessian is that of one thinned network: repeatable.
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nd.Dropout(0.5), nn.Linear(8, 3))
    batch = (torch.randn(32, 5), torch.randint(0, 3, (32,)))
    first = CurvatureProbe(dropout=True)(context(model, batch, F.cross_entropy))
    second = CurvatureProbe(dropout=True)(context(model, batch, F.cross_entropy))
    assert first == second and first[0]["dropout"] is True
