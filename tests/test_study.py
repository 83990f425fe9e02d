"""The study engine: claims -> specs -> sweep -> analyses -> report; robust to failed and diverged runs, missing
probes and broken analyses; re-runs reuse the store; ``normdrop study --quick`` end to end."""

from __future__ import annotations

import json
import math
import random
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from normdrop.claims import CLAIM_IDS, Analysis, Claim, ClaimData, Experiment, StudySetting, all_claims, get, measure
from normdrop.claims.experiment import probed_deep_arms
from normdrop.lr_search import LogBisection, rounds_needed
from normdrop.report import summary_dict, write_report
from normdrop.scope import OVERALL
from normdrop.spec import RunResult, RunSpec
from normdrop.study import default_settings, plan_study, run_study

ISSUE_KEYS = {"id", "verdict", "effect", "ci_low", "ci_high", "metric", "n_seeds"}
SCOPE_KEYS = {"numbers_from", "scope", "supported_in", "settings", "fragile", "fragile_detail", "adjusted"}
SETTING_ROW_KEYS = {"setting", "verdict", "effect", "ci_low", "ci_high", "n_seeds", "p", "p_adjusted", "mde"}
SETTING_ROW_KEYS |= {"resolution_limited", "budgets"}


def fake_run(spec: RunSpec) -> RunResult:
    """Stands in for the trainer: accuracy curves where BN learns faster and dropout generalizes better, plain
    networks diverge at lr >= 1 and BN ones at lr >= 10, and every run with dropout before the head fails."""
    if spec.dropout_position == "before_head":
        raise RuntimeError("fake failure")
    rng = random.Random(spec.run_id)
    diverge_at = 10.0 if spec.norm == "batch" else 1.0
    if spec.lr >= diverge_at:
        return RunResult(
            spec.run_id, spec, "diverged", diverged_step=3, metrics=[(0, "batch_loss", 2.3)], summary={}, wall_time=0.01
        )
    lr_factor = min(spec.lr, 0.3) / 0.1 if spec.optimizer == "sgd" else 1.0
    speed = (4.0 if spec.norm == "batch" else 1.0) * lr_factor * (1 + 0.1 * rng.random())
    final_train = 0.95 - 0.3 * spec.dropout
    final_test = 0.6 + 0.1 * spec.dropout + 0.01 * rng.random()
    metrics: list[tuple[int, str, float]] = [(t, "batch_loss", 2.3 * math.exp(-t / 200)) for t in range(spec.steps)]
    for step in range(0, spec.steps + 1, spec.eval_every):
        progress = 1 - math.exp(-speed * step / spec.steps * 5)
        train_acc, test_acc = 0.1 + (final_train - 0.1) * progress, 0.1 + (final_test - 0.1) * progress
        metrics += [
            (step, "train_accuracy", train_acc),
            (step, "test_accuracy", test_acc),
            (step, "train_loss", 2.3 * (1 - 0.8 * progress)),
            (step, "test_loss", 2.3 * (1 - 0.6 * progress)),
            (step, "train_time", step * 0.001),
        ]
    return RunResult(spec.run_id, spec, "finished", metrics=metrics, summary={"diverged": False}, wall_time=0.01)


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("fake-study")
    setting = StudySetting.create(quick=True, seeds=3)
    outcome = run_study(setting, root / "runs.sqlite", workers=2, progress=False, run_fn=fake_run)
    return root, outcome


def test_a_study_with_failed_and_diverged_runs_completes_and_renders(fake_study: tuple[Path, object]) -> None:
    root, outcome = fake_study
    assert outcome.sweep["failed"] > 0 and outcome.sweep["diverged"] > 0
    paths = write_report(outcome, root / "report")
    summary = json.loads(paths["json"].read_text())
    assert [entry["id"] for entry in summary["claims"]] == list(CLAIM_IDS)
    for entry in summary["claims"]:
        assert set(entry) >= ISSUE_KEYS | SCOPE_KEYS
        assert entry["verdict"] in OVERALL and entry["numbers_from"] == "mlp-sgd"
        for row in entry["settings"]:
            assert set(row) >= SETTING_ROW_KEYS and set(row["budgets"]) == {"0.25", "0.5", "1"}
        if entry["effect"] is not None:
            assert entry["ci_low"] <= entry["effect"] <= entry["ci_high"]
    verdicts = {entry["id"]: entry["verdict"] for entry in summary["claims"]}
    details = summary["details"]
    # the fake trainer makes BN faster, more stable at high lr, and dropout better on the test set
    assert verdicts["bn-faster"] == "supported"
    assert verdicts["bn-higher-lr"] == "supported"
    assert verdicts["dropout-generalizes"] == "supported"
    # fake runs carry no probe records and no weights: those claims say so instead of inventing numbers
    for claim_id in ("bn-stable-inputs", "bn-smooth", "dropout-coadapt", "dropout-ensemble", "dropout-bn-shift"):
        assert verdicts[claim_id] == "not measurable", claim_id
        assert details[claim_id]["primary"]["reason"], claim_id
    assert details["dropout-bn-shift"]["runs"]["failed"] > 0
    html = paths["html"].read_text()
    assert all(f'data-claim-id="{claim_id}"' in html for claim_id in CLAIM_IDS)
    assert "http://" not in html and "https://" not in html
    assert paths["markdown"].read_text().count("\n## ") == len(CLAIM_IDS)


def test_a_rerun_reuses_the_store_and_report_only_reads(tmp_path: Path) -> None:
    setting = StudySetting.create(quick=True, seeds=2)
    claims = [get("bn-faster"), get("dropout-bn-shift")]  # the second has runs that fail (dropout before the head)
    first = run_study(setting, tmp_path / "runs.sqlite", claims=claims, workers=2, progress=False, run_fn=fake_run)
    assert first.sweep["failed"] > 0 and first.sweep["reused"] == 0
    again = run_study(setting, tmp_path / "runs.sqlite", claims=claims, workers=2, progress=False, run_fn=fake_run)
    # failed runs are retried (and fail again); everything else comes from the store
    assert again.sweep["finished"] == 0 and again.sweep["diverged"] == 0
    assert again.sweep["reused"] == again.sweep["total"] - again.sweep["failed"]
    rendered = run_study(setting, tmp_path / "runs.sqlite", claims=claims, train=False, progress=False)
    assert not rendered.sweep and not rendered.notes
    assert [r.verdict for r in rendered.results] == [r.verdict for r in first.results]
    elsewhere = run_study(setting, tmp_path / "empty.sqlite", claims=claims, train=False, progress=False)
    assert [r.verdict for r in elsewhere.results] == ["not measurable"] * 2
    assert "not in the store" in elsewhere.notes[0]


class NeedsAMissingProbe(Claim):
    id = "needs-missing-probe"
    title = "A claim whose instrument does not exist"
    statement = "Something only a missing probe could measure."
    probes = ("no_such_probe",)

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment(arms={"a": setting.arm("small", probes=())})

    def analyze(self, data: ClaimData) -> Analysis:  # pragma: no cover - never reached
        raise AssertionError("a claim with a missing probe must not be analysed")


class BrokenAnalysis(Claim):
    id = "broken-analysis"
    title = "A claim whose analysis raises"
    statement = "Anything."

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment()

    def analyze(self, data: ClaimData) -> Analysis:
        raise ZeroDivisionError("oops")


class CountsRuns(Claim):
    id = "counts-runs"
    title = "A user's claim on the shared probed runs"
    statement = "BN runs exist."

    def experiment(self, setting: StudySetting) -> Experiment:
        return Experiment(arms=probed_deep_arms(setting))

    def analyze(self, data: ClaimData) -> Analysis:
        values = {seed: 1.0 for seed in data.finished("batch probed")}
        return Analysis(measure("finished BN runs", "one per finished run", values, "increase"))


def test_missing_probes_and_broken_analyses_make_a_claim_not_measurable(tmp_path: Path) -> None:
    setting = StudySetting.create(quick=True, seeds=2)
    claims = [NeedsAMissingProbe(), BrokenAnalysis(), CountsRuns()]
    plans = plan_study(setting, claims)
    assert plans[0].specs == [] and "no_such_probe" in plans[0].missing_probes
    outcome = run_study(setting, tmp_path / "runs.sqlite", claims=claims, workers=1, progress=False, run_fn=fake_run)
    missing, broken, counted = outcome.results
    assert missing.verdict == "not measurable" and "no_such_probe" in missing.analysis.primary.decision.reason
    assert broken.verdict == "not measurable" and "ZeroDivisionError: oops" in broken.analysis.primary.decision.reason
    assert counted.verdict == "supported" and counted.runs.planned == 4 and counted.runs.finished == 4
    summary = summary_dict(outcome)
    assert [entry["id"] for entry in summary["claims"]] == [c.id for c in claims]
    json.dumps(summary, allow_nan=False)


def test_every_claim_of_claims_md_is_registered_with_its_module() -> None:
    assert [claim.id for claim in all_claims()] == list(CLAIM_IDS)
    for claim_id in CLAIM_IDS:
        claim = get(claim_id)
        assert type(claim).__module__ == f"normdrop.claims.{claim_id.replace('-', '_')}"
        assert claim.statement and claim.mechanism and claim.rationale and claim.title


def test_default_study_size() -> None:
    """The default study (every claim in every setting of the catalogue) and the quick one (one setting) ask for the
    static runs their budgets were measured with (see README; the BN claims' bisections add their runs in rounds, not
    counted here); runs shared by claims and settings count once."""
    sizes = {}
    for quick in (False, True):
        plans = plan_study(default_settings(quick=quick))
        sizes[quick] = len({spec.run_id for plan in plans for spec in plan.specs})
    assert sizes == {False: 587, True: 62}


# ---- normdrop study --quick, end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_quick_study_end_to_end(quick_study: Path, tmp_path: Path, normdrop_cli: list[str]) -> None:
    summary = json.loads((quick_study / "report" / "summary.json").read_text())
    assert [entry["id"] for entry in summary["claims"]] == list(CLAIM_IDS)
    for entry in summary["claims"]:
        assert set(entry) >= ISSUE_KEYS | SCOPE_KEYS and entry["verdict"] in OVERALL
        if entry["settings"][0]["raw_verdict"] == "not measurable":
            assert summary["details"][entry["id"]]["primary"]["reason"]
        else:
            assert entry["ci_low"] <= entry["effect"] <= entry["ci_high"] and entry["n_seeds"] >= 2
    study = summary["study"]
    assert study["setting"]["quick"] and study["sweep"]["failed"] == 0
    assert study["sweep"]["finished"] + study["sweep"]["diverged"] == study["sweep"]["total"]
    assert (quick_study / "report" / "summary.md").read_text().startswith("# normdrop study")

    # a re-run trains nothing and only renders; `normdrop report` re-renders from the store
    rerun = subprocess.run(
        [*normdrop_cli, "study", "--quick", "--store", "runs.sqlite", "--out", str(tmp_path / "again"), "-q"],
        cwd=quick_study,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "report:" in rerun.stdout
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["study"]["sweep"]["reused"] == again["study"]["sweep"]["total"]
    assert [e["verdict"] for e in again["claims"]] == [e["verdict"] for e in summary["claims"]]
    subprocess.run(
        [*normdrop_cli, "report", "--store", "runs.sqlite", "--out", str(tmp_path / "again"), "-q"],
        cwd=quick_study,
        check=True,
        capture_output=True,
    )
    rendered = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert rendered["study"]["trained"] is False and rendered["study"]["setting"]["quick"] is True
    # the same runs give the same effects (the mechanics claims measure float32 rounding, ~1e-7, and can differ)
    trained_effects = {e["id"]: e["effect"] for e in rendered["claims"] if not e["id"].endswith("mechanics")}
    assert trained_effects == {e["id"]: e["effect"] for e in summary["claims"] if not e["id"].endswith("mechanics")}


def test_runs_on_mixed_numeric_paths_are_noted_or_refused(tmp_path: Path) -> None:
    """A store whose runs were computed on two numeric paths (e.g. resumed on a machine without the fast path):
    the analysis says so in its notes, and refuses with ``strict_numeric_path``."""
    import sqlite3

    from normdrop.store import Store
    from normdrop.study import MixedNumericPaths, numeric_paths

    setting = StudySetting.create(quick=True, seeds=2)
    claims = [get("bn-faster")]
    store_path = tmp_path / "runs.sqlite"
    first = run_study(setting, store_path, claims=claims, workers=1, progress=False, run_fn=fake_run)
    assert not first.notes
    with Store(store_path) as store:
        ids = [run.run_id for run in store.runs()]
        assert len(numeric_paths(store, ids)) == 1
    with sqlite3.connect(store_path) as db:  # as if half the runs had been computed on the composite backend
        for run_id, text in db.execute("SELECT run_id, versions FROM runs ORDER BY run_id").fetchall()[::2]:
            versions = json.loads(text)
            versions["numeric_path"] = {**versions["numeric_path"], "backend": "composite", "fastpath": False}
            db.execute("UPDATE runs SET versions = ? WHERE run_id = ?", (json.dumps(versions), run_id))
    mixed = run_study(setting, store_path, claims=claims, train=False, progress=False)
    assert any("2 numeric paths" in note and "backend=composite" in note for note in mixed.notes)
    with pytest.raises(MixedNumericPaths, match="numeric paths"):
        run_study(setting, store_path, claims=claims, train=False, progress=False, strict_numeric_path=True)


# ---- adaptive experiments (Experiment.extend) ---------------------------------------------------------------


class BisectsTheLimit(Claim):
    """Bisects each seed's largest non-diverging learning rate with rounds of runs (fake_run: plain nets diverge
    at lr >= 1), replaying the searches from the results each round."""

    id = "bisects-the-limit"
    title = "A bisection over rounds"
    statement = "The plain net's limit is 1."

    def _searches(self, setting: StudySetting, results: Mapping[str, RunResult]) -> dict[int, LogBisection]:
        searches = {}
        for seed in setting.seed_list:
            search = LogBisection(0.01, 10.0, 1.25)
            while (lr := search.pending()) is not None:
                result = results.get(setting.spec("deep", seed=seed, lr=lr).run_id)
                if result is None:
                    break
                search.record(lr, result.status == "finished")
            searches[seed] = search
        return searches

    def experiment(self, setting: StudySetting) -> Experiment:
        def extend(results: Mapping[str, RunResult]) -> dict[str, tuple[list[RunSpec], list[int] | None]]:
            arms = {}
            for seed, search in self._searches(setting, results).items():
                lrs = [lr for lr, _ in search.evaluations]
                if (lr := search.pending()) is not None:
                    lrs.append(lr)
                arms[f"seed {seed}"] = ([setting.spec("deep", seed=seed, lr=lr) for lr in lrs], [seed] * len(lrs))
            return arms

        return Experiment(extend=extend)

    def analyze(self, data: ClaimData) -> Analysis:
        searches = self._searches(data.setting, data.results)
        values = {seed: search.result().value for seed, search in searches.items() if search.done}
        return Analysis(measure("limit", "largest stable lr", values, "increase", null=0.5))


def test_adaptive_rounds_run_a_bisection_and_report_replays_it(tmp_path: Path) -> None:
    setting = StudySetting.create(quick=True, seeds=2)
    store = tmp_path / "runs.sqlite"
    outcome = run_study(setting, store, claims=[BisectsTheLimit()], workers=1, progress=False, run_fn=fake_run)
    (result,) = outcome.results
    values = result.analysis.primary.per_seed
    assert sorted(values) == [0, 1]
    for value in values.values():  # the bracket straddles the fake's threshold 1.0 to within x1.25
        assert 1.0 / 1.25 < value < 1.0 * 1.25
    runs = outcome.sweep["finished"] + outcome.sweep["diverged"]
    assert runs == result.runs.planned and runs <= 2 * rounds_needed(0.01, 10.0, 1.25)
    again = run_study(setting, store, claims=[BisectsTheLimit()], train=False, progress=False)
    assert again.results[0].analysis.primary.per_seed == values and again.results[0].runs.missing == 0


def test_runs_that_never_loaded_the_fast_path_agree_with_either_path() -> None:
    from normdrop.study import mixed_paths

    on, off, unused = "backend=auto, fast path=True", "backend=auto, fast path=False", "backend=auto, fast path=None"
    assert not mixed_paths({on: 6, unused: 6}) and not mixed_paths({off: 3, unused: 1}) and not mixed_paths({on: 1})
    assert mixed_paths({on: 1, off: 1}) and mixed_paths({on: 2, "backend=composite, fast path=None": 1})
