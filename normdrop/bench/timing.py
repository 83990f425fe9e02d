"""How the benchmarks time code: calls per round calibrated to a fixed duration, implementations interleaved round
by round, and the best round kept (the one least disturbed by other work on a shared machine, as ``timeit``
advises). Ratios within one run are comparable; absolute times across runs are not."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

ROUND_SECONDS = 0.05
"""Each timing round runs an implementation for about this long."""

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""wall: elapsed time; cpu: this process's CPU time, steadier with one thread on a machine shared with other work
(with several threads it also counts threads spinning while they wait for work)."""


def seconds_per_call(fn: Callable[[], object], calls: int, clock: Callable[[], float]) -> float:
    """Mean seconds of ``calls`` back-to-back calls of ``fn`` on ``clock``."""
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def calibrate(fn: Callable[[], object], clock: Callable[[], float], round_seconds: float = ROUND_SECONDS) -> int:
    """Calls per timing round: about ``round_seconds`` of work (after a warm-up call, which also compiles)."""
    fn()
    calls = 1
    while (elapsed := seconds_per_call(fn, calls, clock) * calls) < round_seconds / 10:
        calls *= 10
    return max(1, round(calls * round_seconds / max(elapsed, 1e-9)))


def time_round_robin(
    impls: dict[str, Callable[[], object]],
    repeats: int,
    clock: Callable[[], float],
    round_seconds: float = ROUND_SECONDS,
) -> dict[str, float]:
    """Best seconds per call of each implementation over ``repeats`` interleaved rounds."""
    calls = {name: calibrate(fn, clock, round_seconds) for name, fn in impls.items()}
    best = dict.fromkeys(impls, float("inf"))
    for _ in range(repeats):
        for name, fn in impls.items():
            best[name] = min(best[name], seconds_per_call(fn, calls[name], clock))
    return best


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block (normdrop's numba kernels follow torch's)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
