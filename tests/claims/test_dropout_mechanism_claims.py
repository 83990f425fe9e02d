"""The mechanism controls of dropout-coadapt, dropout-ensemble, dropout-bn-shift and summary, against closed forms:
single-unit usefulness and ablation on hand-built networks, NLL and ECE on hand-made probabilities, the matched
dropout-layer count of the bn-shift fix on the built models, summary's two comparisons on synthetic runs with
known ratios, and claims reaching their verdicts on fake runs through the study engine."""

from __future__ import annotations

import math
import random
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from torch import nn

from normdrop.claims import ClaimData, StudySetting, get
from normdrop.claims.base import ClaimResult
from normdrop.claims.dropout_bn_shift import MATCHED, matched_label, position_label
from normdrop.claims.dropout_coadapt import unit_mean
from normdrop.claims.experiment import factorial_selection_arms
from normdrop.claims.readers import final_unit_probe_scores
from normdrop.claims.results import Analysis, RunCounts, measure
from normdrop.lab import run_spec
from normdrop.models import build_model
from normdrop.probes import (
    CoadaptationProbe,
    ablation_drops,
    expected_calibration_error,
    mc_dropout_records,
    negative_log_likelihood,
    single_unit_probe_accuracy,
)
from normdrop.probes.coadaptation import TEST_EXAMPLES, single_unit_probe_correct
from normdrop.probes.ensemble import mc_example_nll_gap
from normdrop.spec import RunResult, RunSpec
from normdrop.study import run_study
from normdrop.train import HookContext, load_run_dataset

SETTING = StudySetting.create(quick=True, seeds=4)

# ---- individual usefulness: single-unit probes and ablation --------------------------------------------------


def test_single_unit_probe_matches_sklearn_lda_and_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    test_labels = torch.randint(0, 4, (300,), generator=g)
    x = torch.randn(400, 3, generator=g) + torch.stack([labels * 1.0, labels * 0.3, 0 * labels], 1)
    x_test = torch.randn(300, 3, generator=g) + torch.stack([test_labels * 1.0, test_labels * 0.3, 0 * test_labels], 1)
    ours = single_unit_probe_accuracy(x, labels, x_test, test_labels, 4)
    for unit in range(3):
        lda = LinearDiscriminantAnalysis(solver="lsqr").fit(x[:, [unit]].numpy(), labels.numpy())
        expected = float((lda.predict(x_test[:, [unit]].numpy()) == test_labels.numpy()).mean())
        assert float(ours[unit]) == pytest.approx(expected, abs=1e-12)
    # closed forms: a unit equal to the class separates exactly (accuracy 1); a constant unit predicts the most
    # frequent training class (class 1: 3 of 4 training examples), right on 2 of the 5 test examples
    train = torch.tensor([[0.0, 7.0], [1.0, 7.0], [1.0, 7.0], [1.0, 7.0]])
    train_labels = torch.tensor([0, 1, 1, 1])
    test = torch.tensor([[0.0, 7.0], [1.0, 7.0], [0.0, 7.0], [1.0, 7.0], [0.0, 7.0]])
    test_y = torch.tensor([0, 1, 0, 1, 0])
    assert single_unit_probe_accuracy(train, train_labels, test, test_y, 2).tolist() == [1.0, 0.4]


def two_unit_network() -> nn.Module:
    """Hidden units h = ReLU(x) (two of them); logits (0.5, h0 + h1): class 1 iff either unit is on."""
    first, head = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.5, 0.0]))
    return nn.Sequential(first, nn.ReLU(), head)


def test_ablation_drops_equal_the_fraction_of_examples_each_unit_alone_decides() -> None:
    # 3 examples need unit 0, 1 needs unit 1, 4 are class 0 with both off: zeroing unit 0 costs 3/8, unit 1 1/8
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[0.0, 0.0]] * 4)
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    for repeat_inputs in (False, True):
        accuracy, drops = ablation_drops(two_unit_network(), x, y, repeat_inputs=repeat_inputs)
        assert accuracy == 1.0
        assert drops["1"].tolist() == pytest.approx([3 / 8, 1 / 8])


def test_batched_ablation_equals_one_unit_at_a_time_on_mlps_and_cnns() -> None:
    torch.manual_seed(0)
    models = {
        "mlp": (nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 37), nn.ReLU(), nn.Linear(37, 3)), (60, 5)),
        "cnn": (nn.Sequential(nn.Conv1d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 10, 3)), (60, 1, 12)),
    }
    for name, (model, shape) in models.items():
        x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
        _, drops = ablation_drops(model, x, y)
        relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
        with torch.no_grad():
            base = float((model(x).argmax(1) == y).double().mean())
            for layer, module in relus:
                expected = []
                for unit in range(drops[layer].numel()):

                    def zero(_m: nn.Module, _a: Any, out: torch.Tensor, unit: int = unit) -> torch.Tensor:
                        out = out.clone()
                        out[:, unit] = 0
                        return out

                    handle = module.register_forward_hook(zero)
                    expected.append(base - float((model(x).argmax(1) == y).double().mean()))
                    handle.remove()
                assert drops[layer].tolist() == pytest.approx(expected), (name, layer)


def test_the_coadaptation_probe_records_usefulness_at_the_last_step_only() -> None:
    model = two_unit_network()
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] + [[0.0, 0.0]] * 4)
    y = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    dataset = types.SimpleNamespace(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=2)
    spec = RunSpec(steps=20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def context(step: int) -> HookContext:
        return HookContext(spec, step, 0.1, model, optimizer, None, (x, y), dataset)  # type: ignore[arg-type]

    (last,) = CoadaptationProbe()(context(20))
    assert last["ablation_drop"] == pytest.approx((3 / 8 + 1 / 8) / 2)
    assert last["ablation_drop_max"] == pytest.approx(3 / 8) and last["test_accuracy"] == 1.0
    # unit 0 alone: on for the 3 class-1 examples it decides, off for 1 class-1 and 4 class-0 ones; nearest of the
    # class means (0.75 and 0, variance-weighted with priors) -> the 3 on are class 1, the 5 off class 0: 7/8
    expected = single_unit_probe_accuracy(x, y, x, y, 2).mean()
    assert last["unit_probe_accuracy"] == pytest.approx(float(expected))
    assert float(single_unit_probe_accuracy(x[:, :1], y, x[:, :1], y, 2)[0]) == pytest.approx(7 / 8)
    (first,) = CoadaptationProbe()(context(0))
    assert "unit_probe_accuracy" not in first and "mean_abs_correlation" in first


def test_the_per_example_unit_scores_of_the_kept_network_reproduce_the_probes_record() -> None:
    """The oracle: the coadaptation probe's own record at the last step of a real run. The analysis refits the
    probes on the kept final network and scores them per test example; the mean of those scores must be the
    record's unit-weighted mean accuracy (which also checks that the kept weights are the ones the probe saw)."""
    spec = SETTING.spec(
        "small", seed=2, dropout=0.5, steps=30, train_size=200, probes=("coadaptation",), keep=("final_weights",)
    )
    result = run_spec(spec)
    scores = final_unit_probe_scores(result)
    assert scores is not None and scores.shape == (min(TEST_EXAMPLES, len(load_run_dataset(spec).y_test)),)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.std() > 0
    assert float(scores.mean()) == pytest.approx(unit_mean(result, "unit_probe_accuracy"), abs=1e-12)
    unkept = RunResult(result.run_id + "-unkept", spec, "finished", probe_records=result.probe_records)
    assert final_unit_probe_scores(unkept) is None


def test_single_unit_probe_correct_is_per_example() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    correct = single_unit_probe_correct(x[:40], y[:40], x[40:], y[40:], 3)
    assert correct.shape == (20, 5) and set(correct.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(correct.mean(dim=0), single_unit_probe_accuracy(x[:40], y[:40], x[40:], y[40:], 3))


def test_the_per_example_nll_gap_averages_to_the_records_gap() -> None:
    """The oracle: :func:`mc_dropout_records`' NLLs of the MC average of 50 masks and of weight scaling; the
    per-example gaps of the same masks must average to their difference (and be zero without dropout)."""
    torch.manual_seed(1)
    spec = SETTING.spec("small", dropout=0.5)
    data = load_run_dataset(spec)
    model = build_model(spec, data.input_shape, data.num_classes).eval()
    x, y = data.x_test[:300], data.y_test[:300]
    rows = mc_dropout_records(model, x, y, (1, 5, 50))
    ws = next(r["nll"] for r in rows if r["method"] == "weight_scaled")
    mc = next(r["nll"] for r in rows if r["method"] == "mc" and r["k"] == 50)
    gap = mc_example_nll_gap(model, x, y, 50)
    assert gap.shape == (300,) and gap.std() > 0
    assert float(gap.mean()) == pytest.approx(mc - ws, abs=1e-12)
    plain = build_model(SETTING.spec("small"), data.input_shape, data.num_classes).eval()
    assert mc_example_nll_gap(plain, x, y, 5).abs().max() < 1e-12  # every pass is weight scaling (up to rounding)
    with pytest.raises(ValueError, match="positive"):
        mc_example_nll_gap(model, x, y, 0)


# ---- NLL and ECE ----------------------------------------------------------------------------------------------


def test_nll_and_ece_closed_forms() -> None:
    probabilities = torch.tensor([[0.95, 0.05], [0.62, 0.38], [0.29, 0.71], [0.17, 0.83]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    nll = -(math.log(0.95) + math.log(0.38) + math.log(0.71) + math.log(0.83)) / 4
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(nll, abs=1e-12)
    # each confidence in its own bin of 15: ECE = mean |correct - confidence|
    ece = (0.05 + 0.62 + 0.29 + 0.17) / 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(ece, abs=1e-12)
    # two confidences in one bin (0.8, 0.8667]: one right, one wrong -> (2/2) |0.5 - 0.83|
    shared = torch.tensor([[0.81, 0.19], [0.85, 0.15]], dtype=torch.float64)
    assert expected_calibration_error(shared, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.83), abs=1e-12)
    # a calibrated bin: 10 predictions at 0.7, 7 right -> 0
    calibrated = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    assert expected_calibration_error(calibrated, torch.tensor([0] * 7 + [1] * 3)) == pytest.approx(0.0, abs=1e-12)
    # bins are right-closed: confidence 0.5 with 2 bins is in (0, 0.5]
    assert expected_calibration_error(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([0, 0]), bins=2) == (
        pytest.approx((0.5 + 0.1) / 2)
    )
    assert negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(
        -math.log(torch.finfo(torch.float64).tiny)
    )
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(probabilities, labels, bins=0)


def test_dropout_ensemble_asks_for_twice_the_seeds_and_dropout_trained_members() -> None:
    setting = StudySetting.create(seeds=5)
    experiment = get("dropout-ensemble").experiment(setting)
    dropout_nets = experiment.arms["dropout net"]
    assert experiment.replicates["dropout net"] == list(range(10))
    members = [spec for label, specs in experiment.arms.items() if label != "dropout net" for spec in specs]
    assert members and all(spec.dropout == setting.primary_dropout for spec in members)
    assert all("final_weights" in spec.keep for spec in dropout_nets + members)
    # members share their replicate's training subset, not its initialization; no seed is a selection seed
    for label, specs in experiment.arms.items():
        for replicate, spec in zip(experiment.replicates[label], specs, strict=True):
            assert spec.data_seed == replicate and spec.seed not in setting.selection_seed_list
    assert len({spec.seed for spec in dropout_nets + members}) == len(dropout_nets + members)


# ---- dropout-bn-shift: the matched count -----------------------------------------------------------------------


def dropout_and_norm_order(model: nn.Module) -> list[str]:
    """'D' for every dropout layer and 'N' for every BN layer, in forward (module) order."""
    order = []
    for module in model.modules():
        kind = type(module).__name__.lower()
        if "dropout" in kind:
            order.append("D")
        elif "batchnorm" in kind:
            order.append("N")
    return order


@pytest.mark.parametrize("name", ["mlp-sgd", "cnn1d"])
def test_the_bn_shift_fix_keeps_the_number_of_dropout_layers(name: str) -> None:
    setting = StudySetting.create(name=name, quick=True, seeds=2)
    experiment = get("dropout-bn-shift").experiment(setting)
    shape = (1, 40)
    orders = {}
    for where in MATCHED:
        spec = experiment.arms[matched_label(setting, where)][0]
        orders[where] = dropout_and_norm_order(build_model(spec, shape, 10))
    assert orders["before"].count("D") == orders["after"].count("D") == 1
    assert orders["before"] == ["D", "N"]  # the one dropout layer right before the (last) BN
    assert orders["after"] == ["N", "D"]  # the same one dropout layer after it
    # the family-depth placements have one dropout layer per hidden layer, both
    counts = [
        dropout_and_norm_order(build_model(experiment.arms[position_label(setting, p)][0], shape, 10)).count("D")
        for p in ("before_norm", "after_norm")
    ]
    assert counts[0] == counts[1] == setting.spec("small").depth


# ---- summary: two like-for-like comparisons --------------------------------------------------------------------


def linear_factorial(bn_speed: float, bn_error: float, dropout_error: float) -> Any:
    """Training accuracy rising linearly at 0.1 / steps per step (x ``bn_speed`` with BN): steps to any target are
    exact; final test error 0.4, x ``bn_error`` with BN and x ``dropout_error`` with dropout."""

    def make(spec: RunSpec) -> RunResult:
        rate = 0.1 * (bn_speed if spec.norm == "batch" else 1.0) / spec.steps
        error = 0.4 * (bn_error if spec.norm == "batch" else 1.0) * (dropout_error if spec.dropout else 1.0)
        error *= 1 + 0.01 * (random.Random(spec.run_id).random() - 0.5)
        metrics = []
        for step in range(0, spec.steps + 1, spec.eval_every):
            metrics += [(step, "train_accuracy", rate * step), (step, "test_accuracy", 1 - error)]
        return RunResult(spec.run_id, spec, "finished", metrics=metrics, wall_time=0.1)

    return make


def summary_data(make: Any, others: dict[str, ClaimResult] | None = None) -> ClaimData:
    experiment = get("summary").experiment(SETTING)
    results = {spec.run_id: make(spec) for spec in experiment.specs()}
    return ClaimData(SETTING, experiment, results, others=others or {})


def claim_result(claim_id: str, values: dict[int, float]) -> ClaimResult:
    primary = measure(claim_id, "synthetic", values, "increase", unit="u")
    return ClaimResult(get(claim_id), Analysis(primary), RunCounts(), len(values))


def test_summary_two_comparisons_have_their_closed_forms() -> None:
    # BN: 4x faster, same test error; dropout: same speed, test error x0.8 (the target is reached at 0.9 steps by
    # the plain cells and at 0.9 / 4 steps with BN: exact on linear curves)
    others = {"bn-faster": claim_result("bn-faster", {0: 1.0, 1: 1.2, 2: 0.9}), "dropout-overfit": None}
    others = {key: value for key, value in others.items() if value is not None}
    analysis = get("summary").analyze(summary_data(linear_factorial(4.0, 1.0, 0.8), others))
    error, speed = analysis.secondary[0], analysis.secondary[1]
    assert error.estimate.value == pytest.approx(math.log(1 / 0.8), abs=0.01)
    assert speed.estimate.value == pytest.approx(math.log(4.0), abs=1e-9)
    assert analysis.primary.estimate.value == pytest.approx(math.log(1 / 0.8), abs=0.01)  # the smaller one
    assert analysis.primary.verdict == error.verdict == speed.verdict == "supported"
    assert "selection seeds" in analysis.primary.note
    rows = {row[0]: row for row in analysis.tables[0].rows}
    assert rows["bn-faster"][1] == "supported" and rows["dropout-overfit"][1] == "not analysed"


def test_summary_is_contradicted_when_either_comparison_goes_the_other_way() -> None:
    # BN lowers the test error more than dropout does, although BN is faster: the error comparison is negative
    analysis = get("summary").analyze(summary_data(linear_factorial(4.0, 0.5, 0.9)))
    error, speed = analysis.secondary[0], analysis.secondary[1]
    assert error.verdict == "contradicted" and speed.verdict == "supported"
    assert analysis.primary.verdict == "contradicted"
    assert "other way" in analysis.primary.decision.reason


def test_summary_target_comes_from_the_selection_seeds_only() -> None:
    experiment = get("summary").experiment(SETTING)
    selection = factorial_selection_arms(SETTING)
    assert all(set(experiment.replicates[label]) == set(SETTING.selection_seed_list) for label in selection)

    # selection runs reach only half the accuracy: the target halves, and with it every step count, by the same
    # factor in every cell, so the ratios (the effects) do not move; evaluation-seed runs never set the target
    def make(spec: RunSpec) -> RunResult:
        result = linear_factorial(4.0, 1.0, 0.8)(spec)
        if spec.seed in SETTING.selection_seed_list:
            result.metrics = [(s, n, v / 2 if n == "train_accuracy" else v) for s, n, v in result.metrics]
        return result

    target_note = get("summary").analyze(summary_data(make)).primary.note
    assert "speed target 0.045" in target_note  # 0.9 x the plain cells' final 0.1 / 2
    missing = summary_data(linear_factorial(4.0, 1.0, 0.8))
    missing.results = {
        run_id: r for run_id, r in missing.results.items() if r.spec.seed not in SETTING.selection_seed_list
    }
    analysis = get("summary").analyze(missing)
    assert analysis.primary.verdict == "not measurable" and analysis.secondary[0].estimate is not None


# ---- claims through the study engine on fake runs ---------------------------------------------------------------


def fake_small_run(spec: RunSpec) -> RunResult:
    """Linear training curves (BN 4x faster), test error x0.8 with dropout, and coadaptation records whose
    single-unit probe accuracy is 0.25 with dropout and 0.2 without."""
    result = linear_factorial(4.0, 1.0, 0.8)(spec)
    jitter = 1 + 0.02 * (random.Random(spec.run_id).random() - 0.5)
    rows = [
        {
            "probe": "coadaptation",
            "step": spec.steps,
            "unit": None,
            "layer": layer,
            "units": spec.width,
            "mean_abs_correlation": 0.3,
            "decov": 1.0,
            "active_fraction": 0.5,
            "unit_probe_accuracy": (0.25 if spec.dropout else 0.2) * jitter,
            "ablation_drop": 0.001,
        }
        for layer in ("hidden1.act", "hidden2.act")
    ]
    result.probe_records = rows if "coadaptation" in spec.probes else []
    return result


def test_coadapt_and_summary_reach_their_verdicts_through_the_study(tmp_path: Path) -> None:
    setting = StudySetting.create(quick=True, seeds=3)
    claims = [get("dropout-coadapt"), get("summary")]
    outcome = run_study(
        setting, tmp_path / "runs.sqlite", claims=claims, workers=1, progress=False, run_fn=fake_small_run
    )
    verdicts = {result.claim.id: result.verdict for result in outcome.results}
    assert verdicts == {"dropout-coadapt": "supported", "summary": "supported"}
