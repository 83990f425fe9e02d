"""Fleet vs solo training speed for the study's MLP families: member-steps per second, in one process.

For each family (``normdrop.claims.base.FAMILIES``, with and without BN + dropout) and fleet size K, the benchmark
trains a fleet of K members (``normdrop.fleet.run_fleet``, seeds 0..K-1 and K learning rates) and the first member
alone (``normdrop.train.run``), alternating, ``--repeats`` times, and keeps the best of each. Times are the runs' own
``train_time`` (training steps only: evaluation and hooks excluded), so

    fleet member-steps/s = K * steps / fleet train time,      solo member-steps/s = steps / solo train time.

Achieved GFLOP/s = member-steps/s x 3 x the forward matmul FLOPs of one member's step (2 B sum(in x out)), beside
the best rate of an n x n float32 matmul measured in the same run on the same threads (the machine's limit). On a
shared machine only the ratios mean anything. Usage:

    python -m benchmarks.bench_fleet [--quick] [--members 10 40] [--steps 100] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from typing import Any

import torch

from normdrop.bench.models import MATMUL_SIZE, QUICK_MATMUL_SIZE, matmul_peak
from normdrop.claims.setting import FAMILIES
from normdrop.fleet import run_fleet
from normdrop.spec import RunSpec
from normdrop.train import run

FLEET_FAMILIES: dict[str, dict[str, Any]] = {
    "deep 6x100 sgd": dict(FAMILIES["deep"]),
    "deep 6x100 sgd bn+dropout": {**FAMILIES["deep"], "norm": "batch", "dropout": 0.1},
    "small 2x128 adam": dict(FAMILIES["small"]),
    "small 2x128 adam bn+dropout": {**FAMILIES["small"], "norm": "batch", "dropout": 0.3},
}
INPUT_FEATURES, NUM_CLASSES = 40, 10  # MNIST-1D


def family_specs(options: dict[str, Any], members: int, steps: int) -> list[RunSpec]:
    """K specs of one family: seeds 0..K-1, learning rates spread over [lr, 2 lr), ``steps`` steps, one eval."""
    fields = {**options, "steps": steps, "eval_every": steps}
    lr = fields.pop("lr", 0.01)  # the deep family has no lr of its own: the spec default
    return [RunSpec(**fields, seed=k, lr=lr * (1 + k / members)) for k in range(members)]


def step_flops(spec: RunSpec) -> int:
    """3 x forward matmul FLOPs of one member's training step."""
    widths = [INPUT_FEATURES] + [spec.width] * spec.depth + [NUM_CLASSES]
    return 3 * 2 * spec.batch_size * sum(a * b for a, b in itertools.pairwise(widths))


def _train_seconds(result) -> float:
    if result.status != "finished":
        raise RuntimeError(f"benchmark run {result.run_id} ended {result.status}: {result.error}")
    return result.summary["train_time"]


def measure(name: str, members: int, steps: int, repeats: int, peak_gflops: float) -> dict[str, Any]:
    specs = family_specs(FLEET_FAMILIES[name], members, steps)
    run_fleet(specs[:2], num_threads=1)  # warm-up: numba kernels, datasets, the per-shape linear check
    fleet_best = solo_best = math.inf
    for _ in range(repeats):
        fleet_best = min(fleet_best, sum(_train_seconds(r) for r in run_fleet(specs, num_threads=1)))
        solo_best = min(solo_best, _train_seconds(run(specs[0], num_threads=1)))
    fleet_rate, solo_rate = members * steps / fleet_best, steps / solo_best
    flops = step_flops(specs[0])
    return {
        "family": name,
        "members": members,
        "steps": steps,
        "fleet_member_steps_per_s": fleet_rate,
        "solo_member_steps_per_s": solo_rate,
        "speedup": fleet_rate / solo_rate,
        "fleet_gflop_per_s": fleet_rate * flops / 1e9,
        "solo_gflop_per_s": solo_rate * flops / 1e9,
        "fleet_percent_of_peak": 100 * fleet_rate * flops / 1e9 / peak_gflops,
        "solo_percent_of_peak": 100 * solo_rate * flops / 1e9 / peak_gflops,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and one repeat: a smoke run, not numbers")
    parser.add_argument("--members", type=int, nargs="+", default=[10, 40], help="fleet sizes K")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 100; 10 quick)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds, best kept (default 3)")
    parser.add_argument("--families", nargs="+", default=list(FLEET_FAMILIES), choices=list(FLEET_FAMILIES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.members):
        parser.error(f"--members must be >= 1, got {args.members}")
    steps = args.steps or (10 if args.quick else 100)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    peak = matmul_peak(1, QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE, 3 if args.quick else 7)
    peak_gflops = peak["matmul_gflop_per_s"]
    rows = [measure(name, k, steps, repeats, peak_gflops) for name in args.families for k in args.members]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {"machine": peak, "load_average": load, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"1 thread; matmul peak {peak['matmul_gflop_per_s']:.1f} GFLOP/s ({peak['matmul_size']}^2); "
        f"load average {load}; best of {repeats}, {steps} steps"
    )
    header = f"{'family':<30} {'K':>4} {'fleet m-steps/s':>16} {'solo m-steps/s':>15} {'speedup':>8} "
    print(header + f"{'fleet GF/s (%peak)':>19} {'solo GF/s (%peak)':>18}")
    for row in rows:
        print(
            f"{row['family']:<30} {row['members']:>4} {row['fleet_member_steps_per_s']:>16.1f} "
            f"{row['solo_member_steps_per_s']:>15.1f} {row['speedup']:>7.2f}x "
            f"{row['fleet_gflop_per_s']:>10.1f} ({row['fleet_percent_of_peak']:>3.0f}%) "
            f"{row['solo_gflop_per_s']:>9.1f} ({row['solo_percent_of_peak']:>3.0f}%)"
        )


if __name__ == "__main__":
    main()
