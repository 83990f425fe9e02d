"""Dropout variants against their formulas: noise distributions (moments within sampling bounds), masks (structure
and rates), gradients, eval-mode identity, reproducibility, and argument checks."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

import normdrop.nn as nd
from normdrop.nn import dropout_variants as DV
from normdrop.nn.rng import draw_rng_state

N_LARGE = 200_000


def within_sigmas(value: float, expected: float, std_error: float, sigmas: float = 5.0) -> bool:
    return abs(value - expected) <= sigmas * std_error


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- multiplicative noise


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_gaussian_dropout_noise_is_normal_with_mean_one_and_dropout_variance(p):
    x = torch.full((N_LARGE,), 2.0, dtype=torch.float64)
    eps = DV.gaussian_dropout(x, p) / 2.0
    alpha = p / (1 - p)
    z = (eps - 1) / math.sqrt(alpha)
    assert within_sigmas(z.mean().item(), 0.0, 1 / math.sqrt(N_LARGE))
    assert within_sigmas(z.var().item(), 1.0, math.sqrt(2 / N_LARGE))
    assert within_sigmas((z**3).mean().item(), 0.0, math.sqrt(15 / N_LARGE))  # skewness of N(0, 1): 0
    assert within_sigmas((z**4).mean().item(), 3.0, math.sqrt(96 / N_LARGE))  # kurtosis: 3
    # Normal quantiles: P(z < 1) = 0.8413.
    assert within_sigmas((z < 1).double().mean().item(), 0.8413447, math.sqrt(0.8413 * 0.1587 / N_LARGE))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_uout_noise_is_uniform_on_one_plus_minus_beta(beta):
    x = torch.full((N_LARGE,), -3.0, dtype=torch.float64)
    factor = DV.uout(x, beta) / -3.0
    assert float(factor.min()) >= 1 - beta and float(factor.max()) <= 1 + beta
    assert within_sigmas(factor.mean().item(), 1.0, beta / math.sqrt(3 * N_LARGE))
    assert within_sigmas(factor.var().item(), beta**2 / 3, beta**2 * math.sqrt(4 / 45 / N_LARGE))
    deciles = torch.histc(((factor - (1 - beta)) / (2 * beta)).float(), bins=10, min=0, max=1) / N_LARGE
    assert torch.all((deciles - 0.1).abs() < 5 * math.sqrt(0.09 / N_LARGE))


@pytest.mark.parametrize(("fn", "rate"), [(DV.gaussian_dropout, 0.3), (DV.uout, 0.4)], ids=["gaussian", "uout"])
def test_multiplicative_noise_gradient_is_the_same_noise_and_nothing_big_is_saved(fn, rate):
    saved_sizes = []
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        y = fn(x, rate)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, y.detach() / x.detach())
    assert max(saved_sizes) <= 2  # the (seed, offset) pair only
    # Differentiable twice (backward is the op itself), and reproducible from a seed.
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fn(t, rate, generator=seeded(3)), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fn(t, rate, generator=seeded(3)) ** 2, (x,))
    torch.manual_seed(7)
    first = fn(x.detach(), rate)
    torch.manual_seed(7)
    torch.testing.assert_close(fn(x.detach(), rate), first)


@pytest.mark.parametrize(
    "layer",
    [
        nd.GaussianDropout(0.5),
        nd.Uout(0.3),
        nd.DropPath(0.5),
        nd.DropBlock2d(0.3, 3),
        nd.ConcreteDropout(init_p=0.3),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_eval_mode_is_identity(layer):
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(layer.eval()(x), x)
    assert not torch.equal(layer.train()(x), x)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nd.GaussianDropout(1.0), r"between 0 and 1 \(excluded\), but got 1.0"),
        (lambda: nd.GaussianDropout(-0.1), "gaussian dropout probability has to be between 0 and 1"),
        (lambda: nd.Uout(1.5), "uout beta has to be between 0 and 1, but got 1.5"),
        (lambda: nd.DropPath(2), "drop path probability has to be between 0 and 1, but got 2"),
        (lambda: nd.DropBlock2d(1.0, 3), "DropBlock drop probability p has to be between 0 and 1"),
        (lambda: nd.DropBlock2d(0.1, 0), "block_size must be a positive int, got 0"),
        (lambda: nd.DropBlock2d(0.1, 2.5), "block_size must be a positive int, got 2.5"),
        (lambda: nd.DropConnect(3, 2, p=-1), "DropConnect probability p has to be between 0 and 1"),
        (lambda: nd.ConcreteDropout(init_p=0.0), "init_p has to be strictly between 0 and 1"),
        (lambda: nd.ConcreteDropout(temperature=0.0), "temperature must be positive"),
        (lambda: nd.ConcreteDropout(weight_regularizer=-1.0), "regularizers must be non-negative"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --------------------------------------------------------------------------------------------------- drop path


def test_drop_path_drops_whole_samples_at_rate_p(backend):
    p, n = 0.3, 20_000
    x = torch.randn(n, 3, 4, requires_grad=True)
    y = DV.drop_path(x, p)
    kept = (y != 0).flatten(1)
    assert torch.equal(kept.all(1), kept.any(1))  # each sample entirely kept or entirely dropped
    dropped = int((~kept.any(1)).sum())
    assert within_sigmas(dropped, n * p, math.sqrt(n * p * (1 - p)))
    survivors = kept.all(1)
    torch.testing.assert_close(y[survivors], x.detach()[survivors] / (1 - p))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, survivors.view(-1, 1, 1).expand_as(x).float() / (1 - p))
    assert torch.equal(DV.drop_path(x, 1.0), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------------- DropBlock


def corner_counts(size: int, block: int) -> torch.Tensor:
    """k(i): how many valid block corners along one axis cover index i."""
    corners = size - block + 1
    return torch.tensor([sum(1 for c in range(corners) if c <= i < c + block) for i in range(size)])


@pytest.mark.parametrize(("p", "block", "size"), [(0.2, 3, 12), (0.1, 5, 9), (0.3, 2, 7)])
def test_drop_block_drops_whole_blocks_at_the_papers_rate(p, block, size):
    maps = 3000
    x = torch.ones(maps // 3, 3, size, size, dtype=torch.float64)
    y = DV.drop_block2d(x, p, block)
    dropped = (y == 0).double()
    # The zeros are a union of b x b blocks: eroding then dilating the dropped set (a morphological opening with a
    # b x b square) gives it back.
    eroded = -torch.nn.functional.max_pool2d(-dropped, block, stride=1)
    opened = torch.nn.functional.max_pool2d(torch.nn.functional.pad(eroded, (block - 1,) * 4), block, stride=1)
    assert torch.equal(opened, dropped)
    # Kept units are rescaled by numel / count_ones.
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, y.numel() / kept.numel()))
    # A unit covered by k corners is dropped with probability 1 - (1 - gamma)^k (Ghiasi et al.'s gamma).
    gamma = p / block**2 * size**2 / (size - block + 1) ** 2
    k = corner_counts(size, block)
    expected = (1 - (1 - gamma) ** (k.view(-1, 1) * k.view(1, -1)).double()).mean().item()
    per_map = dropped.mean((2, 3)).flatten()
    assert within_sigmas(per_map.mean().item(), expected, per_map.std().item() / math.sqrt(maps))


def test_drop_block_of_size_one_is_dropout_at_rate_p():
    p = 0.25
    y = DV.drop_block2d(torch.ones(50, 4, 10, 10), p, 1)
    n = y.numel()
    assert within_sigmas(int((y == 0).sum()), n * p, math.sqrt(n * p * (1 - p)))


def test_drop_block_checks_the_feature_map():
    with pytest.raises(ValueError, match=r"block_size must be at most min\(H, W\) = 4 for a 4x6 feature map, got 5"):
        DV.drop_block2d(torch.randn(2, 3, 4, 6), 0.1, 5)
    with pytest.raises(ValueError, match=r"4D \(N, C, H, W\) input, got a 3D input"):
        nd.DropBlock2d(0.1, 3)(torch.randn(3, 8, 8))


# ------------------------------------------------------------------------------------------------- DropConnect


def test_drop_connect_applies_a_dropout_mask_to_the_weights(backend):
    layer = nd.DropConnect(6, 4, p=0.4, generator=seeded(5))
    x = torch.randn(10, 6)
    y = layer(x)
    masked_weight = nd.functional.dropout(layer.weight.detach(), 0.4, generator=seeded(5))
    torch.testing.assert_close(y, torch.nn.functional.linear(x, masked_weight, layer.bias.detach()))
    kept = masked_weight != 0
    assert 0 < int(kept.sum()) < kept.numel()
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(layer.weight.grad, (torch.ones(10, 4).T @ x) * kept / 0.6)
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 10.0))
    layer.eval()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_drop_connect_per_sample_masks_differ_and_average_to_the_mean_network():
    linear = torch.nn.Linear(8, 3).double()
    layer = nd.DropConnect.from_linear(linear, p=0.5, per_sample=True)
    assert layer.weight is linear.weight
    x = torch.randn(1, 8, dtype=torch.float64).expand(4000, 8)
    y = layer(x)
    assert len({tuple(row.tolist()) for row in y[:20]}) == 20  # a fresh mask for every sample
    # E[y] = x W^T + b; each output is a sum of 8 independent terms x_i W_ji (2 m - 1), m ~ Bernoulli(1/2).
    expected = linear(x[:1])
    std_error = torch.sqrt(((x[0] * linear.weight) ** 2).sum(1) / 4000)
    assert torch.all((y.mean(0) - expected[0]).abs() < 5 * std_error)
    with pytest.raises(ValueError, match=r"per_sample=True expects an \(N, in_features\) input"):
        layer(torch.randn(2, 3, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------- concrete


def test_concrete_dropout_matches_its_relaxation_formula():
    x = torch.randn(6, 5, dtype=torch.float64)
    p = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y = DV.concrete_dropout(x, p, temperature=0.2, generator=seeded(11))
    u = DV._uniform(x.shape, draw_rng_state(seeded(11)), 0, x.device)
    eps = 1e-7
    drop = torch.sigmoid((math.log(0.3 + eps) - math.log(0.7 + eps) + torch.log(u) - torch.log(1 - u)) / 0.2)
    torch.testing.assert_close(y, x * (1 - drop) / 0.7)
    y.sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad)


def test_concrete_dropout_tends_to_bernoulli_dropout_at_low_temperature():
    p = 0.3
    x = torch.ones(N_LARGE, dtype=torch.float64)
    y = DV.concrete_dropout(x, torch.tensor(p, dtype=torch.float64), temperature=1e-3)
    near_zero = int((y < 0.01).sum())
    assert within_sigmas(near_zero, N_LARGE * p, math.sqrt(N_LARGE * p * (1 - p)))
    assert within_sigmas(y.mean().item(), 1.0, math.sqrt(p / (1 - p) / N_LARGE))


def test_concrete_dropout_regularization_formula_and_learned_rate():
    inner = torch.nn.Linear(5, 3)
    layer = nd.ConcreteDropout(inner, init_p=0.2, weight_regularizer=1e-2, dropout_regularizer=1e-1)
    model = torch.nn.Sequential(layer)
    assert layer.p.item() == pytest.approx(0.2)
    layer(torch.randn(4, 5))
    p = layer.p
    squares = sum(param.pow(2).sum() for param in inner.parameters())
    expected = 1e-2 * squares / (1 - p) + 1e-1 * 5 * (p * torch.log(p) + (1 - p) * torch.log(1 - p))
    torch.testing.assert_close(nd.concrete_dropout_regularization(model), expected)
    # The entropy term alone pulls p towards 1/2.
    alone = nd.ConcreteDropout(init_p=0.1, dropout_regularizer=1.0)
    optimizer = torch.optim.SGD([alone.p_logit], lr=0.1)
    for _ in range(20):
        alone(torch.randn(8, 5))
        optimizer.zero_grad()
        alone.regularization.backward()
        optimizer.step()
    assert 0.2 < alone.p.item() < 0.5


def test_concrete_dropout_models_copy_and_pickle_after_a_training_step():
    model = torch.nn.Sequential(nd.ConcreteDropout(torch.nn.Linear(3, 2)))
    model(torch.randn(4, 3))
    assert model[0].regularization is not None
    clone = copy.deepcopy(model)
    assert clone[0].regularization is None and model[0].regularization is not None
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored[0].p_logit, model[0].p_logit)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda x, g: DV.gaussian_dropout(x, 0.3, generator=g), id="gaussian"),
        pytest.param(lambda x, g: DV.uout(x, 0.2, generator=g), id="uout"),
        pytest.param(lambda x, g: DV.drop_block2d(x, 0.2, 3, generator=g), id="dropblock"),
        pytest.param(lambda x, g: DV.concrete_dropout(x, torch.tensor(0.3), generator=g), id="concrete"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "threads"), [((4, 3, 9, 9), 1), ((5, 4, 130, 130), 2)], ids=["small", "large"])
def test_variants_give_the_same_numbers_on_every_backend(fn, dtype, shape, threads):
    """The random fields come from numba kernels on the CPU and from torch ops on composite, from the same bits,
    with the same float64 arithmetic after them: the same outputs and gradients, bit for bit. The large shape spans
    several of the Gaussian's chunks and the parallel kernels' blocks."""
    from normdrop.nn import kernels

    torch.set_num_threads(threads)  # conftest's autouse fixture restores it
    x0 = torch.randn(shape, dtype=dtype)
    results = {}
    for name in ("composite", "numba"):
        kernels.set_backend(name)
        try:
            x = x0.clone().requires_grad_()
            y = fn(x, seeded(11))
            y.backward(torch.ones_like(y))
            results[name] = (y.detach(), x.grad)
        finally:
            kernels.set_backend(None)
    for ours, reference in zip(results["numba"], results["composite"], strict=True):
        assert torch.equal(ours, reference)
