"""The study over several settings, end to end from synthetic runs with known answers: an effect present in one
setting only (setting-dependent), effects that flip at half the budget or with half the seeds (fragile), seeds that
tie to the resolution (resolution-limited) or exactly (zero-width), a claim significant alone but not after Holm,
and an analysis that raises in one setting; then summary.json, the report and `normdrop report` on that store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from normdrop.claims import Analysis, Claim, ClaimData, Experiment, StudySetting, measure, register, unregister
from normdrop.claims.readers import final
from normdrop.claims.results import not_measurable
from normdrop.scope import resolution_limited
from normdrop.significance import holm, min_detectable_effect, p_value
from normdrop.spec import RunResult, RunSpec
from normdrop.study import budget_skip_reason, cut_result, plan_study, run_study

SETTINGS = ("mlp-sgd", "cnn1d", "digits")
SEEDS = 4
NOISE = (0.01, -0.012, 0.008, -0.006)
"""Per-seed noise of the BN arm: sums to zero over the four seeds, so a zero effect stays inconclusive."""

ONLY_IN_MNIST1D_MLPS, FLIPS_LATE, FLIPS_WITH_SEEDS, TIES, WEAK, LATE_TARGET, ADAPTIVE = 11, 12, 13, 14, 16, 17, 18
"""Each fake claim's runs have their own width, which tells :func:`scope_run` the behaviour to fake."""
SEED_EFFECTS = {FLIPS_WITH_SEEDS: (0.05, 0.06, 0.07, 0.08), WEAK: (0.02, 0.05, 0.08, 0.11)}


def effect(spec: RunSpec, step: int) -> float:
    """The BN arm's test-accuracy gain at ``step`` of the run, by the claim (width) the run belongs to."""
    noise = NOISE[spec.seed % SEEDS]
    if spec.width == ONLY_IN_MNIST1D_MLPS:
        return (0.1 if spec.model == "mlp" and spec.dataset == "mnist1d" else 0.0) + noise
    if spec.width == FLIPS_LATE:  # behind for the first half of the run, ahead at the end
        return (0.1 if step > spec.steps / 2 else -0.1) + noise
    if spec.width == TIES:
        return 0.25
    if spec.width == ADAPTIVE:  # the pilot's accuracy rises in the run's second half; the gain is steady
        return (0.1 if spec.lr != 0.05 or step > spec.steps / 2 else 0.0) + noise / 100
    if spec.width == LATE_TARGET:  # in the CNN setting the gain (and the target) comes only in the run's second half
        late = spec.model == "cnn1d" and step <= spec.steps / 2
        return (0.0 if late else 0.1) + noise / 100  # seeds nearly agree: half of them still decide
    return SEED_EFFECTS[spec.width][spec.seed % SEEDS]


def scope_run(spec: RunSpec) -> RunResult:
    """A run's accuracy curve: 0.5, plus :func:`effect` in the BN arm."""
    metrics = []
    for step in range(0, spec.steps + 1, spec.eval_every):
        value = 0.5 + (effect(spec, step) if spec.norm == "batch" else 0.0)
        metrics += [(step, "test_accuracy", value), (step, "train_accuracy", value)]
    summary = {"test_accuracy": metrics[-2][2], "train_accuracy": metrics[-1][2], "diverged": False}
    return RunResult(spec.run_id, spec, "finished", metrics=metrics, summary=summary, wall_time=0.001)


class AccuracyGain(Claim):
    """BN minus plain final test accuracy per seed, on the small family with this claim's own width."""

    title = "A fake accuracy gain"
    statement = "BN raises test accuracy."

    def __init__(self, claim_id: str, width: int, *, flag_ties_in: str | None = None) -> None:
        self.id = claim_id
        self.width = width
        self.flag_ties_in = flag_ties_in

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment(
            arms={norm: setting.arm("small", norm=norm, width=self.width, probes=()) for norm in ("none", "batch")}
        )

    def analyze(self, data: ClaimData) -> Analysis:
        plain, bn = data.finished("none"), data.finished("batch")
        values = {s: final(bn[s], "test_accuracy") - final(plain[s], "test_accuracy") for s in bn if s in plain}
        m = measure("accuracy gain", "test accuracy, BN - plain", values, "increase")
        if data.setting.name == self.flag_ties_in:
            m.resolution_limited = resolution_limited([0.5 + v for v in values.values()], 1.25)
        return Analysis(m, secondary=[measure("same again", "exploratory copy", values, "increase")])


class ReachesTarget(AccuracyGain):
    """The gain, measurable only once the BN arm reaches 55% test accuracy in every seed (as bn-faster needs its
    target reached): a run cut before that cannot measure it."""

    def analyze(self, data: ClaimData) -> Analysis:
        bn = data.finished("batch")
        if not bn or any(max(v for _, name, v in r.metrics if name == "test_accuracy") < 0.55 for r in bn.values()):
            return Analysis(not_measurable("gain", "test accuracy, BN - plain", "increase", "target not reached"))
        return super().analyze(data)


class ChoosesOnAPilot(AccuracyGain):
    """An adaptive claim: a pilot pair of runs (lr 0.05) decides, from its final BN accuracy, the learning rate of
    the evaluation pair (0.1 when the pilot ends above 55%, else 0.01), added by ``extend``. On runs cut to half
    their steps the pilot has not risen yet, so re-making the choice there would ask for runs never trained."""

    @staticmethod
    def choice(setting: StudySetting, results) -> float | None:
        pilot = results.get(setting.spec("small", norm="batch", width=ADAPTIVE, probes=(), lr=0.05, seed=0).run_id)
        if pilot is None:
            return None
        return 0.1 if final(pilot, "test_accuracy") > 0.55 else 0.01

    def experiment(self, setting: StudySetting) -> Experiment:
        pilot = {
            f"pilot {norm}": setting.arm("small", norm=norm, width=ADAPTIVE, probes=(), lr=0.05) for norm in NORMS_AB
        }

        def extend(results):
            lr = self.choice(setting, results)
            if lr is None:
                return {}
            return {
                norm: (setting.arm("small", norm=norm, width=ADAPTIVE, probes=(), lr=lr), None) for norm in NORMS_AB
            }

        return Experiment(arms=pilot, extend=extend)

    def analyze(self, data: ClaimData) -> Analysis:
        lr = self.choice(data.setting, data.choice_results)
        wanted = {data.setting.spec("small", norm="batch", width=ADAPTIVE, probes=(), lr=lr, seed=0).run_id}
        if lr is None or not wanted <= set(data.results):
            return Analysis(not_measurable("gain", "test accuracy, BN - plain", "increase", "runs missing"))
        return super().analyze(data)


NORMS_AB = ("none", "batch")


class FailsOnConvs(Claim):
    """Measured without runs (one value per evaluation seed); its analysis raises in the CNN setting."""

    id = "fails-on-convs"
    title = "An in-process measurement that assumes (N, C) activations"
    statement = "A layer computes what it should."

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment()

    def analyze(self, data: ClaimData) -> Analysis:
        if data.setting.name == "cnn1d":
            raise ValueError("expected (N, C) activations, got (N, C, L)")
        return Analysis(measure("exact", "1 per seed", {s: 1.0 + 0.1 * s for s in data.setting.seed_list}, "increase"))


def claims() -> list[Claim]:
    return [
        AccuracyGain("only-in-mnist1d-mlps", ONLY_IN_MNIST1D_MLPS),
        AccuracyGain("flips-late", FLIPS_LATE),
        AccuracyGain("flips-with-seeds", FLIPS_WITH_SEEDS),
        AccuracyGain("ties", TIES, flag_ties_in="mlp-sgd"),
        AccuracyGain("weak", WEAK),
        ReachesTarget("late-target", LATE_TARGET),
        ChoosesOnAPilot("adaptive", ADAPTIVE),
        FailsOnConvs(),
    ]


def settings() -> list[StudySetting]:
    return [StudySetting.create(name=name, quick=True, seeds=SEEDS) for name in SETTINGS]


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:
    from normdrop.report import write_report

    root = tmp_path_factory.mktemp("scoped-study")
    outcome = run_study(settings(), root / "runs.sqlite", claims=claims(), workers=1, progress=False, run_fn=scope_run)
    paths = write_report(outcome, root / "report")
    summary = json.loads(paths["json"].read_text())
    return root, outcome, summary


def entry(summary: dict, claim_id: str) -> dict:
    return next(e for e in summary["claims"] if e["id"] == claim_id)


def rows(summary: dict, claim_id: str) -> dict[str, dict]:
    return {row["setting"]: row for row in entry(summary, claim_id)["settings"]}


def test_runs_shared_across_settings_run_once_in_one_sweep(scoped: tuple[Path, object, dict]) -> None:
    _, outcome, _ = scoped
    planned = {spec.run_id for plan in plan_study(settings(), claims()) for spec in plan.specs}
    # 7 claims with runs x 3 settings x 2 arms x 4 seeds, all distinct (width, model, dataset differ); the adaptive
    # claim's evaluation pair comes in one more round: 3 settings x 2 arms x 4 seeds
    assert len(planned) == 7 * 3 * 2 * SEEDS
    assert outcome.sweep["total"] == len(planned) + 3 * 2 * SEEDS == outcome.sweep["finished"]


def test_an_effect_in_one_setting_only_is_setting_dependent(scoped: tuple[Path, object, dict]) -> None:
    _, _, summary = scoped
    e = entry(summary, "only-in-mnist1d-mlps")
    assert e["verdict"] == "setting-dependent"
    assert e["scope"].startswith("1/3 settings") and "cnn1d: inconclusive" in e["scope"]
    assert e["supported_in"] == ["mlp-sgd"]
    assert [row["verdict"] for row in e["settings"]] == ["supported", "inconclusive", "inconclusive"]
    # today's keys: the overall verdict, and the first setting's numbers
    assert e["numbers_from"] == "mlp-sgd" and e["effect"] == pytest.approx(0.1) and e["n_seeds"] == SEEDS


def test_an_effect_that_flips_at_half_the_budget_is_fragile(scoped: tuple[Path, object, dict]) -> None:
    _, _, summary = scoped
    e = entry(summary, "flips-late")
    assert e["verdict"] == "supported" and e["scope"] == "3/3 settings"
    assert e["fragile"] is True and "contradicted with half the budget" in e["fragile_detail"]
    assert e["reanalyses"]["half the budget"]["verdict"] == "contradicted"
    for row in e["settings"]:
        assert row["budgets"]["0.25"]["effect"] == pytest.approx(-0.1)
        assert row["budgets"]["0.5"]["effect"] == pytest.approx(-0.1)
        assert row["budgets"]["1"]["effect"] == pytest.approx(0.1)
        assert row["budgets"]["1"]["verdict"] == "supported" and row["budgets"]["0.5"]["verdict"] == "contradicted"


def test_a_setting_not_measurable_at_half_the_budget_is_left_out_not_a_flip(scoped: tuple[Path, object, dict]) -> None:
    _, _, summary = scoped
    e = entry(summary, "late-target")
    assert e["verdict"] == "supported" and e["scope"].startswith("3/3 settings")
    assert e["fragile"] is False, e["fragile_detail"]
    assert "not measurable with half the budget in cnn1d (left out of the robustness comparison)" in e["fragile_detail"]
    assert "supported also with half the seeds and with half the budget (on the 2/3 settings" in e["fragile_detail"]


def test_an_adaptive_claim_keeps_its_full_budget_choice_in_budget_reanalyses(scoped: tuple[Path, object, dict]) -> None:
    _, _, summary = scoped
    e = entry(summary, "adaptive")
    assert e["verdict"] == "supported"
    for row in e["settings"]:
        assert row["budgets"]["0.5"]["verdict"] == "supported", row["budgets"]  # measured, not "runs missing"
    assert e["fragile"] is False and "not measurable" not in e["fragile_detail"]


def test_an_effect_carried_by_the_later_seeds_is_fragile(scoped: tuple[Path, object, dict]) -> None:
    _, _, summary = scoped
    e = entry(summary, "flips-with-seeds")
    assert e["verdict"] == "supported" and e["fragile"] is True
    assert "inconclusive with half the seeds" in e["fragile_detail"]
    for row in e["settings"]:
        assert row["half_seeds"]["n_seeds"] == 2 and row["half_seeds"]["verdict"] == "inconclusive"
        assert row["budgets"]["0.5"]["verdict"] == "supported"  # constant over the run: budget-stable


def test_ties_are_resolution_limited_or_zero_width_never_precision(scoped: tuple[Path, object, dict]) -> None:
    root, _, summary = scoped
    e = entry(summary, "ties")
    assert e["verdict"] == "supported" and e["fragile"] is False
    assert e["fragile_detail"] == "supported also with half the seeds and with half the budget"
    by = rows(summary, "ties")
    assert by["mlp-sgd"]["resolution_limited"] is True and by["mlp-sgd"]["zero_width"] is False
    assert by["cnn1d"]["resolution_limited"] is False and by["cnn1d"]["zero_width"] is True
    assert by["mlp-sgd"]["ci_low"] == by["mlp-sgd"]["ci_high"]
    html = (root / "report" / "report.html").read_text()
    md = (root / "report" / "summary.md").read_text()
    for text in (html, md):
        assert "0.25 (resolution-limited)" in text and "0.25 (zero-width: seeds tie)" in text
        assert "[0.25, 0.25]" not in text


def test_holm_turns_a_lone_significant_effect_inconclusive(scoped: tuple[Path, object, dict]) -> None:
    _, outcome, summary = scoped
    e = entry(summary, "weak")
    assert e["verdict"] == "inconclusive"
    for row in e["settings"]:
        assert row["raw_verdict"] == "supported" and row["verdict"] == "inconclusive"
        assert 0.0025 < row["p"] < 0.025 and row["p_adjusted"] >= 0.05
        assert "not significant after Holm" in row["reason"]
    # p and p_adjusted recomputed from the per-seed values with significance.p_value and significance.holm
    p_values = {}
    for claim in summary["claims"]:
        for row in claim["settings"]:
            per_seed = summary["details"][claim["id"]]["by_setting"][row["setting"]]["primary"]["per_seed"]
            expected = p_value(per_seed.values(), "increase") if row["raw_verdict"] != "not measurable" else None
            assert row["p"] == pytest.approx(expected)
            p_values[(claim["id"], row["setting"])] = row["p"]
            values = [v for v in per_seed.values() if v is not None]
            if len(values) >= 2:
                assert row["mde"] == pytest.approx(min_detectable_effect(float(np.std(values, ddof=1)), len(values)))
    adjusted = holm({f"{k[0]}@{k[1]}": p for k, p in p_values.items()})
    for key, p in p_values.items():
        got = rows(summary, key[0])[key[1]]["p_adjusted"]
        assert got == (None if p is None else pytest.approx(adjusted[f"{key[0]}@{key[1]}"].adjusted))
    tests = sum(p is not None for p in p_values.values())
    assert outcome.holm_tests == tests == summary["study"]["multiplicity"]["tests"]
    assert all(claim["adjusted"] == f"Holm over {tests} primary tests" for claim in summary["claims"])
    # the strong effects survive the correction
    assert [row["verdict"] for row in entry(summary, "flips-late")["settings"]] == ["supported"] * 3


def test_an_analysis_that_raises_in_one_setting_is_not_measurable_there(scoped: tuple[Path, object, dict]) -> None:
    _, _, summary = scoped
    e = entry(summary, "fails-on-convs")
    by = rows(summary, "fails-on-convs")
    assert by["cnn1d"]["verdict"] == "not measurable"
    assert "expected (N, C) activations" in by["cnn1d"]["reason"] and "cnn1d" in by["cnn1d"]["reason"]
    assert by["mlp-sgd"]["verdict"] == by["digits"]["verdict"] == "supported"
    assert e["verdict"] == "setting-dependent" and "cnn1d: not measurable" in e["scope"]
    assert "without training runs" in by["mlp-sgd"]["budget_skipped"]
    assert by["mlp-sgd"]["budgets"]["0.5"] is None and by["mlp-sgd"]["budgets"]["1"]["effect"] is not None


def test_summary_and_report_show_scope_robustness_and_exploratory_measurements(
    scoped: tuple[Path, object, dict],
) -> None:
    root, _, summary = scoped
    assert summary["study"]["claims"] == [c.id for c in claims()]
    assert [s["name"] for s in summary["study"]["settings"]] == list(SETTINGS)
    assert summary["study"]["quick"] is True
    details = summary["details"]["ties"]
    assert details["by_setting"]["cnn1d"]["secondary"][0]["exploratory"] is True
    assert details["secondary"][0]["exploratory"] is True and details["numbers_from"] == "mlp-sgd"
    html = (root / "report" / "report.html").read_text()
    assert html.count('class="quick"') >= 1 + len(claims())  # the page and every claim section
    assert "quick: a first look, not for citing" in html
    assert f"Holm across {summary['study']['multiplicity']['tests']} primary tests, family-wise 5%" in html
    assert "Benjamini-Hochberg" in html and "exploratory" in html
    for claim in summary["claims"]:
        assert f'data-claim-id="{claim["id"]}" data-verdict="{claim["verdict"]}"' in html
        assert f"<b>Scope:</b> {claim['scope']}" in html.replace("&#x27;", "'")
    assert html.count("<details") >= sum(len(c["settings"]) for c in summary["claims"])
    assert "http://" not in html and "https://" not in html
    md = (root / "report" / "summary.md").read_text()
    assert md.startswith("# normdrop study") and "> **quick: a first look, not for citing**" in md
    assert "| flips-late | **supported** (quick) | 3/3 settings | fragile |" in md


def test_report_rerenders_the_recorded_settings_and_claims(scoped: tuple[Path, object, dict]) -> None:
    from normdrop.cli import app

    root, _, summary = scoped
    registered = claims()
    for claim in registered:
        register(claim)
    try:
        result = CliRunner().invoke(
            app, ["report", "--store", str(root / "runs.sqlite"), "--out", str(root / "report"), "-q"]
        )
    finally:
        for claim in registered:
            unregister(claim.id)
    assert result.exit_code == 0, result.output
    again = json.loads((root / "report" / "summary.json").read_text())
    assert again["study"]["trained"] is False
    assert [s["name"] for s in again["study"]["settings"]] == list(SETTINGS)
    strip = ("wall_seconds", "phase_seconds", "started_at", "trained", "sweep")
    for old, new in zip(summary["claims"], again["claims"], strict=True):
        assert old == new
    assert {k: v for k, v in again["study"].items() if k not in strip} == {
        k: v for k, v in summary["study"].items() if k not in strip
    }


# ---- pieces ---------------------------------------------------------------------------------------------------


def test_cut_result_is_the_run_stopped_at_the_budget() -> None:
    spec = StudySetting.create(quick=True).spec("small", seed=0)
    metrics = [(t, "test_accuracy", t / 1000) for t in range(0, 201, 25)] + [(t, "batch_loss", 1.0) for t in range(200)]
    records = [{"probe": "p", "step": t, "v": t} for t in (0, 100, 200)]
    diverged = RunResult(
        spec.run_id,
        spec,
        "diverged",
        diverged_step=150,
        metrics=metrics,
        probe_records=records,
        summary={"test_accuracy": None, "diverged": True},
        artifacts={"final_weights": b"w"},
    )
    half = cut_result(diverged, 0.5)
    assert half.status == "finished" and half.diverged_step is None and half.run_id == spec.run_id
    assert max(step for step, _, _ in half.metrics) == 100 and [r["step"] for r in half.probe_records] == [0, 100]
    assert half.artifacts == {} and half.spec.steps == 100
    assert half.summary["test_accuracy"] == pytest.approx(0.1) and half.summary["steps_completed"] == 100
    quarter = cut_result(diverged, 0.25)
    assert max(step for step, name, _ in quarter.metrics if name == "test_accuracy") == 50
    early = cut_result(dataclass_replace(diverged, diverged_step=30), 0.5)
    assert early.status == "diverged" and early.diverged_step == 30
    assert cut_result(diverged, 1.0) is diverged
    with pytest.raises(ValueError, match="budget"):
        cut_result(diverged, 0.0)


def dataclass_replace(result: RunResult, **fields: object) -> RunResult:
    import dataclasses

    return dataclasses.replace(result, **fields)


class NeedsWholeRuns(AccuracyGain):
    budget_reanalysis = False


class Scheduled(AccuracyGain):
    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment(arms={"batch": setting.arm("small", norm="batch", schedule="cosine", lr_min=0.0)})


def test_budget_reanalysis_is_skipped_with_the_reason() -> None:
    setting = StudySetting.create(quick=True, seeds=2)
    whole, scheduled, plain = plan_study(
        setting, [NeedsWholeRuns("whole", 20), Scheduled("scheduled", 21), AccuracyGain("plain", 22)]
    )
    assert "whole runs" in budget_skip_reason(whole)
    assert "schedule" in budget_skip_reason(scheduled)
    assert budget_skip_reason(plain) == ""


def test_a_claim_in_none_of_the_settings_is_refused_before_any_work() -> None:
    he = StudySetting.create(name="mlp-sgd-he", quick=True)
    with pytest.raises(ValueError, match="runs in none of the settings mlp-sgd-he"):
        plan_study([he], [AccuracyGain("not-a-bn-claim", 30)])
    with pytest.raises(ValueError, match="distinct names"):
        plan_study([he, he], [])


def test_half_seeds_setting_keeps_the_first_ceil_half() -> None:
    from normdrop.study import half_seed_setting

    for n in (1, 2, 3, 5, 10):
        half = half_seed_setting(StudySetting.create(seeds=n))
        assert half.seed_list == list(range(math.ceil(n / 2)))
        assert half.selection_seed_list == StudySetting.create(seeds=n).selection_seed_list
