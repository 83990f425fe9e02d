"""The C++ fast path (normdrop/nn/kernels/fastpath.py): taken where it should be, skipped where it must be, and
the same numbers (dropout: the same bits; batch norm: to rounding) as the Python path of the numba backend, its
oracle; torch.nn is the oracle of both, in test_batchnorm.py / test_dropout.py, which run every test with the fast
path on and off."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import normdrop.nn as nd
from normdrop.nn import functional as F
from normdrop.nn import kernels
from normdrop.nn.kernels import fastpath
from normdrop.nn.kernels.composite import SELU_SATURATION

BN_SHAPES = [(6, 5), (4, 3, 7), (2, 3, 4, 5), (2, 3, 2, 3, 4)]
BN_CLASSES = {2: nd.BatchNorm1d, 3: nd.BatchNorm1d, 4: nd.BatchNorm2d, 5: nd.BatchNorm3d}


@pytest.fixture
def numba_backend():
    kernels.set_backend("numba")
    yield
    kernels.set_backend(None)
    fastpath.set_enabled(None)


def node(y: torch.Tensor) -> str:
    """The autograd node that made ``y``: the fast path's are C++ nodes named after their struct."""
    return y.grad_fn.name() if y.grad_fn is not None else "none"


def is_fast(y: torch.Tensor) -> bool:
    return "BatchNormNode" in node(y) or "DropoutNode" in node(y)


def test_the_extension_builds_here():
    # make test builds it first; if this fails, every "numba+fastpath" test silently ran the Python path.
    assert fastpath.extension() is not None


def train_bn(fast: bool, shape, dtype, affine, track, momentum, steps=2):
    """A few training steps then one eval step of a fresh BN layer; everything the layer produced."""
    fastpath.set_enabled(fast)
    torch.manual_seed(0)
    bn = BN_CLASSES[len(shape)](shape[1], affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    out = {}
    for step in range(steps + 1):
        bn.train(step < steps)
        x = (torch.randn(shape, dtype=dtype) * 2 + 1).requires_grad_()
        y = bn(x)
        out[f"fast{step}"] = is_fast(y)
        (y * torch.randn_like(y)).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
        for name, tensor in bn.named_parameters():
            out[f"d{name}{step}"] = tensor.grad.clone()
            tensor.grad = None
    for name, tensor in bn.named_buffers():
        out[name] = tensor.clone()
    return out


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("affine", "track", "momentum"), [(True, True, 0.1), (False, True, None), (True, False, 0.1)])
def test_batch_norm_fast_path_matches_the_python_path(numba_backend, shape, dtype, affine, track, momentum):
    fast = train_bn(True, shape, dtype, affine, track, momentum)
    slow = train_bn(False, shape, dtype, affine, track, momentum)
    assert fast.keys() == slow.keys()
    assert all(fast[f"fast{s}"] for s in range(3)) and not any(slow[f"fast{s}"] for s in range(3))
    # The same loops, but not always the same bits: the kernel updates running statistics in float64 then rounds
    # where the Python path lerps in the buffer's dtype (an ulp; so may the eval step that uses them differ), and
    # the C entry points inline the kernels into another compiled function, where LLVM may reassociate the
    # per-channel sums differently (seen: float64 input gradients an ulp or two apart after a cold numba compile).
    ulps = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-14}
    for key, value in fast.items():
        if not key.startswith("fast"):
            torch.testing.assert_close(value, slow[key], **ulps, msg=key)


def test_batch_norm_fast_path_against_torch_nn_with_running_stats(numba_backend):
    """The oracle directly: a 64x128 BatchNorm1d (the lab's size) trained 3 steps, then eval."""
    fastpath.set_enabled(True)
    ours, theirs = nd.BatchNorm1d(128), torch.nn.BatchNorm1d(128)
    for step in range(4):
        ours.train(step < 3), theirs.train(step < 3)
        x = torch.randn(64, 128) * 3 - 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        assert is_fast(y1)
        g = torch.randn_like(y1)
        y1.backward(g), y2.backward(g)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
def test_batch_norm_fast_path_double_backward(numba_backend, training, shape):
    fastpath.set_enabled(True)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64)

    def f(x, weight, bias):
        return F.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, 0.1, 1e-5)

    assert is_fast(f(x, weight, bias))
    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


def test_batch_norm_fast_path_updates_running_stats_in_place_visibly(numba_backend):
    """The kernel writes the buffers: their version counters move as an in-place op's would (so autograd can
    detect a stale saved buffer), and num_batches_tracked and momentum=None (a cumulative average) still work."""
    fastpath.set_enabled(True)
    bn = nd.BatchNorm1d(4, momentum=None)
    before = bn.running_mean._version
    xs = [torch.randn(16, 4) * 2 + 3 for _ in range(3)]
    for x in xs:
        assert is_fast(bn(x.requires_grad_()))
    assert bn.running_mean._version > before and int(bn.num_batches_tracked) == 3
    stacked = torch.stack(xs)
    torch.testing.assert_close(bn.running_mean, stacked.mean(dim=1).mean(dim=0))
    torch.testing.assert_close(bn.running_var, stacked.var(dim=1).mean(dim=0))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda: torch.randn(7, 6).t(), id="transposed"),
        pytest.param(lambda: torch.randn(6, 7, dtype=torch.bfloat16), id="bfloat16"),
    ],
)
def test_fast_path_skips_what_its_kernels_do_not_take(numba_backend, make):
    fastpath.set_enabled(True)
    x = make().requires_grad_()
    bn = BN_CLASSES[x.ndim](x.shape[1]).to(x.dtype)
    assert not is_fast(bn(x))
    assert not is_fast(nd.Dropout(0.5)(x))
    reference = torch.nn.BatchNorm2d(x.shape[1]).to(x.dtype) if x.ndim == 4 else torch.nn.BatchNorm1d(x.shape[1])
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if x.dtype == torch.bfloat16 else {}
    torch.testing.assert_close(bn(x), reference.to(x.dtype)(x), **tolerance)


def test_running_stats_in_another_dtype_are_refused_as_torch_refuses_them(numba_backend):
    """They never reach the kernels (which would read float64 memory as float32): torch raises a RuntimeError."""
    fastpath.set_enabled(True)
    for module in (nd, torch.nn):
        bn = module.BatchNorm1d(5)
        bn.running_mean = bn.running_mean.double()
        with pytest.raises(RuntimeError):
            bn(torch.randn(8, 5, requires_grad=True))


def test_fast_path_off_by_switch_backend_and_thread_count(numba_backend, monkeypatch):
    x = torch.randn(32, 8, requires_grad=True)
    fastpath.set_enabled(False)
    assert not is_fast(nd.BatchNorm1d(8)(x))
    fastpath.set_enabled(None)
    monkeypatch.setenv(fastpath.FASTPATH_ENV, "0")
    fastpath._environment_enabled.cache_clear()
    try:
        assert not is_fast(nd.BatchNorm1d(8)(x))
    finally:
        monkeypatch.delenv(fastpath.FASTPATH_ENV)
        fastpath._environment_enabled.cache_clear()
    assert is_fast(nd.BatchNorm1d(8)(x))
    kernels.set_backend("composite")
    assert not is_fast(nd.BatchNorm1d(8)(x))
    kernels.set_backend("numba")
    # Large enough for the threaded kernels, with two threads: the parallel Python path, not the serial fast path.
    big = torch.randn(kernels._numba_module().PARALLEL_MIN_NUMEL // 256, 256, requires_grad=True)
    torch.set_num_threads(2)
    assert not is_fast(nd.BatchNorm1d(256)(big))
    torch.set_num_threads(1)
    assert is_fast(nd.BatchNorm1d(256)(big))
    huge = torch.randn(fastpath.MAX_NUMEL // 64, 64, requires_grad=True)
    assert not is_fast(nd.BatchNorm1d(64)(huge)) and not is_fast(nd.Dropout(0.5)(huge))


def test_fast_path_not_under_functorch_transforms(numba_backend):
    """Inside torch.func transforms the C++ nodes would see wrapped tensors: the fast path steps aside (normdrop's
    layers do not support torch.func yet either way: their Python autograd.Functions lack setup_context)."""
    fastpath.set_enabled(True)
    x = torch.randn(8, 3)
    seen = []

    def loss(w):
        seen.append(fastpath._usable(x))
        return (w * x).sum()

    assert fastpath._usable(x) is not None
    torch.func.grad(loss)(torch.ones(3))
    assert seen == [None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_fast_path_matches_the_python_path(numba_backend, dtype, p):
    outputs = {}
    x0 = torch.randn(33, 17, dtype=dtype)  # odd sizes: no vector-width assumptions
    g = torch.randn_like(x0)
    for fast in (True, False):
        fastpath.set_enabled(fast)
        x = x0.clone().requires_grad_()
        y = F.dropout(x, p, generator=torch.Generator().manual_seed(5))
        assert is_fast(y) == fast
        y.backward(g)
        outputs[fast] = (y.detach(), x.grad)
        kept = y != 0
        torch.testing.assert_close(x.grad, torch.where(kept, g / (1 - p), torch.zeros_like(g)))
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("make_layer", "shape", "mask_dims"),
    [
        (lambda: nd.Dropout1d(0.4), (6, 5, 7), 2),
        (lambda: nd.Dropout2d(0.4), (3, 5, 4, 4), 2),
        (lambda: nd.Dropout3d(0.4), (2, 3, 2, 3, 4), 2),
        (lambda: nd.Dropout3d(0.4), (3, 2, 3, 4), 1),  # unbatched: one mask value per index of dim 0
        (lambda: nd.DropPath(0.4), (7, 3, 5), 1),
        (lambda: nd.FeatureAlphaDropout(0.4), (3, 5, 4, 4), 2),
        (lambda: nd.AlphaDropout(0.4), (6, 7), 2),
    ],
)
def test_channel_and_sample_dropout_fast_path_matches_the_python_path(numba_backend, make_layer, shape, mask_dims):
    outputs = {}
    x0 = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    for fast in (True, False):
        fastpath.set_enabled(fast)
        x = x0.clone().requires_grad_()
        torch.manual_seed(9)
        y = make_layer()(x)
        assert is_fast(y) == fast
        y.backward(g)
        outputs[fast] = (y.detach(), x.grad)
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(a, b)
    y, dx = outputs[True]
    layer = make_layer()
    if isinstance(layer, torch.nn.AlphaDropout | torch.nn.FeatureAlphaDropout):
        # A dropped unit takes alpha dropout's constant a s' + b = -a * 1.758 * (1 - p); backward is a * mask.
        a = 1.0 / ((SELU_SATURATION**2 * 0.4 + 1.0) * 0.6) ** 0.5
        dropped_value = -a * SELU_SATURATION * 0.6
        kept = (y - dropped_value).abs() > 1e-12
        gain = a
    else:
        kept, gain = y != 0, 1 / 0.6
    # Whole units dropped: within each unit (the dims after the mask's), all dropped or all kept.
    units = kept.reshape(math.prod(shape[:mask_dims]), -1)
    assert bool((units.all(dim=1) | ~units.any(dim=1)).all()) and units.any() and not units.all()
    torch.testing.assert_close(dx, torch.where(kept, g * gain, torch.zeros_like(g)))


def test_dropout_fast_path_keeps_no_tensor_for_backward_and_double_backward(numba_backend):
    fastpath.set_enabled(True)
    x = torch.randn(64, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = nd.Dropout(0.3)(x)
    assert is_fast(y) and sum(t.numel() for t in saved) == 0
    x64 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def f(x):
        return F.dropout(x, 0.4, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(f, (x64,))
    assert torch.autograd.gradgradcheck(f, (x64,))


@pytest.mark.parametrize("alpha", [False, True])
def test_dropout_fast_path_p_next_to_one_drops_everything(numba_backend, alpha):
    """p so close to 1 that round(p * 2**32) = 2**32: no uint32 threshold drops every unit, so the constants of a
    kept unit are those of a dropped one, as on the Python path."""
    fastpath.set_enabled(True)
    x = torch.randn(50, 20, requires_grad=True)
    p = 1.0 - 1e-12
    y = (F.alpha_dropout if alpha else F.dropout)(x, p, training=True)
    assert is_fast(y)
    fastpath.set_enabled(False)
    assert torch.equal(y, (F.alpha_dropout if alpha else F.dropout)(x, p, training=True))
    assert len(torch.unique(y)) == 1


def test_dropout_fast_path_second_backward_raises_as_torch_does(numba_backend):
    """The node keeps no tensor of x's size, but an empty one that autograd frees after backward: a second backward
    without retain_graph raises instead of silently accumulating the gradient twice."""
    fastpath.set_enabled(True)
    y = nd.Dropout(0.5)(torch.randn(4, 4, requires_grad=True))
    assert is_fast(y)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()
    kept = nd.Dropout(0.5)(torch.randn(4, 4, requires_grad=True))
    kept.sum().backward(retain_graph=True)
    kept.sum().backward()  # allowed when the graph is retained


def test_dropout_fast_path_inplace_and_reproducible(numba_backend):
    fastpath.set_enabled(True)
    torch.manual_seed(7)
    a = nd.Dropout(0.5)(torch.ones(40, 10))
    torch.manual_seed(7)
    b = torch.ones(40, 10)
    nd.Dropout(0.5, inplace=True)(b)
    assert torch.equal(a, b) and 0.3 < (a == 0).float().mean() < 0.7


def test_a_corrupt_library_and_a_failed_build_warn_and_fall_back(tmp_path):
    """A library that does not import is reported and rebuilt; with no working compiler the rebuild fails with one
    RuntimeWarning naming the cause, and every call takes the Python path with results equal to tolerance."""
    script = """
import warnings, torch
import normdrop.nn as nd
from normdrop.nn import kernels
from normdrop.nn.kernels import fastpath
from normdrop.nn.kernels.composite import SELU_SATURATION
directory = fastpath.build_dir()
directory.mkdir(parents=True)
(directory / "normdrop_fastpath.so").write_bytes(b"not a shared library")
kernels.set_backend("numba")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    bn = nd.BatchNorm1d(8)
    x = torch.randn(16, 8, requires_grad=True)
    y = bn(x); y.sum().backward(); bn(x)
    nd.Dropout(0.5)(x)
messages = [str(w.message) for w in caught]
assert len(messages) == 2, messages
assert "does not import" in messages[0] and "could not be built" in messages[1], messages
assert "BatchNormNode" not in y.grad_fn.name()
torch.testing.assert_close(y, torch.nn.BatchNorm1d(8)(x))
assert not any(p.name.startswith("build-") for p in directory.iterdir()), "scratch build directory left behind"
print("fell back")
"""
    env = {**os.environ, fastpath.EXT_DIR_ENV: str(tmp_path), "CXX": "/bin/false", fastpath.FASTPATH_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fell back" in done.stdout


def test_prepare_builds_only_where_calls_may_use_it(monkeypatch):
    """Sweeps call prepare() before starting workers, so the library is compiled once, by the parent."""
    calls = []
    monkeypatch.setattr(fastpath, "extension", lambda: calls.append("built"))
    for enabled, backend, expected in [(True, "numba", 1), (False, "numba", 0), (True, "composite", 0)]:
        fastpath.set_enabled(enabled)
        kernels.set_backend(backend)
        try:
            fastpath.prepare()
        finally:
            fastpath.set_enabled(None)
            kernels.set_backend(None)
        assert len(calls) == expected
        calls.clear()


class _TorchFunctionSubclass(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensors_without_plain_memory_never_reach_the_kernels(backend):
    """Kernels read raw addresses: FakeTensors and wrapper subclasses (no storage: a read would crash the process),
    and lazily-zero gradients, take the composite path; subclasses come back as subclasses, as with torch.nn."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.two_tensor import TwoTensor

    with FakeTensorMode():
        y = F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True)
    assert type(y).__name__ == "FakeTensor" and y.shape == (4, 3)
    pair = TwoTensor(torch.randn(4, 3), torch.randn(4, 3))
    assert isinstance(F.batch_norm(pair, None, None, training=True), TwoTensor)
    assert isinstance(F.dropout(pair, 0.3), TwoTensor)
    plain = torch.randn(4, 3)
    subclass = plain.as_subclass(_TorchFunctionSubclass)
    assert isinstance(F.batch_norm(subclass, None, None, training=True), _TorchFunctionSubclass)
    assert isinstance(F.dropout(subclass, 0.3), _TorchFunctionSubclass)
    for fn in (lambda x: F.dropout(x, 0.5), lambda x: F.batch_norm(x, None, None, training=True)):
        x = torch.randn(4, 3, requires_grad=True)
        fn(x).backward(torch._efficientzerotensor((4, 3)))
        assert torch.equal(x.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("make_generator", [lambda: None, lambda: torch.Generator().manual_seed(21)])
def test_the_seed_drawn_in_cpp_is_draw_seeds(make_generator):
    """The C++ draw is rng.draw_seed's twin: the same seeds from the same generator state, and the same state after
    (the next torch draw agrees), so a layer's masks stay a function of torch's generator state."""
    from normdrop.nn import rng

    module = fastpath.extension()
    assert module is not None
    draws = {}
    for name, draw in (("python", rng.draw_seed), ("cpp", module.draw_seed)):
        torch.manual_seed(1234)
        generator = make_generator()
        seeds = [draw(generator) for _ in range(200)]
        draws[name] = (seeds, torch.rand(4, generator=generator))
    assert draws["python"][0] == draws["cpp"][0]
    assert torch.equal(draws["python"][1], draws["cpp"][1])
    assert len(set(draws["cpp"][0])) == 200 and all(0 <= s < rng.SEED_BOUND for s in draws["cpp"][0])
    for seed in [0, 1, 2**32 - 1, 2**32, rng.SEED_BOUND - 1, *draws["cpp"][0][:20]]:
        assert tuple(module.round_keys(seed)) == rng.round_keys(seed)


@pytest.mark.parametrize(
    "make", [lambda: torch.randn(9, 6), lambda: torch.randn(6, 9).t(), lambda: torch.randn(9, 6).half()]
)
def test_one_seed_draw_per_dropout_call_on_either_path(numba_backend, make):
    """The fast path draws its seed in C++ only when it runs; where it steps aside (a transposed input, a float16
    one) the Python path draws it: either way one draw per call, so later draws do not depend on the path."""
    from normdrop.nn import rng

    fastpath.set_enabled(True)
    x = make()
    torch.manual_seed(3)
    rng.draw_seed()
    expected = torch.rand(3)
    torch.manual_seed(3)
    F.dropout(x, 0.4)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(3)
    nd.Uout(0.2)(x.float())
    assert torch.equal(torch.rand(3), expected)


def test_a_replaced_draw_seed_still_sets_the_fast_paths_mask(numba_backend, monkeypatch):
    """Callers pin a mask's seed by replacing functional.draw_seed (the fleet's tests do): the fast path then takes
    that seed instead of drawing its own."""
    fastpath.set_enabled(True)
    monkeypatch.setattr(F, "draw_seed", lambda generator=None: 987654321)
    x = torch.randn(20, 30)
    y = F.dropout(x.requires_grad_(), 0.5)
    assert is_fast(y)
    fastpath.set_enabled(False)
    assert torch.equal(y, F.dropout(x, 0.5))
    monkeypatch.undo()  # the seed drawn as usual: another mask
    fastpath.set_enabled(True)
    assert not torch.equal(y, F.dropout(x, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(33, 17), (64, 32, 2, 2), (1,)])
def test_uout_fast_path_matches_the_python_path(numba_backend, dtype, shape):
    outputs = {}
    x0 = torch.randn(shape, dtype=dtype)
    g = torch.randn_like(x0)
    for fast in (True, False):
        fastpath.set_enabled(fast)
        x = x0.clone().requires_grad_()
        torch.manual_seed(4)
        y = nd.Uout(0.3)(x)
        assert ("UniformNoiseNode" in node(y)) == fast
        y.backward(g)
        outputs[fast] = (y.detach(), x.grad, torch.rand(2))
    for a, b in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(a, b)
    y, dx, _ = outputs[True]
    factor = y / x0
    assert bool(((factor - 1).abs() <= 0.3 + 1e-6).all()) and (x0.numel() == 1 or len(torch.unique(factor)) > 1)
    torch.testing.assert_close(dx, g * factor)


def test_uout_fast_path_double_backward_and_second_backward(numba_backend):
    fastpath.set_enabled(True)
    x64 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert "UniformNoiseNode" in node(_uout(x64))
    assert torch.autograd.gradcheck(_uout, (x64,))
    assert torch.autograd.gradgradcheck(_uout, (x64,))
    y = _uout(torch.randn(4, 4, requires_grad=True))
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def _uout(x: torch.Tensor) -> torch.Tensor:
    """Uout with the same noise on every call (its own freshly seeded generator)."""
    from normdrop.nn.dropout_variants import uout

    return uout(x, 0.4, generator=torch.Generator().manual_seed(8))
