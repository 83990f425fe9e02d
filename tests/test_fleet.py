"""Fleet training: every member bit for bit its solo run (the oracle is normdrop.train.run on the member's spec)."""

from __future__ import annotations

import math

import pytest
import torch

from normdrop.fleet import Fleet, fleet_dropout_multiplier, fleet_key, group_specs, run_fleet
from normdrop.lab import run_fleet_specs, run_spec
from normdrop.nn import functional as ndF
from normdrop.spec import RunSpec
from normdrop.train import run

BASE = {"dataset": "mnist1d", "train_size": 400, "steps": 12, "eval_every": 5, "batch_size": 50}


def _comparable(result):
    """Everything a stored run holds except wall-clock times."""
    metrics = [(step, name, value) for step, name, value in result.metrics if name != "train_time"]
    summary = {key: value for key, value in result.summary.items() if key != "train_time"}
    return (
        result.run_id,
        result.status,
        result.diverged_step,
        result.error,
        metrics,
        summary,
        result.probe_records,
        result.artifacts,
    )


def _assert_members_equal_solo(specs):
    """The oracle: each member's result from the lab's fleet path equals ``run_spec`` of its spec (the solo path
    that attaches the same probes)."""
    fleet_results = run_fleet_specs(specs)
    for spec, fleet_result in zip(specs, fleet_results, strict=True):
        solo = run_spec(spec)
        assert solo.status != "failed", solo.error
        assert _comparable(fleet_result) == _comparable(solo), spec
    return fleet_results


OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "lr": 0.05},
    "sgd_momentum_wd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "nesterov": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
    "adam": {"optimizer": "adam", "lr": 0.01},
    "adamw": {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.05},
}
LAYERS = {
    "plain": {},
    "bn": {"norm": "batch"},
    "dropout": {"dropout": 0.2},
    "bn_dropout": {"norm": "batch", "dropout": 0.1, "dropout_position": "before_norm", "warmup_steps": 3},
}


@pytest.mark.parametrize("layers", list(LAYERS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_members_equal_solo_runs(optimizer, layers):
    # width 37 is not a multiple of 16 (vector tails move with K); per-member lr, seed, init and dropout p
    options = {**BASE, **OPTIMIZERS[optimizer], **LAYERS[layers], "width": 37, "depth": 2}
    lr = options.pop("lr")
    specs = []
    for k in range(2):
        member = dict(options, seed=k, lr=lr * (1 + 0.5 * k))
        if k == 1:
            member.update(init="kaiming", schedule="cosine")
            if member.get("dropout"):
                member["dropout"] = 0.3
        specs.append(RunSpec(**member))
    _assert_members_equal_solo(specs)


@pytest.mark.parametrize(("members", "width", "depth"), [(1, 48, 2), (7, 64, 3), (7, 100, 1)])
def test_fleet_sizes_and_widths(members, width, depth):
    specs = [
        RunSpec(**BASE, width=width, depth=depth, norm="batch", dropout=0.1, seed=k, lr=0.005 * (k + 1))
        for k in range(members)
    ]
    _assert_members_equal_solo(specs)


def test_forty_members_few_steps():
    options = {**BASE, "steps": 3, "eval_every": 3, "width": 20, "norm": "batch", "dropout": 0.2}
    specs = [RunSpec(**options, seed=k, lr=0.001 * (k + 1), optimizer="sgd", momentum=0.5) for k in range(40)]
    _assert_members_equal_solo(specs)


def test_members_diverge_at_their_own_steps():
    options = {**BASE, "steps": 20, "eval_every": 4, "optimizer": "sgd", "momentum": 0.9, "width": 24}
    specs = [
        RunSpec(**options, seed=k, lr=lr, diverge_loss=limit)
        for k, (lr, limit) in enumerate([(0.01, 100.0), (3.0, 100.0), (8.0, 100.0), (0.05, 2.2), (30.0, 100.0)])
    ]
    results = _assert_members_equal_solo(specs)
    steps = {result.diverged_step for result in results if result.status == "diverged"}
    assert len(steps) >= 2, [(r.status, r.diverged_step) for r in results]  # diverging at different steps
    assert any(result.status == "finished" for result in results)


def test_member_masks_equal_solo_masks():
    seeds, ps = [11, 2**61 + 5, 0], [0.1, 0.5, 0.9]
    multiplier = fleet_dropout_multiplier((3, 30, 37), seeds, ps)
    for k, (seed, p) in enumerate(zip(seeds, ps, strict=False)):
        # the solo layer draws its seed from torch's default generator: find the seed state that draws `seed`
        ones = torch.ones(30, 37)
        solo = _dropout_with_seed(ones, p, seed)
        assert torch.equal(multiplier[k], solo)


def _dropout_with_seed(x, p, seed):
    import normdrop.nn.functional as functional_module

    original = functional_module.draw_seed
    functional_module.draw_seed = lambda generator=None: seed
    try:
        return ndF.dropout(x, p, training=True)
    finally:
        functional_module.draw_seed = original


def test_probe_records_equal_solo_runs():
    options = {**BASE, "steps": 6, "norm": "batch", "dropout": 0.2, "probes": ("layer_inputs",), "probe_every": 3}
    specs = [RunSpec(**options, seed=k, lr=0.01 * (k + 1)) for k in range(2)]
    results = _assert_members_equal_solo(specs)
    assert all(result.probe_records for result in results)


def test_final_weights_are_kept_as_the_solo_run_keeps_them():
    # spec.keep = ("final_weights",): each finished member stores the bytes run_spec stores; one member diverges at
    # its first step (diverge_loss below any loss) and, as a diverged solo run, keeps nothing
    options = {**BASE, "steps": 6, "norm": "batch", "dropout": 0.2, "keep": ("final_weights",)}
    specs = [RunSpec(**options, seed=k, lr=0.01 * (k + 1)) for k in range(2)]
    specs.append(RunSpec(**options, seed=2, diverge_loss=1e-6))
    results = _assert_members_equal_solo(specs)
    assert [r.status for r in results] == ["finished", "finished", "diverged"]
    assert [sorted(r.artifacts) for r in results] == [["final_weights"], ["final_weights"], []]
    assert results[0].artifacts["final_weights"] != results[1].artifacts["final_weights"]
    plain = run_fleet_specs([RunSpec(**{**options, "keep": ()}, seed=k) for k in range(2)])
    assert all(r.status == "finished" and r.artifacts == {} for r in plain)


class _CountMetrics:
    """A hook that records what it saw: the learning rate and how many metrics the run had recorded so far."""

    every = 4
    name = "count_metrics"

    @torch.no_grad()
    def __call__(self, ctx):
        return [
            {
                "lr": ctx.lr,
                "metrics": len(ctx.metrics),
                "loss": ctx.loss_fn(ctx.model(ctx.probe_batch[0]), ctx.probe_batch[1]).item(),
            }
        ]


def test_extra_hooks_see_what_they_see_in_the_solo_run():
    specs = [RunSpec(**BASE, norm="batch", dropout=0.1, seed=k, lr=0.01 * (k + 1)) for k in range(2)]
    results = run_fleet(specs, hooks_factory=lambda spec: [_CountMetrics()])
    for spec, result in zip(specs, results, strict=True):
        solo = run(spec, hooks=[_CountMetrics()])
        assert result.probe_records == solo.probe_records and len(solo.probe_records) == 4
        assert _comparable(result) == _comparable(solo)


def test_probes_without_their_hooks_are_refused_as_by_the_trainer():
    specs = [RunSpec(**BASE, probes=("layer_inputs",), seed=k) for k in range(2)]
    with pytest.raises(ValueError, match="run_fleet_specs"):
        run_fleet(specs)
    with pytest.raises(ValueError, match="run_spec"):
        run(specs[0])
    with pytest.raises(ValueError, match="one per spec"):
        run_fleet(specs, probe_hooks=[[]])
    bad = _CountMetrics()
    bad.every = -1
    results = run_fleet([RunSpec(**BASE, seed=k) for k in range(2)], hooks_factory=lambda spec: [bad])
    assert [r.status for r in results] == ["failed", "failed"] and all("every must be" in r.error for r in results)


def test_member_model_is_the_solo_model():
    specs = [RunSpec(**BASE, norm="batch", seed=k) for k in range(3)]
    fleet = Fleet(specs, (40,), 10)
    model, optimizer = fleet.member_model(1)
    from normdrop.models import build_model

    solo = build_model(specs[1], (40,), 10)
    for (name, value), (solo_name, solo_value) in zip(
        model.state_dict().items(), solo.state_dict().items(), strict=False
    ):
        assert name == solo_name and torch.equal(value, solo_value)
    assert isinstance(optimizer, torch.optim.Adam)


def test_grouping():
    a = RunSpec(**BASE, seed=0)
    b = RunSpec(**BASE, seed=1, lr=0.1)
    c = RunSpec(**BASE, seed=0, width=50)
    cnn = RunSpec(**BASE, model="cnn1d")
    gelu = RunSpec(**BASE, activation="gelu")
    assert fleet_key(a) == fleet_key(b) != fleet_key(c)
    # the data seed and BN momentum / eps are the members' own: one fleet
    bn = fleet_key(RunSpec(**BASE, norm="batch"))
    for other in ({"data_seed": 3}, {"norm_momentum": None}, {"norm_eps": 1e-3}):
        assert fleet_key(RunSpec(**BASE, norm="batch", **other)) == bn, other
    assert fleet_key(cnn) is None and fleet_key(gelu) is None
    assert fleet_key(RunSpec(**BASE, momentum=0.5, optimizer="sgd")) != fleet_key(RunSpec(**BASE, optimizer="sgd"))
    fleets, solo = group_specs([a, b, c, cnn])
    assert fleets == [[a, b]] and solo == [cnn, c]


def test_mixed_specs_are_refused():
    with pytest.raises(ValueError, match="fleet_key"):
        Fleet([RunSpec(**BASE), RunSpec(**BASE, width=7)], (40,), 10)


def test_failure_marks_every_member_failed():
    specs = [RunSpec(**{**BASE, "batch_size": 1000}, seed=k) for k in range(2)]
    results = run_fleet(specs)
    assert [r.status for r in results] == ["failed", "failed"]
    assert all("batch_size=1000" in r.error for r in results)
    assert all(not math.isnan(r.wall_time) for r in results)


def test_sweep_with_and_without_fleet_stores_the_same_runs(tmp_path):
    from normdrop.store import Store
    from normdrop.sweep import plan_tasks, run_sweep

    # with probes and kept weights: the sweep's fleets build each member's probes as run_spec does
    options = {**BASE, "steps": 6, "norm": "batch", "dropout": 0.1, "probes": ("layer_inputs",), "probe_every": 3}
    options["keep"] = ("final_weights",)
    # data_seed = seed on a training subset with label noise, as the study runs them: still one fleet
    options.update(train_size=200, label_noise=0.1)
    specs = [RunSpec(**options, seed=k, data_seed=k, lr=0.01 * (k + 1)) for k in range(3)]
    specs += [RunSpec(**options, seed=0, width=50), RunSpec(**{**options, "model": "cnn1d", "width": 8})]
    assert [len(task) if isinstance(task, tuple) else 1 for task in plan_tasks(specs, workers=1)] == [3, 1, 1]
    stored = {}
    for fleet in (True, False):
        path = tmp_path / f"fleet_{fleet}.sqlite"
        report = run_sweep(specs, path, workers=1, progress=False, fleet=fleet)
        assert report.finished == len(specs)
        with Store(path) as store:
            results = {spec.run_id: store.result(spec.run_id) for spec in specs}
            fleets = {run.run_id: run.versions.get("fleet") for run in store.runs()}
        stored[fleet] = {run_id: _comparable(result) for run_id, result in results.items()}
        members = [fleets[spec.run_id] for spec in specs[:3]]
        if fleet:
            assert {m["size"] for m in members} == {3} and len({m["id"] for m in members}) == 1
            assert fleets[specs[3].run_id] is None and fleets[specs[4].run_id] is None
        else:
            assert all(m is None for m in members)
    assert stored[True] == stored[False]
    assert all(result[6] and result[7] for result in stored[True].values())  # probe records and weights stored


def test_the_sweep_fleets_only_the_trainer_and_the_lab():
    from normdrop.sweep import fleet_twin

    assert fleet_twin(run_spec) is run_fleet_specs and fleet_twin(run) is run_fleet
    assert fleet_twin(lambda spec: run_spec(spec)) is None


def test_torch_mask_kernel_equals_the_numba_kernel():
    # the GPU path hashes in torch int64 ops; on CPU it must give the numba kernel's multiplier
    import numpy as np

    from normdrop.fleet import _torch_multiplier
    from normdrop.nn.kernels import numba_cpu
    from normdrop.nn.rng import drop_threshold, round_keys

    seeds, ps = [3, 2**62 - 1, 99], [0.2, 0.5, 0.7]
    constants = [numba_cpu._dropout_constants(p, False, True, torch.float32)[1] for p in ps]
    by_torch = _torch_multiplier(
        (3, 20, 33),
        np.array([round_keys(s) for s in seeds], dtype=np.int64),
        np.array([drop_threshold(p) for p in ps], dtype=np.int64),
        np.array([c[1] for c in constants], dtype=np.float32),
        np.array([c[0] for c in constants], dtype=np.float32),
        torch.device("cpu"),
    )
    assert torch.equal(by_torch, fleet_dropout_multiplier((3, 20, 33), seeds, ps))


def test_batched_path_of_other_devices_matches_solo_to_tolerance():
    # exact=False is the path a CUDA fleet takes (batched losses and evaluation): close to solo, not bitwise
    specs = [RunSpec(**BASE, norm="batch", dropout=0.1, seed=k, lr=0.01 * (k + 1)) for k in range(3)]
    for spec, result in zip(specs, run_fleet(specs, exact=False), strict=True):
        solo = run(spec)
        assert result.status == solo.status == "finished"
        for name in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            assert result.summary[name] == pytest.approx(solo.summary[name], rel=1e-3, abs=5e-3), name


def test_no_fleets_under_the_composite_backend():
    from normdrop.nn import kernels

    specs = [RunSpec(**BASE, seed=k) for k in range(3)]
    assert group_specs(specs) == ([specs], [])
    kernels.set_backend("composite")
    try:
        assert group_specs(specs) == ([], specs)
    finally:
        kernels.set_backend(None)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_per_member_momentum_and_weight_decay(optimizer):
    extra = {"momentum": 0.9, "nesterov": True} if optimizer == "sgd" else {}
    specs = [
        RunSpec(
            **{**BASE, "steps": 8},
            optimizer=optimizer,
            width=37,
            norm="batch",
            seed=k,
            lr=0.02,
            weight_decay=wd,
            warmup_steps=2,
            schedule="step",
            lr_step_size=3,
            lr_gamma=0.5,
            **({**extra, "momentum": momentum} if extra else {}),
        )
        for k, (momentum, wd) in enumerate([(0.9, 1e-3), (0.5, 3e-2), (0.99, 1e-4)])
    ]
    _assert_members_equal_solo(specs)


DATA_SEEDED = {"train_size": 200, "label_noise": 0.1, "steps": 8, "eval_every": 4}


@pytest.mark.parametrize("optimizer", ["sgd_momentum_wd", "adam"])
@pytest.mark.parametrize("layers", ["plain", "bn_dropout"])
@pytest.mark.parametrize("members", [2, 7])
def test_members_with_their_own_data_seeds_equal_solo_runs(members, layers, optimizer):
    # data_seed = seed, as the study draws each seed's training subset and label noise: one fleet, each member on
    # its own subset, noisy labels and standardization statistics (so its own test inputs too); seeds 0 and 3
    # share a data_seed (two members reading one dataset among members reading their own)
    options = {**BASE, **DATA_SEEDED, **OPTIMIZERS[optimizer], **LAYERS[layers], "width": 37, "depth": 2}
    lr = options.pop("lr")
    data_seeds = [0, 1, 2, 0, 3, 4, 5][:members]
    specs = [RunSpec(**options, seed=k, data_seed=d, lr=lr * (1 + 0.1 * k)) for k, d in enumerate(data_seeds)]
    assert len({fleet_key(spec) for spec in specs}) == 1
    fleets, solo = group_specs(specs)
    assert fleets == [specs] and solo == []
    results = _assert_members_equal_solo(specs)
    # the data differ: members with other data_seeds end with other train losses than member 0's
    losses = [result.summary["train_loss"] for result in results]
    assert len(set(losses)) == members


def test_members_of_a_synthetic_dataset_with_their_own_data_seeds():
    # blobs: the data_seed draws the data themselves (train and test); a 3-member fleet with BN and dropout
    options = {**BASE, "dataset": "blobs", "train_size": None, "steps": 6, "eval_every": 3, "norm": "batch"}
    options["dropout"] = 0.2
    options["dataset_options"] = (("n_train", 300), ("n_test", 150))
    specs = [RunSpec(**options, seed=k, data_seed=10 + k, lr=0.01) for k in range(3)]
    _assert_members_equal_solo(specs)


def test_members_whose_datasets_differ_in_shape_train_in_fleets_of_one_shape(monkeypatch):
    # every real data_seed gives one shape; a loader where data_seed 2 gives 300 training examples instead of 200
    # must split the fleet (members with data_seed 2 train together, the others together), each still its solo run
    import normdrop.fleet as fleet_module
    import normdrop.train as train_module

    real = train_module.load_run_dataset

    def uneven(spec, data_root=None):
        return real(spec.model_copy(update={"train_size": 300 if spec.data_seed == 2 else 200}), data_root)

    monkeypatch.setattr(train_module, "load_run_dataset", uneven)
    monkeypatch.setattr(fleet_module, "load_run_dataset", uneven)
    options = {**BASE, **DATA_SEEDED, "norm": "batch", "dropout": 0.1}
    specs = [RunSpec(**options, seed=k, data_seed=d) for k, d in enumerate([0, 2, 1, 2])]
    seen = []
    original = fleet_module._train_fleet

    def spy(specs, datasets, *args):
        seen.append([spec.data_seed for spec in specs])
        return original(specs, datasets, *args)

    monkeypatch.setattr(fleet_module, "_train_fleet", spy)
    _assert_members_equal_solo(specs)
    assert sorted(seen) == [[0, 1], [2, 2]]


def test_members_with_their_own_batch_norm_momentum_and_eps():
    # per-member BN momentum (None: the cumulative average) and eps, in an order that is not grouped by setting;
    # the evaluations read the running statistics that momentum makes
    options = {**BASE, **DATA_SEEDED, "norm": "batch", "dropout": 0.1, "width": 37, "depth": 2}
    settings = [(0.1, 1e-5), (0.3, 1e-3), (None, 1e-5), (0.1, 1e-5), (0.3, 1e-5), (None, 1e-5)]
    specs = [
        RunSpec(**options, seed=k, data_seed=k % 2, norm_momentum=m, norm_eps=e) for k, (m, e) in enumerate(settings)
    ]
    assert len({fleet_key(spec) for spec in specs}) == 1
    results = _assert_members_equal_solo(specs)
    assert results[0].summary["test_loss"] != results[3].summary["test_loss"]  # other data_seed, same setting


def test_the_fleet_nodes_carry_batch_norm_and_dropout(monkeypatch):
    # on CPU every BN and dropout layer of a training step is one C++ node over the members (not K Python calls)
    from normdrop.nn.kernels import fastpath

    calls = {"bn": 0, "dropout": 0}
    bn, dropout = fastpath.fleet_batch_norm, fastpath.fleet_dropout_drawing_seeds

    def counting(kind, function):
        def wrapped(*args, **kwargs):
            y = function(*args, **kwargs)
            calls[kind] += y is not None
            return y

        return wrapped

    monkeypatch.setattr(fastpath, "fleet_batch_norm", counting("bn", bn))
    monkeypatch.setattr(fastpath, "fleet_dropout_drawing_seeds", counting("dropout", dropout))
    options = {**BASE, "steps": 2, "eval_every": 2, "norm": "batch", "dropout": 0.2, "depth": 3}
    run_fleet([RunSpec(**options, seed=k) for k in range(3)])
    if fastpath.extension() is None:
        pytest.skip("the C++ fast path cannot be built here")
    assert calls["dropout"] == 2 * 3  # 2 steps x 3 layers
    assert calls["bn"] >= 2 * 3  # and the evaluations' inference calls


def test_members_equal_solo_runs_without_the_fast_path(monkeypatch):
    # with the fast path off the fleet takes the solo call member by member (BN) and the multiplier (dropout)
    from normdrop.nn.kernels import fastpath

    monkeypatch.setattr(fastpath, "_forced", False)
    options = {**BASE, "norm": "batch", "dropout": 0.2, "width": 37, "depth": 2, "steps": 6}
    settings = [(0.1, 1e-5), (None, 1e-3), (0.3, 1e-5)]
    _assert_members_equal_solo(
        [RunSpec(**options, seed=k, norm_momentum=m, norm_eps=e) for k, (m, e) in enumerate(settings)]
    )


def test_one_row_batches_with_batch_norm_fail_as_the_solo_runs_do():
    # training batch norm on one row per member is an error in the solo run; the fleet's node must not hide it
    specs = [RunSpec(**{**BASE, "batch_size": 1, "steps": 2}, norm="batch", seed=k) for k in range(2)]
    for spec, result in zip(specs, run_fleet(specs), strict=True):
        solo = run(spec)
        assert solo.status == result.status == "failed"
        assert "more than 1 value per channel" in solo.error
        assert result.error == solo.error.splitlines()[-1]  # the solo run stores the traceback above it
