"""Noisy batch norm (Santurkar et al. 2018's control) against an oracle: normdrop's BatchNorm with the drawn noise
applied by hand."""

from __future__ import annotations

import pytest
import torch

from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normdrop.nn.batchnorm_variants import NoisyBatchNorm1d, NoisyBatchNorm2d, noise_draw
from normdrop.nn.factory import make_norm


def _pair(cls, ref_cls, channels: int, noise: float):
    torch.manual_seed(3)
    noisy, reference = cls(channels, noise=noise), ref_cls(channels)
    with torch.no_grad():
        noisy.weight.uniform_(0.5, 2.0)
        noisy.bias.normal_()
    reference.load_state_dict(noisy.state_dict())
    return noisy, reference


SHAPES = [
    (NoisyBatchNorm1d, BatchNorm1d, (16, 5)),
    (NoisyBatchNorm1d, BatchNorm1d, (8, 5, 7)),
    (NoisyBatchNorm2d, BatchNorm2d, (4, 5, 3, 3)),
]


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), SHAPES)
def test_zero_noise_is_batch_norm_exactly(cls, ref_cls, shape) -> None:
    noisy, reference = _pair(cls, ref_cls, shape[1], 0.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    for layer in (noisy, reference):
        inputs = x.clone().requires_grad_(True)
        out = layer(inputs)
        (out * upstream).sum().backward()
        outputs.append(out.detach())
        grads.append((inputs.grad, layer.weight.grad, layer.bias.grad))
    assert torch.equal(outputs[0], outputs[1])
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(noisy.running_mean, reference.running_mean)
    assert torch.equal(noisy.running_var, reference.running_var)


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), SHAPES)
def test_noise_is_the_recomputed_draw_applied_to_batch_norm(cls, ref_cls, shape) -> None:
    noisy, reference = _pair(cls, ref_cls, shape[1], 0.8)
    view = (1, -1) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    seeds = []
    for _ in range(3):  # redrawn every training step; running statistics are batch norm's
        inputs = x.clone().requires_grad_(True)
        out = noisy(inputs)
        ref_inputs = x.clone().requires_grad_(True)
        ref = reference(ref_inputs)
        scale, shift = noise_draw(noisy.last_noise_seed, shape[1], 0.8)
        expected = ref * scale.float().view(view) + shift.float().view(view)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        out.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(inputs.grad, ref_inputs.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(noisy.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
        assert (scale != 1).all() and (shift != 0).all() and (shift.abs() <= 0.8).all()
        assert ((scale >= 1 / 1.8) & (scale <= 1.8)).all()
        seeds.append(noisy.last_noise_seed)
    assert len(set(seeds)) == 3
    assert torch.equal(noisy.running_mean, reference.running_mean)
    assert torch.equal(noisy.running_var, reference.running_var)


def test_eval_adds_no_noise_and_runs_reproduce_per_seed() -> None:
    noisy, reference = _pair(NoisyBatchNorm1d, BatchNorm1d, 6, 1.0)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    noisy.train()(x)
    reference.train()(x)
    noisy.eval(), reference.eval()
    assert torch.equal(noisy(x), reference(x))
    outputs = []
    for seed in (7, 7, 8):
        layer = make_norm("noisy", 6, noise=1.0)
        torch.manual_seed(seed)
        outputs.append(layer.train()(x))
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("noise", [-0.1, float("nan"), True, "1"])
def test_bad_noise_is_refused(noise) -> None:
    with pytest.raises(ValueError, match="noise must be"):
        NoisyBatchNorm1d(4, noise=noise)
