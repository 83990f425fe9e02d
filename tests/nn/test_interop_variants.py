"""The layers torch.nn has no twin of, under torch's program-capture tools: FX keeps each as a leaf module (and FX
quantization prepares a model holding them), ``torch.jit.trace`` captures them in eval, ``torch.jit.script`` refuses
them with a message; and the scripted alpha dropouts never write into their input, as torch.nn's and eager's."""

from __future__ import annotations

import copy

import pytest
import torch

import normdrop.nn as nd

VARIANTS = {  # name: (layer, input shape)
    "GhostBatchNorm1d": (lambda: nd.GhostBatchNorm1d(4, ghost_batch_size=2), (8, 4)),
    "GhostBatchNorm2d": (lambda: nd.GhostBatchNorm2d(4, ghost_batch_size=3), (8, 4, 3, 3)),
    "BatchRenorm1d": (lambda: nd.BatchRenorm1d(4, warmup_steps=0, r_max_steps=1, d_max_steps=1), (8, 4)),
    "BatchRenorm2d": (lambda: nd.BatchRenorm2d(4), (8, 4, 3, 3)),
    "FrozenBatchNorm1d": (lambda: nd.FrozenBatchNorm1d(4), (8, 4)),
    "FrozenBatchNorm2d": (lambda: nd.FrozenBatchNorm2d(4, trainable_affine=True), (8, 4, 3, 3)),
    "GaussianDropout": (lambda: nd.GaussianDropout(0.3), (8, 4)),
    "Uout": (lambda: nd.Uout(0.3), (8, 4)),
    "DropPath": (lambda: nd.DropPath(0.3), (8, 4, 3, 3)),
    "DropBlock2d": (lambda: nd.DropBlock2d(0.3, block_size=3), (8, 4, 6, 6)),
    "ConcreteDropout": (lambda: nd.ConcreteDropout(torch.nn.Linear(4, 4), init_p=0.3), (8, 4)),
    "DropConnect": (lambda: nd.DropConnect(4, 4, p=0.3), (8, 4)),
}


def model_with(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    make, shape = VARIANTS[name]
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():  # statistics and affine maps that are not the identity
        for tensor in [*layer.parameters(), *layer.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return torch.nn.Sequential(torch.nn.Identity(), layer), torch.randn(*shape)


def call_modules(graph_module: torch.fx.GraphModule) -> list[str]:
    return [node.target for node in graph_module.graph.nodes if node.op == "call_module"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fx_keeps_the_variant_as_a_leaf_and_matches_eager(name):
    model, x = model_with(name)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert call_modules(traced) == ["0", "1"]
    assert type(traced.get_submodule("1")) is type(model[1])
    torch.testing.assert_close(traced.eval()(x), model.eval()(x), rtol=0, atol=0)
    for seed in (1, 2):  # training: the same module runs, so the same torch seed gives the same masks and updates
        torch.manual_seed(seed)
        got = traced.train()(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(got, model.train()(x), rtol=0, atol=0)
    for (key, a), b in zip(traced.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_fx_quantization_prepares_a_model_holding_variants():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        nd.GhostBatchNorm2d(4, ghost_batch_size=2),
        torch.nn.ReLU(),
        nd.DropBlock2d(0.2, block_size=3),
        nd.DropPath(0.2),
    ).eval()
    x = torch.randn(4, 3, 6, 6)
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), example_inputs=(x,))
    kinds = {type(module).__name__ for module in prepared.modules()}
    assert {"GhostBatchNorm2d", "DropBlock2d", "DropPath"} <= kinds
    torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=0)  # observers record, they do not change values


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jit_trace_in_eval_matches_eager(name):
    model, x = model_with(name)
    model.eval()
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(traced(2 * x), model(2 * x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jit_script_refuses_the_variant_with_a_message(name):
    model, _ = model_with(name)
    with pytest.raises(
        TypeError, match=rf"torch.jit.script does not support {name} .*torch.jit.trace or torch.compile"
    ):
        torch.jit.script(model)


@pytest.mark.parametrize(
    ("layer", "twin", "shape"),
    [
        (nd.AlphaDropout, torch.nn.AlphaDropout, (6, 5)),
        (nd.FeatureAlphaDropout, torch.nn.FeatureAlphaDropout, (6, 3, 4)),
    ],
)
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_scripted_alpha_dropout_ignores_inplace_as_torch_and_eager_do(layer, twin, shape, p):
    x = torch.randn(*shape)
    outputs = {}
    for label, module in (
        ("eager", layer(p, inplace=True)),
        ("script", torch.jit.script(layer(p, inplace=True))),
        ("torch", twin(p, inplace=True)),
    ):
        given = x.clone()
        torch.manual_seed(3)
        outputs[label] = module.train()(given)
        torch.testing.assert_close(given, x, rtol=0, atol=0, msg=f"{label} wrote into its input")
    torch.testing.assert_close(outputs["script"], outputs["eager"], rtol=0, atol=0)
    if p == 1.0:  # every unit dropped: the same constant as torch's layer
        torch.testing.assert_close(outputs["script"], outputs["torch"], rtol=0, atol=0)


EXPORTED_IN_TRAINING = ["GhostBatchNorm2d", "FrozenBatchNorm2d", "DropPath", "DropConnect"]
"""The variants torch.export captures in training mode (README); the others stop on a data-dependent ``.item()``."""


@pytest.mark.parametrize("name", EXPORTED_IN_TRAINING)
def test_export_in_training_runs_the_variant(name):
    model, x = model_with(name)
    exported = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
    if name in ("GhostBatchNorm2d", "FrozenBatchNorm2d"):  # no randomness: the same outputs as eager
        torch.testing.assert_close(exported(x), model.train()(x), rtol=1e-6, atol=1e-6)
    elif name == "DropPath":  # each sample dropped whole or kept and scaled by 1 / (1 - p), as in eager mode
        y = exported(x)
        for sample, given in zip(y, x, strict=True):
            assert torch.equal(sample, torch.zeros_like(sample)) or torch.allclose(sample, given / 0.7)
    else:
        assert exported(x).shape == model(x).shape


@pytest.mark.parametrize("name", ["GhostBatchNorm2d", "BatchRenorm1d", "FrozenBatchNorm1d", "DropPath", "DropConnect"])
def test_compile_default_has_no_graph_break_on_the_variant(name):
    import torch._dynamo

    model, x = model_with(name)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model.train())(x).graph_break_count == 0
