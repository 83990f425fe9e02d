"""The small-family claims (dropout-generalizes, dropout-overfit, bn-regularizes, bn-less-dropout): the dropout rate
is chosen on the selection seeds only, the ghost-BN dose-response reaches its verdicts, the test-set bootstrap widens
intervals on small test sets, subsets are drawn per seed, and the claims run through the study engine."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from normdrop.claims import ClaimData, StudySetting, get, small_family
from normdrop.claims.bn_less_dropout import claim_seeds
from normdrop.claims.bn_regularizes import MATCH_TARGET, dose_slopes
from normdrop.claims.readers import final, final_predictions
from normdrop.claims.small_family import accuracy_estimate, chosen_dropout
from normdrop.lab import run_spec
from normdrop.significance import paired_example_bootstrap
from normdrop.spec import RunResult, RunSpec
from normdrop.stats import t_interval
from normdrop.study import run_study

SETTING = StudySetting.create(seeds=3, selection_seeds=2)
"""Not quick: three candidate dropout rates to choose from."""


def curves_result(spec: RunSpec, curves: dict[str, Callable[[int], float]], status: str = "finished") -> RunResult:
    metrics = [
        (step, name, float(fn(step)))
        for step in range(0, spec.steps + 1, spec.eval_every)
        for name, fn in curves.items()
    ]
    return RunResult(spec.run_id, spec, status, metrics=metrics, wall_time=0.01)


def data_for(claim_id: str, make: Callable[[RunSpec], RunResult | None], setting: StudySetting = SETTING) -> ClaimData:
    experiment = get(claim_id).experiment(setting)
    results = {}
    for spec in experiment.specs():
        result = make(spec)
        if result is not None:
            results[spec.run_id] = result
    return ClaimData(setting, experiment, results)


def dropout_runs(best_on_selection: float, best_on_evaluation: float) -> Callable[[RunSpec], RunResult]:
    """Final test accuracy 0.5, +1 pp at ``best_on_selection`` on the selection seeds and +30 pp at
    ``best_on_evaluation`` on the evaluation seeds: a choice that reads any evaluation seed picks the latter."""

    def make(spec: RunSpec) -> RunResult:
        if spec.seed >= 1000:
            test = 0.5 + (0.01 if spec.dropout == best_on_selection else 0.0)
        else:
            test = 0.5 + (0.3 if spec.dropout == best_on_evaluation else 0.0) + 0.001 * spec.seed
        return curves_result(
            spec,
            {
                "train_accuracy": lambda t: 1.0,
                "test_accuracy": lambda t: test,
                "train_loss": lambda t: 0.01,
                "test_loss": lambda t: 2.0 - test,
            },
        )

    return make


@pytest.mark.parametrize("claim_id", ["dropout-generalizes", "dropout-overfit"])
def test_the_dropout_rate_is_chosen_on_selection_seeds_only(claim_id: str) -> None:
    data = data_for(claim_id, dropout_runs(best_on_selection=0.1, best_on_evaluation=0.5))
    choice = chosen_dropout(data)
    assert choice.p == 0.1
    assert choice.seeds == tuple(SETTING.selection_seed_list)
    assert choice.means[0.1] == pytest.approx(0.51) and choice.means[0.5] == pytest.approx(0.50)
    analysis = get(claim_id).analyze(data)
    assert "0.1 (chosen)" in analysis.primary.name
    assert "selection seeds [1000, 1001]" in analysis.primary.note
    # the effect is measured on the evaluation seeds only
    assert sorted(analysis.primary.per_seed) == SETTING.seed_list


def test_the_choice_follows_the_selection_seeds_whatever_the_evaluation_seeds_say() -> None:
    for best in (0.1, 0.3, 0.5):
        data = data_for("dropout-generalizes", dropout_runs(best_on_selection=best, best_on_evaluation=0.3))
        assert chosen_dropout(data).p == best


def test_without_selection_runs_nothing_is_chosen_and_the_primary_is_not_measurable() -> None:
    make = dropout_runs(0.1, 0.5)
    data = data_for("dropout-generalizes", lambda spec: None if spec.seed >= 1000 else make(spec))
    assert chosen_dropout(data).p is None
    analysis = get("dropout-generalizes").analyze(data)
    assert analysis.primary.verdict == "not measurable"
    assert "no selection run finished" in analysis.primary.decision.reason
    assert analysis.secondary[0].verdict == "supported"  # the pre-registered p = 0.5 needs no choice: +30 pp


def test_the_statement_and_note_say_500_training_examples() -> None:
    claim = get("dropout-generalizes")
    assert "500 training examples" in claim.statement and "500 training examples" in claim.title
    analysis = claim.analyze(data_for("dropout-generalizes", dropout_runs(0.1, 0.5)))
    assert "500 training examples" in analysis.primary.note and "500 training examples" in analysis.primary.name
    assert f"{SETTING.steps('small')} steps" in analysis.primary.note
    assert "500 training examples" in claim.experiment(SETTING).description


def test_subset_runs_draw_their_data_from_their_seed() -> None:
    for claim_id in ("dropout-generalizes", "bn-regularizes", "bn-less-dropout"):
        experiment = get(claim_id).experiment(SETTING)
        subset = [spec for spec in experiment.specs() if spec.train_size is not None]
        assert subset, claim_id
        assert all(spec.data_seed == spec.seed for spec in subset), claim_id
        for specs in experiment.arms.values():
            if specs[0].train_size is not None:
                assert len({spec.data_seed for spec in specs}) == len(specs), claim_id


def test_small_runs_keep_their_final_weights_and_the_reader_matches_the_trainer() -> None:
    spec = SETTING.spec("small", seed=3, steps=30, eval_every=30, train_size=200, keep=("final_weights",))
    result = run_spec(spec)
    predictions = final_predictions(result)
    assert predictions is not None
    assert predictions.logits.shape == (len(predictions.labels), 10)
    # the oracle: the trainer's own final evaluation of the same network on the same test set
    assert predictions.correct.mean() == pytest.approx(final(result, "test_accuracy"), abs=1e-12)
    cut = RunResult(result.run_id, spec, "finished", metrics=result.metrics, artifacts={}, wall_time=0.0)
    assert final_predictions(cut) is None  # a run cut to a smaller budget has no weights: no cached predictions
    assert all("final_weights" in s.keep for s in get("dropout-generalizes").experiment(SETTING).specs())


# ---- test-set bootstrap ------------------------------------------------------------------------------------


def correctness(n_examples: int, accuracy: float, rng: random.Random) -> np.ndarray:
    """Exactly round(accuracy * n) correct examples, at random positions."""
    correct = np.zeros(n_examples)
    correct[rng.sample(range(n_examples), round(accuracy * n_examples))] = 1.0
    return correct


def test_the_example_bootstrap_is_wider_than_seeds_alone_when_test_examples_are_few() -> None:
    rng = random.Random(0)
    seeds = range(5)
    # every seed gains about 10 pp, but on only 40 test examples: the seeds agree, the test set is small
    a = {s: correctness(40, 0.6 + 0.025 * (s % 2), rng) for s in seeds}
    b = {s: correctness(40, 0.5, rng) for s in seeds}
    per_seed = {s: 100 * (a[s].mean() - b[s].mean()) for s in seeds}
    t = t_interval(per_seed.values())
    boot = paired_example_bootstrap(a, b, shared_test_set=True)
    assert t is not None and boot is not None
    assert 100 * (boot.ci_high - boot.ci_low) > 2 * (t.ci_high - t.ci_low)
    # with many test examples the bootstrap's extra width shrinks
    big_a = {s: np.tile(a[s], 100) for s in seeds}
    big_b = {s: np.tile(b[s], 100) for s in seeds}
    big = paired_example_bootstrap(big_a, big_b, shared_test_set=True)
    assert big is not None and (big.ci_high - big.ci_low) < (boot.ci_high - boot.ci_low) / 3


def test_accuracy_estimate_is_the_hull_and_falls_back_to_t_without_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1)
    seeds = [0, 1, 2, 3]
    a = {s: correctness(50, 0.7 + 0.02 * s, rng) for s in seeds}
    b = {s: correctness(50, 0.6, rng) for s in seeds}
    per_seed = {s: 100 * (a[s].mean() - b[s].mean()) for s in seeds}
    arm_a = {s: object() for s in seeds}
    arm_b = {s: object() for s in seeds}

    def fake_correctness(runs: dict) -> dict:
        return {s: (a[s] if r is arm_a[s] else b[s]) for s, r in runs.items()}

    monkeypatch.setattr(small_family, "final_correctness", fake_correctness)
    estimate, phrase = accuracy_estimate(per_seed, [arm_a], [arm_b])
    t = t_interval(per_seed.values())
    boot = paired_example_bootstrap(a, b, shared_test_set=True)
    assert estimate is not None and t is not None and boot is not None
    assert estimate.value == pytest.approx(t.value)
    assert estimate.ci_low == pytest.approx(min(t.ci_low, 100 * boot.ci_low))
    assert estimate.ci_high == pytest.approx(max(t.ci_high, 100 * boot.ci_high))
    assert "50 test examples" in phrase
    monkeypatch.setattr(small_family, "final_correctness", lambda runs: {})
    fallback, phrase = accuracy_estimate(per_seed, [arm_a], [arm_b])
    assert fallback == t and "t interval" in phrase


# ---- bn-regularizes: the ghost-BN dose-response --------------------------------------------------------------


def ghost_runs(per_doubling: float) -> Callable[[RunSpec], RunResult]:
    """Training accuracy rising linearly to 1; test accuracy 0.6 without BN, and with (ghost) BN 0.6 + 0.02 +
    ``per_doubling`` x log2(ghost size / 100) (plain BN: ghost size 100), plus a little seed noise."""

    def make(spec: RunSpec) -> RunResult:
        noise = 0.002 * (random.Random(spec.run_id).random() - 0.5)
        if spec.norm == "none":
            test = 0.6 + noise
        else:
            ghost = dict(spec.norm_options).get("ghost_batch_size", spec.batch_size)
            test = 0.62 + per_doubling * math.log2(ghost / 100) + noise
        curves = {
            "train_accuracy": lambda t: t / spec.steps,
            "test_accuracy": lambda t: test,
            "train_loss": lambda t: 1.0 - t / spec.steps,
            "test_loss": lambda t: 1.0,
        }
        return curves_result(spec, curves)

    return make


def dose(analysis: object) -> object:
    return next(m for m in analysis.secondary if m.name.startswith("ghost BN dose-response"))  # type: ignore[attr-defined]


def test_the_ghost_bn_dose_response_reaches_each_verdict() -> None:
    claim = get("bn-regularizes")
    assert sorted(SETTING.ghost_batch_sizes) == [10, 25, 50]
    supported = claim.analyze(data_for("bn-regularizes", ghost_runs(per_doubling=-0.01)))
    assert dose(supported).verdict == "supported"
    assert dose(supported).estimate.value == pytest.approx(-1.0, abs=0.05)  # pp per doubling
    assert supported.primary.verdict == "supported"  # plain BN tests 2 pp better at matched fit
    contradicted = claim.analyze(data_for("bn-regularizes", ghost_runs(per_doubling=0.01)))
    assert dose(contradicted).verdict == "contradicted"
    flat = claim.analyze(data_for("bn-regularizes", ghost_runs(per_doubling=0.0)))
    assert dose(flat).verdict == "inconclusive"
    assert f"{MATCH_TARGET:.0%} training accuracy" in supported.primary.note


def test_dose_slopes_is_the_least_squares_slope_per_seed() -> None:
    effects = {10: {0: 3.0, 1: 1.0}, 25: {0: 2.0}, 100: {0: 3.0 - math.log2(10), 1: 1.0 + math.log2(10)}}
    slopes = dose_slopes(effects, [0, 1, 2])
    assert slopes[1] == pytest.approx(1.0)  # two points: the line through them
    x = np.log2([10, 25, 100])
    assert slopes[0] == pytest.approx(np.polyfit(x, [3.0, 2.0, 3.0 - math.log2(10)], 1)[0])
    assert slopes[2] is None


def test_bn_regularizes_runs_that_never_reach_the_target_are_gaps_not_errors() -> None:
    def make(spec: RunSpec) -> RunResult:
        return curves_result(
            spec,
            {
                "train_accuracy": lambda t: 0.5,
                "test_accuracy": lambda t: 0.4,
                "train_loss": lambda t: 1.0,
                "test_loss": lambda t: 1.0,
            },
        )

    analysis = get("bn-regularizes").analyze(data_for("bn-regularizes", make))
    assert analysis.primary.verdict == "not measurable"
    assert "never reached the target" in analysis.primary.decision.reason


# ---- bn-less-dropout: twice the seeds ------------------------------------------------------------------------


def test_bn_less_dropout_measures_on_twice_the_evaluation_seeds() -> None:
    assert claim_seeds(SETTING) == list(range(2 * SETTING.seeds))

    def make(spec: RunSpec) -> RunResult:
        gain = 0.0 if spec.norm == "batch" else 0.1
        test = 0.4 + gain * spec.dropout + 0.002 * (random.Random(spec.run_id).random() - 0.5)
        return curves_result(spec, {"test_accuracy": lambda t: test, "train_accuracy": lambda t: 1.0})

    analysis = get("bn-less-dropout").analyze(data_for("bn-less-dropout", make))
    assert sorted(analysis.primary.per_seed) == claim_seeds(SETTING)
    assert analysis.primary.verdict == "supported"
    assert "minimum detectable effect" in analysis.primary.note
    assert "p = 0.5 fixed in code" in analysis.primary.note
    half = StudySetting.create(seeds=2, selection_seeds=2)  # a half-seeds re-analysis halves this claim's seeds too
    assert claim_seeds(half) == [0, 1, 2, 3]


# ---- through the study engine --------------------------------------------------------------------------------


def fake_run(spec: RunSpec) -> RunResult:
    """Module level (the sweep pickles it): dropout 0.3 best on the selection seeds, 0.5 on the evaluation seeds;
    ghost BN better the smaller its ghost batches."""
    if spec.norm == "none" and spec.batch_size == 100:
        return dropout_runs(best_on_selection=0.3, best_on_evaluation=0.3)(spec)
    return ghost_runs(per_doubling=-0.01)(spec)


def test_the_small_family_claims_run_through_the_study_engine(tmp_path: Path) -> None:
    claims = [get(c) for c in ("dropout-generalizes", "dropout-overfit", "bn-regularizes", "bn-less-dropout")]
    outcome = run_study(SETTING, tmp_path / "runs.sqlite", claims=claims, workers=1, progress=False, run_fn=fake_run)
    by_id = {r.claim.id: r for r in outcome.results}
    generalizes = by_id["dropout-generalizes"].analysis
    assert "0.3 (chosen)" in generalizes.primary.name
    assert generalizes.primary.verdict == "supported"
    assert by_id["dropout-overfit"].analysis.primary.verdict in ("supported", "inconclusive", "contradicted")
    assert dose(by_id["bn-regularizes"].analysis).verdict == "supported"
    less = by_id["bn-less-dropout"].analysis.primary
    assert sorted(less.per_seed) == claim_seeds(SETTING)  # the extra seeds were trained by the engine too
    assert outcome.sweep["failed"] == 0


def test_the_quick_study_has_one_candidate_and_no_selection_runs() -> None:
    quick = StudySetting.create(quick=True, seeds=3)
    experiment = get("dropout-generalizes").experiment(quick)
    assert not any(spec.seed >= 1000 for spec in experiment.specs())
    data = data_for("dropout-generalizes", dropout_runs(0.5, 0.5), setting=quick)
    choice = chosen_dropout(data)
    assert choice.p == quick.primary_dropout and "nothing chosen" in choice.describe()
    assert get("dropout-generalizes").analyze(data).primary.verdict == "supported"
