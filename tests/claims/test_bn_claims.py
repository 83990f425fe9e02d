"""The deep-family BN claims (bn-faster, bn-higher-lr, bn-stable-inputs, bn-smooth, bn-mechanics) on fake runners
with known answers, through the study's adaptive rounds (run_study with a fake run_fn)."""

from __future__ import annotations

import math
import random

import pytest

from normdrop.claims.base import ClaimData
from normdrop.claims.bn_higher_lr import BNHigherLR
from normdrop.claims.experiment import PROBED_FRACTION
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult, RunSpec
from normdrop.study import run_study

# Known thresholds of the fake: per arm and seed, the rate above which a run diverges, and the rate above which it
# finishes but learns badly (accuracy 0.5); below SLOW a run is too slow (0.8, under 90% of the best 0.95).
DIVERGE = {"none": 0.3, "batch": 6.0}
GOOD = {"none": 0.2, "batch": 2.0}
SLOW = 0.05


def _thresholds(spec: RunSpec) -> tuple[float, float]:
    factor = 1 + 0.1 * (spec.seed % 7)  # seeds differ, so the limits are not all alike
    norm = "batch" if spec.norm != "none" else "none"
    return DIVERGE[norm] * factor, GOOD[norm] * factor


def fake_run(spec: RunSpec) -> RunResult:
    """Runs with known limits: diverged above DIVERGE, bad accuracy above GOOD, slow below SLOW; BN learns 4x
    faster than none in steps; every metric a claim reads is there."""
    diverge, good = _thresholds(spec)
    if spec.lr >= diverge:
        return RunResult(spec.run_id, spec, "diverged", diverged_step=3, metrics=[(0, "train_loss", 2.3)])
    level = 0.95 if SLOW <= spec.lr < good else (0.8 if spec.lr < SLOW else 0.5)
    rng = random.Random(spec.run_id)
    speed = (4.0 if spec.norm != "none" else 1.0) * (1 + 0.1 * rng.random())
    metrics: list[tuple[int, str, float]] = []
    for step in range(0, spec.steps + 1, spec.eval_every):
        progress = 1 - math.exp(-speed * step / spec.steps * 5)
        metrics += [
            (step, "train_accuracy", 0.1 + (level - 0.1) * progress),
            (step, "test_accuracy", 0.1 + (level - 0.15) * progress),
            (step, "train_loss", 2.3 * (1 - 0.8 * progress)),
            (step, "train_time", step * 0.001),
        ]
    return RunResult(spec.run_id, spec, "finished", metrics=metrics, summary={"diverged": False}, wall_time=0.01)


@pytest.fixture(scope="module")
def higher_lr(tmp_path_factory: pytest.TempPathFactory):
    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    store = tmp_path_factory.mktemp("higher-lr") / "runs.sqlite"
    outcome = run_study(setting, store, claims=[BNHigherLR()], workers=1, progress=False, run_fn=fake_run)
    return setting, store, outcome


@pytest.mark.slow  # ~10 adaptive rounds, each a spawned worker pool
def test_bisection_finds_the_fakes_thresholds_under_both_definitions(higher_lr) -> None:
    setting, _, outcome = higher_lr
    (result,) = outcome.results
    primary, (diverge,) = result.analysis.primary, result.analysis.secondary
    assert "trains" in primary.name or "within" in primary.name
    assert sorted(primary.per_seed) == setting.seed_list == sorted(diverge.per_seed)
    for seed in setting.seed_list:
        # the same factor scales both arms of a seed, so the true ratio is known: GOOD 10x, DIVERGE 20x
        assert abs(primary.per_seed[seed] - math.log10(GOOD["batch"] / GOOD["none"])) <= math.log10(1.25)
        assert abs(diverge.per_seed[seed] - math.log10(DIVERGE["batch"] / DIVERGE["none"])) <= math.log10(1.25)
    # the two definitions differ where they should: (b) is below (a), by the fake's factor
    assert all(diverge.per_seed[s] > primary.per_seed[s] for s in setting.seed_list)
    assert primary.verdict == "supported" and diverge.verdict == "supported"


def _replayed(setting: StudySetting, seeds: list[int], run=fake_run) -> dict:
    """Drive the searches to the end outside the study: run whatever each replay asks for."""
    from normdrop.claims.stability import replay_all

    results: dict[str, RunResult] = {}
    for _ in range(40):
        searches = replay_all(setting, ("none", "batch"), seeds, results)
        missing = [spec for s in searches.values() for spec in s.specs if spec.run_id not in results]
        if not missing:
            return searches
        results.update({spec.run_id: run(spec) for spec in missing})
    raise AssertionError("the searches did not finish")


def test_each_seed_brackets_its_own_limit() -> None:
    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    for (norm, seed), search in _replayed(setting, setting.seed_list).items():
        diverge, good = DIVERGE[norm] * (1 + 0.1 * seed), GOOD[norm] * (1 + 0.1 * seed)
        assert search.state == "done" and not search.non_monotone and not search.diverge_non_monotone
        assert search.diverge.largest_stable < diverge <= search.diverge.smallest_unstable
        assert search.diverge.ratio <= 1.25 * (1 + 1e-9)
        assert search.good.largest_stable < good <= search.good.smallest_unstable
        assert search.good.ratio <= 1.25 * (1 + 1e-9)


def _complete(experiment, run=fake_run) -> dict[str, RunResult]:
    """Run an adaptive experiment's rounds outside the study (what run_study does, in process)."""
    results: dict[str, RunResult] = {}
    for _ in range(40):
        arms = experiment.extend(results)
        missing = {spec.run_id: spec for specs, _ in arms.values() for spec in specs if spec.run_id not in results}
        if not missing:
            for label, (specs, replicates) in arms.items():
                experiment.add(label, specs, replicates)
            return results
        results.update({run_id: run(spec) for run_id, spec in missing.items()})
    raise AssertionError("the experiment did not finish")


def _cheating_run(spec: RunSpec) -> RunResult:
    """As fake_run, but an evaluation seed's plain run at the smallest grid rate reaches 100% at once: a choice
    that read evaluation seeds would pick that rate."""
    result = fake_run(spec)
    if spec.seed < 1000 and spec.norm == "none" and spec.lr == 0.01 and result.status == "finished":
        result.metrics = [(t, m, 1.0 if m == "train_accuracy" else v) for t, m, v in result.metrics]
    return result


def test_bn_faster_chooses_on_selection_seeds_only() -> None:
    from normdrop.claims.bn_faster import BNFaster, choices, deep_lr_grid, deep_spec

    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    clean = _complete(BNFaster().experiment(setting))
    # every grid rate also run on the evaluation seeds, with values that would change the choice
    cheating = dict(clean)
    for norm in ("none", "batch"):
        for lr in deep_lr_grid(setting):
            for seed in setting.seed_list:
                spec = deep_spec(setting, norm, lr, seed)
                cheating[spec.run_id] = _cheating_run(spec)
    chosen, leaked = choices(setting, clean), choices(setting, cheating)
    assert not isinstance(chosen, str) and chosen == leaked
    assert chosen[1]["none"] != 0.01  # the cheat's rate is not what the selection seeds pick


def test_selection_view_refuses_an_evaluation_seed() -> None:
    from normdrop.selection import SelectionLeak, SelectionView

    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    view = SelectionView({0: 1.0, 1000: 0.5}, setting.seed_split)
    assert list(view) == [1000]
    with pytest.raises(SelectionLeak):
        view[0]


def test_bn_faster_measures_the_fakes_speed_up_on_evaluation_seeds() -> None:
    from normdrop.claims.bn_faster import BNFaster

    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    experiment = BNFaster().experiment(setting)
    results = _complete(experiment)
    analysis = BNFaster().analyze(ClaimData(setting, experiment, results, draw=False))
    assert sorted(analysis.primary.per_seed) == setting.seed_list
    # the fake's BN is ~4x faster in steps; steps are interpolated between evaluations, so only roughly
    assert all(1.0 < v < 3.0 for v in analysis.primary.per_seed.values())
    assert analysis.primary.verdict == "supported" and not analysis.figures
    assert "selection seeds" in analysis.primary.note and "Budget" in analysis.primary.note


def test_bn_claims_do_not_raise_on_missing_failed_or_diverged_runs() -> None:
    from normdrop.claims.bn_faster import BNFaster
    from normdrop.claims.bn_smooth import BNSmooth
    from normdrop.claims.bn_stable_inputs import BNStableInputs

    setting = StudySetting.create(seeds=2, name="mlp-sgd")

    def failing(spec: RunSpec) -> RunResult:
        return RunResult(spec.run_id, spec, "failed", error="boom")

    for claim in (BNFaster(), BNHigherLR(), BNSmooth(), BNStableInputs()):
        for results in ({}, _complete(claim.experiment(setting), failing)):
            analysis = claim.analyze(ClaimData(setting, claim.experiment(setting), results, draw=False))
            assert analysis.primary.verdict == "not measurable", claim.id


def test_resolution_limited_is_set_when_seeds_tie() -> None:
    setting = StudySetting.create(seeds=3, name="mlp-sgd")

    def alike(spec: RunSpec) -> RunResult:  # no seed factor: every seed has the same limits
        return fake_run(spec.model_copy(update={"seed": 0}))

    experiment = BNHigherLR().experiment(setting)
    results = _complete(experiment, alike)
    primary = BNHigherLR().analyze(ClaimData(setting, experiment, results, draw=False)).primary
    assert primary.resolution_limited and len(set(primary.per_seed.values())) == 1

    def apart(spec: RunSpec) -> RunResult:  # BN's limits grow x1.5 per seed, the plain net's do not
        if spec.norm == "none":
            return alike(spec)
        result = alike(spec.model_copy(update={"lr": spec.lr / 1.5**spec.seed}))
        result.run_id, result.spec = spec.run_id, spec
        return result

    spread = BNHigherLR().analyze(ClaimData(setting, experiment, _complete(experiment, apart), draw=False)).primary
    assert not spread.resolution_limited and spread.estimate is not None
    assert spread.estimate.ci_high - spread.estimate.ci_low > 0.1


def test_bn_mechanics_on_a_1d_cnn_and_per_channel_statistics() -> None:
    import torch

    from normdrop.claims.bn_mechanics import CHECKS, measure_seed, per_channel

    x = torch.randn(4, 3, 5)
    flat = per_channel(x)
    assert flat.shape == (20, 3)
    torch.testing.assert_close(flat.mean(0), x.mean(dim=(0, 2)))
    image = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(per_channel(image).var(0, unbiased=False), image.var(dim=(0, 2, 3), unbiased=False))
    setting = StudySetting.create(quick=True, name="cnn1d")
    deviation, pictures = measure_seed(setting, 0)
    assert set(deviation) == set(CHECKS)
    for name, (_, tolerance) in CHECKS.items():
        assert deviation[name] < tolerance, name
    assert pictures["inputs"].shape[1] == 3


def _probed_fake(spec: RunSpec) -> RunResult:
    """fake_run plus landscape and curvature records: after initialization the plain net is 10x less smooth, at
    step 0 BN is (as the issue reports for real runs); noisy BN learns as fast as BN and its inputs drift more."""
    result = fake_run(spec)
    if not spec.probes or result.status != "finished":
        return result
    records = []
    for step in range(0, spec.steps + 1, spec.probe_every):
        bn = spec.norm != "none"
        beta = (5.0 if bn else 1.0) if step == 0 else (1.0 if bn else 10.0)
        beta *= 1 + 0.01 * (spec.seed % 5)
        records += [
            {
                "probe": "landscape",
                "step": step,
                "eta": None,
                "beta_smoothness": beta,
                "grad_change_max": beta,
                "loss_range": 0.1 * beta,
            },
            {
                "probe": "curvature",
                "step": step,
                "bn_mode": "batch" if spec.norm != "none" else "no_bn",
                "top_eigenvalue": 3 * beta,
            },
        ]
    result.probe_records = records
    return result


def test_bn_smooth_probes_each_arm_at_half_its_own_limit_and_reports_step_0_apart() -> None:
    from normdrop.claims.bn_smooth import BNSmooth
    from normdrop.claims.experiment import probed_label
    from normdrop.claims.stability import PROBE_FRACTION, selection_limits

    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    experiment = BNSmooth().experiment(setting)
    results = _complete(experiment, _probed_fake)
    limits = selection_limits(setting, results)
    for norm in ("none", "batch"):
        (spec, *_) = experiment.arms[probed_label(norm)]
        expected = PROBE_FRACTION * math.exp(sum(math.log(v) for v, _ in limits[norm]) / len(limits[norm]))
        assert spec.lr == pytest.approx(expected)
        seeds = setting.selection_seed_list
        true = GOOD[norm] * math.exp(sum(math.log(1 + 0.1 * (s % 7)) for s in seeds) / len(seeds))
        assert spec.lr == pytest.approx(PROBE_FRACTION * true, rel=0.12)  # the bisection's x1.25, halved
        assert spec.steps == setting.steps("deep") // PROBED_FRACTION
    analysis = BNSmooth().analyze(ClaimData(setting, experiment, results, draw=False))
    assert analysis.primary.verdict == "supported"  # after initialization: plain 10x, BN 1x
    at_init = next(m for m in analysis.secondary if "step 0" in m.name)
    assert at_init.verdict == "contradicted"  # at step 0 BN is the less smooth
    assert any("step 0" in f for f in analysis.findings)


def test_bn_stable_inputs_runs_the_noisy_control_at_bns_rate() -> None:
    from normdrop.claims.bn_stable_inputs import BNStableInputs
    from normdrop.claims.experiment import probed_label

    setting = StudySetting.create(seeds=3, name="mlp-sgd")
    experiment = BNStableInputs().experiment(setting)
    _complete(experiment, _probed_fake)
    noisy, batch = experiment.arms[probed_label("noisy")], experiment.arms[probed_label("batch")]
    assert [s.lr for s in noisy] == [s.lr for s in batch] and {s.norm for s in noisy} == {"noisy"}
    assert dict(noisy[0].norm_options)["noise"] > 0
    assert [s.seed for s in noisy] == setting.seed_list


def test_non_monotone_divergence_is_counted() -> None:
    from normdrop.claims.stability import LimitSearch

    search = LimitSearch("none", 0, stable={0.1: True, 0.3: False, 0.5: True, 1.0: False})
    assert search.diverge_non_monotone
    assert not LimitSearch("none", 0, stable={0.1: True, 0.3: True, 1.0: False}).diverge_non_monotone
