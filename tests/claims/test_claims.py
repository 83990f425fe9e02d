"""Claims fed synthetic runs for which each verdict is due: the verdict reached, failed and diverged runs tolerated,
missing runs and probes reported as not measurable, broken layers caught by the mechanics claims."""

from __future__ import annotations

import math
import random
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import normdrop.nn as nd
from normdrop.claims import CLAIM_IDS, ClaimData, StudySetting, get, register, unregister
from normdrop.claims.base import Claim
from normdrop.claims.bn_stable_inputs import relative_drift
from normdrop.claims.dropout_bn_shift import position_label
from normdrop.claims.experiment import Experiment, small_label
from normdrop.claims.readers import final, steps_to_reach
from normdrop.claims.results import Analysis
from normdrop.probe_catalog import PROBES
from normdrop.probes import make_probe
from normdrop.significance import HULL_METHOD
from normdrop.spec import RunResult, RunSpec
from normdrop.stats import VERDICTS, decide, t_interval

SETTING = StudySetting.create(quick=True, seeds=4)
MECHANICS = ("bn-mechanics", "dropout-mechanics")
Make = Callable[[str, RunSpec], RunResult | None]


def run_result(
    spec: RunSpec,
    curves: dict[str, Callable[[int], float]] | None = None,
    status: str = "finished",
    probe_records: list[dict[str, Any]] | None = None,
) -> RunResult:
    """A result with the given metric curves evaluated at every ``eval_every`` steps."""
    metrics = []
    for step in range(0, spec.steps + 1, spec.eval_every):
        for name, fn in (curves or {}).items():
            metrics.append((step, name, float(fn(step))))
    return RunResult(spec.run_id, spec, status, metrics=metrics, probe_records=probe_records or [], wall_time=0.1)


def data_for(claim_id: str, make: Make, setting: StudySetting = SETTING) -> ClaimData:
    """Each spec of the claim's experiment through ``make(arm label, spec)`` (None: the store lacks the run)."""
    experiment = get(claim_id).experiment(setting)
    results = {}
    for label, specs in experiment.arms.items():
        for spec in specs:
            result = make(label, spec)
            if result is not None:
                results[spec.run_id] = result
    return ClaimData(setting, experiment, results)


def verdict(claim_id: str, make: Make) -> str:
    analysis = get(claim_id).analyze(data_for(claim_id, make))
    assert analysis.figures, f"{claim_id}: every analysis draws at least one figure"
    assert all(figure.png.startswith(b"\x89PNG") for figure in analysis.figures)
    return analysis.primary.verdict


def noise(spec: RunSpec, scale: float) -> float:
    return scale * (random.Random(spec.run_id).random() - 0.5)


# ---- bn-faster / bn-higher-lr: the learning-rate grid ------------------------------------------------------


def lr_grid(bn_rate: float, plain_rate: float, bn_diverges_at: float = 100.0, plain_diverges_at: float = 100.0) -> Make:
    """Training accuracy rising at ``rate`` per step (scaled by the learning rate); runs diverge at the given lr."""

    def make(label: str, spec: RunSpec) -> RunResult:
        diverges_at = bn_diverges_at if spec.norm == "batch" else plain_diverges_at
        if spec.lr >= diverges_at:
            return run_result(spec, {"train_loss": lambda t: 2.3}, status="diverged")
        rate = (bn_rate if spec.norm == "batch" else plain_rate) * (1 + noise(spec, 0.2)) * min(spec.lr, 1.0)
        return run_result(
            spec,
            {
                "train_accuracy": lambda t: 0.1 + 0.8 * (1 - math.exp(-rate * t)),
                "train_loss": lambda t: 2.3 * math.exp(-rate * t) + 0.1,
                "train_time": lambda t: 0.002 * t,
            },
        )

    return make


def adaptive_data_for(claim_id: str, make: Make, setting: StudySetting = SETTING) -> ClaimData:
    """As :func:`data_for` for an adaptive experiment: its rounds (``extend``) replayed until nothing is missing."""
    experiment = get(claim_id).experiment(setting)
    results: dict[str, RunResult] = {}
    for _ in range(40):
        arms = dict(experiment.arms)
        if experiment.extend is not None:
            arms.update({label: specs for label, (specs, _) in experiment.extend(results).items()})
        missing = [(label, spec) for label, specs in arms.items() for spec in specs if spec.run_id not in results]
        fresh = {spec.run_id: r for label, spec in missing if (r := make(label, spec)) is not None}
        if not fresh:
            break
        results.update(fresh)
    return ClaimData(setting, experiment, results)


def adaptive_verdict(claim_id: str, make: Make) -> str:
    analysis = get(claim_id).analyze(adaptive_data_for(claim_id, make))
    assert analysis.figures, f"{claim_id}: every analysis draws at least one figure"
    assert all(figure.png.startswith(b"\x89PNG") for figure in analysis.figures)
    return analysis.primary.verdict


def test_bn_faster_each_verdict() -> None:
    assert adaptive_verdict("bn-faster", lr_grid(bn_rate=0.2, plain_rate=0.02)) == "supported"
    assert adaptive_verdict("bn-faster", lr_grid(bn_rate=0.02, plain_rate=0.2)) == "contradicted"
    assert adaptive_verdict("bn-faster", lr_grid(bn_rate=0.05, plain_rate=0.05)) == "inconclusive"
    assert get("bn-faster").analyze(adaptive_data_for("bn-faster", lambda label, spec: None)).primary.verdict == (
        "not measurable"
    )


def test_bn_higher_lr_each_verdict() -> None:
    # bisection range for SGD: 0.03 .. 30
    assert adaptive_verdict("bn-higher-lr", lr_grid(0.1, 0.1, bn_diverges_at=10, plain_diverges_at=1)) == "supported"
    assert (
        adaptive_verdict("bn-higher-lr", lr_grid(0.1, 0.1, bn_diverges_at=0.1, plain_diverges_at=10)) == "contradicted"
    )

    def mixed(label: str, spec: RunSpec) -> RunResult:  # BN's limit differs from seed to seed
        bn_limit = 10 if spec.seed % 2 else 0.1
        return lr_grid(0.1, 0.1, bn_diverges_at=bn_limit, plain_diverges_at=1)(label, spec)

    assert adaptive_verdict("bn-higher-lr", mixed) == "inconclusive"
    failed = adaptive_data_for("bn-higher-lr", lambda label, spec: run_result(spec, status="failed"))
    assert get("bn-higher-lr").analyze(failed).primary.verdict == "not measurable"


# ---- probe-based claims ---------------------------------------------------------------------------------------


def layer_input_records(spec: RunSpec, drift: float) -> list[dict[str, Any]]:
    records = []
    for step in range(0, spec.steps + 1, spec.probe_every):
        for layer in ("hidden1.act", "hidden2.act"):
            for unit in (None, 0):
                records.append(
                    {
                        "probe": "layer_inputs",
                        "step": step,
                        "layer": layer,
                        "unit": unit,
                        "var": 4.0,
                        "p15": -1.0 + drift * step,
                        "p50": drift * step,
                        "p85": 1.0 + drift * step,
                        "w1_prev": None if step == 0 else drift * spec.probe_every * (1 + noise(spec, 0.1)),
                    }
                )
        records.append({"probe": "ics", "step": step, "index": 2, "ics_relative": 0.5, "ics_cosine": 0.9})
    return records


@pytest.mark.parametrize(
    ("plain_drift", "bn_drift", "expected"), [(0.02, 0.002, "supported"), (0.002, 0.02, "contradicted")]
)
def test_bn_stable_inputs_reads_the_layer_inputs_probe(plain_drift: float, bn_drift: float, expected: str) -> None:
    def make(label: str, spec: RunSpec) -> RunResult:
        drift = bn_drift if spec.norm == "batch" else plain_drift
        return run_result(spec, {"train_accuracy": lambda t: 0.5}, probe_records=layer_input_records(spec, drift))

    assert adaptive_verdict("bn-stable-inputs", make) == expected
    spec = SETTING.spec("deep", probes=("layer_inputs",))
    result = run_result(spec, probe_records=layer_input_records(spec, 0.01))
    assert relative_drift(result) == pytest.approx(0.01 * spec.probe_every / 2.0, rel=0.06)


def shift_records(spec: RunSpec, ratio: float) -> list[dict[str, Any]]:
    return [
        {
            "probe": "variance_shift",
            "step": spec.steps,
            "layer": f"hidden{i}.norm",
            "running_to_eval": ratio * (1 + noise(spec, 0.05)),
            "train_to_eval": 2.0,
            "predicted_ratio": 2.0,
        }
        for i in (1, 2)
    ] + [
        {
            "probe": "variance_shift",
            "step": spec.steps,
            "layer": None,
            "test_accuracy": 0.4,
            "test_accuracy_recalibrated": 0.45,
        }
    ]


@pytest.mark.parametrize(
    ("ratios", "expected"), [((2.5, 2.5), "supported"), ((0.5, 0.5), "contradicted"), ((2.0, 0.5), "inconclusive")]
)
def test_dropout_bn_shift_reads_the_variance_shift_probe(ratios: tuple[float, float], expected: str) -> None:
    def make(label: str, spec: RunSpec) -> RunResult:
        ratio = ratios[spec.seed % 2]  # the inconclusive case alternates between a shift up and a shift down
        return run_result(spec, {"test_accuracy": lambda t: 0.4}, probe_records=shift_records(spec, ratio))

    assert verdict("dropout-bn-shift", make) == expected
    assert position_label(SETTING, "after_norm") == small_label("batch", SETTING.primary_dropout)


# ---- dropout generalization claims ---------------------------------------------------------------------------


def dropout_runs(test_gain: float, train_drop: float = 0.1) -> Make:
    """Final test accuracy 0.4 + test_gain * p; training accuracy 1 - train_drop * p."""

    def make(label: str, spec: RunSpec) -> RunResult:
        p = spec.dropout
        test = 0.4 + test_gain * p + noise(spec, 0.004)
        train = 1.0 - train_drop * p
        return run_result(
            spec,
            {
                "train_accuracy": lambda t: train * min(1.0, t / 50 + 0.1),
                "test_accuracy": lambda t: test * min(1.0, t / 50 + 0.1),
                "train_loss": lambda t: 0.1 + p,
                "test_loss": lambda t: 2.0 - test_gain * p,
            },
        )

    return make


def test_dropout_generalizes_and_overfit_each_verdict() -> None:
    assert verdict("dropout-generalizes", dropout_runs(test_gain=0.1)) == "supported"
    assert verdict("dropout-generalizes", dropout_runs(test_gain=-0.1)) == "contradicted"
    assert verdict("dropout-generalizes", dropout_runs(test_gain=0.0)) == "inconclusive"
    assert verdict("dropout-overfit", dropout_runs(test_gain=0.1, train_drop=0.1)) == "supported"
    assert verdict("dropout-overfit", dropout_runs(test_gain=-0.1, train_drop=-0.2)) == "contradicted"


def test_bn_less_dropout_interaction() -> None:
    def make(bn_gain: float, plain_gain: float) -> Make:
        def run(label: str, spec: RunSpec) -> RunResult:
            gain = bn_gain if spec.norm == "batch" else plain_gain
            test = 0.4 + gain * spec.dropout + noise(spec, 0.002)
            return run_result(spec, {"test_accuracy": lambda t: test, "train_accuracy": lambda t: 1.0})

        return run

    assert verdict("bn-less-dropout", make(bn_gain=0.0, plain_gain=0.1)) == "supported"
    assert verdict("bn-less-dropout", make(bn_gain=0.1, plain_gain=0.0)) == "contradicted"


# ---- robustness -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("claim_id", [c for c in CLAIM_IDS if c not in MECHANICS])
@pytest.mark.parametrize("outcome", ["missing", "failed", "diverged"])
def test_every_claim_without_usable_runs_is_not_measurable(claim_id: str, outcome: str) -> None:
    def make(label: str, spec: RunSpec) -> RunResult | None:
        if outcome == "missing":
            return None
        return run_result(spec, {"train_loss": lambda t: 2.3}, status=outcome)

    analysis = get(claim_id).analyze(data_for(claim_id, make))
    assert analysis.primary.verdict == "not measurable", claim_id
    assert analysis.primary.decision.reason
    for m in analysis.secondary:
        assert m.verdict in VERDICTS
    assert analysis.figures


def test_diverged_runs_are_results_not_gaps() -> None:
    spec = SETTING.spec("deep", lr=10.0)
    diverged = run_result(spec, {"train_accuracy": lambda t: 0.1}, status="diverged")
    assert final(diverged, "train_accuracy") is None
    assert steps_to_reach(diverged, "train_accuracy", 0.5) is None
    rising = run_result(spec, {"train_accuracy": lambda t: t / spec.steps})
    assert steps_to_reach(rising, "train_accuracy", 0.5) == pytest.approx(spec.steps / 2)


def test_probes_named_by_claims_exist_in_the_registry() -> None:
    # adaptive experiments (Experiment.extend) ask for their probed runs only once earlier rounds have results
    static = [claim_id for claim_id in CLAIM_IDS if get(claim_id).experiment(SETTING).extend is None]
    named = {probe for claim_id in static for probe in get(claim_id).probes}
    specs = [spec for claim_id in static for spec in get(claim_id).experiment(SETTING).specs()]
    asked = {probe for spec in specs for probe in spec.probes}
    assert named and named <= asked <= set(PROBES)
    assert {probe for claim_id in CLAIM_IDS for probe in get(claim_id).probes} <= set(PROBES)
    for probe in asked:
        assert make_probe(probe, every=1).every == (0 if PROBES[probe] == "end" else 1), probe


def test_the_mechanics_claims_pass_on_normdrop_layers() -> None:
    setting = StudySetting.create(quick=True, seeds=2)
    for claim_id in MECHANICS:
        claim = get(claim_id)
        analysis = claim.analyze(ClaimData(setting, claim.experiment(setting), {}))
        assert analysis.primary.verdict == "supported", (claim_id, analysis.primary.decision.reason)


def test_dropout_mechanics_catches_a_dropout_that_forgets_to_rescale(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unscaled(torch.nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.p = p

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return x
            return x * (torch.rand_like(x) >= self.p)

    monkeypatch.setattr(nd, "Dropout", Unscaled)
    claim = get("dropout-mechanics")
    setting = StudySetting.create(quick=True, seeds=3)
    analysis = claim.analyze(ClaimData(setting, claim.experiment(setting), {}))
    assert analysis.primary.verdict == "contradicted"
    failing = {m.name for m in analysis.secondary if m.verdict == "contradicted"}
    assert {"survivors scaled by 1/(1-p)", "expectation preserved"} <= failing


def test_a_user_claim_can_be_registered_and_removed() -> None:
    class Mine(Claim):
        id = "my-claim"
        title = "mine"
        statement = "mine"

        def experiment(self, setting: StudySetting) -> Experiment:
            return Experiment()

        def analyze(self, data: ClaimData) -> Any:
            raise NotImplementedError

    register(Mine())
    try:
        assert get("my-claim").title == "mine"
        with pytest.raises(ValueError, match="already registered"):
            register(Mine())
    finally:
        unregister("my-claim")
    with pytest.raises(KeyError):
        get("my-claim")


def test_settings_round_trip_and_point_at_other_data() -> None:
    setting = StudySetting.create(dataset="digits", seeds=2, overrides={"width": 64})
    assert StudySetting.from_dict(setting.as_dict()) == setting
    spec = setting.spec("small", dropout=0.5)
    assert (spec.dataset, spec.width, spec.dropout) == ("digits", 64, 0.5)
    with pytest.raises(ValueError, match="unknown spec fields"):
        StudySetting(overrides=(("not_a_field", 1),))


# ---- verdicts of bn-smooth, bn-regularizes, dropout-coadapt, dropout-ensemble and summary ------------------------


def alternating(spec: RunSpec, size: float) -> float:
    """+size on even seeds, -size on odd ones: a mean near 0 with a wide interval (the inconclusive case)."""
    return size if spec.seed % 2 == 0 else -size


def smooth_runs(plain_beta: float, bn_beta: float, spread: float = 0.0) -> Make:
    """Probed deep runs whose landscape probe reports beta-smoothness ``plain_beta`` / ``bn_beta``; the grid runs
    rise steadily (bn-smooth also reads them for its secondary measurements)."""

    def make(label: str, spec: RunSpec) -> RunResult:
        beta = (bn_beta if spec.norm == "batch" else plain_beta) * math.exp(alternating(spec, spread))
        landscape = [
            {
                "probe": "landscape",
                "step": step,
                "eta": None,
                "beta_smoothness": beta * (1 + noise(spec, 0.01)),
                "grad_change_max": beta,
                "loss_range": 0.1,
            }
            for step in range(0, spec.steps + 1, spec.probe_every)
        ]
        curvature = [
            {
                "probe": "curvature",
                "step": step,
                "bn_mode": "batch" if spec.norm == "batch" else "no_bn",
                "top_eigenvalue": 10 * beta,
            }
            for step in range(spec.probe_every, spec.steps + 1, spec.probe_every)
        ]
        curves = {
            "train_accuracy": lambda t: 0.1 + 0.8 * t / spec.steps,
            "test_accuracy": lambda t: 0.1 + 0.7 * t / spec.steps + noise(spec, 0.01),
            "train_loss": lambda t: 2.3 - t / spec.steps,
        }
        return run_result(spec, curves, probe_records=landscape + curvature if spec.probes else [])

    return make


def test_bn_smooth_each_verdict() -> None:
    assert adaptive_verdict("bn-smooth", smooth_runs(plain_beta=10.0, bn_beta=1.0)) == "supported"
    assert adaptive_verdict("bn-smooth", smooth_runs(plain_beta=1.0, bn_beta=10.0)) == "contradicted"
    assert adaptive_verdict("bn-smooth", smooth_runs(plain_beta=1.0, bn_beta=1.0, spread=1.0)) == "inconclusive"


def matched_runs(gain: Callable[[RunSpec], float]) -> Make:
    """Small runs whose training accuracy rises linearly to 1 and whose test accuracy is 0.6 plus, with BN,
    ``gain(spec)``: at any matched training accuracy the BN run tests ``gain`` better."""

    def make(label: str, spec: RunSpec) -> RunResult:
        test = 0.6 + (gain(spec) if spec.norm == "batch" else 0.0) + noise(spec, 0.002)
        curves = {"train_accuracy": lambda t: t / spec.steps, "test_accuracy": lambda t: test}
        curves |= {"train_loss": lambda t: 1.0 - t / spec.steps, "test_loss": lambda t: 1.0}
        return run_result(spec, curves)

    return make


def test_bn_regularizes_each_verdict() -> None:
    assert verdict("bn-regularizes", matched_runs(lambda spec: 0.05)) == "supported"
    assert verdict("bn-regularizes", matched_runs(lambda spec: -0.05)) == "contradicted"
    assert verdict("bn-regularizes", matched_runs(lambda spec: alternating(spec, 0.05))) == "inconclusive"


def coadaptation_runs(with_dropout: Callable[[RunSpec], float]) -> Make:
    """Mean single-unit probe accuracy 0.2 without dropout and ``with_dropout(spec)`` with it, mean |correlation|
    0.3 without dropout and 0.1 with it, at the last step."""

    def make(label: str, spec: RunSpec) -> RunResult:
        usefulness = 0.2 if spec.dropout == 0 else with_dropout(spec)
        correlation = 0.3 if spec.dropout == 0 else 0.1
        rows = [
            {
                "probe": "coadaptation",
                "step": spec.steps,
                "unit": None,
                "layer": layer,
                "units": 128,
                "mean_abs_correlation": correlation * (1 + noise(spec, 0.01)),
                "decov": correlation,
                "active_fraction": 0.5,
                "unit_probe_accuracy": usefulness * (1 + noise(spec, 0.01)),
                "ablation_drop": 0.01 if spec.dropout == 0 else 0.001,
            }
            for layer in ("hidden1.act", "hidden2.act")
        ]
        return run_result(spec, {"train_accuracy": lambda t: 1.0, "test_accuracy": lambda t: 0.6}, probe_records=rows)

    return make


def test_dropout_coadapt_each_verdict() -> None:
    assert verdict("dropout-coadapt", coadaptation_runs(lambda spec: 0.3)) == "supported"
    assert verdict("dropout-coadapt", coadaptation_runs(lambda spec: 0.1)) == "contradicted"
    assert verdict("dropout-coadapt", coadaptation_runs(lambda spec: 0.2 + alternating(spec, 0.1))) == "inconclusive"
    analysis = get("dropout-coadapt").analyze(data_for("dropout-coadapt", coadaptation_runs(lambda spec: 0.3)))
    by_name = {m.name.split(",")[0]: m for m in analysis.secondary}
    assert by_name["mean |correlation| between units"].verdict == "supported"  # ln(0.3 / 0.1) > 0
    # these runs kept no weights: the probes cannot be scored per example, and the note says what is left out
    assert analysis.primary.estimate is not None and analysis.primary.estimate.method == "t"
    assert "without the test set's sampling error" in analysis.primary.note
    assert by_name["accuracy drop when one unit is zeroed"].estimate.value == pytest.approx(-0.9)  # pp


def shared_examples(mean: float, values: tuple[float, float], n_examples: int, seed: int = 0) -> np.ndarray:
    """``n_examples`` per-example values, half ``values[0]`` and half ``values[1]`` shifted so that their mean is
    exactly ``mean``, in an order fixed by ``seed`` (the same fixed test set for every seed that asks)."""
    half = np.array([values[0]] * (n_examples // 2) + [values[1]] * (n_examples - n_examples // 2))
    row = half - half.mean() + mean
    return np.random.default_rng(seed).permutation(row)


def ensemble_analysis(
    monkeypatch: pytest.MonkeyPatch,
    gap: Callable[[int], float],
    per_example: Callable[[int, float], np.ndarray | None] | None = None,
) -> Analysis:
    """dropout-ensemble on fake networks (the seed stands for the net): ``ensemble_comparison`` rows whose MC average
    has an NLL ``gap(seed)`` nats below weight scaling (the primary is ``-gap``) and the same accuracy, and
    ``mc_example_nll_gap`` giving ``per_example(seed, -gap(seed))`` (default: ``-gap`` on each of 1000 test
    examples: no test-set spread). Both are tested on real networks elsewhere (tests/probes/test_probes_ensemble.py,
    tests/claims/test_dropout_mechanism_claims.py)."""
    from normdrop.claims import dropout_ensemble

    monkeypatch.setattr(dropout_ensemble, "final_model", lambda result: None if result is None else result.spec.seed)
    monkeypatch.setattr(dropout_ensemble, "load_run_dataset", lambda spec: types.SimpleNamespace(x_test=0, y_test=0))

    def comparison(model: int, nets: list[int], x: Any, y: Any, ks: Any) -> list[dict[str, Any]]:
        nll = 1.0 + noise(SETTING.spec("small", seed=model), 0.001)
        rows = [{"method": "weight_scaled", "k": None, "accuracy": 0.6, "nll": nll, "ece": 0.1}]
        rows += [
            {
                "method": "mc",
                "k": k,
                "accuracy": 0.6,
                "nll": nll - gap(model),
                "ece": 0.05,
                "agreement_weight_scaled": 0.99,
            }
            for k in ks
        ]
        rows += [{"method": "ensemble", "k": n + 1, "accuracy": 0.7, "nll": 0.9, "ece": 0.03} for n in range(len(nets))]
        return rows

    def examples(model: int, x: Any, y: Any, k: int) -> np.ndarray | None:
        assert k == dropout_ensemble.MC_PASSES
        if per_example is None:
            return np.full(1000, -gap(model))
        return per_example(model, -gap(model))

    monkeypatch.setattr(dropout_ensemble, "ensemble_comparison", comparison)
    monkeypatch.setattr(dropout_ensemble, "mc_example_nll_gap", examples)
    return get("dropout-ensemble").analyze(data_for("dropout-ensemble", lambda label, spec: run_result(spec)))


def test_dropout_ensemble_each_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def check(gap: Callable[[int], float], expected: str) -> None:
        analysis = ensemble_analysis(monkeypatch, gap)
        assert analysis.figures and all(figure.png.startswith(b"\x89PNG") for figure in analysis.figures)
        assert analysis.primary.verdict == expected

    check(lambda seed: 0.001, "supported")  # 0.001 nats apart: within the 0.05-nat margin
    check(lambda seed: 0.2, "contradicted")  # the MC average is clearly better in likelihood
    check(lambda seed: 0.1 if seed % 2 == 0 else 0.0, "inconclusive")  # 0 or 0.1 nats: spans the margin's edge


def test_dropout_ensemble_interval_includes_the_test_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicates that agree exactly (-0.01 nats each: the seed-only interval has zero width, inside the 0.05
    band) on one fixed test set whose per-example NLL differences spread by 0.3 nats: with 20 examples the test
    set's error (about 1.96 x 0.3 / sqrt(20) = 0.13 nats) spans the band's edges, so the verdict must be
    inconclusive; with 20 000 examples (0.004 nats) it is supported again."""
    few = ensemble_analysis(monkeypatch, lambda seed: 0.01, lambda seed, mean: shared_examples(mean, (-0.3, 0.3), 20))
    seed_only = t_interval(few.primary.per_seed.values())
    assert seed_only is not None and seed_only.ci_low == seed_only.ci_high  # the seeds alone: decisive
    assert decide(seed_only, "equal", margin=0.05).verdict == "supported"
    primary = few.primary
    assert primary.verdict == "inconclusive", primary.decision.reason
    assert primary.estimate is not None and primary.estimate.method == HULL_METHOD
    assert primary.estimate.ci_high - primary.estimate.ci_low > 0.2
    assert primary.estimate.value == pytest.approx(-0.01)
    assert "20 test examples" in primary.note and "sampling error is included" in primary.note
    assert all("not included" in m.note for m in few.secondary)  # the secondaries say they are seed-only
    many = ensemble_analysis(
        monkeypatch, lambda seed: 0.01, lambda seed, mean: shared_examples(mean, (-0.3, 0.3), 20_000)
    )
    assert many.primary.verdict == "supported", many.primary.decision.reason
    assert many.primary.estimate is not None and many.primary.estimate.ci_high - many.primary.estimate.ci_low < 0.02
    # per-example values that do not average to the recorded gap are not used; the note says what is left out
    wrong = ensemble_analysis(monkeypatch, lambda seed: 0.01, lambda seed, mean: shared_examples(0.2, (-0.3, 0.3), 20))
    assert wrong.primary.verdict == "supported" and "do not reproduce" in wrong.primary.note
    assert "sampling error" in wrong.primary.note and wrong.primary.estimate == seed_only


def unit_score_runs(
    monkeypatch: pytest.MonkeyPatch, gain: float, n_examples: int, spread: float = 0.2
) -> tuple[Make, dict[str, np.ndarray]]:
    """Coadaptation records with mean single-unit probe accuracy 0.2 without dropout and ``0.2 + gain`` with it,
    the same on every seed, and per-example unit-probe scores (``final_unit_probe_scores``) on ``n_examples``
    shared test examples: half ``mean - spread``, half ``mean + spread``, independently ordered per arm, so their
    differences spread by about ``spread * sqrt(2)``."""
    from normdrop.claims import dropout_coadapt

    scores: dict[str, np.ndarray] = {}

    def make(label: str, spec: RunSpec) -> RunResult:
        usefulness = 0.2 + (gain if spec.dropout else 0.0)
        rows = [
            {
                "probe": "coadaptation",
                "step": spec.steps,
                "unit": None,
                "layer": layer,
                "units": 128,
                "mean_abs_correlation": 0.3 if spec.dropout == 0 else 0.1,
                "decov": 0.3,
                "active_fraction": 0.5,
                "unit_probe_accuracy": usefulness,
                "ablation_drop": 0.01,
            }
            for layer in ("hidden1.act", "hidden2.act")
        ]
        scores[spec.run_id] = shared_examples(usefulness, (-spread, spread), n_examples, seed=int(spec.dropout > 0))
        return run_result(spec, {"train_accuracy": lambda t: 1.0, "test_accuracy": lambda t: 0.6}, probe_records=rows)

    monkeypatch.setattr(
        dropout_coadapt, "final_unit_probe_scores", lambda result: None if result is None else scores[result.run_id]
    )
    return make, scores


def test_dropout_coadapt_interval_includes_the_test_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every seed gains exactly 2 pp (zero-width seed interval, above 0), on one fixed test set whose per-example
    score differences spread by about 0.28: with 40 examples the test set's error (about 1.96 x 28 / sqrt(40) = 9
    pp) makes the verdict inconclusive; with 40 000 (0.3 pp) it is supported."""
    make, _ = unit_score_runs(monkeypatch, 0.02, 40)
    primary = get("dropout-coadapt").analyze(data_for("dropout-coadapt", make)).primary
    seed_only = t_interval(primary.per_seed.values())
    assert seed_only is not None and seed_only.ci_low == seed_only.ci_high
    assert decide(seed_only, "increase").verdict == "supported"  # the seeds alone: decisive
    assert primary.verdict == "inconclusive", primary.decision.reason
    assert primary.estimate is not None and primary.estimate.method == HULL_METHOD
    assert primary.estimate.ci_low < -2 and primary.estimate.value == pytest.approx(2.0)
    assert "40 test examples" in primary.note and "sampling error is included" in primary.note
    make, _ = unit_score_runs(monkeypatch, 0.02, 40_000)
    analysis = get("dropout-coadapt").analyze(data_for("dropout-coadapt", make))
    assert analysis.primary.verdict == "supported", analysis.primary.decision.reason
    assert analysis.primary.estimate is not None and analysis.primary.estimate.ci_low > 1.5
    assert all("not included" in m.note for m in analysis.secondary)  # the secondaries say they are seed-only


def factorial_runs(bn_speed: float, dropout_speed: float, bn_error: float, dropout_error: float) -> Make:
    """2 x 2 runs: training accuracy rises at a rate multiplied by ``bn_speed`` with BN and ``dropout_speed`` with
    dropout; the final test error is multiplied by ``bn_error`` with BN and ``dropout_error`` with dropout."""

    def make(label: str, spec: RunSpec) -> RunResult:
        rate = 0.01 * (bn_speed if spec.norm == "batch" else 1.0) * (dropout_speed if spec.dropout else 1.0)
        rate *= 1 + noise(spec, 0.02)
        error = 0.4 * (bn_error if spec.norm == "batch" else 1.0) * (dropout_error if spec.dropout else 1.0)
        curves = {"train_accuracy": lambda t: 1 - math.exp(-rate * t), "test_accuracy": lambda t: 1 - error}
        return run_result(spec, curves)

    return make


def test_summary_each_verdict() -> None:
    # BN: 4x faster, same test error; dropout: same speed, test error x0.7 -> BN leans to speed, dropout to tests.
    assert verdict("summary", factorial_runs(bn_speed=4, dropout_speed=1, bn_error=1, dropout_error=0.7)) == "supported"
    assert verdict("summary", factorial_runs(bn_speed=1, dropout_speed=4, bn_error=0.7, dropout_error=1)) == (
        "contradicted"
    )
    assert verdict("summary", factorial_runs(bn_speed=1, dropout_speed=1, bn_error=1, dropout_error=1)) == (
        "inconclusive"
    )
