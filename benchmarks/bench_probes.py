"""Overhead of each probe: wall time of a run with one probe attached every k steps, as a ratio to the same run
without probes, and the time of one probe call.

All runs happen in this one process, interleaved (plain, probe 1, ..., probe n, plain, ...), each configuration
repeated and the fastest repeat kept (the one least disturbed by other work, as ``timeit`` advises). Each probe is
also timed call by call (median over calls and repeats), which is steadier than a difference of run times on a
shared machine: ``predicted`` = 1 + calls x (probe call + trainer's save/restore) / plain run. A ``(no-op hook)``
row measures the trainer's save/restore of model, optimizer and RNG around a hook that does nothing.

The run is the lab's MNIST-1D MLP (40 -> 100 -> 100 -> 10) with batch norm and dropout 0.1, so every probe has
something to measure. Usage:

    .venv/bin/python benchmarks/bench_probes.py [--steps 400] [--every 50] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from normdrop.probes import REGISTRY, make_probe
from normdrop.spec import RunSpec
from normdrop.train import HookContext, run

NO_OP = "(no-op hook)"
PLAIN = "(none)"


def base_spec(steps: int, every: int) -> RunSpec:
    """The benchmarked run: the MNIST-1D MLP with BN before ReLU and dropout after it, Adam, batches of 100."""
    return RunSpec(dataset="mnist1d", model="mlp", norm="batch", dropout=0.1, steps=steps, eval_every=steps)


class Timed:
    """A hook that calls ``probe`` (or nothing) and keeps the duration of each call."""

    def __init__(self, probe: Any | None, every: int) -> None:
        self.probe = probe
        self.every = every if probe is None else probe.every
        self.name = NO_OP if probe is None else probe.name
        self.seconds: list[float] = []

    def __call__(self, ctx: HookContext) -> list[dict[str, Any]]:
        start = time.perf_counter()
        records = [] if self.probe is None else self.probe(ctx)
        self.seconds.append(time.perf_counter() - start)
        return records


def measure(steps: int, every: int, repeats: int, names: list[str]) -> list[dict[str, float | int | str]]:
    """One row per configuration: fastest run seconds, ratio to plain, calls, ms per call, predicted ratio."""
    spec = base_spec(steps, every)
    run(spec.model_copy(update={"steps": 2, "eval_every": 2}))  # load the data and warm up the kernels
    configurations = [PLAIN, NO_OP, *names]
    run_seconds: dict[str, list[float]] = {name: [] for name in configurations}
    call_seconds: dict[str, list[float]] = {name: [] for name in configurations}
    calls: dict[str, int] = {name: 0 for name in configurations}
    for _ in range(repeats):
        for name in configurations:
            hooks = [] if name == PLAIN else [Timed(None if name == NO_OP else make_probe(name, every), every)]
            start = time.perf_counter()
            result = run(spec, hooks=hooks)
            run_seconds[name].append(time.perf_counter() - start)
            if result.status != "finished":
                raise RuntimeError(f"benchmark run with {name} ended {result.status}: {result.error}")
            if hooks:
                call_seconds[name] += hooks[0].seconds
                calls[name] = len(hooks[0].seconds)
    plain = min(run_seconds[PLAIN])
    no_op = min(run_seconds[NO_OP])
    save_restore = (no_op - plain) / calls[NO_OP]
    rows: list[dict[str, float | int | str]] = []
    for name in configurations:
        per_call = statistics.median(call_seconds[name]) if call_seconds[name] else 0.0
        overhead = calls[name] * (per_call + (save_restore if name != NO_OP else 0.0)) if name != PLAIN else 0.0
        rows.append(
            {
                "probe": name,
                "seconds": min(run_seconds[name]),
                "ratio": min(run_seconds[name]) / plain,
                "calls": calls[name],
                "ms_per_call": 1000 * (per_call if name != NO_OP else save_restore),
                "predicted_ratio": 1 + overhead / plain if name != NO_OP else no_op / plain,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50, help="probe cadence k (the ensemble probe runs at the end)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", default=",".join(REGISTRY), help="comma-separated registry names")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    rows = measure(args.steps, args.every, args.repeats, [name for name in args.probes.split(",") if name])
    if args.json:
        print(json.dumps({"steps": args.steps, "every": args.every, "repeats": args.repeats, "rows": rows}, indent=2))
        return
    print(f"{args.steps} steps, probes every {args.every} steps, fastest of {args.repeats} runs, one torch thread")
    print(f"| {'probe':<18} | {'run (s)':>8} | {'x plain':>8} | {'calls':>5} | {'ms / call':>9} | {'predicted':>9} |")
    print(f"|{'-' * 20}|{'-' * 9}:|{'-' * 9}:|{'-' * 6}:|{'-' * 10}:|{'-' * 10}:|")
    for row in rows:
        print(
            f"| {row['probe']:<18} | {row['seconds']:>8.2f} | {row['ratio']:>8.2f} | {row['calls']:>5} |"
            f" {row['ms_per_call']:>9.1f} | {row['predicted_ratio']:>9.2f} |"
        )


if __name__ == "__main__":
    main()
