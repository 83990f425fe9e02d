"""The lab's own costs: the trainer against a hand-written PyTorch loop, and how busy a sweep keeps the cores.

1. ``trainer``: ``normdrop.train.run`` vs the same model, data, optimizer and batch order in a bare loop (the
   trainer also evaluates every ``eval_every`` steps; the bare loop does the same evaluations), in this process,
   interleaved; the ratio of training wall times.
2. ``sweep``: the same small set of runs through ``run_sweep`` with 1 worker and with one worker per core, each into
   a fresh store; the speed-up, and the CPU utilisation of the parallel sweep (CPU seconds of the workers / (wall
   seconds x cores)).

    .venv/bin/python benchmarks/bench_lab.py [--steps 1000] [--runs 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from normdrop.models import build_model
from normdrop.seeds import derive_seed
from normdrop.spec import RunSpec
from normdrop.sweep import available_cores, run_sweep
from normdrop.train import evaluate, load_run_dataset, make_optimizer, run


def hand_written_seconds(spec: RunSpec) -> float:
    """Training wall time of a plain loop over the spec's model and data (same evaluations as the trainer)."""
    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    data = load_run_dataset(spec)
    model = build_model(spec, data.input_shape, data.num_classes)
    optimizer = make_optimizer(spec, list(model.parameters()))
    order = torch.Generator().manual_seed(derive_seed(spec.seed, "batch_order"))
    start = time.perf_counter()
    perm = torch.randperm(len(data.y_train), generator=order)
    cursor = 0
    for step in range(1, spec.steps + 1):
        if cursor + spec.batch_size > len(perm):
            perm, cursor = torch.randperm(len(data.y_train), generator=order), 0
        batch = perm[cursor : cursor + spec.batch_size]
        cursor += spec.batch_size
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        if step % spec.eval_every == 0 or step == spec.steps:
            evaluate(model, data.x_train, data.y_train)
            evaluate(model, data.x_test, data.y_test)
    return time.perf_counter() - start


def trainer_ratio(spec: RunSpec, rounds: int = 3) -> dict:
    ours, bare = [], []
    for _ in range(rounds):
        result = run(spec)
        ours.append(result.wall_time)
        bare.append(hand_written_seconds(spec))
    return {
        "trainer_s": statistics.median(ours),
        "hand_written_s": statistics.median(bare),
        "ratio": statistics.median(ours) / statistics.median(bare),
    }


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sweep_utilisation(specs: list[RunSpec]) -> dict:
    cores = available_cores()
    timings = {}
    for workers in (1, cores):
        with tempfile.TemporaryDirectory() as tmp:
            cpu_before = _children_cpu_seconds()
            start = time.perf_counter()
            run_sweep(specs, Path(tmp) / "store.sqlite", workers=workers, progress=False)
            wall = time.perf_counter() - start
            timings[workers] = (wall, _children_cpu_seconds() - cpu_before)
    serial_wall = timings[1][0]
    parallel_wall, parallel_cpu = timings[cores]
    return {
        "cores": cores,
        "runs": len(specs),
        "serial_wall_s": serial_wall,
        "parallel_wall_s": parallel_wall,
        "speedup": serial_wall / parallel_wall,
        "cpu_utilisation": parallel_cpu / (parallel_wall * cores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = RunSpec(dataset="mnist1d", model="mlp", norm="batch", dropout=0.1, steps=args.steps, eval_every=250)
    load_run_dataset(base)  # generate / load the cached MNIST-1D once, outside the timings
    results = {
        "trainer": trainer_ratio(base),
        "sweep": sweep_utilisation([base.model_copy(update={"seed": seed}) for seed in range(args.runs)]),
        "load_average": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    trainer, sweep = results["trainer"], results["sweep"]
    print(
        f"trainer vs hand-written loop: {trainer['ratio']:.2f}x ({trainer['trainer_s']:.2f} s vs "
        f"{trainer['hand_written_s']:.2f} s)"
    )
    print(
        f"sweep of {sweep['runs']} runs: 1 worker {sweep['serial_wall_s']:.1f} s, {sweep['cores']} workers "
        f"{sweep['parallel_wall_s']:.1f} s, speed-up {sweep['speedup']:.2f}x, CPU utilisation "
        f"{100 * sweep['cpu_utilisation']:.0f}%"
    )
    print(f"load average during the benchmark: {results['load_average']}")


if __name__ == "__main__":
    main()
