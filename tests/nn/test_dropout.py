"""normdrop's dropout layers: statistics, gradients, semantics and errors, with torch.nn as the reference."""

from __future__ import annotations

import math

import pytest
import torch

import normdrop.nn as nd
from normdrop.nn import functional as F
from normdrop.nn import rng
from normdrop.nn.functional import InputDimError
from normdrop.nn.kernels import composite

P_VALUES = [0.1, 0.5, 0.8]


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """A range the count of a Binomial(n, p) leaves with probability < 1e-6."""
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


@pytest.mark.parametrize("p", P_VALUES)
def test_drop_rate_within_binomial_bounds_and_expectation_preserved(backend, p):
    x = torch.ones(500_000)
    y = F.dropout(x, p)
    dropped = int((y == 0).sum())
    low, high = binomial_bounds(x.numel(), p)
    assert low <= dropped <= high
    kept_values = y[y != 0]
    torch.testing.assert_close(kept_values, torch.full_like(kept_values, 1 / (1 - p)))
    # E[y] = x: the sample mean is within 5 standard errors of 1.
    standard_error = math.sqrt(p / (1 - p) / x.numel())
    assert abs(y.mean().item() - 1.0) < 5 * standard_error


@pytest.mark.parametrize("p", P_VALUES)
def test_gradient_is_mask_over_keep_probability(backend, p):
    x = torch.randn(64, 50, requires_grad=True)
    y = F.dropout(x, p)
    y.backward(torch.ones_like(y))
    mask = (y != 0).to(x.dtype)
    torch.testing.assert_close(x.grad, mask / (1 - p))
    torch.testing.assert_close(y, x.detach() * mask / (1 - p))


def test_backward_keeps_nothing_the_size_of_the_input(backend):
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    x = torch.randn(128, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in (nd.Dropout(0.3), nd.Dropout1d(0.3), nd.AlphaDropout(0.3)):
            layer(x.view(128, 16, 16) if isinstance(layer, nd.Dropout1d) else x).sum().backward()
    # Only (seed, offset) pairs; the C++ fast path keeps its key as integers in the node, no tensor at all.
    assert max(saved_sizes, default=0) <= 2
    if backend != "numba+fastpath":
        assert saved_sizes


@pytest.mark.parametrize(
    "layer_cls", [nd.Dropout, nd.Dropout1d, nd.Dropout2d, nd.Dropout3d, nd.AlphaDropout, nd.FeatureAlphaDropout]
)
def test_eval_is_identity_and_p0_is_identity(backend, layer_cls):
    shape = {nd.Dropout1d: (4, 3, 5), nd.Dropout3d: (2, 3, 2, 2, 2)}.get(layer_cls, (2, 3, 4, 4))
    x = torch.randn(shape)
    layer = layer_cls(0.5).eval()
    assert layer(x) is x or torch.equal(layer(x), x)
    assert torch.equal(layer_cls(0.0).train()(x), x)


@pytest.mark.parametrize("layer_cls", [nd.Dropout, nd.Dropout2d, nd.AlphaDropout, nd.FeatureAlphaDropout])
def test_p1_gives_zeros_and_zero_gradient_like_torch(backend, layer_cls):
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = layer_cls(1.0)(x)
    torch_layer = getattr(torch.nn, layer_cls.__name__)(1.0)
    assert torch.equal(y, torch_layer(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(
    ("fn", "shape", "mask_dims"),
    [
        (F.dropout1d, (8, 6, 10), 2),
        (F.dropout1d, (6, 10), 1),
        (F.dropout2d, (8, 6, 4, 5), 2),
        (F.dropout3d, (4, 6, 2, 3, 4), 2),
        (F.dropout3d, (6, 2, 3, 4), 1),
    ],
)
def test_channel_dropout_zeroes_whole_channels(backend, fn, shape, mask_dims):
    x = torch.rand(shape) + 0.5  # strictly positive: a zero output means a dropped unit
    y = fn(x, 0.5)
    per_channel = (y == 0).reshape(*shape[:mask_dims], -1)
    assert torch.all(per_channel.all(-1) | ~per_channel.any(-1)), "a channel was partly dropped"
    assert per_channel.all(-1).any() and (~per_channel.any(-1)).any()
    kept = y[y != 0]
    torch.testing.assert_close(kept, (x * 2)[y != 0])


def test_channels_last_layout_kept(backend):
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    for fn in (F.dropout, F.dropout2d, F.alpha_dropout):
        y = fn(x, 0.5, True)
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_elementwise_mask_does_not_depend_on_memory_layout(backend):
    x = torch.randn(4, 3, 5, 5)
    a = F.dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
    b = F.dropout(x.to(memory_format=torch.channels_last), 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_alpha_dropout_keeps_mean_and_std(backend, p):
    x = torch.randn(1_000_000, dtype=torch.float64)
    y = F.alpha_dropout(x, p, training=True)
    assert abs(y.mean().item()) < 0.01
    assert abs(y.std().item() - 1.0) < 0.01
    torch_y = torch.nn.functional.alpha_dropout(x, p, training=True)
    assert abs(y.mean().item() - torch_y.mean().item()) < 0.01
    assert abs(y.std().item() - torch_y.std().item()) < 0.01


@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_formula(backend, feature):
    """Kept units: a x + a s p; dropped: a s (p - 1), with s = 1.7581 (Klambauer et al. 2017)."""
    p = 0.3
    s = composite.SELU_SATURATION
    a = 1 / math.sqrt((s * s * p + 1) * (1 - p))
    x = torch.rand(16, 8, 3, dtype=torch.float64) + 5  # far from the dropped value
    y = (F.feature_alpha_dropout if feature else F.alpha_dropout)(x, p, True)
    dropped = torch.isclose(y, torch.tensor(a * s * (p - 1), dtype=torch.float64))
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(y[~dropped], a * x[~dropped] + a * s * p)
    if feature:
        assert torch.all(dropped.all(-1) | ~dropped.any(-1))


def test_same_seed_same_mask_different_seed_different_mask(backend):
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = F.dropout(x, 0.5)
    torch.manual_seed(3)
    b = F.dropout(x, 0.5)
    torch.manual_seed(4)
    c = F.dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(F.dropout(x, 0.5, generator=g1), F.dropout(x, 0.5, generator=g2))
    assert not torch.equal(F.dropout(x, 0.5, generator=g1), F.dropout(x, 0.5, generator=g1.manual_seed(11)).neg())
    layer = nd.Dropout(0.5, generator=torch.Generator().manual_seed(5))
    twin = nd.Dropout(0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(layer(x), twin(x))


def test_composite_bits_follow_the_reference_specification():
    for seed, offset in [(0, 0), (12345, 99), (2**61 + 3, 2**32 - 2), (7, 3 * 2**32 + 5)]:
        bits = composite.counter_bits(seed, offset, 5, torch.device("cpu")).tolist()
        assert bits == [rng.counter_bits(seed, offset + i) for i in range(5)]


@pytest.mark.parametrize("fn", [F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout2d])
def test_gradcheck_and_gradgradcheck_with_fixed_mask(backend, fn):
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)

    def with_fixed_mask(x):
        return fn(x, 0.4, True, generator=torch.Generator().manual_seed(2))

    assert torch.autograd.gradcheck(with_fixed_mask, (x,))
    assert torch.autograd.gradgradcheck(with_fixed_mask, (x,))


def test_inplace_writes_into_the_input(backend):
    x = torch.randn(50, 20)
    original = x.clone()
    y = F.dropout(x, 0.5, inplace=True)
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(x, y) and not torch.equal(x, original)
    layer = nd.Dropout(0.5, inplace=True)
    assert "inplace=True" in repr(layer)


def test_nan_and_inf_propagate_like_torch(backend):
    """A dropped NaN stays NaN (NaN * 0), a dropped inf becomes NaN: the same as torch.nn.Dropout."""
    x = torch.tensor([float("nan"), float("inf"), 1.0] * 100)
    y = F.dropout(x, 0.5)
    reference = torch.nn.functional.dropout(x, 0.5)
    assert torch.isnan(y[0::3]).all() and torch.isnan(reference[0::3]).all()
    assert set(torch.isinf(y[1::3]).tolist()) | set(torch.isnan(y[1::3]).tolist()) == {True, False}


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_p_raises_value_error_like_torch(p):
    for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout):
        with pytest.raises(ValueError, match="between 0 and 1"):
            fn(torch.randn(2, 3, 4), p, True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        nd.Dropout(p)(torch.randn(3))  # torch's constructor lets NaN through; the forward does not


def test_wrong_rank_errors_are_value_and_runtime_errors():
    with pytest.raises(InputDimError, match="received a 4D input"):
        F.dropout1d(torch.randn(2, 3, 4, 5), 0.5)
    with pytest.raises(ValueError):
        nd.Dropout1d(0.5)(torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError):  # what torch.nn.Dropout1d raises
        nd.Dropout1d(0.5)(torch.randn(2, 3, 4, 5))
    with pytest.raises(InputDimError, match="at least 2 dimensions"):
        F.feature_alpha_dropout(torch.randn(5), 0.5, True)
    with pytest.warns(UserWarning, match="3D input"):
        F.dropout2d(torch.randn(2, 3, 4), 0.5)


@pytest.mark.parametrize(
    "layer_cls", [nd.Dropout, nd.Dropout1d, nd.Dropout2d, nd.Dropout3d, nd.AlphaDropout, nd.FeatureAlphaDropout]
)
def test_drop_in_for_torch(layer_cls):
    torch_cls = getattr(torch.nn, layer_cls.__name__)
    ours, theirs = layer_cls(0.25, inplace=False), torch_cls(0.25, inplace=False)
    assert isinstance(ours, torch_cls) and isinstance(ours, torch.nn.modules.dropout._DropoutNd)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
