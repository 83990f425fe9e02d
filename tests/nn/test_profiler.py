"""The layers do their own math: no aten batch_norm, dropout or bernoulli op runs under them."""

from __future__ import annotations

import torch

import normdrop.nn as nd

FORBIDDEN = ("batch_norm", "dropout", "bernoulli")


def test_no_torch_batch_norm_or_dropout_ops_run(backend):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        nd.BatchNorm2d(3),
        nd.Dropout2d(0.3),
        torch.nn.Flatten(),
        nd.Dropout(0.3),
        nd.AlphaDropout(0.2),
        nd.FeatureAlphaDropout(0.2),
        torch.nn.Linear(3 * 4 * 4, 4),
        nd.BatchNorm1d(4),
    )
    x = torch.randn(5, 2, 6, 6, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(x).square().sum().backward()
        model.eval()
        model(x).sum().backward()
    names = {event.name for event in profile.events()}
    assert any(name.startswith("aten::") for name in names), "the profiler recorded no aten ops at all"
    offending = sorted(name for name in names if name.startswith("aten::") and any(f in name for f in FORBIDDEN))
    assert offending == []


def test_the_check_would_catch_torch_layers():
    """The same profile on torch.nn layers does show the forbidden ops: the test above can fail."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(torch.randn(5, 4))
    names = {event.name for event in profile.events()}
    assert any("batch_norm" in name for name in names)
    assert any("bernoulli" in name or "dropout" in name for name in names)
