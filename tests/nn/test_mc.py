"""MC-dropout prediction: BN stays in eval mode, the MC mean converges to the weight-scaled (eval) output like
1/sqrt(k) on a model linear in its dropped units, and entropies / mutual information match closed forms."""

from __future__ import annotations

import math

import pytest
import torch

import normdrop.nn as nd
from normdrop.nn import mc

P = 0.4
N_INPUTS = 200


def linear_in_dropped_units() -> torch.nn.Sequential:
    """Linear -> BN -> ReLU -> Dropout -> Linear: the output is linear in the dropped units."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), nd.BatchNorm1d(10), torch.nn.ReLU(), nd.Dropout(P), torch.nn.Linear(10, 3)
    ).double()
    with torch.no_grad():  # running statistics unlike any batch's, so a train-mode BN would show
        model[1].running_mean.copy_(torch.linspace(-1, 1, 10))
        model[1].running_var.copy_(torch.linspace(0.5, 4, 10))
    return model


def test_mc_mean_converges_to_the_eval_output_like_one_over_sqrt_k(backend):
    model = linear_in_dropped_units()
    x = torch.randn(N_INPUTS, 6, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        eval_output = model(x)
        hidden = model[:3](x)  # the units dropout sees (BN in eval mode)
        train_bn_output = torch.nn.Sequential(model[0], nd.BatchNorm1d(10).double(), *model[2:])(x)
    assert (train_bn_output - eval_output).abs().max() > 0.1  # the test tells BN modes apart
    # Var of one sample's output j: sum_i W_ji^2 h_i^2 p / (1 - p), so the MC mean's error over its standard
    # deviation sqrt(Var / k) has an RMS of 1 for every k: the error shrinks like 1 / sqrt(k). (Outputs of one input
    # share masks, so the RMS over 200 inputs has a spread of about 5%; the bounds are 5 of those.)
    sample_var = (hidden**2) @ (model[4].weight.detach().T ** 2) * P / (1 - P)
    assert bool((sample_var > 0).all())
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in (16, 256, 4096):
        samples = mc.mc_samples(model, x, k)
        assert samples.shape == (k, N_INPUTS, 3)
        standardized = (samples.mean(0) - eval_output) / torch.sqrt(sample_var / k)
        rms = standardized.pow(2).mean().sqrt().item()
        assert 0.75 < rms < 1.3, (k, rms)
    assert all(module.training for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed during MC sampling"


def test_batched_and_one_pass_per_sample_agree_in_distribution():
    model = linear_in_dropped_units()
    x = torch.randn(3, 6, dtype=torch.float64)
    batched = mc.mc_samples(model, x, 2000, samples_per_pass=500)
    single = mc.mc_samples(model, x, 2000, samples_per_pass=1)
    assert not torch.equal(batched[0], batched[1])  # copies in one pass draw different masks
    std_error = torch.sqrt(batched.var(0) / 2000 + single.var(0) / 2000)
    assert torch.all((batched.mean(0) - single.mean(0)).abs() < 5 * std_error)


def test_drop_connect_models_sample_one_mask_per_pass():
    torch.manual_seed(1)
    model = torch.nn.Sequential(nd.DropConnect(4, 3, p=0.5), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    samples = mc.mc_samples(model, torch.randn(1, 4).expand(5, 4), 6)
    # Rows of one pass share a mask (same input, same output); passes differ.
    assert torch.equal(samples[:, 0], samples[:, 4])
    assert len({tuple(s[0].tolist()) for s in samples}) > 1


def test_summary_closed_forms():
    agree = torch.tensor([[[0.2, 0.8]], [[0.2, 0.8]], [[0.2, 0.8]]], dtype=torch.float64)
    summary = mc.summarize_samples(agree)
    entropy = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert summary.predictive_entropy.item() == pytest.approx(entropy)
    assert summary.expected_entropy.item() == pytest.approx(entropy)
    assert summary.mutual_information.item() == pytest.approx(0.0, abs=1e-12)
    # Confident samples that disagree: all the uncertainty is epistemic.
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    summary = mc.summarize_samples(disagree, keep_samples=True)
    torch.testing.assert_close(summary.mean, torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert summary.predictive_entropy.item() == pytest.approx(math.log(2))
    assert summary.expected_entropy.item() == pytest.approx(0.0)
    assert summary.mutual_information.item() == pytest.approx(math.log(2))
    assert summary.samples is disagree


def test_mc_predict_gives_probabilities_and_bounded_information():
    model = linear_in_dropped_units()
    prediction = mc.mc_predict(model, torch.randn(7, 6, dtype=torch.float64), k=50)
    torch.testing.assert_close(prediction.mean.sum(1), torch.ones(7, dtype=torch.float64))
    assert torch.all(prediction.mutual_information >= 0)
    assert torch.all(prediction.mutual_information <= prediction.predictive_entropy + 1e-12)
    assert torch.all(prediction.predictive_entropy <= math.log(3) + 1e-12)


def test_mc_rejects_models_without_dropout_and_bad_counts():
    with pytest.raises(ValueError, match="needs a model with dropout layers"):
        mc.mc_samples(torch.nn.Linear(2, 2), torch.randn(3, 2))
    model = linear_in_dropped_units()
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        mc.mc_samples(model, torch.randn(3, 6, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="samples_per_pass must be a positive int"):
        mc.mc_samples(model, torch.randn(3, 6, dtype=torch.float64), 4, samples_per_pass=-1)
    with pytest.raises(ValueError, match=r"expects \(k, N, C\) probabilities"):
        mc.summarize_samples(torch.rand(3, 4))
