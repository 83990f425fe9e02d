"""Held-out selection: choices made on selection seeds, effects measured on disjoint evaluation seeds.

Choosing the best learning rate (or a target accuracy, a dropout rate, a matched accuracy) on the seeds whose
effect is then reported biases the effect towards the arm that was tuned: the maximum of noisy estimates is
biased upwards ("winner's curse"; DeepOBS's protocol re-runs the chosen setting on fresh seeds for this reason).
Here every choice is made on :attr:`SeedSplit.selection` and every reported number comes from
:attr:`SeedSplit.evaluation`, which never overlap.

:func:`choose` reads scores through a :class:`SelectionView`, which raises :class:`SelectionLeak` if any
evaluation seed is read, so a selection that peeks at the evaluation seeds fails loudly instead of biasing the
result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

Candidate = TypeVar("Candidate", bound=Hashable)


class SelectionLeak(RuntimeError):
    """A choice read a value of an evaluation seed."""


@dataclass(frozen=True)
class SeedSplit:
    """Disjoint seed sets: ``selection`` for choices, ``evaluation`` for reported effects."""

    selection: tuple[int, ...]
    evaluation: tuple[int, ...]

    def __post_init__(self) -> None:
        overlap = set(self.selection) & set(self.evaluation)
        if overlap:
            raise ValueError(f"selection and evaluation seeds must be disjoint, both hold {sorted(overlap)}")
        if not self.selection or not self.evaluation:
            raise ValueError(
                f"need at least one selection and one evaluation seed, got {len(self.selection)} and "
                f"{len(self.evaluation)}"
            )

    @property
    def all(self) -> tuple[int, ...]:
        """Every seed, selection first."""
        return self.selection + self.evaluation


def split_seeds(n_selection: int, n_evaluation: int, *, first: int = 0) -> SeedSplit:
    """Seeds ``first .. first+n_selection-1`` for selection and the next ``n_evaluation`` for evaluation.

    Consecutive blocks rather than a shuffle: adding evaluation seeds later keeps the existing ones (and their
    stored runs) unchanged.
    """
    for name, value in (("n_selection", n_selection), ("n_evaluation", n_evaluation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    selection = tuple(range(first, first + n_selection))
    evaluation = tuple(range(first + n_selection, first + n_selection + n_evaluation))
    return SeedSplit(selection, evaluation)


class SelectionView(Mapping[int, float]):
    """Per-seed values restricted to the selection seeds; reading an evaluation seed raises SelectionLeak."""

    def __init__(self, values: Mapping[int, float], split: SeedSplit) -> None:
        self._values = values
        self._split = split

    def __getitem__(self, seed: int) -> float:
        if seed in self._split.evaluation:
            raise SelectionLeak(f"seed {seed} is an evaluation seed; a choice may read only {self._split.selection}")
        if seed not in self._split.selection:
            raise KeyError(seed)
        return self._values[seed]

    def __iter__(self) -> Iterator[int]:
        return (seed for seed in self._split.selection if seed in self._values)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def choose(
    candidates: Iterable[Candidate],
    scores: Callable[[Candidate], Mapping[int, float]],
    split: SeedSplit,
    *,
    summary: Callable[[Sequence[float]], float] | None = None,
    maximize: bool = True,
) -> Candidate:
    """The candidate whose selection-seed scores summarize best (mean by default); ties go to the first.

    Args:
        candidates: e.g. learning rates, in a fixed order.
        scores: candidate -> per-seed score (e.g. final test accuracy by seed). Only selection seeds are read.
        split: which seeds may be read.
        summary: how a candidate's selection-seed scores are combined; the mean by default.
        maximize: the largest summary wins (False: the smallest).
    """
    combine = summary or (lambda values: sum(values) / len(values))
    best: Candidate | None = None
    best_value = 0.0
    for candidate in candidates:
        view = SelectionView(scores(candidate), split)
        values = [view[seed] for seed in view]
        if not values:
            continue
        value = combine(values)
        if value != value:  # NaN never wins
            continue
        if best is None or (value > best_value if maximize else value < best_value):
            best, best_value = candidate, value
    if best is None:
        raise ValueError(f"no candidate had a score on the selection seeds {split.selection}")
    return best


def evaluation_values(values: Mapping[int, float], split: SeedSplit) -> dict[int, float]:
    """The values of the evaluation seeds only: what an effect is computed from."""
    return {seed: values[seed] for seed in split.evaluation if seed in values}
