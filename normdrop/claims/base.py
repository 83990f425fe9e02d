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
from normdrop.claims.results import Analysis, RunCounts
from normdrop.claims.setting import StudySetting
from normdrop.spec import RunResult


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
    """A claim with its analysis and the bookkeeping the report shows."""

    claim: Claim
    analysis: Analysis
    runs: RunCounts
    n_seeds: int
    analysis_seconds: float = 0.0
    configuration: dict[str, Any] = field(default_factory=dict)
    experiment_description: str = ""

    @property
    def verdict(self) -> str:
        return self.analysis.primary.verdict


@dataclass
class ClaimData:
    """The finished runs of one claim's experiment, as its analysis sees them.

    ``results`` maps run id to the stored result (failed runs included; a run the store does not hold is
    absent). ``others`` holds the results of the claims analysed before this one, in the same setting (the summary
    reads them). ``budget`` is the fraction of each run's steps the results were cut to (1: whole runs; the study
    re-analyses at smaller budgets by cutting each run's records at ``budget * steps``). ``draw`` False: a
    re-analysis (half the seeds, a smaller budget) that reads only the primary and secondary measurements, so the
    claim should skip its figures and any in-process measurement the primary does not need.
    """

    setting: StudySetting
    experiment: Experiment
    results: Mapping[str, RunResult]
    others: Mapping[str, ClaimResult] = field(default_factory=dict)
    budget: float = 1.0
    draw: bool = True

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
