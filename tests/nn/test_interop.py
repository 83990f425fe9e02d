"""normdrop's layers where torch.nn's work: each check runs on a small CNN converted with ``nd.convert`` and on its
torch.nn twin (the same weights), and compares what the tool gives for both.

Dropout masks are normdrop's own (not torch's), so where a check runs in training mode with dropout it compares
normdrop under the tool with normdrop in eager mode from the same ``torch.manual_seed`` (the masks' seeds come
from the same ``torch.randint`` draw), and batch norm's numbers with the twin's on a model without dropout.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import normdrop.nn as nd
from normdrop.nn.kernels import composite
from normdrop.nn.rng import round_keys

ATOL = 1e-5


def twin(dropout: bool = True) -> torch.nn.Sequential:
    """The torch.nn model; ``nd.convert`` of a copy is its normdrop twin."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Dropout2d(0.2),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 6 * 6, 12),
        torch.nn.BatchNorm1d(12),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(12, 4),
    ]
    if not dropout:
        layers = [layer for layer in layers if not isinstance(layer, torch.nn.modules.dropout._DropoutNd)]
    return torch.nn.Sequential(*layers)


def pair(dropout: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(torch.nn model, normdrop model) with the same weights and running statistics (a few training batches
    in, so the statistics are not the initial zeros and ones)."""
    reference = twin(dropout)
    with torch.no_grad():
        for step in range(3):
            reference(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(step)))
    converted = nd.convert(copy.deepcopy(reference))
    assert any(type(m).__module__.startswith("normdrop") for m in converted.modules())
    return reference, converted


def batch(seed: int = 7, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, atol: float = ATOL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=1e-4, msg=key)


def normdrop_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m).__module__.startswith("normdrop.nn")]


# ------------------------------------------------------------------------------------------- passing, to keep


def test_eager_matches_twin_in_eval_and_batch_norm_in_training():
    reference, model = pair()
    x = batch()
    torch.testing.assert_close(model.eval()(x), reference.eval()(x), atol=ATOL, rtol=1e-4)
    reference, model = pair(dropout=False)
    torch.testing.assert_close(model.train()(x), reference.train()(x), atol=ATOL, rtol=1e-4)
    assert_same_state(model, reference)


def test_state_dict_loads_both_ways():
    reference, model = pair()
    fresh_nd, fresh_torch = nd.convert(twin()), twin()
    for p in fresh_torch.parameters():
        p.data.add_(1.0)
    fresh_nd.load_state_dict(reference.state_dict())
    fresh_torch.load_state_dict(model.state_dict())
    assert_same_state(fresh_nd, reference, atol=0)
    assert_same_state(fresh_torch, model, atol=0)


def test_deepcopy_pickle_and_torch_save_weights_only():
    _, model = pair()
    x = batch()
    expected = model.eval()(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = nd.convert(twin())
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), restored):
        assert normdrop_layers(clone) == normdrop_layers(model)
        torch.testing.assert_close(clone.eval()(x), expected, atol=0, rtol=0)


def test_jit_trace_in_eval_matches_twin():
    reference, model = pair()
    x = batch()
    traced = torch.jit.trace(model.eval(), (x,))
    torch.testing.assert_close(traced(batch(8)), reference.eval()(batch(8)), atol=ATOL, rtol=1e-4)


def test_jit_trace_in_training_draws_a_fresh_mask_per_call():
    _, model = pair()
    x = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(copy.deepcopy(model).train(), (x,), check_trace=False)
    torch.manual_seed(3)
    first, second = traced(x), traced(x)
    assert not torch.equal(first, second)  # the seed is drawn by the graph, not frozen into it
    torch.manual_seed(3)
    eager = copy.deepcopy(model).train()(x)
    torch.testing.assert_close(first, eager, atol=ATOL, rtol=1e-4)


def test_export_in_eval_matches_twin():
    reference, model = pair()
    program = torch.export.export(model.eval(), (batch(),))
    torch.testing.assert_close(program.module()(batch(9)), reference.eval()(batch(9)), atol=ATOL, rtol=1e-4)


def test_functional_call_matches_twin():
    reference, model = pair()
    params = {name: p.detach() * 1.5 for name, p in reference.named_parameters()}
    x = batch()
    torch.testing.assert_close(
        functional_call(model.eval(), params, (x,)),
        functional_call(reference.eval(), params, (x,)),
        atol=ATOL,
        rtol=1e-4,
    )


def test_autocast_bf16_and_channels_last():
    reference, model = pair()
    x = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = model.eval()(x), reference.eval()(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.05)
    conv_bn_ref, conv_bn = reference[:2].eval(), model[:2].eval()
    x_last = x.to(memory_format=torch.channels_last)
    got, expected = conv_bn(x_last), conv_bn_ref(x_last)
    assert got.is_contiguous(memory_format=torch.channels_last) == expected.is_contiguous(
        memory_format=torch.channels_last
    )
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_fuse_conv_bn_eval_and_update_bn():
    reference, model = pair()
    x = batch()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0].eval(), model[1].eval())
    torch.testing.assert_close(fused(x), reference[1].eval()(reference[0](x)), atol=ATOL, rtol=1e-4)
    loader = [batch(s) for s in range(3)]
    reference, model = pair(dropout=False)
    torch.optim.swa_utils.update_bn(loader, reference)
    torch.optim.swa_utils.update_bn(loader, model)
    assert_same_state(model, reference)


def test_compile_fullgraph_aot_eager_matches_eager():
    _, model = pair()
    x = batch()
    compiled = torch.compile(copy.deepcopy(model).train(), backend="aot_eager", fullgraph=True)
    eager = copy.deepcopy(model).train()
    torch.manual_seed(4)
    got = compiled(x)
    got.sum().backward()
    torch.manual_seed(4)
    expected = eager(x)
    expected.sum().backward()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
    assert_same_state(compiled._orig_mod, eager)


# --------------------------------------------------------------------------------- the rows that failed before


def test_jit_script_matches_twin_and_eager():
    reference, model = pair()
    x = batch()
    scripted, scripted_ref = torch.jit.script(copy.deepcopy(model)), torch.jit.script(copy.deepcopy(reference))
    torch.testing.assert_close(scripted.eval()(x), scripted_ref.eval()(x), atol=ATOL, rtol=1e-4)
    # training: the scripted dropout draws its seed as eager mode does, so the same torch seed gives the same masks
    eager = copy.deepcopy(model).train()
    torch.manual_seed(5)
    got = scripted.train()(x)
    torch.manual_seed(5)
    torch.testing.assert_close(got, eager(x), atol=ATOL, rtol=1e-4)
    assert_same_state(scripted, eager)
    # batch norm in training, momentum=None included, against torch's scripted layers
    reference, model = pair(dropout=False)
    for module in (reference, model):
        module[1].momentum = None
        module[1].reset_running_stats()
    scripted, scripted_ref = torch.jit.script(model), torch.jit.script(reference)
    for seed in range(2):
        torch.testing.assert_close(
            scripted.train()(batch(seed)), scripted_ref.train()(batch(seed)), atol=ATOL, rtol=1e-4
        )
    assert_same_state(scripted, scripted_ref)


def test_jit_script_refuses_a_layer_with_its_own_generator():
    with pytest.raises(TypeError, match="generator"):
        torch.jit.script(torch.nn.Sequential(nd.Dropout(0.5, generator=torch.Generator())))


def test_export_in_training_mode():
    reference, model = pair(dropout=False)
    x = batch()
    program = torch.export.export(copy.deepcopy(model).train(), (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x), reference.train()(x), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(exported.state_dict()["1.running_mean"], reference[1].running_mean, atol=ATOL, rtol=0)
    # with dropout: the exported graph draws the mask seed on each call, as eager normdrop does
    _, model = pair()
    exported = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
    eager = copy.deepcopy(model).train()
    torch.manual_seed(6)
    got, again = exported(x), exported(x)
    torch.manual_seed(6)
    torch.testing.assert_close(got, eager(x), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(again, eager(x), atol=ATOL, rtol=1e-4)
    assert not torch.equal(got, again)


def call_module_targets(graph_module: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_module"]


def test_fx_symbolic_trace_keeps_normdrop_layers_as_leaves():
    reference, model = pair()
    traced, traced_ref = torch.fx.symbolic_trace(model), torch.fx.symbolic_trace(reference)
    assert call_module_targets(traced) == call_module_targets(traced_ref) == [str(i) for i in range(len(model))]
    for target in normdrop_layers(model):
        assert type(traced.get_submodule(target)) is type(model.get_submodule(target))
    x = batch()
    torch.testing.assert_close(traced.eval()(x), reference.eval()(x), atol=ATOL, rtol=1e-4)


def test_fx_quantization_prepare_fx():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    reference, model = pair()
    x = batch()
    mapping = get_default_qconfig_mapping("x86")
    prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, (x,))
    prepared_ref = prepare_fx(copy.deepcopy(reference).eval(), mapping, (x,))
    observers = [n for n in call_module_targets(prepared) if "activation_post_process" in n]
    assert observers and len(observers) >= len(
        [n for n in call_module_targets(prepared_ref) if "activation_post_process" in n]
    )
    # observers pass values through: calibration gives the float model's outputs
    torch.testing.assert_close(prepared(x), reference.eval()(x), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(prepared_ref(x), reference.eval()(x), atol=ATOL, rtol=1e-4)


def test_func_grad_and_jacrev_match_twin():
    for dropout, mode in ((True, "eval"), (False, "train")):
        reference, model = pair(dropout)
        x = batch()
        params = {k: v.detach() for k, v in reference.named_parameters()}
        results = []
        for module in (model, reference):
            module.train(mode == "train")
            # the running statistics are passed in, as torch.func needs for anything it updates in place
            buffers = {k: v.clone() for k, v in module.named_buffers()}

            def loss(p, b, module=module, x=x):
                return functional_call(module, (p, b), (x,)).square().mean()

            results.append((grad(loss)(params, buffers), buffers))
        (got, got_buffers), (expected, expected_buffers) = results
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=ATOL, rtol=1e-4, msg=key)
        for key in expected_buffers:  # in training the running statistics moved as torch's did
            torch.testing.assert_close(got_buffers[key], expected_buffers[key], atol=ATOL, rtol=1e-4, msg=key)
    # a captured buffer updated in place under grad is refused, for torch's layer and normdrop's alike
    for module in pair(dropout=False):
        params = {k: v.detach() for k, v in module.named_parameters()}
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            grad(lambda p, module=module: functional_call(module.train(), p, (batch(),)).sum())(params)
    reference, model = pair()
    x = batch(n=2)
    torch.testing.assert_close(jacrev(model.eval())(x), jacrev(reference.eval())(x), atol=ATOL, rtol=1e-4)


def test_vmap_and_functional_call_under_vmap():
    reference, model = pair()
    xs = batch(n=12).view(3, 4, 3, 6, 6)
    params = {k: v.detach() for k, v in reference.named_parameters()}
    for module in (reference, model):
        module.eval()
    got = vmap(lambda xb: functional_call(model, params, (xb,)))(xs)
    torch.testing.assert_close(
        got, vmap(lambda xb: functional_call(reference, params, (xb,)))(xs), atol=ATOL, rtol=1e-4
    )
    torch.testing.assert_close(got, torch.stack([model(xb) for xb in xs]), atol=ATOL, rtol=1e-4)


def test_vmap_training_with_unbatched_running_stats_is_refused_as_torch_does():
    reference, model = pair(dropout=False)
    xs = batch(n=8).view(2, 4, 3, 6, 6)
    for module in (reference, model):
        with pytest.raises(RuntimeError, match="running_mean"):
            vmap(module.train())(xs)


def test_vmap_dropout_randomness_like_torch():
    xs = torch.ones(4, 64)
    for layer in (torch.nn.Dropout(0.5), nd.Dropout(0.5)):
        with pytest.raises(RuntimeError, match="randomness"):
            vmap(layer)(xs)
        same = vmap(layer, randomness="same")(xs)
        assert torch.equal(same, same[:1].expand_as(same))
        different = vmap(layer, randomness="different")(xs)
        assert len({tuple(row.tolist()) for row in different}) == 4
        assert set(different.unique().tolist()) <= {0.0, 2.0}


def test_model_ensembling_recipe():
    """torch's recipe: stack_module_state + vmap(functional_call); batched running statistics are updated."""
    outputs = {}
    for lib in ("torch", "normdrop"):
        models = []
        for index in range(3):
            reference, _ = pair(dropout=False)
            with torch.no_grad():
                for p in reference.parameters():
                    p.add_(0.1 * index)
            models.append(reference if lib == "torch" else nd.convert(copy.deepcopy(reference)))
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        x = batch()
        out = vmap(lambda p, b, xb, base=base: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None))(
            params, buffers, x
        )
        loop = torch.stack([m.train()(x) for m in models])
        torch.testing.assert_close(out, loop, atol=ATOL, rtol=1e-4)
        for key in ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var", "5.num_batches_tracked"):
            # one update each: the vmapped call's on the stacked buffers, the loop's on each model's own
            torch.testing.assert_close(buffers[key], torch.stack([m.state_dict()[key] for m in models]), msg=key)
        outputs[lib] = (out, {k: v.clone() for k, v in buffers.items()})
    torch.testing.assert_close(outputs["normdrop"][0], outputs["torch"][0], atol=ATOL, rtol=1e-4)
    for key, value in outputs["torch"][1].items():
        torch.testing.assert_close(outputs["normdrop"][1][key], value, atol=ATOL, rtol=1e-4, msg=key)


def test_tensor_seed_hash_matches_the_spec():
    seeds = [0, 1, 2**62 - 1, 123456789012345, 2**40 + 7]
    for seed in seeds:
        keys = composite.round_keys_tensor(torch.tensor([seed]))
        assert tuple(int(k) for k in keys) == round_keys(seed)
        state = torch.tensor([seed, 2**32 - 5])
        expected = composite.counter_bits(seed, 2**32 - 5, 20, torch.device("cpu"))
        assert torch.equal(composite.counter_bits_from_state(state, 20), expected)


def test_compile_default_mode_has_no_graph_break():
    for module in pair():
        explanation = torch._dynamo.explain(copy.deepcopy(module).train())(batch())
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def onnx_run(module: torch.nn.Module, x: torch.Tensor, dynamo: bool, tmp_path) -> tuple[set[str], torch.Tensor]:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    path = tmp_path / f"model-{dynamo}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=dynamo, verbose=False)
    graph = onnx.load(str(path)).graph
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), {node.domain for node in graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return {node.op_type for node in graph.node}, torch.from_numpy(out)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_runs_in_onnxruntime_like_twin(dynamo, tmp_path):
    reference, model = pair()
    x = batch()
    ops, out = onnx_run(model, x, dynamo, tmp_path)
    ops_ref, out_ref = onnx_run(reference, x, dynamo, tmp_path)
    assert ops == ops_ref
    if not dynamo:  # the dynamo exporter folds batch norm into the convolution / matmul, for both
        assert "BatchNormalization" in ops
    expected = reference.eval()(x)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_ref, expected, atol=ATOL, rtol=0)
