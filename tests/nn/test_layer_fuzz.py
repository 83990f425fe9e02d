"""Differential fuzz of normdrop's layers against torch.nn (issue 12), on every kernel path.

The contract: where torch.nn raises, normdrop raises an exception of the same type (``isinstance`` of torch's; the
message may say more); where torch.nn returns, normdrop returns the same thing: the same shape and dtype, the same
NaN and inf positions as torch in the same dtype, and finite values within a rounding-error bound of torch.nn run
in float64 on the same values (the oracle); the same for the gradients (input, weight, bias), the running
statistics and ``num_batches_tracked``. Each drawn case runs on composite, numba and numba + the C++ fast path.

Families and their oracles:
- batch norm (BatchNorm1d/2d/3d): torch.nn's layer of the same class, any shape (empty ones too), dtype, layout
  (contiguous, channels_last, strided, expanded), eps, momentum, affine/track flags, train or eval, 1-3 steps.
- ghost batch norm: torch.nn.BatchNorm applied to each ghost batch in turn (the documented split: full ghost
  batches, then the remainder, which joins the ghost before it when it is one value per channel).
- dropout (Dropout, AlphaDropout, Dropout1d/2d/3d, FeatureAlphaDropout): torch.nn's layer for errors, the identity
  cases (eval, p = 0, empty) and p = 1 (exactly equal, aliasing included); for 0 < p < 1 masks are random, so
  normdrop's own mask (read back from the same generator on an input of ones) must have torch's structure (constant
  over the dims torch broadcasts its noise over) and the output and gradient must be torch's formula with that mask.

The rounding bound (per channel c, n values per channel, u the unit roundoff of the compute dtype, float32 for
half inputs): with sigma = sqrt(var + eps) of the statistics used and A = (max|x_c| + |center_c|) / sigma,
  y:            K u (|gamma| A + |y - beta| A^2 + |beta|) + eps_out |y|
  grad_x:       K u (|gamma| / sigma max|g_c| (1 + A)^2 + |grad_x| A^2) + eps_out |grad_x|
  grad_weight:  K u sum|g_c| (1 + A)^2,   grad_bias: K u sum|g_c|
  running mean: K u |m| max|x_c| + lerp rounding;  running var: K u |m| n / (n - 1) (max|x_c| + |mean|)^2 + lerp
with K = 4 (n + 8) (a sum of n terms loses at most n ulps of its largest term): first-order error propagation of
``x - mean`` and ``var`` computed to that accuracy. A constant channel normalizes to exactly beta (zero variance;
torch.nn itself does not: -0.28 for ``torch.full((8, 1), 10000.123)``), checked exactly.

``NORMDROP_FUZZ_EXAMPLES`` sets the examples per family (default below); runs are derandomized (the same examples
every run) and leave no hypothesis database behind.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normdrop.nn as nd
from tests.conftest import available_backends, use_path

DEFAULT_EXAMPLES = {"batch_norm": 800, "ghost": 300, "dropout": 1200}
PATHS = available_backends()


def examples(family: str) -> int:
    """Examples for a family: ``$NORMDROP_FUZZ_EXAMPLES`` if set, else the family's default."""
    value = os.environ.get("NORMDROP_FUZZ_EXAMPLES")
    return int(value) if value else DEFAULT_EXAMPLES[family]


def fuzz_settings(family: str) -> settings:
    return settings(
        max_examples=examples(family),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
OTHER_DTYPES = (torch.int64, torch.bool, torch.complex64)


# ------------------------------------------------------------------------------------------------ outcomes


@dataclass
class Outcome:
    """What one call did: the returned tensors (by name) or the exception it raised."""

    values: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


def run(fn: Callable[[], dict[str, Any]]) -> Outcome:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Outcome(values=fn())
    except Exception as error:
        return Outcome(error=error)


def assert_same_failure(ours: Outcome, theirs: Outcome, label: str) -> bool:
    """True when both raised (of the same type); fails when only one raised; False when both returned."""
    if theirs.error is not None:
        assert ours.error is not None, f"{label}: torch raised {theirs.error!r}, normdrop returned"
        assert isinstance(ours.error, type(theirs.error)), (
            f"{label}: torch raised {type(theirs.error).__name__} ({theirs.error}), "
            f"normdrop {type(ours.error).__name__} ({ours.error})"
        )
        assert str(ours.error), f"{label}: {type(ours.error).__name__} without a message"
        return True
    if ours.error is not None:
        raise AssertionError(f"{label}: torch returned, normdrop raised {ours.error!r}") from ours.error
    return False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(compute_dtype(dtype)).eps / 2


def assert_close_to_reference(
    name: str, ours: torch.Tensor | None, theirs: torch.Tensor | None, reference: torch.Tensor | None, bound
) -> None:
    """Same presence, shape and dtype as torch's; torch's NaN/inf where torch has them; elsewhere finite and within
    ``bound`` (a float64 tensor broadcastable to the value, or a callable of the reference) of the float64 one."""
    assert (ours is None) == (theirs is None), f"{name}: normdrop {ours is not None}, torch {theirs is not None}"
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs torch {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} vs torch {theirs.dtype}"
    if not ours.is_floating_point():
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=name)
        return
    a, t = ours.detach().double(), theirs.detach().double()
    special = ~t.isfinite()
    assert torch.equal(a.isnan(), t.isnan()), f"{name}: NaN at {a.isnan().nonzero().tolist()} vs torch's"
    assert torch.equal(a[special & ~t.isnan()], t[special & ~t.isnan()]), f"{name}: infinities differ from torch's"
    finite = ~special
    assert a[finite].isfinite().all(), f"{name}: non-finite where torch is finite"
    if reference is None:
        torch.testing.assert_close(a, t, equal_nan=True, rtol=0, atol=0, msg=name)
        return
    r = reference.detach().double()
    tolerance = bound(r) if callable(bound) else bound
    tolerance = torch.broadcast_to(torch.as_tensor(tolerance, dtype=torch.float64), r.shape)
    error = (a - r).abs()
    bad = finite & r.isfinite() & ~(error <= tolerance)
    assert not bad.any(), (
        f"{name}: off by {error[bad].max().item():.3g} where the bound is {tolerance[bad].min().item():.3g} "
        f"(normdrop {a[bad][:4].tolist()}, float64 torch {r[bad][:4].tolist()}, torch {t[bad][:4].tolist()})"
    )


# ---------------------------------------------------------------------------------------------- batch norm

BN_RANKS = {"BatchNorm1d": (2, 3), "BatchNorm2d": (4,), "BatchNorm3d": (5,)}


@st.composite
def values(draw, shape: tuple[int, ...], dtype: torch.dtype, layout: str, plain: bool = False) -> torch.Tensor:
    """An input of ``shape``: per channel a scale and an offset (constant channels, large means next to small
    spreads), rarely a NaN or an infinity; in ``layout``: contiguous, channels_last, strided (every other
    element of a larger tensor) or expanded (stride 0 over the batch, so every sample is the same)."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base_shape = list(shape)
    if layout == "expanded" and base_shape:
        base_shape[0] = 1
    if layout == "strided" and base_shape:
        base_shape[-1] *= 2
    x = torch.randn(base_shape, generator=generator, dtype=torch.float64)
    if x.ndim >= 2 and x.shape[1] > 0 and not plain:
        channels = x.shape[1]
        scale = torch.tensor(
            [draw(st.sampled_from([1.0, 1.0, 0.0, 1e-3, 1e3, 3.0])) for _ in range(min(channels, 8))]
            + [1.0] * max(channels - 8, 0),
            dtype=torch.float64,
        )
        offset = torch.tensor(
            [draw(st.sampled_from([0.0, 0.0, 1.0, -100.0, 1e4, 10000.123])) for _ in range(min(channels, 8))]
            + [0.0] * max(channels - 8, 0),
            dtype=torch.float64,
        )
        view = (1, -1) + (1,) * (x.ndim - 2)
        x = x * scale.view(view) + offset.view(view)
    if x.numel() > 0 and not plain and draw(st.integers(0, 9)) == 0:
        special = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        if x.ndim >= 2 and draw(st.booleans()):  # a channel's first value: the kernels' pivot
            x[(0, draw(st.integers(0, x.shape[1] - 1))) + (0,) * (x.ndim - 2)] = special
        else:
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    if dtype.is_floating_point or dtype.is_complex:
        x = x.to(dtype)
    else:
        x = x.clamp(-1e6, 1e6).nan_to_num(0.0).round().to(dtype)
    if layout == "expanded" and x.ndim:
        x = x.expand(shape)
    elif layout == "strided" and x.ndim:
        x = x[..., ::2]
    elif layout == "channels_last" and x.ndim in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    return x


@dataclass
class BatchNormCase:
    cls_name: str
    num_features: int
    kwargs: dict[str, Any]
    module_dtype: torch.dtype
    training: bool
    inputs: list[torch.Tensor]
    grad_kind: str
    ghost_batch_size: int | None = None


@st.composite
def shapes(draw, ndim: int) -> tuple[int, ...]:
    return tuple(draw(st.lists(st.sampled_from([0, 1, 2, 2, 3, 3, 4, 5]), min_size=ndim, max_size=ndim)))


@st.composite
def batch_norm_cases(draw, ghost: bool = False) -> BatchNormCase:
    cls_name = draw(st.sampled_from(["BatchNorm1d", "BatchNorm2d"] if ghost else list(BN_RANKS)))
    ranks = BN_RANKS[cls_name]
    ndim = draw(st.sampled_from(ranks)) if draw(st.integers(0, 19)) else draw(st.integers(0, 6))
    shape = draw(shapes(ndim))
    if ghost and ndim >= 1:
        shape = (draw(st.integers(0, 11)), *shape[1:])
    channels = shape[1] if ndim >= 2 else 3
    num_features = max(channels, 1)
    if draw(st.integers(0, 14)) == 0:
        num_features = draw(st.sampled_from([channels + 1, max(channels - 1, 1), 0]))
    dtype_choice = draw(st.integers(0, 19))
    input_dtype = draw(st.sampled_from(OTHER_DTYPES)) if dtype_choice == 0 else draw(st.sampled_from(FLOATS))
    module_dtype = input_dtype if input_dtype in FLOATS else torch.float32
    if dtype_choice in (1, 2):  # mixed dtypes: half inputs with float32 layers are allowed, the rest is not
        module_dtype = draw(st.sampled_from(FLOATS))
    kwargs = dict(
        eps=draw(st.sampled_from([1e-5, 1e-5, 1e-3, 0.5, 0.0, -1e-3, math.nan])),
        momentum=draw(st.sampled_from([0.1, 0.1, None, 0.0, 1.0, 0.5, 1.5])),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
    )
    layout = draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "strided", "expanded"]))
    steps = draw(st.integers(1, 3))
    inputs = [draw(values(shape, input_dtype, layout, plain=ghost)) for _ in range(steps)]
    ghost_batch_size = draw(st.integers(1, 5)) if ghost else None
    return BatchNormCase(
        cls_name, num_features, kwargs, module_dtype, draw(st.booleans()), inputs,
        draw(st.sampled_from(["random", "random", "sum"])), ghost_batch_size,
    )  # fmt: skip


def make_layers(case: BatchNormCase) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(normdrop's layer, torch's) with the same random affine parameters and running statistics."""
    torch_cls = getattr(torch.nn, case.cls_name)
    if case.ghost_batch_size is None:
        ours = getattr(nd, case.cls_name)(case.num_features, **case.kwargs)
    else:
        ours = getattr(nd, "Ghost" + case.cls_name)(case.num_features, case.ghost_batch_size, **case.kwargs)
    theirs = torch_cls(case.num_features, **case.kwargs)
    generator = torch.Generator().manual_seed(case.num_features)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.copy_(torch.randn(case.num_features, generator=generator))
            theirs.bias.copy_(torch.randn(case.num_features, generator=generator))
        if theirs.track_running_stats:
            theirs.running_mean.copy_(torch.randn(case.num_features, generator=generator))
            theirs.running_var.copy_(torch.rand(case.num_features, generator=generator) + 0.5)
    theirs = theirs.to(case.module_dtype)
    ours.load_state_dict(theirs.state_dict())
    ours = ours.to(case.module_dtype)
    return ours.train(case.training), theirs.train(case.training)


def ghost_sizes(batch: int, ghost_batch_size: int, spatial: int) -> list[int]:
    """The documented split (the oracle's own copy): full ghost batches, then the remainder, which joins the last
    full one when it is a single value per channel; a batch of at most one ghost batch is one piece."""
    if batch <= ghost_batch_size:
        return [batch]
    sizes = [ghost_batch_size] * (batch // ghost_batch_size)
    remainder = batch % ghost_batch_size
    if remainder * spatial == 1:
        sizes[-1] += 1
    elif remainder:
        sizes.append(remainder)
    return sizes


def torch_forward(layer: torch.nn.Module, x: torch.Tensor, ghost_batch_size: int | None) -> torch.Tensor:
    """torch's layer on x, or, for ghost batch norm in training, on each ghost batch in turn."""
    use_batch_stats = layer.training or layer.running_mean is None
    if ghost_batch_size is None or not use_batch_stats or x.ndim < 2:
        return layer(x)
    sizes = ghost_sizes(x.shape[0], ghost_batch_size, math.prod(x.shape[2:]))
    return torch.cat([layer(chunk) for chunk in x.split(sizes)]) if len(sizes) > 1 else layer(x)


def in_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x converted to ``dtype`` in the same layout (expanded and strided inputs stay so; ``to`` would make them
    dense)."""
    if x.ndim and x.shape[0] > 1 and x.stride(0) == 0:
        return x[:1].to(dtype).expand(x.shape)
    if x.ndim and x.shape[-1] > 0 and x.stride(-1) == 2:
        wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.to(dtype)


def as_leaf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(leaf, input, gradient view): a leaf tensor that requires grad (floating inputs only), the input in x's
    layout made from it (expanded over dim 0 or every other element of a wider tensor, if x is), and how to read
    x's gradient from the leaf's (for an expanded input: the gradient of its one sample)."""
    if not x.is_floating_point():
        return x, x, lambda grad: grad
    if x.ndim and x.shape[0] > 1 and x.stride(0) == 0:
        leaf = x[:1].clone().requires_grad_()
        return leaf, leaf.expand(x.shape), lambda grad: grad
    if x.ndim and x.shape[-1] > 0 and x.stride(-1) == 2:
        wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        wide[..., ::2] = x
        leaf = wide.requires_grad_()
        return leaf, leaf[..., ::2], lambda grad: grad[..., ::2]
    leaf = x.clone().requires_grad_()
    return leaf, leaf, lambda grad: grad


def batch_norm_step(
    layer, x, grad_kind: str, grad_dtype: torch.dtype, ghost_batch_size: int | None, normdrop: bool
) -> dict[str, Any]:
    """One training or eval step: output, gradients (input, weight, bias; the output gradient rounded to
    ``grad_dtype``, so the float64 reference gets the same one), then the state after it."""
    leaf, source, grad_view = as_leaf(x.detach())
    y = layer(source) if normdrop else torch_forward(layer, source, ghost_batch_size)
    out: dict[str, Any] = {"y": y.detach().clone()}
    for parameter in layer.parameters():
        parameter.grad = None
    if y.requires_grad:
        if grad_kind == "sum":
            y.sum().backward()
        else:
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(y.numel()), dtype=torch.float64)
            y.backward(grad.to(grad_dtype).to(y.dtype))
        out["grad_x"] = grad_view(leaf.grad)
        out["grad_weight"] = None if layer.weight is None else layer.weight.grad
        out["grad_bias"] = None if layer.bias is None else layer.bias.grad
    out.update({f"state.{k}": v.clone() for k, v in layer.state_dict().items()})
    return out


def grad_of(y: torch.Tensor, grad_kind: str) -> torch.Tensor:
    if grad_kind == "sum":
        return torch.ones(y.shape, dtype=torch.float64)
    return (
        torch.randn(y.shape, generator=torch.Generator().manual_seed(y.numel()), dtype=torch.float64)
        .to(y.dtype)
        .double()
    )


def channel_stats(x: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, int]:
    """max |x_c| + |center_c| per channel (NaN and inf left out), and the values per channel."""
    dims = [0, *range(2, x.ndim)]
    finite = torch.where(x.isfinite(), x, torch.zeros_like(x)).abs()
    return finite.amax(dims) + center.abs(), x.numel() // max(x.shape[1], 1)


def batch_norm_bounds(case, x64, before64, ours_training, theirs_ref, grad64, carry):
    """The rounding bounds of the module docstring, per output, from the float64 reference step."""
    dims = [0, *range(2, x64.ndim)]
    view = (1, -1) + (1,) * (x64.ndim - 2)
    channels = x64.shape[1]
    expanded = x64.shape[0] > 1 and x64.stride(0) == 0
    eps = case.kwargs["eps"]
    use_batch = ours_training or before64.get("state.running_mean") is None
    if use_batch:
        center = x64.mean(dims)
        var = x64.var(dims, unbiased=False)
    else:
        center, var = before64["state.running_mean"], before64["state.running_var"]
    sigma = (var + eps).sqrt()
    magnitude, n = channel_stats(x64, center)
    a = magnitude / sigma
    u = unit_roundoff(x64.dtype if case.inputs[0].dtype == torch.float64 else case.inputs[0].dtype)
    k = 4 * (n + 8)
    eps_out = torch.finfo(case.inputs[0].dtype).eps if case.inputs[0].is_floating_point() else 0.0
    eps_param = torch.finfo(case.module_dtype).eps
    gamma = theirs_ref.weight.detach().double() if theirs_ref.weight is not None else torch.ones(channels)
    beta = theirs_ref.bias.detach().double() if theirs_ref.bias is not None else torch.zeros(channels)
    gamma, beta = gamma.double(), beta.double()

    def y_bound(ref):
        return (
            k
            * u
            * (
                (gamma.abs() * a).view(view)
                + (ref - beta.view(view)).abs() * (a * a).view(view)
                + beta.abs().view(view)
            )
            + eps_out * ref.abs()
        )

    g = grad64
    g_max = g.abs().amax(dims) if g.numel() else torch.zeros(channels)
    g_sum = g.abs().sum(dims) if g.numel() else torch.zeros(channels)

    gain = gamma.abs() / sigma

    def gx_bound(ref):
        if expanded:  # the gradient of the one sample sums the batch's: bound each, by magnitude, and add them
            per_sample = (gain * g_max * (2 + a * a)).view(view)
            term = k * u * ((gain * g_max * (1 + a) ** 2).view(view) + per_sample * (a * a).view(view))
            return x64.shape[0] * (term + eps_out * per_sample)
        return k * u * ((gain * g_max * (1 + a) ** 2).view(view) + ref.abs() * (a * a).view(view)) + eps_out * ref.abs()

    def gw_bound(ref):
        return k * u * g_sum * (1 + a) ** 2 + 2 * eps_param * ref.abs()

    def gb_bound(ref):
        return k * u * g_sum + 2 * eps_param * ref.abs()

    bounds = {"y": y_bound, "grad_x": gx_bound, "grad_weight": gw_bound, "grad_bias": gb_bound}
    if use_batch and "state.running_mean" in before64 and case.training:
        m = case.kwargs["momentum"]
        m = 1.0 / float(before64["state.num_batches_tracked"] + 1) if m is None else m
        old_mean, old_var = before64["state.running_mean"].abs(), before64["state.running_var"].abs()
        var_unbiased = var * n / max(n - 1, 1)
        # Plus what the running statistics were already off by before this step, times (1 - m).
        bounds["state.running_mean"] = (
            k * u * abs(m) * magnitude
            + 2 * eps_param * (old_mean + abs(m) * (old_mean + center.abs()))
            + abs(1 - m) * carry.get("state.running_mean", 0.0)
        )
        bounds["state.running_var"] = (
            k * u * abs(m) * n / max(n - 1, 1) * magnitude**2
            + 2 * eps_param * (old_var + abs(m) * (old_var + var_unbiased.abs()))
            + abs(1 - m) * carry.get("state.running_var", 0.0)
        )
    return bounds


def check_batch_norm_case(case: BatchNormCase) -> None:
    ours0, theirs = make_layers(case)
    reference = copy.deepcopy(theirs).double()
    ghost = case.ghost_batch_size
    torch_steps, reference_steps = [], []
    for x in case.inputs:
        before = {f"state.{k}": v.clone().double() for k, v in reference.state_dict().items()}
        torch_steps.append(run(lambda x=x: batch_norm_step(theirs, x, case.grad_kind, x.dtype, ghost, normdrop=False)))
        x64 = in_dtype(x.detach(), torch.float64) if x.is_floating_point() else None
        if x64 is not None and x.numel() > 0 and case.module_dtype is not None:
            out = run(
                lambda x64=x64, x=x: batch_norm_step(reference, x64, case.grad_kind, x.dtype, ghost, normdrop=False)
            )
            reference_steps.append((before, x64, out))
        else:
            reference_steps.append(None)
    for path in PATHS:
        use_path(path)
        try:
            ours = copy.deepcopy(ours0)
            carry: dict[str, torch.Tensor] = {}  # the running statistics' bounds after the previous step
            for step, x in enumerate(case.inputs):
                label = f"{path}, step {step}"
                mine = run(
                    lambda x=x, ours=ours: batch_norm_step(ours, x, case.grad_kind, x.dtype, ghost, normdrop=True)
                )
                theirs_step = torch_steps[step]
                if assert_same_failure(mine, theirs_step, label):
                    break
                compare_batch_norm_step(case, mine, theirs_step, reference_steps[step], reference, x, label, carry)
        finally:
            use_path(None)


def compare_batch_norm_step(case, mine, theirs_step, reference_step, reference, x, label, carry) -> None:
    """Every value of a step against torch's (same dtype: NaN/inf positions; exact where nothing was computed) and
    the float64 reference's (finite values, within the rounding bounds)."""
    assert mine.values.keys() == theirs_step.values.keys(), f"{label}: {mine.values.keys()}"
    ref_values: dict[str, Any] = {}
    bounds: dict[str, Any] = {}
    if reference_step is not None and reference_step[2].error is None:
        before, x64, ref_out = reference_step
        ref_values = ref_out.values
        if case.ghost_batch_size is None:
            grad64 = grad_of(theirs_step.values["y"], case.grad_kind) if "grad_x" in ref_values else torch.zeros(0)
            bounds = batch_norm_bounds(case, x64, before, case.training, reference, grad64, carry)
            carry.update({name: bounds[name] for name in ("state.running_mean", "state.running_var") if name in bounds})
        else:  # ghost batches: well-conditioned values (see ghost cases), a fixed tolerance per dtype
            bounds = {name: ghost_tolerance(case) for name in ref_values if name != "state.num_batches_tracked"}
    for name, value in mine.values.items():
        computed = name in bounds and name in ref_values
        assert_close_to_reference(
            f"{label}: {name}",
            value,
            theirs_step.values[name],
            ref_values[name] if computed else None,
            bounds.get(name) if computed else None,
        )
    if x.is_floating_point() and x.ndim >= 2 and x.numel() > 0 and "y" in mine.values:
        assert_constant_channels_exact(case, x, mine.values["y"], reference, label)


def ghost_tolerance(case: BatchNormCase) -> Callable[[torch.Tensor], torch.Tensor]:
    """rtol = atol = 1000 ulps of the compute dtype (plus the output's rounding) for inputs of unit spread."""
    u = unit_roundoff(case.inputs[0].dtype)
    out = max(torch.finfo(case.inputs[0].dtype).eps, torch.finfo(case.module_dtype).eps)
    return lambda ref: (1000 * u + 2 * out) * (1 + ref.abs())


def assert_constant_channels_exact(case, x, y, reference, label) -> None:
    """A channel whose values are all equal (and finite) normalizes to exactly beta in training."""
    if not (case.training or not case.kwargs["track_running_stats"]) or case.ghost_batch_size is not None:
        return
    eps = case.kwargs["eps"]
    if not eps > 0 or not math.isfinite(eps):
        return
    dims = [0, *range(2, x.ndim)]
    x64 = x.double()
    constant = (x64.amax(dims) == x64.amin(dims)) & x64.isfinite().all(dims) if x.ndim == 2 else None
    if constant is None:
        flat = x64.transpose(0, 1).reshape(x.shape[1], -1)
        constant = (flat.amax(1) == flat.amin(1)) & flat.isfinite().all(1)
    beta = reference.bias.detach() if reference.bias is not None else torch.zeros(x.shape[1], dtype=torch.float64)
    for c in constant.nonzero().flatten().tolist():
        channel = y.select(1, c).double()
        expected = beta[c].to(y.dtype).double()
        assert torch.all(channel == expected), f"{label}: constant channel {c} gives {channel.flatten()[:3]}"


@pytest.mark.slow
@fuzz_settings("batch_norm")
@given(case=batch_norm_cases())
def test_batch_norm_matches_torch_nn(case):
    check_batch_norm_case(case)


@pytest.mark.slow
@fuzz_settings("ghost")
@given(case=batch_norm_cases(ghost=True))
def test_ghost_batch_norm_matches_torch_nn_per_ghost_batch(case):
    check_batch_norm_case(case)


# ------------------------------------------------------------------------------------------------- dropout

ELEMENTWISE = ("Dropout", "AlphaDropout")
DROPOUT_CLASSES = (*ELEMENTWISE, "Dropout1d", "Dropout2d", "Dropout3d", "FeatureAlphaDropout")
SELU_SATURATION = 1.7580993408473766  # torch's alpha_dropout constant: SELU's lambda * alpha


def torch_mask_dims(cls_name: str, ndim: int) -> int:
    """How many leading dims torch's noise covers (it broadcasts over the rest), read off torch.nn.functional:
    element-wise dropout all; dropout1d (N, C) of a 3D input, (C,) of a 2D one; dropout3d (N, C) of a 5D input,
    dim 0 of any other (read as unbatched); dropout2d and feature_alpha_dropout the first two dims."""
    if cls_name in ELEMENTWISE:
        return ndim
    if cls_name == "Dropout1d":
        return 2 if ndim == 3 else 1
    if cls_name == "Dropout3d":
        return 2 if ndim == 5 else 1
    return 2


@dataclass
class DropoutCase:
    cls_name: str
    p: float
    inplace: bool
    training: bool
    x: torch.Tensor
    seed: int


@st.composite
def dropout_cases(draw) -> DropoutCase:
    cls_name = draw(st.sampled_from(DROPOUT_CLASSES))
    p = draw(
        st.one_of(
            st.floats(0.0, 1.0),
            st.sampled_from([0.5, 0.5, 0.1, 0.9, 0.0, 1.0, math.nan, 1e-9, 1 - 1e-9, 1 - 2**-34, -0.1, 1.5]),
        )
    )
    ndim = draw(st.integers(0, 5))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4]), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(OTHER_DTYPES)) if draw(st.integers(0, 14)) == 0 else draw(st.sampled_from(FLOATS))
    layout = draw(st.sampled_from(["contiguous", "contiguous", "channels_last", "strided", "expanded"]))
    x = draw(values(shape, dtype, layout))
    return DropoutCase(cls_name, p, draw(st.booleans()), draw(st.booleans()), x, draw(st.integers(0, 2**31 - 1)))


def dropout_step(case: DropoutCase, module, generator: torch.Generator | None) -> dict[str, Any]:
    """Build the layer, call it (in place on a non-leaf copy if asked), backward with a gradient in x's dtype."""
    kwargs = {"generator": generator} if generator is not None else {}
    layer = getattr(module, case.cls_name)(case.p, case.inplace, **kwargs).train(case.training)
    leaf, source, grad_view = as_leaf(case.x)
    given = source * 1 if case.inplace and leaf.requires_grad else (source.clone() if case.inplace else source)
    y = layer(given)
    out: dict[str, Any] = {"y": y.detach().clone(), "alias": y.numel() > 0 and y.data_ptr() == given.data_ptr()}
    if case.inplace:
        out["input_after"] = given.detach().clone()
    if y.requires_grad:
        y.backward(grad_for(y))
        out["grad_x"] = grad_view(leaf.grad)
    return out


def grad_for(y: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(y.numel())
    return torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)


def our_mask(case: DropoutCase) -> torch.Tensor:
    """normdrop's keep mask for the case, read back from the same layer and generator seed on an input of ones."""
    generator = torch.Generator().manual_seed(case.seed)
    layer = getattr(nd, case.cls_name)(case.p, generator=generator).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = layer(torch.ones(case.x.shape, dtype=torch.float64))
    return y > 0  # kept: 1 / (1 - p) > 0, or alpha dropout's a (1 + s' p) > 0; dropped: 0 or s' a (p - 1) < 0


def dropout_formula(case: DropoutCase, x64: torch.Tensor, keep: torch.Tensor, shift: bool) -> torch.Tensor:
    """torch's formula (aten/native/Dropout.cpp) with the given mask, in float64: x * m / (1 - p), or for alpha
    dropout x * m a + ((m - 1) s' a + s' a p) with a = ((s'^2 p + 1) (1 - p))^(-1/2) (shift: the additive part)."""
    m, p = keep.double(), case.p
    if "Alpha" not in case.cls_name:
        return x64 * m / (1 - p)
    a = 1.0 / math.sqrt((SELU_SATURATION**2 * p + 1) * (1 - p))
    y = x64 * m * a
    return y + ((m - 1) * SELU_SATURATION * a + SELU_SATURATION * a * p) if shift else y


def check_dropout_case(case: DropoutCase) -> None:
    theirs = run(lambda: dropout_step(case, torch.nn, None))
    for path in PATHS:
        use_path(path)
        try:
            label = f"{path}"
            mine = run(lambda: dropout_step(case, nd, torch.Generator().manual_seed(case.seed)))
            if assert_same_failure(mine, theirs, label):
                continue
            compare_dropout(case, mine, theirs, label)
        finally:
            use_path(None)


def compare_dropout(case: DropoutCase, mine: Outcome, theirs: Outcome, label: str) -> None:
    assert mine.values.keys() == theirs.values.keys(), f"{label}: {mine.values.keys()} vs {theirs.values.keys()}"
    assert mine.values["alias"] == theirs.values["alias"], f"{label}: returns its input: {mine.values['alias']}"
    if case.inplace:  # the input afterwards: overwritten (alias), or untouched (alpha dropout modules), as torch's
        if not (case.training and 0.0 < case.p < 1.0 and "Alpha" not in case.cls_name):
            after, theirs_after = mine.values["input_after"], theirs.values["input_after"]
            assert_close_to_reference(f"{label}: input after", after, theirs_after, None, None)
        if mine.values["alias"]:
            after = mine.values["input_after"]
            torch.testing.assert_close(after, mine.values["y"], rtol=0, atol=0, equal_nan=True, msg=label)
    x = case.x
    dropping = case.training and 0.0 < case.p < 1.0 and x.numel() > 0
    if not dropping:  # identity or zeros: exactly torch's
        for name in ("y", "grad_x"):
            assert_close_to_reference(f"{label}: {name}", mine.values.get(name), theirs.values.get(name), None, None)
        return
    keep = our_mask(case)
    k = torch_mask_dims(case.cls_name, x.ndim)
    units = keep.reshape(*x.shape[:k], -1)
    assert (units == units[..., :1]).all(), f"{label}: the mask is not constant over dims {k}.. as torch's noise is"
    dtype = x.dtype
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).smallest_normal * eps
    x64 = x.double()
    expected = dropout_formula(case, x64, keep, shift=True)
    magnitude = dropout_formula(case, x64.abs(), keep, shift=False).abs()
    if "Alpha" in case.cls_name:  # the two additive terms, which may cancel: their magnitudes
        a = 1.0 / math.sqrt((SELU_SATURATION**2 * case.p + 1) * (1 - case.p))
        magnitude = magnitude + SELU_SATURATION * a * ((1 - keep.double()) + case.p)
    bound = 4 * eps * magnitude + 2 * tiny
    ours_y, theirs_y = mine.values["y"], theirs.values["y"]
    assert ours_y.shape == theirs_y.shape and ours_y.dtype == theirs_y.dtype, f"{label}: y {ours_y.dtype}"
    assert_close_to_reference(f"{label}: y", ours_y, expected.to(dtype), expected, bound)
    if "grad_x" in mine.values:
        g64 = grad_for(theirs_y).double()
        grad_expected = dropout_formula(case, g64, keep, shift=False)
        if x.ndim and x.shape[0] > 1 and x.stride(0) == 0:
            grad_expected = grad_expected.sum(0, keepdim=True)
            grad_bound = 8 * eps * dropout_formula(case, g64.abs(), keep, shift=False).sum(0, keepdim=True) + 2 * tiny
        else:
            grad_bound = 4 * eps * grad_expected.abs() + 2 * tiny
        assert theirs.values["grad_x"].shape == mine.values["grad_x"].shape
        assert_close_to_reference(
            f"{label}: grad_x", mine.values["grad_x"], grad_expected.to(dtype), grad_expected, grad_bound
        )


@pytest.mark.slow
@fuzz_settings("dropout")
@given(case=dropout_cases())
def test_dropout_matches_torch_nn(case):
    check_dropout_case(case)


# ------------------------------------------------------------------------------- issue 12's reproducers


def _train_bn(module, *args, x, **kwargs):
    layer = module.BatchNorm1d(*args, **kwargs)
    y = layer(x)
    return {"y": y, "running_mean": layer.running_mean, "running_var": layer.running_var}


def _backward(module, cls_name, num_features, x, **kwargs):
    x = x.clone().requires_grad_()
    layer = getattr(module, cls_name)(num_features, **kwargs)
    y = layer(x)
    y.sum().backward()
    return {"y": y.detach(), "grad": x.grad, "weight_grad": None if layer.weight is None else layer.weight.grad}


REPRODUCERS: dict[str, Callable[[Any], Any]] = {
    "L1 integer input": lambda m: m.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.int64)),
    "L1 integer input, eps=0": lambda m: m.BatchNorm1d(3, eps=0)(torch.ones(4, 3, dtype=torch.int64)),
    "L1 integer input, one value per channel": lambda m: m.BatchNorm1d(3)(torch.ones(1, 3, dtype=torch.int64)),
    "L1 integer input, wrong channel count": lambda m: m.BatchNorm1d(3)(torch.ones(4, 5, dtype=torch.int64)),
    "L2 wrong channel count": lambda m: m.BatchNorm1d(3)(torch.randn(4, 5)),
    "L3 float32 layer, float64 input": lambda m: m.BatchNorm1d(3)(torch.randn(4, 3, dtype=torch.float64)),
    "L3 float64 layer, float32 input, eval": lambda m: m.BatchNorm1d(3).double().eval()(torch.randn(4, 3)),
    "L3 float32 layer, bfloat16 input (allowed)": lambda m: m.BatchNorm1d(3)(torch.randn(4, 3).bfloat16()),
    "L4 empty int64 input": lambda m: m.BatchNorm1d(2)(torch.empty(0, 2, dtype=torch.int64)),
    "L5 backward through an empty input": lambda m: _backward(m, "BatchNorm1d", 2, torch.empty(0, 3)),
    "L5 (2, 0, 2) into BatchNorm1d(1)": lambda m: _backward(m, "BatchNorm1d", 1, torch.empty(2, 0, 2)),
    "L5 eval without running stats, (4, 1, 0, 0)": lambda m: _backward(
        m, "BatchNorm2d", 2, torch.empty(4, 1, 0, 0), track_running_stats=False
    ),
    "L6 Dropout on int64 input": lambda m: m.Dropout()(torch.ones(4, dtype=torch.int64)),
    "L6 Dropout on bool input": lambda m: m.Dropout()(torch.ones(4, dtype=torch.bool)),
    "L6 Dropout2d on int64 input": lambda m: m.Dropout2d()(torch.ones(2, 2, 2, 2, dtype=torch.int64)),
    "L7 Dropout(nan)": lambda m: m.Dropout(math.nan)(torch.ones(4)),
    "L7 Dropout(nan), eval": lambda m: m.Dropout(math.nan).eval()(torch.ones(4)),
    "L8 -inf in a channel": lambda m: _train_bn(m, 1, x=torch.tensor([[-math.inf], [0.5], [2.0]])),
    "L8 inf first": lambda m: _train_bn(m, 2, x=torch.tensor([[math.inf, 1.0], [0.5, 2.0], [2.0, 3.0]])),
}


@pytest.mark.parametrize("name", list(REPRODUCERS))
def test_issue_12_reproducer_behaves_as_torch_nn(backend, name):
    """Each mismatch the issue listed, now the same exception type or the same values as torch.nn."""
    torch.manual_seed(0)
    theirs = run(lambda: REPRODUCERS[name](torch.nn))
    torch.manual_seed(0)  # the same random input
    ours = run(lambda: REPRODUCERS[name](nd))
    if assert_same_failure(ours, theirs, name):
        return
    mine, expected = ours.values, theirs.values
    if isinstance(expected, torch.Tensor):
        mine, expected = {"y": mine}, {"y": expected}
    assert mine.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert mine[key] is None, f"{name}: {key}"
            continue
        assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, f"{name}: {key}"
        torch.testing.assert_close(mine[key].detach(), value.detach(), equal_nan=True, msg=f"{name}: {key}")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("layout", ["contiguous", "expanded"])
def test_issue_12_l9_a_constant_channel_normalizes_to_exactly_beta(backend, dtype, layout):
    """L9: torch.full((8, 1), 10000.123) gives -0.28 through torch.nn.BatchNorm1d (float32) and gave -0.28 through
    composite (-0.06 in bfloat16, -0.007 expanded); the shifted statistics give exactly 0 (beta with affine)."""
    x = torch.full((1 if layout == "expanded" else 8, 2), 10000.123, dtype=dtype)
    x = x.expand(8, 2) if layout == "expanded" else x
    layer = nd.BatchNorm1d(2, affine=False).to(dtype)
    assert torch.equal(layer(x), torch.zeros(8, 2, dtype=dtype))
    affine = nd.BatchNorm1d(2).to(dtype)
    with torch.no_grad():
        affine.bias.copy_(torch.tensor([0.25, -3.0]))
    assert torch.equal(affine(x), affine.bias.detach().expand(8, 2))
