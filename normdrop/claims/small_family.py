"""What the small-family claims share in their analyses: the dropout rate chosen on the selection seeds, final
test-accuracy differences with an interval that includes the test set's sampling error, and convergence checks.

**The chosen dropout rate** (:func:`chosen_dropout`): the candidate p > 0 of
:attr:`StudySetting.dropout_candidates` with the highest mean final test accuracy over the *selection* seeds
(:func:`normdrop.selection.choose`, which raises :class:`normdrop.selection.SelectionLeak` if an evaluation seed is
read). Choosing on the selection seeds' test accuracy is sound here because the evaluation seeds are disjoint: a
different initialization, batch order, dropout masks *and* a different 500-example training subset
(``data_seed = seed``); only the test set is shared, and it is the same for every candidate. Every claim that uses
the chosen rate (dropout-generalizes, dropout-overfit) calls this one function, so they use the same p.

**The interval of an accuracy difference** (:func:`accuracy_estimate`): the test set is fixed per dataset, so a
t interval over seeds leaves out its sampling error. Where every run kept its final weights, the interval is the
hull of the t interval over seeds and :func:`normdrop.significance.paired_example_bootstrap` (seeds and test
examples resampled, ``shared_test_set=True``): the bootstrap adds the test-set error, which matters on small
test sets (digits: 360 examples), while the percentile bootstrap alone, over 5 seeds, lacks the small-sample
t correction and would understate the seed variance. The effect itself (the per-seed values the engine tests)
comes from the recorded metrics, so it is the same at every budget; the bootstrap needs the final weights, so a
re-analysis at a smaller budget (weights dropped) falls back to the t interval and says so in the note.
:func:`example_estimate` does the same for any effect that is a mean over test examples of a per-example value
(dropout-ensemble's per-example NLL differences, dropout-coadapt's per-example share of units probed right);
:func:`normdrop.significance.with_example_error` says why the hull.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from normdrop.claims.base import ClaimData
from normdrop.claims.experiment import dropout_label, selection_label
from normdrop.claims.readers import curve, final, final_correctness
from normdrop.claims.setting import FAMILIES
from normdrop.selection import choose
from normdrop.significance import example_bootstrap, min_detectable_effect, with_example_error
from normdrop.spec import RunResult
from normdrop.stats import Estimate, finite, t_interval

SMALL_N = int(FAMILIES["small"]["train_size"])
"""Training examples of the small family (the statements and notes say it)."""


def small_scope(
    data: ClaimData,
    examples: str = f"{SMALL_N} training examples (a fresh subset per seed)",
    seeds: Sequence[int] | None = None,
) -> str:
    """The scope facts a note starts with: data, budget in steps (the cut budget in a re-analysis), evaluation
    seeds (default the setting's)."""
    spec = data.setting.spec("small")
    budget = f"{round(data.budget * spec.steps)} of {spec.steps} steps" if data.budget < 1 else f"{spec.steps} steps"
    return f"{examples}, {budget}, evaluation seeds {list(data.setting.seed_list if seeds is None else seeds)}"


@dataclass(frozen=True)
class DropoutChoice:
    """The dropout rate chosen on the selection seeds (``p`` None: no candidate had a finished selection run).

    ``means``: candidate -> mean final test accuracy over the selection seeds that finished; ``seeds``: the
    selection seeds; ``reason``: why nothing was chosen."""

    p: float | None
    means: dict[float, float] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        """One sentence for a note: what was chosen, on which seeds, from what."""
        if self.p is None:
            return f"no dropout rate could be chosen ({self.reason})"
        if not self.seeds:
            return f"p = {self.p:g}, {self.reason}"
        scores = ", ".join(f"p={q:g}: {m:.1%}" for q, m in self.means.items())
        return (
            f"p = {self.p:g} chosen on selection seeds {list(self.seeds)} by mean final test accuracy ({scores}); "
            "the evaluation seeds were not read"
        )


def selection_accuracy(data: ClaimData, p: float) -> dict[int, float]:
    """Selection seed -> final test accuracy of the plain small network with dropout ``p`` (finished runs)."""
    label = selection_label(dropout_label(data.setting, p, data.setting.small_train_size))
    if label not in data.experiment.arms:
        return {}
    values = {seed: final(result, "test_accuracy") for seed, result in data.runs(label).items()}
    return {seed: v for seed, v in values.items() if v is not None and math.isfinite(v)}


def chosen_dropout(data: ClaimData) -> DropoutChoice:
    """The candidate dropout rate with the best mean final test accuracy on the selection seeds (module docstring);
    the experiment must hold :func:`normdrop.claims.experiment.dropout_selection_arms`."""
    setting = data.setting
    candidates = setting.dropout_candidates
    if len(candidates) == 1:
        return DropoutChoice(candidates[0], {}, (), "the only candidate (quick study): nothing chosen")
    scores = {p: selection_accuracy(data, p) for p in candidates}
    means = {
        p: float(np.mean([v for s, v in values.items() if s in setting.selection_seed_list]))
        for p, values in scores.items()
        if any(s in setting.selection_seed_list for s in values)
    }
    try:
        p = choose(candidates, lambda q: scores[q], setting.seed_split)
    except ValueError:
        return DropoutChoice(None, means, tuple(setting.selection_seed_list), "no selection run finished")
    return DropoutChoice(p, means, tuple(setting.selection_seed_list))


def final_values(runs: Mapping[int, RunResult | None], metric: str) -> dict[int, float | None]:
    """Seed -> final value of ``metric`` (None for missing, failed or diverged runs)."""
    return {seed: final(result, metric) for seed, result in runs.items()}


def accuracy_estimate(
    per_seed: Mapping[int, float],
    plus: Sequence[Mapping[int, RunResult | None]],
    minus: Sequence[Mapping[int, RunResult | None]],
    *,
    scale: float = 100.0,
) -> tuple[Estimate | None, str]:
    """The interval of an effect that is a signed sum of final test accuracies, ``scale * (sum(plus) -
    sum(minus))`` per seed (a difference: one arm each; an interaction: two each), and a phrase for the note.

    The hull of the t interval of ``per_seed`` and the two-level example bootstrap (module docstring) when every
    seed of ``per_seed`` has final predictions in every arm; otherwise the t interval alone."""
    seeds = set(per_seed)
    correct_plus = [final_correctness({s: r for s, r in arm.items() if s in seeds}) for arm in plus]
    correct_minus = [final_correctness({s: r for s, r in arm.items() if s in seeds}) for arm in minus]
    if any(set(c) != seeds for c in correct_plus + correct_minus):
        differences: dict[int, np.ndarray] = {}
    else:
        differences = {
            s: np.sum([c[s] for c in correct_plus], axis=0) - np.sum([c[s] for c in correct_minus], axis=0)
            for s in seeds
        }
    return example_estimate(
        per_seed,
        differences,
        scale=scale,
        missing="final weights not available, e.g. a re-analysis at a smaller budget",
        bootstrap="a paired bootstrap",
    )


def example_estimate(
    per_seed: Mapping[int, float],
    per_example: Mapping[int, np.ndarray],
    *,
    scale: float = 1.0,
    missing: str = "per-example values not available",
    bootstrap: str = "a bootstrap",
    tolerance: float | None = None,
) -> tuple[Estimate | None, str]:
    """The interval of an effect that is, per seed, ``scale`` times a mean over one fixed test set of per-example
    values, and a phrase for the note.

    With ``per_example[s]`` for every seed of ``per_seed``: the hull
    (:func:`normdrop.significance.with_example_error`) of the t interval of ``per_seed`` and
    :func:`normdrop.significance.example_bootstrap` with ``shared_test_set=True`` (seeds and test examples
    resampled). Otherwise, or when the test sets differ in size, the t interval alone, and the phrase says the
    test-set error is left out (``missing``: why). ``tolerance``: the largest allowed ``|scale * mean(per_example[s])
    - per_seed[s]|``; a seed beyond it means the per-example values are not those of the recorded effect, so the t
    interval is used and the phrase says so.
    """
    t = t_interval(per_seed.values())
    if t is None:
        return None, "too few seeds for an interval"
    seeds = sorted(per_seed)
    seed_only = "t interval over seeds only, without the test set's sampling error"
    if not set(seeds) <= set(per_example):
        return t, f"{seed_only} ({missing})"
    rows = {s: np.asarray(per_example[s], dtype=np.float64) for s in seeds}
    if tolerance is not None:
        worst = max(abs(scale * float(rows[s].mean()) - per_seed[s]) if rows[s].size else math.inf for s in seeds)
        if not worst <= tolerance:
            return t, f"{seed_only} (the per-example values do not reproduce the recorded per-seed effect)"
    try:
        boot = example_bootstrap(rows, shared_test_set=True)
    except ValueError:  # test sets of different sizes: runs of different datasets, not a shared test set
        boot = None
    if boot is None:
        return t, seed_only
    n_examples = len(rows[seeds[0]])
    return (
        with_example_error(t, boot, scale=scale),
        f"interval: hull of the t interval over seeds and {bootstrap} over seeds and the {n_examples} test "
        "examples (the test set is fixed, so its sampling error is included)",
    )


def mde_phrase(per_seed: Mapping[int, float], unit: str = "pp") -> str:
    """ "minimum detectable effect X" (one-sided t test, 80% power, from the per-seed spread), for a note."""
    values = finite(per_seed.values())
    if len(values) < 2:
        return "minimum detectable effect: too few seeds"
    mde = min_detectable_effect(float(values.std(ddof=1)), len(values))
    return f"minimum detectable effect {mde:.2g} {unit} ({len(values)} evaluation seeds, 80% power)"


def improvement_over_last_half(result: RunResult | None, metric: str) -> float | None:
    """How much ``metric`` rose over the second half of the (possibly cut) run: last value minus the value at the
    last evaluation at or before half the last evaluated step; None for a run without two evaluations."""
    if result is None or result.status != "finished":
        return None
    steps, values = curve(result, metric)
    if len(steps) < 2:
        return None
    half = steps[-1] / 2
    before = values[steps <= half]
    return float(values[-1] - before[-1]) if len(before) else None


def convergence_phrase(runs: Mapping[int, RunResult | None], what: str, threshold: float = 0.01) -> str:
    """A note phrase: mean final training accuracy of ``runs`` and whether it (or the test accuracy) still rose
    by more than ``threshold`` over the second half of the runs, i.e. whether the arm had converged."""
    train = [final(r, "train_accuracy") for r in runs.values()]
    rise_train = [improvement_over_last_half(r, "train_accuracy") for r in runs.values()]
    rise_test = [improvement_over_last_half(r, "test_accuracy") for r in runs.values()]
    train_f, rt, rs = finite(train), finite(rise_train), finite(rise_test)
    if not len(train_f):
        return f"{what}: no finished run"
    rising = (len(rt) and float(rt.mean()) > threshold) or (len(rs) and float(rs.mean()) > threshold)
    state = "still improving (not converged)" if rising else "converged"
    detail = f"mean final training accuracy {float(train_f.mean()):.1%}"
    if len(rt) and len(rs):
        detail += f", +{100 * float(rt.mean()):.1f} pp train / {100 * float(rs.mean()):+.1f} pp test over the last half"
    return f"{what}: {state} ({detail})"
