"""Training steps per second of the study's models with normdrop layers vs the same models with torch.nn layers, and
their model-FLOP utilisation (MFU) against this machine's matmul peak, measured in the same run.

Models (``LAB_MODELS``): the study's two MLP families (``normdrop.claims.base.FAMILIES``: "deep", 6 x 100 with SGD
and momentum; "small", 2 x 128 with Adam) and the MNIST-1D CNN of Greydanus (2020) (3 conv layers of 25 channels)
with the small family's optimizer, each with batch norm and dropout in every hidden layer. Both builds come from
``normdrop.models.build_model`` with the same spec and seed (``layers="normdrop"`` / ``"torch"``), on one random
MNIST-1D-shaped batch (100 signals of 1 x 40, 10 classes). A step is ``zero_grad``, forward, cross-entropy,
backward and the optimizer's update; the two builds are timed round-robin (``normdrop.bench.timing``).

MFU = model FLOPs per step x steps per second / peak FLOP/s, where

- model FLOPs per step = 3 x the forward FLOPs of the matmuls and convolutions, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (the backward costs about twice the forward: gradients of the
  inputs and of the weights), the usual convention (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B);
  batch norm, dropout, activations and the optimizer count as zero;
- the peak is the best rate of an n x n float32 matmul (2 n^3 FLOPs) on the same threads in the same run.

The lab's models are small, so a step is mostly call overhead and MFU is low: the number to watch is how far
normdrop's layers move it from torch.nn's. Usage:

    python -m normdrop.bench.models [--quick] [--threads 1 2] [--backend auto|composite|numba] [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from normdrop.bench.timing import CLOCKS, ROUND_SECONDS, num_threads, time_round_robin
from normdrop.claims.setting import FAMILIES
from normdrop.data import MNIST1D_LENGTH
from normdrop.models import build_model
from normdrop.nn import kernels
from normdrop.spec import RunSpec
from normdrop.train import make_optimizer

INPUT_SHAPE = (1, MNIST1D_LENGTH)
"""Per-example shape of MNIST-1D signals."""
NUM_CLASSES = 10

LAB_MODELS: dict[str, dict[str, Any]] = {
    "mlp-deep": {**FAMILIES["deep"], "norm": "batch", "dropout": 0.1},
    "mlp-small": {**FAMILIES["small"], "norm": "batch", "dropout": 0.3},
    "cnn1d": {**FAMILIES["small"], "model": "cnn1d", "depth": 3, "width": 25, "norm": "batch", "dropout": 0.1},
}
"""Spec fields of each benchmarked model (``layers`` is set per build)."""

MATMUL_SIZE = 2048
QUICK_MATMUL_SIZE = 512


def describe(spec: RunSpec) -> str:
    """A short human name of a spec's model: architecture, size, layers and optimizer."""
    arch = f"MLP {spec.depth}x{spec.width}" if spec.model == "mlp" else f"{spec.model} {spec.depth}x{spec.width}ch"
    return f"{arch}, BN + dropout {spec.dropout:g}, {spec.optimizer}, batch {spec.batch_size}"


def matmul_peak(threads: int, size: int, repeats: int, clock: str = "wall", round_seconds: float = ROUND_SECONDS):
    """The best FLOP rate of a ``size`` x ``size`` float32 matmul on ``threads`` threads; one row."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    with num_threads(threads):
        seconds = time_round_robin({"mm": lambda: torch.mm(a, b, out=out)}, repeats, CLOCKS[clock], round_seconds)["mm"]
    return {
        "threads": threads,
        "matmul_size": size,
        "matmul_seconds": seconds,
        "matmul_gflop_per_s": 2 * size**3 / seconds / 1e9,
    }


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``x``: matmuls and convolutions (FlopCounterMode's count)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def training_step(spec: RunSpec, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One optimizer step of ``model`` on the batch ``(x, y)`` with the spec's optimizer, as a no-argument call."""
    model.train()
    optimizer = make_optimizer(spec, list(model.parameters()))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


@dataclass(frozen=True)
class LabCase:
    """One measurement: a model of ``LAB_MODELS`` on a number of threads."""

    model: str
    threads: int

    @property
    def label(self) -> str:
        return f"lab {self.model}, {self.threads} thr"


def lab_cases(threads: list[int], models: list[str] | None = None) -> list[LabCase]:
    """Every (threads, model) combination, threads outermost."""
    return [LabCase(name, t) for t in threads for name in models or LAB_MODELS]


def measure(
    case: LabCase,
    peak_flop_per_s: float,
    repeats: int,
    clock: str = "wall",
    round_seconds: float = ROUND_SECONDS,
    backend: str | None = None,
) -> dict[str, Any]:
    """Time training steps of the normdrop and torch.nn builds of one model round-robin; one row with MFU.

    ``backend`` forces normdrop's kernel backend for the measurement (None: the automatic choice)."""
    spec = RunSpec(**LAB_MODELS[case.model])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((spec.batch_size, *INPUT_SHAPE), generator=generator)
    y = torch.randint(0, NUM_CLASSES, (spec.batch_size,), generator=generator)
    models = {
        layers: build_model(spec.model_copy(update={"layers": layers}), INPUT_SHAPE, NUM_CLASSES)
        for layers in ("normdrop", "torch")
    }
    flops_per_step = 3 * forward_flops(models["torch"], x)
    steps = {layers: training_step(spec, model, x, y) for layers, model in models.items()}
    kernels.set_backend(backend)
    try:
        with num_threads(case.threads):
            best = time_round_robin(steps, repeats, CLOCKS[clock], round_seconds)
    finally:
        kernels.set_backend(None)
    row: dict[str, Any] = {
        "model": case.model,
        "description": describe(spec),
        "threads": case.threads,
        "backend": backend or kernels.requested_backend(),
        "model_flops_per_step": flops_per_step,
        "normdrop_step_seconds": best["normdrop"],
        "torch_step_seconds": best["torch"],
        "normdrop_steps_per_s": 1 / best["normdrop"],
        "torch_steps_per_s": 1 / best["torch"],
        "speedup": best["torch"] / best["normdrop"],
    }
    for layers in ("normdrop", "torch"):
        row[f"{layers}_mfu_percent"] = 100 * flops_per_step / best[layers] / peak_flop_per_s
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller matmul, fewer and shorter rounds")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--models", nargs="+", choices=list(LAB_MODELS), default=list(LAB_MODELS))
    parser.add_argument("--backend", choices=kernels.BACKENDS, default=None, help="force normdrop's kernel backend")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per case (default 7, quick 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    round_seconds = ROUND_SECONDS / 5 if args.quick else ROUND_SECONDS
    size = QUICK_MATMUL_SIZE if args.quick else MATMUL_SIZE
    peaks = {t: matmul_peak(t, size, repeats, args.clock, round_seconds) for t in args.threads}
    rows = [
        measure(case, peaks[case.threads]["matmul_gflop_per_s"] * 1e9, repeats, args.clock, round_seconds, args.backend)
        for case in lab_cases(args.threads, args.models)
    ]
    if args.json:
        print(json.dumps({"machine": list(peaks.values()), "lab": rows}, indent=2))
        return
    for peak in peaks.values():
        print(f"{peak['threads']} thr: {peak['matmul_size']}^2 float32 matmul {peak['matmul_gflop_per_s']:.1f} GFLOP/s")
    print(f"{'model':10} {'thr':>3} {'normdrop/s':>10} {'torch/s':>9} {'speedup':>8} {'MFU nd':>7} {'MFU torch':>9}")
    for row in rows:
        print(
            f"{row['model']:10} {row['threads']:>3} {row['normdrop_steps_per_s']:10.0f} "
            f"{row['torch_steps_per_s']:9.0f} "
            f"{row['speedup']:7.2f}x {row['normdrop_mfu_percent']:6.2f}% {row['torch_mfu_percent']:8.2f}%"
        )


if __name__ == "__main__":
    main()
