"""Model surgery: convert between torch.nn and normdrop layers with state kept, add / remove / replace BN and
dropout at places chosen by glob, name list or predicate."""

from __future__ import annotations

import pytest
import torch

import normdrop.nn as nd


def torch_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Dropout2d(0.2),
        torch.nn.Flatten(),
        torch.nn.Linear(36, 8),
        torch.nn.BatchNorm1d(8, affine=False, eps=1e-3),
        torch.nn.AlphaDropout(0.1),
        torch.nn.Linear(8, 3),
    ).double()


def test_convert_to_normdrop_and_back_keeps_state_modes_and_outputs(backend):
    model = torch_model()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    model(x)  # running statistics away from their initial values
    model[1].weight.requires_grad_(False)
    model.eval()
    model[3].train()
    ours = nd.convert(model, to="normdrop")
    assert [type(m) for m in ours] == [
        torch.nn.Conv2d, nd.BatchNorm2d, torch.nn.ReLU, nd.Dropout2d, torch.nn.Flatten,
        torch.nn.Linear, nd.BatchNorm1d, nd.AlphaDropout, torch.nn.Linear,
    ]  # fmt: skip
    assert type(model[1]) is torch.nn.BatchNorm2d  # not in place
    assert ours[1].momentum is None and ours[6].eps == 1e-3 and not ours[6].affine
    assert not ours[1].weight.requires_grad and ours[3].training and not ours[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours[3].eval()
    model[3].eval()
    torch.testing.assert_close(ours(x), model(x))
    back = nd.convert(ours, to="torch")
    assert [type(m) for m in back] == [type(m) for m in model]


def test_convert_to_torch_refuses_layers_torch_lacks_unless_told():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), nd.GhostBatchNorm1d(4, 2), nd.Dropout(0.1), nd.DropPath(0.1))
    with pytest.raises(ValueError, match=r"no torch.nn counterpart for 1 \(GhostBatchNorm1d\), 3 \(DropPath\)"):
        nd.convert(model, to="torch")
    lenient = nd.convert(model, to="torch", strict=False)
    assert [type(m) for m in lenient] == [torch.nn.Linear, nd.GhostBatchNorm1d, torch.nn.Dropout, nd.DropPath]
    with pytest.raises(ValueError, match="to must be 'normdrop' or 'torch', got 'jax'"):
        nd.convert(model, to="jax")


def test_add_norm_after_every_linear_and_conv_or_chosen_places():
    model = torch_model()
    with_norms = nd.add_norm(model, None, "ghost", ghost_batch_size=2)
    assert isinstance(with_norms[0], torch.nn.Sequential) and isinstance(with_norms[0][1], nd.GhostBatchNorm2d)
    assert isinstance(with_norms[5][1], nd.GhostBatchNorm1d) and with_norms[5][1].num_features == 8
    assert with_norms[5][1].running_mean.dtype == torch.float64
    assert "0.0.weight" in with_norms.state_dict()
    assert with_norms(torch.randn(4, 2, 5, 5, dtype=torch.float64)).shape == (4, 3)
    only_last = nd.add_norm(model, "8", "batch")
    assert isinstance(only_last[8], torch.nn.Sequential) and isinstance(only_last[0], torch.nn.Conv2d)
    after_relu = nd.add_norm(model, ["2"], "batch", num_features=4, dims=2)
    assert isinstance(after_relu[2][1], nd.BatchNorm2d)
    with pytest.raises(ValueError, match="cannot infer the number of features and dims after a ReLU"):
        nd.add_norm(model, ["2"], "batch")


def test_add_dropout_before_or_after_with_dims_from_the_layer():
    model = torch_model()
    added = nd.add_dropout(model, lambda name, m: isinstance(m, torch.nn.Conv2d), "channel", 0.3)
    assert type(added[0][1]) is nd.Dropout2d and added[0][1].p == 0.3
    before = nd.add_dropout(model, "5", "gaussian", 0.2, before=True)
    assert type(before[5][0]) is nd.GaussianDropout and type(before[5][1]) is torch.nn.Linear


def test_remove_and_replace_norms_and_dropouts():
    model = nd.convert(torch_model())
    model[5] = nd.DropConnect.from_linear(model[5], p=0.5)
    model[8] = nd.ConcreteDropout(model[8])
    no_norms = nd.remove_norm(model)
    assert isinstance(no_norms[1], torch.nn.Identity) and isinstance(no_norms[6], torch.nn.Identity)
    no_dropout = nd.remove_dropout(model)
    assert [type(no_dropout[i]) for i in (3, 5, 7, 8)] == [
        torch.nn.Identity, torch.nn.Linear, torch.nn.Identity, torch.nn.Linear
    ]  # fmt: skip
    assert torch.equal(no_dropout[5].weight, model[5].weight)
    some = nd.remove_dropout(model, where="[37]")
    assert isinstance(some[3], torch.nn.Identity) and isinstance(some[5], nd.DropConnect)

    model(torch.randn(4, 2, 5, 5, dtype=torch.float64))
    ghost = nd.replace_norm(model, "ghost", "1", ghost_batch_size=2)
    assert type(ghost[1]) is nd.GhostBatchNorm2d and ghost[1].momentum is None
    assert torch.equal(ghost[1].running_var, model[1].running_var) and ghost[1].weight.dtype == torch.float64
    frozen = nd.replace_norm(model, "frozen").eval()
    model.eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), model(x))
    gaussian = nd.replace_dropout(model, "gaussian")
    assert type(gaussian[3]) is nd.GaussianDropout and gaussian[3].p == 0.2
    assert isinstance(gaussian[5], nd.DropConnect) and isinstance(gaussian[8], nd.ConcreteDropout)


# ---- norm layers with a built-in activation (timm's BatchNormAct2d style), frozen BN -----------------------


class BatchNormAct2d(torch.nn.BatchNorm2d):
    """A BatchNorm2d that applies its own dropout and activation after normalizing, as timm's norm_act layers do."""

    def __init__(self, num_features: int, p: float = 0.0) -> None:
        super().__init__(num_features)
        self.drop = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
        self.act = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNorm2d(torch.nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward does more than BN + children: surgery must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def act_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), BatchNormAct2d(4), torch.nn.Flatten(), torch.nn.Linear(36, 3))
    model(torch.randn(8, 2, 5, 5))  # running statistics away from 0 / 1, so freezing them is visible
    return model.double().eval()


@pytest.mark.parametrize("kind", ["frozen", "batch", "ghost"])
def test_replace_norm_keeps_the_activation_of_a_batch_norm_act_layer(kind):
    model = act_model()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    options = {"ghost_batch_size": 6} if kind == "ghost" else {}
    replaced = nd.replace_norm(model, kind, **options)
    assert isinstance(model[1], BatchNormAct2d)  # not in place
    assert isinstance(replaced[1], torch.nn.Sequential) and isinstance(replaced[1][-1], torch.nn.ReLU)
    torch.testing.assert_close(replaced(x), model(x))  # eval: running statistics, then the ReLU
    assert replaced(x).ne(model[3].bias).any()
    if kind != "frozen":  # train mode: batch statistics (ghost batch = whole batch), then the ReLU
        torch.testing.assert_close(replaced.train()(x), model.train()(x))


def test_remove_norm_keeps_the_activation_and_freezing_needs_statistics():
    model = act_model()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    removed = nd.remove_norm(model)
    assert isinstance(removed[1][-1], torch.nn.ReLU) and not any(map(nd.surgery._is_norm, removed.modules()))
    torch.testing.assert_close(removed(x), model[3](model[2](torch.relu(model[0](x)))))
    untracked = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="without running statistics"):
        nd.replace_norm(untracked, "frozen")


def test_surgery_refuses_a_batch_norm_subclass_it_cannot_reproduce():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), ScaledBatchNorm2d(4))
    for operation in (lambda m: nd.remove_norm(m), lambda m: nd.replace_norm(m, "frozen")):
        with pytest.raises(ValueError, match="ScaledBatchNorm2d subclasses a batch norm but does not compute"):
            operation(model)


def test_convert_frozen_batchnorm_copies_unless_inplace_and_keeps_activations():
    model = act_model()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    expected = model(x)
    frozen = nd.convert_frozen_batchnorm(model)
    assert frozen is not model and type(model[1]) is BatchNormAct2d  # the argument is untouched
    assert isinstance(frozen[1][0], nd.FrozenBatchNorm2d) and isinstance(frozen[1][-1], torch.nn.ReLU)
    torch.testing.assert_close(frozen.train()(x), expected)  # frozen: train mode computes what eval did
    same = nd.convert_frozen_batchnorm(model, inplace=True)
    assert same is model and isinstance(model[1][0], nd.FrozenBatchNorm2d)


def test_frozen_batch_norm_with_trainable_affine_learns_gamma_beta_and_keeps_statistics():
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(3).double()
    bn(torch.randn(8, 3, 4, 4, dtype=torch.float64) * 3 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    frozen = nd.convert_frozen_batchnorm(bn, trainable_affine=True).train()
    assert isinstance(frozen, nd.FrozenBatchNorm2d) and "trainable_affine=True" in repr(frozen)
    assert {name for name, _ in frozen.named_parameters()} == {"weight", "bias"}
    statistics = (frozen.running_mean.clone(), frozen.running_var.clone())
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    oracle = bn.eval()  # torch's BN on running statistics is the same affine map, with trainable gamma, beta
    frozen(x).pow(2).sum().backward()
    oracle(x_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(frozen.weight.grad, oracle.weight.grad)
    torch.testing.assert_close(frozen.bias.grad, oracle.bias.grad)
    torch.optim.SGD(frozen.parameters(), lr=0.1).step()
    assert not torch.equal(frozen.weight, oracle.weight)
    torch.testing.assert_close((frozen.running_mean, frozen.running_var), statistics)
    assert not list(nd.convert_frozen_batchnorm(bn).parameters())  # default: everything frozen
