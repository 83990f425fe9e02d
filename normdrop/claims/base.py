"""The :class:`Claim` base class and what it exchanges with the study: :class:`ClaimData` (the finished runs its
analysis reads) and :class:`ClaimResult` (the claim with its analysis, as the report shows it).

A claim is one class in one module (named by its id in docs/claims.md). It never trains anything itself: it returns
run specs (:meth:`Claim.experiment`, :mod:`normdrop.claims.experiment`), the study engine runs the missing ones into
the store, and :meth:`Claim.analyze` reads the finished runs back (:mod:`normdrop.claims.readers`) and turns them
into measurements with confidence intervals and verdicts (:mod:`normdrop.claims.results`, :mod:`normdrop.stats`)
and figures (:mod:`normdrop.claims.figures`). Claims about what a layer computes ("mechanics") need no training:
they measure the layers directly, in :meth:`Claim.analyze`, and ask for no runs. The setting every claim builds
its runs from is :class:`normdrop.claims.setting.StudySetting`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from normdrop.claims.experiment import Experiment
from normdrop.claims.results import Analysis, Figure, Measurement, RunCounts
from normdrop.claims.setting import StudySetting
from normdrop.scope import ScopedVerdict
from normdrop.spec import RunResult

BUDGETS: tuple[float, ...] = (0.25, 0.5, 1.0)
"""Fractions of each run's steps at which the study shows every primary effect (1: the whole runs)."""
HALF_BUDGET = 0.5
"""The budget whose overall verdict decides robustness to training length (:attr:`ScopedClaimResult.fragile`)."""


class Claim(ABC):
    """One claim of docs/claims.md: what it says, how it is tested, and the analysis of its runs.

    Subclasses set the class attributes and implement :meth:`experiment` and :meth:`analyze`; register an
    instance with :func:`normdrop.claims.register` to add it to the study.

    Attributes:
        id: the claim's id in docs/claims.md (module ``normdrop/claims/<id with underscores>.py``).
        title: a few words.
        statement: the claim, in our words.
        mechanism: a plain-language explanation of the mechanism, for learners.
        rationale: why this experiment tests the claim on 2 CPU cores, and its limits.
        caveats: where the literature disputes the claim or its mechanism.
        probes: names of ``normdrop.probe_catalog.PROBES`` the runs need; a name outside the catalogue makes the
            claim not measurable, with the reason.
        references: papers the measurement follows.
        budget_reanalysis: see the attribute.
    """

    id: ClassVar[str]
    title: ClassVar[str]
    statement: ClassVar[str]
    mechanism: ClassVar[str] = ""
    rationale: ClassVar[str] = ""
    caveats: ClassVar[str] = ""
    probes: ClassVar[tuple[str, ...]] = ()
    references: ClassVar[tuple[str, ...]] = ()
    budget_reanalysis: ClassVar[bool] = True
    """Whether the analysis can be repeated on the runs cut to a fraction of their steps (the study shows each
    effect at smaller budgets and tests robustness to half the budget that way). False for a claim whose primary
    reads what only whole runs hold (final weights)."""
    per_setting: ClassVar[bool] = True
    """Whether the claim is tested in every setting. False for a check of what a layer computes (the mechanics
    claims), which trains nothing: measured once, in the first chosen setting, so the same check is not counted
    several times among the primary tests."""

    @abstractmethod
    def experiment(self, setting: StudySetting) -> Experiment:
        """The runs this claim needs (none for a claim measured without training)."""

    @abstractmethod
    def analyze(self, data: ClaimData) -> Analysis:
        """Measurements, figures and findings from the runs; must not raise for failed or diverged runs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"


@dataclass
class ClaimResult:
    """A claim with its analysis in one setting (``setting``: its name) and the bookkeeping the report shows."""

    claim: Claim
    analysis: Analysis
    runs: RunCounts
    n_seeds: int
    analysis_seconds: float = 0.0
    configuration: dict[str, Any] = field(default_factory=dict)
    experiment_description: str = ""
    setting: str = ""

    @property
    def verdict(self) -> str:
        return self.analysis.primary.verdict


@dataclass
class SettingResult:
    """One claim in one setting: the full analysis, its re-analyses, its test and the verdict the report shows.

    Attributes:
        setting: the setting.
        result: the analysis of the whole runs on all evaluation seeds (figures drawn).
        half_seeds: the primary measurement re-analysed on the first ``ceil(n/2)`` evaluation seeds.
        budgets: budget (a fraction of each run's steps, :data:`BUDGETS`) -> the primary measured on the runs cut
            there; 1.0 is ``result``'s primary. Only 1.0 when the budget re-analysis was skipped
            (``budget_skipped`` says why).
        p: the primary's one-sided (or TOST) p-value from its per-seed values (:func:`normdrop.significance.p_value`;
            None with fewer than two).
        p_adjusted: ``p`` after Holm's correction over every primary test of the study.
        mde: the minimum detectable effect of the primary with its seeds' sd and n (80% power, one-sided 5%).
        verdict, reason: what the report shows: the claim's own verdict, except a "supported" that is not
            significant after Holm, which becomes "inconclusive" (the reason says so; ``raw_verdict`` keeps it).
    """

    setting: StudySetting
    result: ClaimResult
    half_seeds: Measurement | None = None
    budgets: dict[float, Measurement] = field(default_factory=dict)
    budget_skipped: str = ""
    p: float | None = None
    p_adjusted: float | None = None
    mde: float | None = None
    verdict: str = ""
    reason: str = ""
    reanalysis_seconds: float = 0.0

    @property
    def primary(self) -> Measurement:
        """The primary measurement of the full analysis."""
        return self.result.analysis.primary

    @property
    def raw_verdict(self) -> str:
        """The claim's own verdict in this setting, before the multiplicity correction."""
        return self.result.verdict


@dataclass
class ScopedClaimResult:
    """A claim over every setting it ran in: the per-setting results, the overall verdict with its scope, and
    whether that verdict survives half the seeds and half the budget.

    ``fragile``: the overall verdict changes with half the evaluation seeds or at half the budget (each
    re-analysis with its own Holm correction); ``fragile_detail`` says which way ("inconclusive with half the
    seeds, supported in full") or what held ("supported also with half the seeds and with half the budget"), and
    where the budget could not be re-analysed. ``analysis``, ``runs`` and ``n_seeds`` are those of the first
    setting (a one-setting study reads as before).
    """

    claim: Claim
    settings: list[SettingResult]
    scoped: ScopedVerdict
    fragile: bool = False
    fragile_detail: str = ""
    reanalyses: dict[str, ScopedVerdict] = field(default_factory=dict)
    """Overall verdicts of the re-analyses ("half the seeds", "half the budget", "a quarter of the budget")."""
    figure: Figure | None = None
    """The primary effect in every setting and at every budget (the study draws it:
    :mod:`normdrop.claims.scope_figure`)."""

    @property
    def verdict(self) -> str:
        """The overall verdict (:func:`normdrop.scope.overall_verdict` over the shown per-setting verdicts)."""
        return self.scoped.verdict

    @property
    def scope(self) -> str:
        """The scope line ("3/4 settings (not in cnn1d: inconclusive)")."""
        return self.scoped.scope

    @property
    def first(self) -> ClaimResult:
        """The full analysis in the first setting."""
        return self.settings[0].result

    @property
    def analysis(self) -> Analysis:
        return self.first.analysis

    @property
    def runs(self) -> RunCounts:
        return self.first.runs

    @property
    def n_seeds(self) -> int:
        return self.first.n_seeds


@dataclass
class ClaimData:
    """The finished runs of one claim's experiment, as its analysis sees them.

    ``results`` maps run id to the stored result (failed runs included; a run the store does not hold is
    absent). ``others`` holds the results of the claims analysed before this one, in the same setting (the summary
    reads them). ``budget`` is the fraction of each run's steps the results were cut to (1: whole runs; the study
    re-analyses at smaller budgets by cutting each run's records at ``budget * steps``). ``draw`` False: a
    re-analysis (half the seeds, a smaller budget) that reads only the primary and secondary measurements, so the
    claim should skip its figures and any in-process measurement the primary does not need. ``whole``: in a budget
    re-analysis, the same runs uncut; an adaptive claim makes its choices (rates, targets, stability limits) on
    :attr:`choice_results`, so a re-analysis holds them at their full-budget values and cuts only what is measured
    with them (re-making them on cut runs would ask for runs that were never trained).
    """

    setting: StudySetting
    experiment: Experiment
    results: Mapping[str, RunResult]
    others: Mapping[str, ClaimResult] = field(default_factory=dict)
    budget: float = 1.0
    draw: bool = True
    whole: Mapping[str, RunResult] | None = None

    @property
    def choice_results(self) -> Mapping[str, RunResult]:
        """The runs choices are made on: :attr:`whole` in a budget re-analysis, else :attr:`results`."""
        return self.results if self.whole is None else self.whole

    def runs(self, arm: str) -> dict[int, RunResult | None]:
        """Replicate seed -> result of an arm (None when the store does not hold the run).

        The i-th spec of an arm belongs to the i-th replicate seed: ``experiment.replicates[arm]`` where the arm
        names them, else the i-th seed of the setting's evaluation seeds. Replicates outside the setting's
        evaluation and selection seeds are left out (a re-analysis on half the seeds passes a setting with fewer).
        """
        specs = self.experiment.arms[arm]
        replicates = self.experiment.replicates.get(arm)
        if replicates is None:
            return {
                seed: self.results.get(spec.run_id) for seed, spec in zip(self.setting.seed_list, specs, strict=False)
            }
        allowed = set(self.setting.seed_list) | set(self.setting.selection_seed_list)
        return {
            seed: self.results.get(spec.run_id) for seed, spec in zip(replicates, specs, strict=True) if seed in allowed
        }

    def finished(self, arm: str) -> dict[int, RunResult]:
        """Seed -> result of the arm's runs that finished (neither diverged nor failed)."""
        return {seed: r for seed, r in self.runs(arm).items() if r is not None and r.status == "finished"}

    def completed(self, arm: str) -> dict[int, RunResult]:
        """Seed -> result of the arm's runs that finished or diverged."""
        return {seed: r for seed, r in self.runs(arm).items() if r is not None and r.status != "failed"}
