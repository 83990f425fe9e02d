"""Ghost batch norm, batch renormalization and frozen batch norm against their formulas, written here with plain
torch ops (the oracle), and their argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import normdrop.nn as nd
from normdrop.nn.batchnorm_variants import ghost_batch_sizes

TOL64 = dict(rtol=1e-10, atol=1e-10)


def batch_stats_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x - mean) / sqrt(var + eps) over all dims but 1, with the mean and biased variance (the oracle)."""
    dims = [0, *range(2, x.ndim)]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps), mean.flatten(), var.flatten()


def channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (ndim - 2))


def with_affine(layer, channels: int):
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return layer


# ------------------------------------------------------------------------------------------------ ghost BN


GHOST_CASES = [  # (class, input shape, ghost_batch_size, the ghost batches' sizes the documented rule gives)
    (nd.GhostBatchNorm1d, (12, 3), 4, [4, 4, 4]),
    (nd.GhostBatchNorm2d, (8, 3, 4, 5), 2, [2, 2, 2, 2]),
    (nd.GhostBatchNorm1d, (10, 3), 4, [4, 4, 2]),  # a DataLoader's last batch: the remainder is a smaller ghost
    (nd.GhostBatchNorm1d, (9, 3), 4, [4, 5]),  # one (N, C) sample has no variance: it joins the ghost before it
    (nd.GhostBatchNorm1d, (7, 3, 2), 3, [3, 3, 1]),  # one (C, L) sample has 2 values per channel: its own ghost
    (nd.GhostBatchNorm2d, (7, 3, 4, 5), 2, [2, 2, 2, 1]),
]


@pytest.mark.parametrize(("cls", "shape", "ghost", "sizes"), GHOST_CASES)
def test_ghost_batch_norm_normalizes_each_virtual_batch_and_steps_running_stats_per_ghost(
    backend, cls, shape, ghost, sizes
):
    assert ghost_batch_sizes(shape[0], ghost, math.prod(shape[2:])) == sizes
    layer = with_affine(cls(3, ghost, momentum=0.2), 3).double()
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    outputs = []
    for chunk in x_ref.split(sizes):
        normalized, mean, var = batch_stats_normalize(chunk, layer.eps)
        outputs.append(normalized * channel(layer.weight, x.ndim) + channel(layer.bias, x.ndim))
        n = chunk.numel() // 3
        running_mean = 0.8 * running_mean + 0.2 * mean.detach()
        running_var = 0.8 * running_var + 0.2 * var.detach() * n / (n - 1)
    y_ref = torch.cat(outputs)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, **TOL64)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL64)
    torch.testing.assert_close(layer.running_mean, running_mean, **TOL64)
    torch.testing.assert_close(layer.running_var, running_var, **TOL64)
    assert int(layer.num_batches_tracked) == len(sizes)


def test_ghost_batch_norm_with_one_ghost_batch_is_batch_norm_and_eval_is_batch_norm(backend):
    ghost, plain = nd.GhostBatchNorm1d(4, 10, momentum=None), nd.BatchNorm1d(4, momentum=None)
    for step in range(3):
        x = torch.randn(10, 4) + step
        torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.state_dict(), plain.state_dict())
    ghost.eval()
    plain.eval()
    x = torch.randn(7, 4)  # any batch size in eval
    torch.testing.assert_close(ghost(x), plain(x))


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "8"])
def test_ghost_batch_size_must_be_a_positive_int(size):
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        nd.GhostBatchNorm1d(3, size)


def test_ghost_batch_norm_on_batches_of_at_most_one_ghost_is_batch_norm(backend):
    """A batch smaller than a ghost batch is normalized as one; one (N, C) sample fails as in torch.nn."""
    ghost, plain = nd.GhostBatchNorm1d(3, 8), torch.nn.BatchNorm1d(3)
    x = torch.randn(5, 3) * 2 + 1
    torch.testing.assert_close(ghost(x), plain(x))
    torch.testing.assert_close(ghost.state_dict(), plain.state_dict())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ghost(torch.randn(1, 3))
    assert ghost(torch.randn(0, 3)).shape == (0, 3)


# ----------------------------------------------------------------------------------------------- batch renorm


def test_renorm_during_warm_up_is_batch_norm(backend):
    renorm = nd.BatchRenorm1d(3, momentum=0.3, warmup_steps=5)
    plain = nd.BatchNorm1d(3, momentum=0.3)
    for layer in (renorm, plain):
        with_affine(layer, 3)
    for step in range(4):
        x = (torch.randn(16, 3) * 2 + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = renorm(x), plain(x_ref)
        torch.testing.assert_close(y, y_ref)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(renorm.weight.grad, plain.weight.grad)
    torch.testing.assert_close(renorm.state_dict(), plain.state_dict())
    assert renorm.current_limits() == (1.0, 0.0)


@pytest.mark.parametrize(("r_max", "d_max"), [(1e6, 1e6), (1.5, 0.25)])
@pytest.mark.parametrize("shape", [(32, 3), (6, 3, 4, 4)])
def test_renorm_matches_its_formula_with_and_without_clipping(backend, r_max, d_max, shape):
    cls = nd.BatchRenorm1d if len(shape) == 2 else nd.BatchRenorm2d
    layer = with_affine(cls(3, momentum=0.1, r_max=r_max, d_max=d_max, warmup_steps=0, r_max_steps=0, d_max_steps=0), 3)
    layer = layer.double()
    with torch.no_grad():  # running statistics far from the batch's, so r and d matter (and clip when limited)
        layer.running_mean.copy_(torch.tensor([2.0, -1.0, 0.5]))
        layer.running_var.copy_(torch.tensor([0.25, 9.0, 1.0]))
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weight, bias = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)

    normalized, mean, var = batch_stats_normalize(x_ref, layer.eps)
    sigma = torch.sqrt(running_var + layer.eps)
    r = (torch.sqrt(var + layer.eps) / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mean - running_mean) / sigma).clamp(-d_max, d_max).detach()
    ndim = x.ndim
    y_ref = (normalized * channel(r, ndim) + channel(d, ndim)) * channel(weight, ndim) + channel(bias, ndim)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, **TOL64)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL64)
    torch.testing.assert_close(layer.weight.grad, weight.grad, **TOL64)
    torch.testing.assert_close(layer.bias.grad, bias.grad, **TOL64)
    n = x.numel() // 3
    torch.testing.assert_close(layer.running_mean, 0.9 * running_mean + 0.1 * mean.detach(), **TOL64)
    torch.testing.assert_close(layer.running_var, 0.9 * running_var + 0.1 * var.detach() * n / (n - 1), **TOL64)
    if r_max > 1e5:
        # Unclipped, r and d undo the batch statistics: the output is the inference output with the old stats.
        eval_output = (x.detach() - channel(running_mean, ndim)) / channel(sigma, ndim)
        eval_output = eval_output * channel(weight, ndim) + channel(bias, ndim)
        torch.testing.assert_close(y, eval_output, **TOL64)
    else:
        assert bool((r == r_max).any() or (r == 1 / r_max).any()) and bool((d.abs() == d_max).any())


def test_renorm_warm_up_schedule_is_linear_between_its_steps():
    layer = nd.BatchRenorm1d(2, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    expected = {0: (1.0, 0.0), 9: (1.0, 0.0), 10: (1.0, 0.0), 15: (1.5, 2.5), 20: (2.0, 5.0), 30: (3.0, 5.0)}
    for step, limits in expected.items():
        layer.num_batches_tracked.fill_(step)
        assert layer.current_limits() == pytest.approx(limits)
    layer.num_batches_tracked.fill_(10**6)
    assert layer.current_limits() == (3.0, 5.0)


def test_renorm_eval_is_batch_norm_eval(backend):
    renorm, plain = nd.BatchRenorm2d(3), nd.BatchNorm2d(3)
    for layer in (renorm, plain):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
            layer.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(1))
        layer.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(renorm(x), plain(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r_max": 0.5}, "r_max must be a finite number >= 1"),
        ({"r_max": float("inf")}, "r_max must be a finite number >= 1"),
        ({"d_max": -1.0}, "d_max must be a finite number >= 0"),
        ({"d_max": float("nan")}, "d_max must be a finite number >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be a non-negative int"),
        ({"r_max_steps": 2.5}, "r_max_steps must be a non-negative int"),
        ({"warmup_steps": 100, "r_max_steps": 50}, r"r_max_steps .* must be >= warmup_steps=100, got 50"),
        ({"warmup_steps": 100, "r_max_steps": 200, "d_max_steps": 10}, r"d_max_steps .* >= warmup_steps=100"),
    ],
)
def test_renorm_rejects_bad_limits_and_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nd.BatchRenorm1d(3, **kwargs)


def test_renorm_needs_more_than_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nd.BatchRenorm1d(3)(torch.randn(1, 3))


# ------------------------------------------------------------------------------------------------ frozen BN


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    ("bn_cls", "frozen_cls", "shape"),
    [(nd.BatchNorm1d, nd.FrozenBatchNorm1d, (5, 3)), (nd.BatchNorm2d, nd.FrozenBatchNorm2d, (2, 3, 4, 4))],
)
def test_frozen_batch_norm_is_the_eval_batch_norm_and_learns_nothing(backend, affine, bn_cls, frozen_cls, shape):
    bn = bn_cls(3, affine=affine)
    for _ in range(3):
        bn(torch.randn(shape) * 2 + 1)
    if affine:
        with_affine(bn, 3)
    frozen = frozen_cls.from_batch_norm(bn)
    assert list(frozen.parameters()) == []
    frozen.train()  # the mode changes nothing
    bn.eval()
    x = torch.randn(shape, requires_grad=True)
    y = frozen(x)
    expected = (x.detach() - channel(bn.running_mean, x.ndim)) / torch.sqrt(channel(bn.running_var, x.ndim) + bn.eps)
    if affine:
        expected = expected * channel(bn.weight.detach(), x.ndim) + channel(bn.bias.detach(), x.ndim)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, bn(x))
    y.sum().backward()
    scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight.detach() if affine else 1)
    torch.testing.assert_close(x.grad, channel(scale, x.ndim).expand_as(x))
    loaded = frozen_cls(3)
    loaded.load_state_dict(bn.state_dict())  # a BatchNorm's state_dict (with num_batches_tracked) loads as it is
    torch.testing.assert_close(loaded(x), y)


def test_convert_frozen_batchnorm_freezes_every_batch_norm():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), nd.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.BatchNorm1d(12)
    )
    model(torch.randn(8, 2, 4, 4))
    model.eval()
    x = torch.randn(4, 2, 4, 4)
    expected = model(x)
    frozen = nd.convert_frozen_batchnorm(model).train()
    assert isinstance(frozen[1], nd.FrozenBatchNorm2d) and isinstance(frozen[3], nd.FrozenBatchNorm1d)
    torch.testing.assert_close(frozen(x), expected)


def test_frozen_batch_norm_rejects_wrong_ranks_and_untracked_batch_norms():
    with pytest.raises(ValueError, match="FrozenBatchNorm2d expected a 4D input, got a 3D input"):
        nd.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="without running statistics"):
        nd.FrozenBatchNorm1d.from_batch_norm(nd.BatchNorm1d(3, track_running_stats=False))
