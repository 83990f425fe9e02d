"""normdrop vs torch.nn layers on 2 threads while another process keeps one core busy: the issue's contention case.

A busy-loop child process is pinned to the last core this process may use (``os.sched_setaffinity``), then the
normdrop and the torch.nn layer of each case are timed round-robin in this process (``normdrop.bench.layers``'
ops and callables), ``--rounds`` rounds of ``--round-seconds`` each. Under contention the *median* round says
what a user sees; the best round says what an undisturbed round costs (both printed, as torch time / normdrop
time). ``--no-busy`` measures the same without the child; ``--fixed`` also times normdrop's kernels on the fixed
thread count they used before they gave up cores other processes keep busy. Only the ratios mean anything.

    python -m benchmarks.bench_contention [--threads 2] [--rounds 15] [--no-busy] [--fixed] [--shape 128 64 32 32]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time
from collections.abc import Iterator

import torch

from normdrop.bench.layers import OPS, make_layers, op_callable
from normdrop.bench.timing import calibrate, num_threads, seconds_per_call


def _busy(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


@contextlib.contextmanager
def _fixed_threads() -> Iterator[None]:
    """The parallel kernels as they were before: on torch's thread count whatever other processes do."""
    from normdrop.nn.kernels.numba_cpu import memory

    saved = memory.free_cores
    memory.free_cores = lambda: len(os.sched_getaffinity(0))
    try:
        yield
    finally:
        memory.free_cores = saved


def measure(
    shape: tuple[int, ...], op_name: str, threads: int, rounds: int, round_seconds: float, fixed: bool = False
) -> dict:
    """Per-round seconds per call of both layers (and, with ``fixed``, normdrop's kernels on a fixed thread count,
    as before they gave up busy cores), interleaved; best and median ratios torch / normdrop."""
    op = next(o for o in OPS if o.name == op_name)
    x = torch.randn(*shape)
    grad = torch.randn(*shape)
    with num_threads(threads):
        impls = {impl: op_callable(layer, op, x, grad) for impl, layer in make_layers(op, x).items()}
        if fixed:
            adaptive = impls["normdrop"]

            def fixed_call() -> object:
                with _fixed_threads():
                    return adaptive()

            impls["normdrop fixed"] = fixed_call
        calls = {name: calibrate(fn, time.perf_counter, round_seconds) for name, fn in impls.items()}
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(rounds):
            for name, fn in impls.items():
                times[name].append(seconds_per_call(fn, calls[name], time.perf_counter))
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    row = {
        "op": op_name,
        "shape": shape,
        "threads": threads,
        "normdrop_median_ms": 1e3 * median["normdrop"],
        "torch_median_ms": 1e3 * median["torch"],
        "median_speedup": median["torch"] / median["normdrop"],
        "best_speedup": best["torch"] / best["normdrop"],
    }
    if fixed:
        row["fixed_median_speedup"] = median["torch"] / median["normdrop fixed"]
        row["fixed_best_speedup"] = best["torch"] / best["normdrop fixed"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--round-seconds", type=float, default=0.1)
    parser.add_argument("--shape", type=int, nargs="+", default=[128, 64, 32, 32])
    parser.add_argument("--ops", nargs="+", default=["bn train fwd+bwd", "bn train fwd"])
    parser.add_argument("--no-busy", action="store_true", help="no busy-loop child: the quiet reference")
    parser.add_argument("--fixed", action="store_true", help="also time the kernels on a fixed thread count")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    child = None
    if not args.no_busy:
        child = multiprocessing.get_context("spawn").Process(target=_busy, args=(cores[-1],), daemon=True)
        child.start()
        time.sleep(0.5)
    try:
        print(f"load average {os.getloadavg()}; busy child on core {cores[-1] if child else None}; {args.threads} thr")
        for op in args.ops:
            row = measure(tuple(args.shape), op, args.threads, args.rounds, args.round_seconds, args.fixed)
            fixed = (
                f"; fixed threads: median {row['fixed_median_speedup']:.2f}x, best {row['fixed_best_speedup']:.2f}x"
                if args.fixed
                else ""
            )
            print(
                f"{row['op']:<18} {'x'.join(map(str, row['shape']))}: normdrop {row['normdrop_median_ms']:.2f} ms, "
                f"torch {row['torch_median_ms']:.2f} ms (medians); speedup median {row['median_speedup']:.2f}x, "
                f"best {row['best_speedup']:.2f}x{fixed}"
            )
    finally:
        if child is not None:
            child.terminate()
            child.join()


if __name__ == "__main__":
    main()
