"""The numba CPU kernels against the torch composite backend (their oracle): batch norm within float tolerance,
dropout masks and outputs bit for bit, on every layout the kernels take; plus ``supports`` and an end-to-end check
through ``normdrop.nn.functional``."""

from __future__ import annotations

import itertools
import math
import os
import sys

import pytest
import torch

pytest.importorskip("numba")

from normdrop.nn import functional as NF
from normdrop.nn import kernels, rng
from normdrop.nn.kernels import composite, numba_cpu
from normdrop.nn.kernels.numba_cpu import memory as numba_memory

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = [torch.float32, torch.float64]

# (shape, memory format): every layout the kernels take, and size-1 dims that make two layouts coincide.
LAYOUT_CASES = [
    ((16, 5), torch.contiguous_format),
    ((6, 5, 7), torch.contiguous_format),
    ((4, 3, 5, 6), torch.contiguous_format),
    ((4, 3, 5, 6), torch.channels_last),
    ((3, 4, 2, 3, 5), torch.contiguous_format),
    ((3, 4, 2, 3, 5), torch.channels_last_3d),
    ((5, 3, 1, 1), torch.channels_last),
    ((2, 1, 3, 4), torch.channels_last),
]
LAYOUT_IDS = [f"{'x'.join(map(str, shape))}-{str(fmt).split('.')[-1]}" for shape, fmt in LAYOUT_CASES]


@pytest.fixture(params=["serial", "parallel"])
def kernel_threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Run a test on the serial kernels (one thread) and on the parallel ones (two threads, no size threshold)."""
    if request.param == "parallel":
        monkeypatch.setattr(numba_memory, "PARALLEL_MIN_NUMEL", 0)  # the module _parallel reads it from
        torch.set_num_threads(2)  # the autouse fixture in conftest.py restores the thread count
    return request.param


@pytest.fixture
def numba_backend():
    kernels.set_backend("numba")
    yield
    kernels.set_backend(None)


def make_input(shape, memory_format, dtype, scale=2.0, shift=0.5) -> torch.Tensor:
    return (torch.randn(shape, dtype=dtype) * scale + shift).contiguous(memory_format=memory_format)


def channel_params(channels: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.linspace(0.5, 1.5, channels, dtype=dtype),
        "bias": torch.linspace(-0.3, 0.3, channels, dtype=dtype),
        "running_mean": torch.linspace(-1.0, 1.0, channels, dtype=dtype),
        "running_var": torch.linspace(0.5, 2.0, channels, dtype=dtype),
    }


def assert_same_memory_format(actual: torch.Tensor, expected: torch.Tensor) -> None:
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if (fmt is torch.channels_last and actual.ndim != 4) or (fmt is torch.channels_last_3d and actual.ndim != 5):
            continue
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt), fmt


# -------------------------------------------------------------------------------------------------- supports


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 4),
        lambda: torch.randn(3, 4, dtype=torch.float64),
        lambda: torch.randn(()),
        lambda: torch.randn(7),
        lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
        lambda: torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d),
        lambda: torch.randn(3, 4, requires_grad=True),
        lambda: torch.randn(0, 4),
    ],
)
def test_supports_cpu_float_dense_layouts(make):
    assert numba_cpu.supports(make())


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(3, 4, dtype=torch.bfloat16),
        lambda: torch.randn(3, 4, dtype=torch.float16),
        lambda: torch.arange(12).view(3, 4),
        lambda: torch.randn(4, 3).t(),
        lambda: torch.randn(3, 8)[:, ::2],
        lambda: torch.randn(1, 4).expand(3, 4),
        lambda: torch.randn(2, 3, 4).permute(0, 2, 1),
        lambda: torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)[:, :, :, :3],
        lambda: torch.randn(3, 4).to_sparse(),
        lambda: torch.randn(3, 4, device="meta"),
        lambda: torch._neg_view(torch.randn(3, 4)),
    ],
)
def test_supports_rejects_other_dtypes_layouts_devices(make):
    assert not numba_cpu.supports(make())


def test_unsupported_inputs_called_directly_go_to_composite():
    """Called without ``supports`` first, the kernels still never read memory they do not understand."""
    for x in (torch.randn(5, 4).t(), torch.randn(4, 5, dtype=torch.bfloat16)):
        for got, want in zip(
            numba_cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5),
            composite.batch_norm_forward(x, None, None, None, None, True, 1e-5),
            strict=True,
        ):
            assert torch.equal(got, want)
        assert torch.equal(
            numba_cpu.dropout_forward(x, 3, 0, 0.5, 2, False, True),
            composite.dropout_forward(x, 3, 0, 0.5, 2, False, True),
        )


def test_auto_backend_picks_numba_for_supported_cpu_tensors():
    kernels.set_backend(None)
    assert kernels.backend_for(torch.randn(3, 4)) is numba_cpu
    assert kernels.backend_for(torch.randn(4, 3).t()) is composite


# ------------------------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize(("shape", "memory_format"), LAYOUT_CASES, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_forward_matches_composite(kernel_threads, shape, memory_format, dtype, training, affine):
    x = make_input(shape, memory_format, dtype)
    params = channel_params(shape[1], dtype)
    weight, bias = (params["weight"], params["bias"]) if affine else (None, None)
    args = (weight, bias, params["running_mean"], params["running_var"], training, 1e-5)
    y, mean, var = numba_cpu.batch_norm_forward(x, *args)
    y_ref, mean_ref, var_ref = composite.batch_norm_forward(x, *args)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(mean, mean_ref, **TOL[dtype])
    torch.testing.assert_close(var, var_ref, **TOL[dtype])
    assert_same_memory_format(y, x)


@pytest.mark.parametrize(("shape", "memory_format"), LAYOUT_CASES, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("affine", "stat_grads"), [(True, True), (True, False), (False, True), (False, False)])
def test_batch_norm_backward_matches_composite(
    kernel_threads, shape, memory_format, dtype, training, affine, stat_grads
):
    x = make_input(shape, memory_format, dtype)
    channels = shape[1]
    params = channel_params(channels, dtype)
    weight = params["weight"] if affine else None
    if training:
        _, mean, var = composite.batch_norm_forward(x, weight, None, None, None, True, 1e-5)
    else:
        mean, var = params["running_mean"], params["running_var"]
    grad_out = torch.randn_like(x)
    grad_mean = torch.randn(channels, dtype=dtype) if stat_grads else None
    grad_var = torch.randn(channels, dtype=dtype) if stat_grads else None
    args = (grad_out, x, weight, mean, var, training, 1e-5, grad_mean, grad_var)
    grads = numba_cpu.batch_norm_backward(*args)
    grads_ref = composite.batch_norm_backward(*args)
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    assert_same_memory_format(grads[0], x)


@pytest.mark.parametrize(
    "make_grad",
    [
        lambda x: torch.randn(x.shape),  # contiguous while x is channels_last
        lambda x: torch.randn(()).expand(x.shape),  # what the backward of a sum() hands over
        lambda x: torch.randn(x.shape, dtype=torch.float64),  # another dtype
    ],
)
def test_batch_norm_backward_takes_grads_of_any_layout(make_grad):
    x = make_input((4, 3, 5, 6), torch.channels_last, torch.float32)
    grad_out = make_grad(x)
    _, mean, var = composite.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    grads = numba_cpu.batch_norm_backward(grad_out, x, None, mean, var, True, 1e-5)
    grads_ref = composite.batch_norm_backward(grad_out, x, None, mean, var, True, 1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_batch_norm_params_in_another_dtype():
    """float64 parameters on a float32 input: computed in float32, parameter grads returned in float64."""
    x = make_input((6, 4, 5), torch.contiguous_format, torch.float32)
    params = channel_params(4, torch.float64)
    args = (params["weight"], params["bias"], params["running_mean"], params["running_var"])
    for training in (True, False):
        for got, want in zip(
            numba_cpu.batch_norm_forward(x, *args, training, 1e-5),
            composite.batch_norm_forward(x, *args, training, 1e-5),
            strict=True,
        ):
            torch.testing.assert_close(got, want, **TOL[torch.float32])
    _, mean, var = composite.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    grad_out = torch.randn_like(x)
    grads = numba_cpu.batch_norm_backward(grad_out, x, params["weight"], mean, var, True, 1e-5)
    grads_ref = composite.batch_norm_backward(grad_out, x, params["weight"], mean, var, True, 1e-5)
    assert [g.dtype for g in grads] == [torch.float32, torch.float64, torch.float64]
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize(("shape", "memory_format"), LAYOUT_CASES[:4], ids=LAYOUT_IDS[:4])
def test_batch_norm_float32_statistics_survive_a_large_mean(shape, memory_format):
    """Statistics accumulate in float64 around a pivot: a mean 1e4 times the spread costs no accuracy."""
    x = make_input(shape, memory_format, torch.float32, scale=1.0, shift=1e4)
    y, mean, var = numba_cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    y_ref, mean_ref, var_ref = composite.batch_norm_forward(x.double(), None, None, None, None, True, 1e-5)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-7, atol=0.0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-3)


def test_batch_norm_reads_views_with_a_storage_offset():
    base = torch.randn(7, 4, 5, 6)
    x = base[2:]  # contiguous, but not at the start of its storage
    args = (None, None, None, None, True, 1e-5)
    for got, want in zip(numba_cpu.batch_norm_forward(x, *args), composite.batch_norm_forward(x, *args), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_kernels_allocate_on_cpu_whatever_the_default_device():
    """Under ``with torch.device(...)`` the kernels' own tensors must still be CPU tensors (they are read as raw CPU
    memory); "meta" stands for any other device here."""
    x = make_input((4, 3, 5), torch.contiguous_format, torch.float32)
    expected_bn = composite.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    expected_grads = composite.batch_norm_backward(x, x, None, *expected_bn[1:], True, 1e-5)
    expected_dropout = composite.dropout_forward(x, 9, 0, 0.3, 3, True, True)
    numba_cpu._dropout_constants.cache_clear()
    with torch.device("meta"):
        bn = numba_cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
        grads = numba_cpu.batch_norm_backward(x, x, None, *bn[1:], True, 1e-5)
        dropped = numba_cpu.dropout_forward(x, 9, 0, 0.3, 3, True, True)
    for got, want in zip((*bn, *grads, dropped), (*expected_bn, *expected_grads, expected_dropout), strict=True):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_batch_norm_nan_and_inf_propagate_as_in_composite():
    x = torch.randn(6, 3, 4)
    x[1, 1, 2] = float("nan")
    x[2, 2, 0] = float("inf")
    outputs = numba_cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    expected = composite.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    for got, want in zip(outputs, expected, strict=True):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    grad = torch.randn_like(x)
    grads = numba_cpu.batch_norm_backward(grad, x, None, expected[1], expected[2], True, 1e-5)
    for got, want in zip(grads, composite.batch_norm_backward(grad, x, None, *expected[1:], True, 1e-5), strict=True):
        assert torch.equal(got.isnan(), want.isnan())


def test_batch_norm_refuses_mis_sized_tensors():
    """The kernels read raw memory: a per-channel tensor or a gradient of the wrong size must not reach them."""
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="per-channel"):
        numba_cpu.batch_norm_forward(x, torch.ones(2), None, None, None, True, 1e-5)
    _, mean, var = numba_cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
    with pytest.raises(ValueError, match="gradient of shape"):
        numba_cpu.batch_norm_backward(torch.randn(4, 3), x, None, mean, var, True, 1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_empty_batch_as_composite(training):
    x = torch.randn(0, 3, 4)
    params = channel_params(3, torch.float32)
    args = (params["weight"], params["bias"], params["running_mean"], params["running_var"], training, 1e-5)
    for got, want in zip(numba_cpu.batch_norm_forward(x, *args), composite.batch_norm_forward(x, *args), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    mean, var = torch.zeros(3), torch.ones(3)
    grad_args = (torch.randn(0, 3, 4), x, params["weight"], mean, var, training, 1e-5)
    for got, want in zip(
        numba_cpu.batch_norm_backward(*grad_args), composite.batch_norm_backward(*grad_args), strict=True
    ):
        torch.testing.assert_close(got, want)


# -------------------------------------------------------------------------------------------------- dropout

DROPOUT_SHAPES = [
    ((), torch.contiguous_format),
    ((1000,), torch.contiguous_format),
    ((8, 6), torch.contiguous_format),
    ((4, 3, 50), torch.contiguous_format),
    ((4, 3, 5, 6), torch.contiguous_format),
    ((4, 3, 5, 6), torch.channels_last),
    ((2, 3, 4, 5, 6), torch.contiguous_format),
    ((2, 3, 4, 5, 6), torch.channels_last_3d),
]
DROPOUT_IDS = [f"{'x'.join(map(str, shape)) or 'scalar'}-{str(fmt).split('.')[-1]}" for shape, fmt in DROPOUT_SHAPES]
# (p, alpha, shift): standard dropout is always called with shift=True by the op and shift=False by its backward.
DROPOUT_FLAVOURS = [
    (0.1, False, True),
    (0.5, False, False),
    (0.9, False, True),
    (0.2, True, True),
    (0.5, True, True),
    (0.5, True, False),
]
SEEDS_OFFSETS = [(0, 0), (12345, 7), (2**62 - 1, 2**32 - 100), (987654321, 2**40 + 3)]


def mask_dims_for(ndim: int) -> list[int]:
    """Element-wise; channel dropout of a batched (N, C, *) input; feature dropout of an unbatched (C, *) one."""
    return sorted({ndim, min(2, ndim), min(1, ndim)})


@pytest.mark.parametrize(("shape", "memory_format"), DROPOUT_SHAPES, ids=DROPOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("p", "alpha", "shift"), DROPOUT_FLAVOURS)
def test_dropout_bit_identical_to_composite(kernel_threads, shape, memory_format, dtype, p, alpha, shift):
    x = make_input(shape, memory_format, dtype)
    for (seed, offset), mask_dims in itertools.product(SEEDS_OFFSETS, mask_dims_for(x.ndim)):
        y = numba_cpu.dropout_forward(x, seed, offset, p, mask_dims, alpha, shift)
        y_ref = composite.dropout_forward(x, seed, offset, p, mask_dims, alpha, shift)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
        assert torch.equal(y, y_ref), f"seed={seed} offset={offset} mask_dims={mask_dims}"
        assert_same_memory_format(y, x)


@pytest.mark.parametrize(("shape", "memory_format"), DROPOUT_SHAPES[1:], ids=DROPOUT_IDS[1:])
def test_dropout_masks_bit_identical(kernel_threads, shape, memory_format):
    """On a tensor of ones the output *is* the mask (times 1 / (1 - p)): compare it with composite's keep_mask."""
    x = torch.ones(shape).contiguous(memory_format=memory_format)
    for mask_dims in mask_dims_for(x.ndim):
        keep = numba_cpu.dropout_forward(x, 31337, 5, 0.5, mask_dims, False, True) != 0
        keep_ref = composite.keep_mask(composite.mask_shape(x, mask_dims), 31337, 5, 0.5, x.device)
        assert torch.equal(keep, keep_ref.expand(shape))


@pytest.mark.parametrize("p", [1e-12, 1.0 - 1e-12])
def test_dropout_thresholds_at_the_ends(p):
    """p so small that nothing is dropped (threshold 0), or so close to 1 that everything is (threshold 2**32)."""
    x = torch.randn(4, 3, 10)
    for mask_dims, alpha in itertools.product((3, 2), (False, True)):
        y = numba_cpu.dropout_forward(x, 3, 0, p, mask_dims, alpha, True)
        assert torch.equal(y, composite.dropout_forward(x, 3, 0, p, mask_dims, alpha, True))


def test_dropout_unusual_mask_dims_on_channels_last_falls_back():
    x = make_input((2, 3, 4, 5), torch.channels_last, torch.float32)
    for mask_dims in (0, 3):
        y = numba_cpu.dropout_forward(x, 1, 0, 0.5, mask_dims, False, True)
        assert torch.equal(y, composite.dropout_forward(x, 1, 0, 0.5, mask_dims, False, True))


def test_dropout_large_tensor_parallel_blocks(kernel_threads):
    """Several parallel blocks, and a counter range that crosses a multiple of 2**32 inside the tensor."""
    x = torch.randn(3 * numba_cpu.PARALLEL_BLOCK + 17)
    offset = 2**32 - numba_cpu.PARALLEL_BLOCK
    for alpha in (False, True):
        y = numba_cpu.dropout_forward(x, 42, offset, 0.3, 1, alpha, True)
        assert torch.equal(y, composite.dropout_forward(x, 42, offset, 0.3, 1, alpha, True))


@pytest.mark.parametrize("unit_size", [1, 2, 3, 4, 7, 64])
def test_unit_dropout_over_several_hash_blocks_and_the_high_word(unit_size):
    """Unit (channel / sample) masks are hashed UNIT_BLOCK units at a time: blocks that end inside the tensor and
    counters that cross a multiple of 2**32 inside a block give composite's bits."""
    from normdrop.nn.kernels.numba_cpu.dropout import UNIT_BLOCK

    units = 2 * UNIT_BLOCK + 37
    x = torch.randn(units, unit_size, dtype=torch.float64)
    for offset, (p, alpha, shift) in itertools.product((0, 2**32 - UNIT_BLOCK - 5, 2**40 - 3), DROPOUT_FLAVOURS):
        y = numba_cpu.dropout_forward(x, 77, offset, p, 1, alpha, shift)
        assert torch.equal(y, composite.dropout_forward(x, 77, offset, p, 1, alpha, shift)), (offset, p, alpha)


@pytest.mark.parametrize(("count", "offset"), [(1, 0), (1000, 7), (3 * 2**14 + 17, 2**32 - 2**14), (5, 2**61)])
def test_uniform_bit_identical_to_composite(kernel_threads, count, offset):
    """The variants' random fields: same float64 values as composite, strictly inside (0, 1), also across a
    multiple of 2**32 and at large offsets."""
    u = numba_cpu.uniform(12345, offset, count, torch.device("cpu"))
    assert u.dtype == torch.float64 and u.shape == (count,)
    assert torch.equal(u, composite.uniform(12345, offset, count, torch.device("cpu")))
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert u[0] == (rng.counter_bits(12345, offset) + 0.5) / 2**32


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs a plain fork()")
def test_forked_child_of_a_parallel_parent_still_computes(monkeypatch):
    """After the parent has run a parallel kernel, a forked child must not restart OpenMP's pool (numba would
    terminate it): it takes the serial kernels and gets the same result."""
    monkeypatch.setattr(numba_memory, "PARALLEL_MIN_NUMEL", 0)  # the module _parallel reads it from
    torch.set_num_threads(2)
    x = torch.randn(8, 3, 16)
    expected = numba_cpu.dropout_forward(x, 5, 0, 0.5, 3, False, True)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 iff the kernels ran and agreed, and never back into pytest
        status = 1
        try:
            numba_cpu.batch_norm_forward(x, None, None, None, None, True, 1e-5)
            status = 0 if torch.equal(numba_cpu.dropout_forward(x, 5, 0, 0.5, 3, False, True), expected) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


# ------------------------------------------------------------------------------------------ end to end


def run_batch_norm(backend: str, x: torch.Tensor, training: bool) -> list[torch.Tensor]:
    kernels.set_backend(backend)
    params = channel_params(x.shape[1], x.dtype)
    weight = params["weight"].requires_grad_()
    bias = params["bias"].requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = NF.batch_norm(x, params["running_mean"], params["running_var"], weight, bias, training, 0.1, 1e-5)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
    return [y, x.grad, weight.grad, bias.grad, params["running_mean"], params["running_var"]]


@pytest.mark.parametrize(("shape", "memory_format"), [LAYOUT_CASES[0], LAYOUT_CASES[3]], ids=["2d", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_numba_vs_composite(numba_backend, shape, memory_format, dtype, training):
    x = make_input(shape, memory_format, dtype)
    kernels.set_backend("numba")
    assert kernels.backend_for(x) is numba_cpu
    ours = run_batch_norm("numba", x, training)
    reference = run_batch_norm("composite", x, training)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want, **TOL[dtype])


DROPOUT_FUNCTIONS = [
    (NF.dropout, (4, 3, 5, 6)),
    (NF.dropout1d, (4, 3, 7)),
    (NF.dropout2d, (4, 3, 5, 6)),
    (NF.dropout3d, (2, 3, 4, 5, 6)),
    (NF.dropout3d, (3, 4, 5, 6)),  # unbatched: the mask covers dim 0 only
    (NF.alpha_dropout, (4, 3, 5, 6)),
    (NF.feature_alpha_dropout, (4, 3, 5, 6)),
]


def run_dropout(backend: str, fn, x: torch.Tensor) -> list[torch.Tensor]:
    kernels.set_backend(backend)
    torch.manual_seed(7)
    x = x.detach().clone().requires_grad_()
    y = fn(x, 0.3, True)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
    return [y, x.grad]


@pytest.mark.parametrize(
    ("fn", "shape"), DROPOUT_FUNCTIONS, ids=[f"{f.__name__}-{len(s)}d" for f, s in DROPOUT_FUNCTIONS]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_functional_dropout_numba_vs_composite(numba_backend, fn, shape, channels_last):
    x = make_input(shape, torch.contiguous_format, torch.float32)
    if channels_last and x.ndim in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    ours = run_dropout("numba", fn, x)
    reference = run_dropout("composite", fn, x)
    for got, want in zip(ours, reference, strict=True):
        assert torch.equal(got, want)


def test_parallel_kernels_give_up_the_cores_other_processes_use(monkeypatch):
    """Under contention the parallel kernels run on the free cores only (one thread when none is free), and the
    results do not change: batch norm's blocks follow the thread count asked for, not the threads that run."""
    import numba

    from normdrop.nn.kernels.numba_cpu.memory import parallel_blocks

    monkeypatch.setattr(numba_memory, "PARALLEL_MIN_NUMEL", 0)
    torch.set_num_threads(2)
    x = make_input((64, 6, 5, 7), torch.contiguous_format, torch.float32)
    grad_out = torch.randn_like(x)
    weight = torch.linspace(0.5, 1.5, 6)
    runs, threads = [], []
    for free in (2, 1, 0):
        monkeypatch.setattr(numba_memory, "free_cores", lambda free=free: free)
        y, mean, var = numba_cpu.batch_norm_forward(x, weight, None, None, None, True, 1e-5)
        threads.append(numba.get_num_threads())
        runs.append((y, mean, var, *numba_cpu.batch_norm_backward(grad_out, x, weight, mean, var, True, 1e-5)))
    assert threads == [2, 1, 1] and parallel_blocks(64 * 6) == 2 and parallel_blocks(0) == 1
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0], strict=True))
    reference = composite.batch_norm_forward(x, weight, None, None, None, True, 1e-5)
    for got, want in zip(runs[0][:3], reference, strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_free_cores_counts_a_busy_process_on_this_process_cores():
    """A busy-loop child pinned to one of this process's cores takes that core off :func:`free_cores`."""
    import multiprocessing
    import time

    cores = sorted(os.sched_getaffinity(0))
    numba_memory._contention["checked"] = -math.inf
    child = multiprocessing.get_context("spawn").Process(target=_spin, args=(cores[-1],), daemon=True)
    child.start()
    try:
        time.sleep(1.0)  # the child is spinning
        numba_memory.free_cores()  # a first sample
        time.sleep(2 * numba_memory.CONTENTION_WINDOW)
        assert numba_memory.free_cores() <= len(cores) - 1
    finally:
        child.terminate()
        child.join()
        numba_memory._contention["checked"] = -math.inf


def _spin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass
