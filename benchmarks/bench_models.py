"""Training-step time of the lab's small models with normdrop layers vs the same models with torch.nn layers.

Both variants run in this one process on the same data, interleaved, so the ratio is meaningful on a noisy
machine; absolute times are not. Usage:

    .venv/bin/python benchmarks/bench_models.py [--threads 1] [--steps 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import normdrop.nn as nd
from normdrop.nn import kernels


def mlp(layers, p: float, width: int = 100, depth: int = 3) -> torch.nn.Module:
    """The MNIST-1D MLP of the lab: 40 -> width x depth -> 10 with BN and dropout after each hidden layer."""
    blocks: list[torch.nn.Module] = []
    fan_in = 40
    for _ in range(depth):
        blocks += [torch.nn.Linear(fan_in, width), layers.BatchNorm1d(width), torch.nn.ReLU(), layers.Dropout(p)]
        fan_in = width
    return torch.nn.Sequential(*blocks, torch.nn.Linear(fan_in, 10))


def cnn1d(layers, p: float, channels: int = 32) -> torch.nn.Module:
    """A small 1-D CNN on MNIST-1D shaped inputs (N, 1, 40)."""
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, channels, 5, padding=2),
        layers.BatchNorm1d(channels),
        torch.nn.ReLU(),
        layers.Dropout1d(p),
        torch.nn.Conv1d(channels, channels, 3, padding=1),
        layers.BatchNorm1d(channels),
        torch.nn.ReLU(),
        layers.Dropout(p),
        torch.nn.Flatten(),
        torch.nn.Linear(channels * 40, 10),
    )


MODELS: dict[str, tuple[Callable, tuple[int, ...]]] = {"mlp": (mlp, (100, 40)), "cnn1d": (cnn1d, (100, 1, 40))}


def step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median wall time of one SGD step (forward, backward, update) over ``steps`` steps, after a warm-up."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    for i in range(steps + 20):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= 20:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(threads: int, steps: int, rounds: int = 3) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name, (builder, shape) in MODELS.items():
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        for p in (0.0, 0.3):
            for backend in ("composite", "numba"):
                kernels.set_backend(backend)
                ratios = []
                for _ in range(rounds):  # interleave to share the machine's noise fairly
                    reference = step_seconds(builder(torch.nn, p), x, y, steps)
                    ours = step_seconds(builder(nd, p), x, y, steps)
                    ratios.append(ours / reference)
                kernels.set_backend(None)
                rows.append(
                    dict(
                        model=name,
                        dropout=p,
                        backend=backend,
                        threads=threads,
                        torch_step_us=reference * 1e6,
                        normdrop_step_us=ours * 1e6,
                        ratio=statistics.median(ratios),
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args.threads, args.steps)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':6} {'p':>4} {'backend':10} {'torch us':>9} {'normdrop us':>12} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['model']:6} {row['dropout']:4.1f} {row['backend']:10} {row['torch_step_us']:9.0f} "
            f"{row['normdrop_step_us']:12.0f} {row['ratio']:6.2f}"
        )


if __name__ == "__main__":
    main()
