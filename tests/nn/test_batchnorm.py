"""normdrop's BatchNorm layers against torch.nn's (the oracle): forward, gradients, running statistics."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import normdrop.nn as nd

RANK_CASES = [  # (normdrop class, torch class, input shape)
    (nd.BatchNorm1d, torch.nn.BatchNorm1d, (8, 3)),
    (nd.BatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 5)),
    (nd.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 5, 6)),
    (nd.BatchNorm3d, torch.nn.BatchNorm3d, (3, 3, 2, 4, 5)),
]
CONFIGS = list(itertools.product([True, False], [True, False], [0.1, None]))  # affine, track, momentum
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def make_pair(nd_cls, torch_cls, channels, dtype, **kwargs):
    """The same layer twice, with equal random affine parameters and running statistics."""
    ours = nd_cls(channels, **kwargs).to(dtype)
    theirs = torch_cls(channels, **kwargs).to(dtype)
    with torch.no_grad():
        for module in (ours, theirs):
            if module.affine:
                module.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=dtype))
                module.bias.copy_(torch.linspace(-0.3, 0.3, channels, dtype=dtype))
            if module.track_running_stats:
                module.running_mean.copy_(torch.linspace(-1, 1, channels, dtype=dtype))
                module.running_var.copy_(torch.linspace(0.5, 2, channels, dtype=dtype))
    return ours, theirs


def assert_same_state(ours, theirs, tol) -> None:
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("nd_cls", "torch_cls", "shape"), RANK_CASES)
@pytest.mark.parametrize(("affine", "track", "momentum"), CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_over_training_then_eval(backend, nd_cls, torch_cls, shape, affine, track, momentum, dtype):
    ours, theirs = make_pair(
        nd_cls, torch_cls, shape[1], dtype, affine=affine, track_running_stats=track, momentum=momentum
    )
    tol = TOL[dtype]
    for step in range(3):  # several steps: running stats, num_batches_tracked and the cumulative average
        x = (torch.randn(shape, dtype=dtype) * (step + 1) + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), theirs(x_ref)
        torch.testing.assert_close(y, y_ref, **tol)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **tol)
        assert_same_state(ours, theirs, tol)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x_ref)
    torch.testing.assert_close(y, y_ref, **tol)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    assert_same_state(ours, theirs, tol)


def test_num_batches_tracked_counts_training_calls_only(backend):
    layer = nd.BatchNorm1d(4)
    for _ in range(3):
        layer(torch.randn(5, 4))
    layer.eval()
    layer(torch.randn(5, 4))
    assert layer.num_batches_tracked.item() == 3


def test_normalized_output_has_zero_mean_unit_variance_per_channel(backend):
    layer = nd.BatchNorm2d(3, affine=False)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1, 1) + 7
    y = layer.double()(x)
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    # var(y) = var / (var + eps): exactly 1 only up to eps.
    expected = x.var(dim=(0, 2, 3), unbiased=False) / (x.var(dim=(0, 2, 3), unbiased=False) + layer.eps)
    torch.testing.assert_close(var, expected, atol=1e-10, rtol=0)


def test_running_var_is_unbiased_and_normalization_biased(backend):
    layer = nd.BatchNorm1d(2, momentum=1.0).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    layer(x)
    torch.testing.assert_close(layer.running_var, x.var(dim=0, unbiased=True))
    torch.testing.assert_close(layer.running_mean, x.mean(dim=0))


@pytest.mark.parametrize("memory_format", [torch.channels_last])
def test_channels_last_is_kept_and_matches(backend, memory_format):
    ours, theirs = make_pair(nd.BatchNorm2d, torch.nn.BatchNorm2d, 3, torch.float32)
    x = torch.randn(4, 3, 5, 6).to(memory_format=memory_format).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x_ref)
    assert y.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])


def test_channels_last_3d(backend):
    ours, theirs = make_pair(nd.BatchNorm3d, torch.nn.BatchNorm3d, 3, torch.float32)
    x = torch.randn(2, 3, 2, 3, 4).to(memory_format=torch.channels_last_3d)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, theirs(x), **TOL[torch.float32])


def test_bfloat16_matches_torch(backend):
    ours, theirs = make_pair(nd.BatchNorm2d, torch.nn.BatchNorm2d, 3, torch.float32)
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    y, y_ref = ours(x), theirs(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)


def test_bfloat16_gradients_at_least_as_accurate_as_torch(backend):
    """In bfloat16 torch's own backward is coarse; both are judged against a float64 computation on the same
    bfloat16 inputs, and ours must be no worse than torch's (plus a bfloat16 rounding step)."""
    x = torch.randn(16, 4).to(torch.bfloat16)
    grad_y = torch.randn(16, 4).to(torch.bfloat16)
    input_grads = {}
    for name, cls, dtype in [
        ("ours", nd.BatchNorm1d, torch.bfloat16),
        ("torch", torch.nn.BatchNorm1d, torch.bfloat16),
        ("exact", torch.nn.BatchNorm1d, torch.float64),
    ]:
        layer, _ = make_pair(cls, cls, 4, dtype)
        xi = x.to(dtype).detach().requires_grad_()
        layer(xi).backward(grad_y.to(dtype))
        assert xi.grad.dtype == dtype
        input_grads[name] = xi.grad.double()
    error_ours = (input_grads["ours"] - input_grads["exact"]).abs().max().item()
    error_torch = (input_grads["torch"] - input_grads["exact"]).abs().max().item()
    assert error_ours <= error_torch + 1e-2 * input_grads["exact"].abs().max().item()


def test_zero_size_batch_like_torch(backend):
    ours, theirs = make_pair(nd.BatchNorm1d, torch.nn.BatchNorm1d, 3, torch.float32)
    x = torch.randn(0, 3, requires_grad=True)
    y, y_ref = ours(x), theirs(x)
    assert y.shape == y_ref.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3)
    assert_same_state(ours, theirs, TOL[torch.float32])  # running stats untouched, counter advanced, as torch


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(backend, training, affine):
    layer = nd.BatchNorm2d(3, affine=affine).double()
    layer.train(training)
    if not training:
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]
    for p in params:
        p.data.uniform_(0.5, 1.5)

    def fn(x, *params):
        return torch.func.functional_call(layer, dict(zip(("weight", "bias"), params, strict=False)), (x,))

    # running stats move on every training call: check against a frozen copy of them.
    layer.momentum = 0.0
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_gradcheck_without_running_stats(backend):
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return nd.functional.batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize(("nd_cls", "torch_cls", "shape"), RANK_CASES)
def test_state_dict_round_trips_with_torch(nd_cls, torch_cls, shape):
    ours, theirs = make_pair(nd_cls, torch_cls, shape[1], torch.float32)
    ours(torch.randn(shape))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "num_batches_tracked" in ours.state_dict()
    fresh_torch = torch_cls(shape[1])
    fresh_torch.load_state_dict(ours.state_dict())
    assert_same_state(fresh_torch, ours, TOL[torch.float32])
    fresh_ours = nd_cls(shape[1])
    fresh_ours.load_state_dict(fresh_torch.state_dict())
    assert_same_state(fresh_ours, fresh_torch, TOL[torch.float32])
    assert repr(ours) == repr(theirs)


def test_isinstance_and_torch_tools_work():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), nd.BatchNorm2d(3))
    assert isinstance(model[1], torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(model[1], torch.nn.BatchNorm2d)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)

    # update_bn recomputes running statistics with a cumulative average over a loader.
    loader = [torch.randn(8, 2, 6, 6) for _ in range(4)]
    torch.optim.swa_utils.update_bn(loader, model)
    with torch.no_grad():
        features = torch.cat([model[0](x) for x in loader])
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)

    model.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_errors_match_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nd.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        nd.BatchNorm1d(3)(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="expected 4D input"):
        nd.BatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"eps must be positive during training, but got 0\.0"):
        nd.BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))
    layer = nd.BatchNorm1d(3, eps=-1.0).eval()
    with pytest.raises(ValueError, match=r"non-negative, but got -1\.0"):
        layer(torch.randn(4, 3))
    for error in (ValueError, RuntimeError):  # torch raises a RuntimeError, normdrop used to raise a ValueError
        with pytest.raises(error, match=r"weight should contain 3 elements .* not 2"):
            nd.functional.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), None, training=True)
        with pytest.raises(error, match="running_mean and running_var"):
            nd.functional.batch_norm(torch.randn(4, 3), None, None, training=False)


class _Doubled(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrized_weight_and_swapped_buffers_are_used(backend):
    """The forward reads its tensors from the parameter/buffer dicts for speed; a parametrization (which moves
    ``weight`` out of that dict) and torch.func.functional_call (which swaps tensors in) still take effect."""
    from torch.nn.utils import parametrize

    x = torch.randn(16, 4) * 2 + 1
    ours, theirs = nd.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    for layer in (ours, theirs):
        parametrize.register_parametrization(layer, "weight", _Doubled())
    torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    state = {"running_mean": torch.full((4,), 3.0), "running_var": torch.full((4,), 4.0)}
    torch.testing.assert_close(
        torch.func.functional_call(ours, state, (x,)), torch.func.functional_call(theirs, state, (x,))
    )
    expected = (x - 3.0) / torch.sqrt(torch.tensor(4.0 + ours.eps)) * ours.weight + ours.bias
    torch.testing.assert_close(torch.func.functional_call(ours, state, (x,)), expected)


def test_running_mean_without_running_var_is_refused(backend):
    """Half of the running statistics is an error, as in torch (the fast path once wrote through a null pointer)."""
    with pytest.raises(ValueError, match="running_mean and running_var must either both be None"):
        nd.functional.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var must either both be None"):
        nd.functional.batch_norm(torch.randn(4, 3), None, torch.ones(3), training=True)


def test_checkpointed_layer_updates_running_stats_as_torch_does(backend):
    """Non-reentrant checkpointing reruns the forward in backward and stops once the saved tensors exist: torch's
    running statistics are updated in both passes, and so must ours be (the update happens inside the op)."""
    from torch.utils.checkpoint import checkpoint

    ours, theirs = nd.BatchNorm1d(6), torch.nn.BatchNorm1d(6)
    x = torch.randn(8, 6) * 2 + 1
    for layer in (ours, theirs):
        checkpoint(layer, x.clone().requires_grad_(), use_reentrant=False).sum().backward()
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_jit_trace_records_the_layer(backend):
    """torch.jit.trace cannot see a kernel called through a pointer: while tracing, the registered custom op runs,
    so the traced module computes what the eager one does on new inputs."""
    import warnings

    model = torch.nn.Sequential(torch.nn.Linear(5, 3), nd.BatchNorm1d(3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation warning
        traced = torch.jit.trace(model, x)
    assert "normdrop::batch_norm" in str(traced.inlined_graph)
    fresh = torch.randn(6, 5) * 3
    torch.testing.assert_close(traced(fresh), model(fresh))
