"""Fleet vs solo training speed for the study's MLP families: member-steps per second, in one process.

For each family of :data:`FLEET_FAMILIES` (the study's ``FAMILIES``, with and without BN + dropout) and fleet size
K, :func:`measure` trains a fleet of K members (:func:`normdrop.fleet.run_fleet`: seeds 0..K-1, ``data_seed =
seed`` as the study draws each seed's training subset, K learning rates) and its first member alone
(:func:`normdrop.train.run`), alternating, ``repeats`` times, and keeps the best of each. Times are the runs' own
``train_time`` (training steps only: evaluation and hooks excluded), so

    fleet member-steps/s = K * steps / fleet train time,      solo member-steps/s = steps / solo train time.

Achieved GFLOP/s = member-steps/s x :func:`step_flops` (3 x the forward matmul FLOPs of one member's step,
2 B sum(in x out)), beside the best rate of an n x n float32 matmul measured in the same process on the same one
thread (:func:`normdrop.bench.models.matmul_peak`: the machine's limit). On a shared machine only the ratios mean
anything. ``normdrop bench fleet`` runs it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from normdrop.claims.setting import FAMILIES
from normdrop.fleet import run_fleet
from normdrop.spec import RunResult, RunSpec
from normdrop.train import load_run_dataset, run

FLEET_FAMILIES: dict[str, dict[str, Any]] = {
    "deep 6x100 sgd": dict(FAMILIES["deep"]),
    "deep 6x100 sgd bn+dropout": {**FAMILIES["deep"], "norm": "batch", "dropout": 0.1},
    "small 2x128 adam": dict(FAMILIES["small"]),
    "small 2x128 adam bn+dropout": {**FAMILIES["small"], "norm": "batch", "dropout": 0.3},
}
"""The families measured, by name: the study's two MLP families, plain and with BN + dropout."""

DEFAULT_MEMBERS = (10, 40)
DEFAULT_STEPS, QUICK_STEPS = 100, 10
DEFAULT_REPEATS, QUICK_REPEATS = 3, 1


def family_specs(options: dict[str, Any], members: int, steps: int) -> list[RunSpec]:
    """K specs of one family: seeds 0..K-1 with ``data_seed = seed``, learning rates spread over [lr, 2 lr),
    ``steps`` steps, one evaluation at the end."""
    fields = {**options, "steps": steps, "eval_every": steps}
    lr = fields.pop("lr", RunSpec.model_fields["lr"].default)  # the deep family has no lr of its own
    return [RunSpec(**fields, seed=k, data_seed=k, lr=lr * (1 + k / members)) for k in range(members)]


def step_flops(spec: RunSpec) -> int:
    """3 x the forward matmul FLOPs of one member's training step: 3 x 2 B sum(in x out) over its linear layers."""
    data = load_run_dataset(spec)
    widths = [data.num_features] + [spec.width] * spec.depth + [data.num_classes]
    return 3 * 2 * spec.batch_size * sum(a * b for a, b in itertools.pairwise(widths))


def _train_seconds(result: RunResult) -> float:
    if result.status != "finished":
        raise RuntimeError(f"benchmark run {result.run_id} ended {result.status}: {result.error}")
    return float(result.summary["train_time"])


def measure(name: str, members: int, steps: int, repeats: int, peak_gflops: float) -> dict[str, Any]:
    """One row: family ``name`` at fleet size ``members``, best of ``repeats`` alternating fleet and solo runs,
    with the achieved GFLOP/s as a percentage of ``peak_gflops``."""
    if name not in FLEET_FAMILIES:
        raise ValueError(f"unknown fleet family {name!r}; expected one of {', '.join(FLEET_FAMILIES)}")
    if members < 1 or steps < 1 or repeats < 1:
        raise ValueError(f"members, steps and repeats must be >= 1, got {members}, {steps}, {repeats}")
    specs = family_specs(FLEET_FAMILIES[name], members, steps)
    run_fleet(specs[:2], num_threads=1)  # warm-up: numba kernels, datasets, the per-shape linear checks
    fleet_best = solo_best = math.inf
    for _ in range(repeats):
        fleet_best = min(fleet_best, sum(_train_seconds(r) for r in run_fleet(specs, num_threads=1)))
        solo_best = min(solo_best, _train_seconds(run(specs[0], num_threads=1)))
    fleet_rate, solo_rate = members * steps / fleet_best, steps / solo_best
    gflop = step_flops(specs[0]) / 1e9
    return {
        "family": name,
        "members": members,
        "steps": steps,
        "repeats": repeats,
        "fleet_member_steps_per_s": fleet_rate,
        "solo_member_steps_per_s": solo_rate,
        "speedup": fleet_rate / solo_rate,
        "fleet_gflop_per_s": fleet_rate * gflop,
        "solo_gflop_per_s": solo_rate * gflop,
        "fleet_percent_of_peak": 100 * fleet_rate * gflop / peak_gflops,
        "solo_percent_of_peak": 100 * solo_rate * gflop / peak_gflops,
    }
