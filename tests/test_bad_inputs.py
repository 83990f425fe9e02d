"""Property-based checks with hypothesis: for any shape, dtype, p, eps, momentum and non-finite input, normdrop's
layers either behave like torch.nn's or raise a clear exception where torch raises -- never crash or hang."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normdrop.nn as nd
from normdrop.nn import functional as F

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]
EXPECTED_ERRORS = (ValueError, TypeError, RuntimeError)
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def inputs(draw, min_dims: int = 0, max_dims: int = 5):
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(shape, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e4]))
    special = draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
    if special is not None and x.numel() > 0:
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    return x.to(dtype) if dtype.is_floating_point else x.round().to(dtype)


def outcome(fn):
    """('ok', value) or ('error', exception type)."""
    try:
        return "ok", fn()
    except EXPECTED_ERRORS as error:
        assert str(error), "an exception without a message"
        return "error", type(error)


BATCH_NORM_CLASSES = {2: ("BatchNorm1d",), 3: ("BatchNorm1d",), 4: ("BatchNorm2d",), 5: ("BatchNorm3d",)}


@HYPOTHESIS
@given(
    x=inputs(),
    cls_name=st.sampled_from(["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]),
    eps=st.sampled_from([1e-5, 0.0, -1e-3, 1.0]),
    momentum=st.sampled_from([0.1, None, 0.0, 1.0, 1.5]),
    affine=st.booleans(),
    track=st.booleans(),
    training=st.booleans(),
)
def test_batch_norm_behaves_like_torch(x, cls_name, eps, momentum, affine, track, training):
    channels = x.shape[1] if x.ndim >= 2 and x.shape[1] > 0 else 3
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    ours = getattr(nd, cls_name)(channels, **kwargs).train(training)
    theirs = getattr(torch.nn, cls_name)(channels, **kwargs).train(training)
    if x.dtype in (torch.float64,):
        ours, theirs = ours.double(), theirs.double()
    status, value = outcome(lambda: ours(x))
    ref_status, ref_value = outcome(lambda: theirs(x))
    if ref_status == "error":
        assert status == "error", f"torch raised {ref_value.__name__} but normdrop returned a result"
        assert issubclass(value, ref_value), f"torch raised {ref_value.__name__}, normdrop {value.__name__}"
        return
    assert status == "ok", f"normdrop raised {value.__name__} where torch computed a result"
    assert value.shape == ref_value.shape and value.dtype == ref_value.dtype
    tolerance = 1e-5 if x.dtype in (torch.float32, torch.float64) else 5e-2
    torch.testing.assert_close(value.double(), ref_value.double(), rtol=tolerance, atol=tolerance, equal_nan=True)


DROPOUT_FUNCTIONS = ["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"]


@HYPOTHESIS
@given(
    x=inputs(),
    fn_name=st.sampled_from(DROPOUT_FUNCTIONS),
    p=st.one_of(st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, math.nan])),
    training=st.booleans(),
)
@pytest.mark.filterwarnings("ignore:dropout")
def test_dropout_behaves_like_torch(x, fn_name, p, training):
    status, value = outcome(lambda: getattr(F, fn_name)(x, p, training))
    ref_status, ref_value = outcome(lambda: getattr(torch.nn.functional, fn_name)(x, p, training))
    if ref_status == "error":
        assert status == "error", f"torch raised {ref_value.__name__} but normdrop returned a result"
        assert issubclass(value, ref_value), f"torch raised {ref_value.__name__}, normdrop {value.__name__}"
        return
    assert status == "ok", f"normdrop raised {value.__name__} where torch did not"
    assert value.shape == ref_value.shape and value.dtype == ref_value.dtype
    if not training or p == 0.0 or p == 1.0:
        assert torch.equal(value.isnan(), ref_value.isnan())
        torch.testing.assert_close(value, ref_value, equal_nan=True)
    elif "alpha" not in fn_name:
        kept = (value != 0) & x.isfinite()
        expected = (x.double() / (1 - p)).to(x.dtype)
        torch.testing.assert_close(value[kept], expected[kept], rtol=1e-2, atol=1e-6, equal_nan=True)
