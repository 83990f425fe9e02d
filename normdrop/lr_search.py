"""The largest stable learning rate of one seed, found by bisection on a log scale.

A grid of learning rates a factor ~3 apart puts every seed on one of a few grid points, so the per-seed values of
"largest stable learning rate" tie and their confidence interval can have zero width: the grid's resolution, not
the seeds' agreement. Bisection instead narrows a bracket ``[good, bad]`` (``good`` stable, ``bad`` not) until
``bad / good <= resolution`` (x1.25 by default, a tenth of a decade), at about ``log2(log(high/low) /
log(resolution))`` evaluations per seed instead of one per grid point.

The rule assumes stability is monotone in the learning rate (stable below a threshold, unstable above it), as it
is for the divergence of gradient descent on a quadratic (stable iff ``lr < 2 / lambda_max``). Where a run is not
monotone (a lucky large rate), bisection finds *a* boundary inside the starting bracket, not the largest; the
search records every evaluation so a reader can check.

Searches of many seeds advance together in rounds (:func:`bisect_all`): each round asks every unfinished search
for its next learning rate and evaluates them all in one batch, so the runs of a round go through a sweep in
parallel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Censoring = Literal["", "at least", "below"]

DEFAULT_RESOLUTION = 1.25
"""Default ratio ``bad / good`` at which a bracket is narrow enough (x1.25, about 0.1 decade)."""


@dataclass(frozen=True)
class Bracket:
    """What a finished search found.

    Attributes:
        largest_stable: the largest learning rate seen to be stable (the bracket's lower end), or None when even
            ``low`` was unstable (``censoring == "below"``).
        smallest_unstable: the smallest learning rate seen to be unstable, or None when even ``high`` was stable
            (``censoring == "at least"``).
        censoring: "" for a bracketed value, "at least" when the top of the range was stable, "below" when its
            bottom was not.
        evaluations: every (learning rate, stable) pair, in the order evaluated.
    """

    largest_stable: float | None
    smallest_unstable: float | None
    censoring: Censoring
    evaluations: tuple[tuple[float, bool], ...]

    @property
    def value(self) -> float:
        """The estimate: the bracket's geometric midpoint; its end for a censored search."""
        if self.largest_stable is None:
            assert self.smallest_unstable is not None
            return self.smallest_unstable
        if self.smallest_unstable is None:
            return self.largest_stable
        return math.sqrt(self.largest_stable * self.smallest_unstable)

    @property
    def ratio(self) -> float | None:
        """``smallest_unstable / largest_stable``: the resolution reached (None when censored)."""
        if self.largest_stable is None or self.smallest_unstable is None:
            return None
        return self.smallest_unstable / self.largest_stable


@dataclass
class LogBisection:
    """A bisection over ``[low, high]`` on a log scale, driven one evaluation at a time.

    ``pending()`` is the next learning rate to evaluate (None when done); ``record(lr, stable)`` gives its outcome.
    The ends are evaluated first (high, then low), then geometric midpoints ``sqrt(good * bad)``.
    """

    low: float
    high: float
    resolution: float = DEFAULT_RESOLUTION
    evaluations: list[tuple[float, bool]] = field(default_factory=list)
    _good: float | None = None
    _bad: float | None = None
    _censoring: Censoring | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or not 0 < self.low < self.high:
            raise ValueError(f"bisection needs 0 < low < high (finite), got low={self.low!r}, high={self.high!r}")
        if not (math.isfinite(self.resolution) and self.resolution > 1):
            raise ValueError(f"resolution must be a finite ratio above 1, got {self.resolution!r}")

    @property
    def done(self) -> bool:
        """Whether the search has its answer."""
        return self._censoring is not None

    def pending(self) -> float | None:
        """The learning rate to evaluate next, or None when the search is done."""
        if self.done:
            return None
        seen = dict(self.evaluations)
        if self.high not in seen:
            return self.high
        if self.low not in seen:
            return self.low
        assert self._good is not None and self._bad is not None
        return math.sqrt(self._good * self._bad)

    def record(self, lr: float, stable: bool) -> None:
        """Record the outcome of evaluating ``lr`` (which must be :meth:`pending`'s value)."""
        expected = self.pending()
        if expected is None:
            raise ValueError("the search is already done")
        if lr != expected:
            raise ValueError(f"expected the outcome at lr={expected!r}, got lr={lr!r}")
        self.evaluations.append((lr, bool(stable)))
        if lr == self.high and len(self.evaluations) == 1:
            if stable:
                self._good, self._censoring = lr, "at least"
            else:
                self._bad = lr
            return
        if lr == self.low and len(self.evaluations) == 2:
            if not stable:
                self._bad, self._censoring = lr, "below"
                return
            self._good = lr
        elif stable:
            self._good = lr
        else:
            self._bad = lr
        assert self._good is not None and self._bad is not None
        if self._bad / self._good <= self.resolution * (1 + 1e-12):
            self._censoring = ""

    def result(self) -> Bracket:
        """The finished search's bracket."""
        if not self.done:
            raise ValueError("the search is not done yet")
        assert self._censoring is not None
        return Bracket(self._good, self._bad, self._censoring, tuple(self.evaluations))


def bisect_all(
    keys: Sequence[Hashable],
    evaluate: Callable[[list[tuple[Hashable, float]]], Mapping[tuple[Hashable, float], bool]],
    *,
    low: float,
    high: float,
    resolution: float = DEFAULT_RESOLUTION,
    max_rounds: int = 64,
) -> dict[Hashable, Bracket]:
    """Run one bisection per key (e.g. per seed and arm) in rounds, evaluating each round's points in one batch.

    Args:
        keys: one search per key.
        evaluate: given ``[(key, lr), ...]``, returns ``{(key, lr): stable}`` for every pair asked.
        low, high, resolution: the starting bracket and the stopping ratio (see :class:`LogBisection`).
        max_rounds: a guard; a search cannot need more than ``2 + log2(log(high/low)/log(resolution))`` rounds.
    """
    searches = {key: LogBisection(low, high, resolution) for key in keys}
    for _ in range(max_rounds):
        batch = [(key, lr) for key, search in searches.items() if (lr := search.pending()) is not None]
        if not batch:
            return {key: search.result() for key, search in searches.items()}
        outcomes = evaluate(batch)
        for key, lr in batch:
            if (key, lr) not in outcomes:
                raise KeyError(f"evaluate() returned no outcome for key {key!r} at lr={lr!r}")
            searches[key].record(lr, outcomes[(key, lr)])
    raise RuntimeError(f"bisection did not finish within {max_rounds} rounds")


def rounds_needed(low: float, high: float, resolution: float = DEFAULT_RESOLUTION) -> int:
    """Most evaluations one search takes: the two ends plus ``ceil(log2(log(high/low) / log(resolution)))``."""
    return 2 + max(0, math.ceil(math.log2(math.log(high / low) / math.log(resolution))))
