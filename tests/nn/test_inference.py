"""fold_batch_norm (outputs equal within 1e-5 in float32) and recalibrate_bn (exact population statistics)."""

from __future__ import annotations

import pytest
import torch

import normdrop.nn as nd

# ---------------------------------------------------------------------------------------------------- folding

LAYERS = {
    "linear": (lambda bias: torch.nn.Linear(6, 5, bias=bias), nd.BatchNorm1d, (16, 6)),
    "conv1d": (lambda bias: torch.nn.Conv1d(3, 5, 3, padding=1, bias=bias), nd.BatchNorm1d, (4, 3, 9)),
    "conv2d": (lambda bias: torch.nn.Conv2d(3, 5, 3, stride=2, groups=1, bias=bias), nd.BatchNorm2d, (4, 3, 9, 9)),
    "conv2d_grouped": (lambda bias: torch.nn.Conv2d(4, 6, 3, groups=2, bias=bias), nd.BatchNorm2d, (4, 4, 7, 7)),
}


def trained_bn(bn_cls, channels: int, affine: bool) -> torch.nn.Module:
    bn = bn_cls(channels, affine=affine)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2, generator=generator)
        bn.running_var.uniform_(0.2, 3, generator=generator)
        if affine:
            bn.weight.uniform_(-1.5, 1.5, generator=generator)
            bn.bias.uniform_(-1, 1, generator=generator)
    return bn


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_folding_keeps_outputs_within_1e_5_in_float32(layer_name, bias, affine):
    make_layer, bn_cls, shape = LAYERS[layer_name]
    layer = make_layer(bias)
    model = torch.nn.Sequential(layer, trained_bn(bn_cls, 6 if "grouped" in layer_name else 5, affine), torch.nn.ReLU())
    model.eval()
    x = torch.randn(shape)
    expected = model(x)
    folded = nd.fold_batch_norm(model)
    assert isinstance(folded[1], torch.nn.Identity) and folded[0].bias is not None
    assert isinstance(model[1], torch.nn.modules.batchnorm._BatchNorm)  # the original is untouched
    assert (folded(x) - expected).abs().max().item() <= 1e-5


def test_folding_into_a_frozen_batch_norm_and_nested_sequentials():
    bn = trained_bn(nd.BatchNorm2d, 4, True).eval()
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), nd.FrozenBatchNorm2d.from_batch_norm(bn)),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
        trained_bn(torch.nn.BatchNorm1d, 3, False),
    ).eval()
    x = torch.randn(5, 2, 4, 4)
    expected = model(x)
    folded = nd.fold_batch_norm(model, inplace=True)
    assert folded is model
    assert isinstance(model[0][1], torch.nn.Identity) and isinstance(model[3], torch.nn.Identity)
    assert (model(x) - expected).abs().max().item() <= 1e-5


def test_fold_checks_mode_channels_and_layer_types():
    layer, bn = torch.nn.Linear(3, 4), nd.BatchNorm1d(4)
    with pytest.raises(ValueError, match="is in training mode"):
        nd.fold_batch_norm(torch.nn.Sequential(layer, bn))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(5\) cannot follow Linear with 4 output channels"):
        nd.fold_batch_norm_into(layer, nd.BatchNorm1d(5).eval())
    with pytest.raises(
        ValueError, match="can fold batch norm into Linear, Conv1d, Conv2d, Conv3d; got ConvTranspose2d"
    ):
        nd.fold_batch_norm_into(torch.nn.ConvTranspose2d(3, 4, 3), bn.eval())
    untracked = torch.nn.Sequential(layer, nd.BatchNorm1d(4, track_running_stats=False)).eval()
    assert isinstance(nd.fold_batch_norm(untracked)[1], nd.BatchNorm1d)  # batch statistics: nothing to fold


# ---------------------------------------------------------------------------------------------- recalibration

BATCH_SIZES = (7, 9, 16, 5)


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 6),
        nd.Dropout(0.5),
        nd.BatchNorm1d(6),
        torch.nn.ReLU(),
        torch.nn.Linear(6, 4),
        torch.nn.BatchNorm1d(4),
    ).double()


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    return [(torch.randn(n, 5, generator=generator, dtype=torch.float64) * 3 + 2, torch.zeros(n)) for n in BATCH_SIZES]


def expected_statistics(model, batches):
    """Mean and unbiased variance of each BN's input over all rows, with dropout off and BN1 normalizing each batch
    with its own statistics (the oracle: torch's functional batch norm)."""
    first, second = [], []
    for x in batches:
        h1 = model[0](x)
        first.append(h1)
        bn = model[2]
        normalized = torch.nn.functional.batch_norm(h1, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        second.append(model[4](torch.relu(normalized)))
    return [(torch.cat(h).mean(0), torch.cat(h).var(0, unbiased=True)) for h in (first, second)]


@pytest.mark.parametrize("n_samples", [None, 20, 37])
def test_recalibration_recovers_exact_population_statistics(backend, n_samples):
    model = make_model()
    model.train()
    with torch.no_grad():
        model[2].running_mean.fill_(100.0)
        model[5].running_var.fill_(1e-3)
        model[2].num_batches_tracked.fill_(42)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    data = make_data()
    with torch.no_grad():
        rows = torch.cat([x for x, _ in data])[: n_samples or None]
        cuts = torch.cumsum(torch.tensor(BATCH_SIZES), 0).tolist()
        batches = [b for b in torch.tensor_split(rows, [c for c in cuts if c < len(rows)]) if len(b)]
        expected = expected_statistics(model, batches)

    assert nd.recalibrate_bn(model, data, n_samples) is model
    for bn, (mean, var) in zip((model[2], model[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-10)
    assert int(model[2].num_batches_tracked) == 42
    assert all(module.training for module in model.modules())  # modes restored
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]) and param.grad is None


def test_recalibration_of_a_conv_model_and_tensor_batches():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), nd.BatchNorm2d(3)).double().eval()
    data = [torch.randn(n, 2, 6, 6, dtype=torch.float64) for n in (3, 4)]
    nd.recalibrate_bn(model, data)
    features = model[0](torch.cat(data)).detach()
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)))
    torch.testing.assert_close(model[1].running_var, features.transpose(0, 1).flatten(1).var(1))
    assert not model.training


def test_recalibration_errors_leave_the_statistics_alone():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="data ran out after 37 samples, n_samples=50"):
        nd.recalibrate_bn(model, make_data(), 50)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="n_samples must be an int >= 2"):
        nd.recalibrate_bn(model, make_data(), 0)
    with pytest.raises(TypeError, match="tensors or"):
        nd.recalibrate_bn(model, [{"x": torch.zeros(2, 5)}])
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert nd.recalibrate_bn(plain, []) is plain  # nothing to recalibrate
