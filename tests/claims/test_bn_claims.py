"""The deep-family BN claims (bn-faster, bn-higher-lr, bn-stable-inputs, bn-smooth, bn-mechanics) on fake runners
with known answers, through the study's adaptive rounds (run_study with a fake run_fn)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from normdrop.claims.base import ClaimData
from normdrop.claims.bn_higher_lr import BNHigherLR
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
    setting = StudySetting.create(quick=True, seeds=3, name="mlp-sgd")
    store = tmp_path_factory.mktemp("higher-lr") / "runs.sqlite"
    outcome = run_study(setting, store, claims=[BNHigherLR()], workers=1, progress=False, run_fn=fake_run)
    return setting, store, outcome


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
    setting = StudySetting.create(quick=True, seeds=3, name="mlp-sgd")
    for (norm, seed), search in _replayed(setting, setting.seed_list).items():
        diverge, good = DIVERGE[norm] * (1 + 0.1 * seed), GOOD[norm] * (1 + 0.1 * seed)
        assert search.state == "done" and not search.non_monotone
        assert search.diverge.largest_stable < diverge <= search.diverge.smallest_unstable
        assert search.diverge.ratio <= 1.25 * (1 + 1e-9)
        assert search.good.largest_stable < good <= search.good.smallest_unstable
        assert search.good.ratio <= 1.25 * (1 + 1e-9)
