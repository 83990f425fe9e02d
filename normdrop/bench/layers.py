"""normdrop.nn's BatchNorm and Dropout layers against torch.nn's, on the same tensors, in one process.

Each case (a shape, an op, a thread count) times three things round-robin (``normdrop.bench.timing``): the normdrop
layer, the torch.nn layer, and a copy of a tensor of the input's size (``y.copy_(x)``). The copy measures this run's
memory bandwidth, 2 x bytes / copy time (it reads x and writes y). An op's *floor* is the least memory traffic a
fused implementation must make, counted in passes over a tensor of the input's size (``Op.passes``):

=====================  ======  ===================================================================
op                     passes  the traffic
=====================  ======  ===================================================================
bn train fwd              3    read x for the batch statistics; read x and write y
bn train fwd+bwd          8    the forward's 3; read g and x for sum(g), sum(g x_hat); read g, x, write dx
bn eval fwd               2    read x, write y
bn eval fwd+bwd           5    the forward's 2; read g and x and write dx (the sums in the same pass)
dropout train fwd         2    read x, write y (the mask is computed, never stored)
dropout train fwd+bwd     4    the forward's 2; read g, write dx
dropout eval fwd          0    identity: both layers return their input (no floor; the ratio is call overhead)
=====================  ======  ===================================================================

floor time = passes x bytes / bandwidth = passes / 2 x copy time, and "% of floor" = floor time / measured time
(100% would be a layer as fast as memory allows). On tiny tensors the copy is mostly call overhead, so there the
percentage says how close a layer comes to the cheapest possible torch call.

Bytes kept for backward: the tensors autograd saves in one forward of the op's mode with an input that requires
grad, recorded with ``torch.autograd.graph.saved_tensors_hooks``, in bytes per input element; ``beyond input``
leaves out the input itself (which the graph may hold anyway for the layer before).

Forward ops run under ``torch.no_grad()``; forward+backward ops call ``torch.autograd.grad`` for the input and the
layer's parameters with a fixed output gradient (nothing accumulates between calls). Dropout has p = 0.5; batch
norm has affine parameters and running statistics. Usage:

    python -m normdrop.bench.layers [--quick] [--threads 1 2] [--clock wall|cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import normdrop.nn as nd
from normdrop.bench.timing import CLOCKS, ROUND_SECONDS, num_threads, time_round_robin

P = 0.5
"""Dropout rate of the benchmarked dropout layers."""

SHAPES: dict[str, tuple[int, ...]] = {
    "large": (128, 64, 32, 32),  # 32 MiB of float32: the measurement, far beyond the caches
    "lab": (100, 25, 19),  # the activations after the first conv of the lab's MNIST-1D CNN (batch 100)
    "tiny": (64, 128),  # a small MLP's hidden layer: call overhead dominates
}
QUICK_SHAPES: dict[str, tuple[int, ...]] = {"medium": (16, 32, 16, 16), "tiny": (64, 128)}

# Batch norm module by input rank, the same name in normdrop.nn and torch.nn.
BATCH_NORM_CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


@dataclass(frozen=True)
class Op:
    """One thing a layer does: which layer, in which mode, with or without backward, and its floor in passes."""

    name: str
    layer: str  # "bn" or "dropout"
    training: bool
    backward: bool
    passes: int


OPS = (
    Op("bn train fwd", "bn", training=True, backward=False, passes=3),
    Op("bn train fwd+bwd", "bn", training=True, backward=True, passes=8),
    Op("bn eval fwd", "bn", training=False, backward=False, passes=2),
    Op("bn eval fwd+bwd", "bn", training=False, backward=True, passes=5),
    Op("dropout train fwd", "dropout", training=True, backward=False, passes=2),
    Op("dropout train fwd+bwd", "dropout", training=True, backward=True, passes=4),
    Op("dropout eval fwd", "dropout", training=False, backward=False, passes=0),
)


@dataclass(frozen=True)
class Case:
    """One measurement: an op on a named shape with a number of threads."""

    shape_name: str
    shape: tuple[int, ...]
    op: Op
    threads: int

    @property
    def label(self) -> str:
        return f"{self.op.name} {self.shape_name} {'x'.join(map(str, self.shape))}, {self.threads} thr"


def cases(shapes: dict[str, tuple[int, ...]], threads: list[int], ops: tuple[Op, ...] = OPS) -> list[Case]:
    """Every (threads, shape, op) combination, threads outermost."""
    return [Case(name, shape, op, t) for t in threads for name, shape in shapes.items() for op in ops]


def make_layers(op: Op, x: torch.Tensor) -> dict[str, torch.nn.Module]:
    """The normdrop and torch.nn layer an op runs on ``x``, in the op's mode."""
    if op.layer == "bn":
        if x.ndim not in BATCH_NORM_CLASSES:
            raise ValueError(f"batch norm takes 2D to 5D inputs, got shape {tuple(x.shape)}")
        name = BATCH_NORM_CLASSES[x.ndim]
        layers = {"normdrop": getattr(nd, name)(x.shape[1]), "torch": getattr(torch.nn, name)(x.shape[1])}
    else:
        layers = {"normdrop": nd.Dropout(P), "torch": torch.nn.Dropout(P)}
    return {impl: layer.train(op.training) for impl, layer in layers.items()}


def op_callable(layer: torch.nn.Module, op: Op, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    """A no-argument call of the op: a no-grad forward, or forward + ``autograd.grad`` of input and parameters."""
    if not op.backward:

        def forward() -> object:
            with torch.no_grad():
                return layer(x)

        return forward

    x_leaf = x.detach().requires_grad_()
    inputs = [x_leaf, *(p for p in layer.parameters() if p.requires_grad)]

    def forward_backward() -> object:
        return torch.autograd.grad(layer(x_leaf), inputs, grad)

    return forward_backward


def saved_bytes_per_element(layer: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Bytes autograd keeps for backward after one forward of ``layer``, per element of ``x``: (all, beyond the
    input). Each saved tensor counts once, by its own size (not its storage's)."""
    x_leaf = x.detach().requires_grad_()
    input_storage = x.untyped_storage().data_ptr()
    saved: dict[tuple[int, int, torch.dtype], tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        is_input = tensor.numel() > 0 and tensor.untyped_storage().data_ptr() == input_storage
        saved[key] = (tensor.numel() * tensor.element_size(), is_input)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x_leaf)
    total = sum(size for size, _ in saved.values())
    beyond_input = sum(size for size, is_input in saved.values() if not is_input)
    return total / x.numel(), beyond_input / x.numel()


def measure(case: Case, repeats: int, clock: str = "wall", round_seconds: float = ROUND_SECONDS) -> dict[str, Any]:
    """Time one case (normdrop, torch.nn, copy round-robin) and count its bytes kept for backward; one row."""
    torch.manual_seed(0)
    x = torch.randn(case.shape)
    grad = torch.randn(case.shape)
    copy_target = torch.empty_like(x)
    layers = make_layers(case.op, x)
    impls = {impl: op_callable(layer, case.op, x, grad) for impl, layer in layers.items()}
    impls["copy"] = lambda: copy_target.copy_(x)
    with num_threads(case.threads):
        best = time_round_robin(impls, repeats, CLOCKS[clock], round_seconds)
    nbytes = x.numel() * x.element_size()
    floor_seconds = case.op.passes / 2 * best["copy"]
    row: dict[str, Any] = {
        "shape_name": case.shape_name,
        "shape": list(case.shape),
        "layer": type(layers["torch"]).__name__,
        "op": case.op.name,
        "threads": case.threads,
        "normdrop_seconds": best["normdrop"],
        "torch_seconds": best["torch"],
        "copy_seconds": best["copy"],
        "speedup": best["torch"] / best["normdrop"],
        "copy_gb_per_s": 2 * nbytes / best["copy"] / 1e9,
        "floor_passes": case.op.passes,
        "normdrop_floor_percent": 100 * floor_seconds / best["normdrop"] if case.op.passes else None,
        "torch_floor_percent": 100 * floor_seconds / best["torch"] if case.op.passes else None,
    }
    for impl, layer in layers.items():
        saved = saved_bytes_per_element(layer, x) if case.op.backward else (None, None)
        row[f"{impl}_saved_bytes_per_element"], row[f"{impl}_saved_beyond_input_bytes_per_element"] = saved
    return row


GOALS = (
    ("dropout train fwd+bwd", "largest", 10.0, "dropout fwd+bwd, large: >= 10x faster than torch.nn.Dropout"),
    ("bn train fwd+bwd", "largest", 2.0, "batch norm train fwd+bwd, large: >= 2x faster than torch.nn"),
    ("bn eval fwd", "largest", 1.0, "batch norm eval fwd, large: at least as fast as torch.nn"),
    (None, "smallest", 1.0, "tiny tensors: no op slower than torch.nn (the slowest op shown)"),
)
"""The speed goals: (op or None for every op, which shape, the least speedup, what it says)."""
SAVED_BYTES_PER_ELEMENT_BOUND = 1e-3
"""Dropout's "0 bytes per element kept": a few bytes in all (the 16-byte (seed, offset) pair), whatever the size;
on the largest shape that is far below this bound, and a saved mask (1 or 4 bytes per element) far above it."""


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed goals checked on measured rows, per thread count: the speedups of ``GOALS`` on the largest and the
    smallest shape measured, and the bytes per element dropout keeps for backward beyond its input (largest shape)."""
    results = []
    for threads in sorted({row["threads"] for row in rows}):
        rows_here = [row for row in rows if row["threads"] == threads]
        by_size = sorted({(math.prod(row["shape"]), row["shape_name"]) for row in rows_here})
        shape_of = {"largest": by_size[-1][1], "smallest": by_size[0][1]}
        for op, which, target, text in GOALS:
            matching = [r for r in rows_here if r["shape_name"] == shape_of[which] and op in (None, r["op"])]
            if not matching:
                continue
            worst = min(matching, key=lambda r: r["speedup"])
            results.append(
                {
                    "goal": text,
                    "threads": threads,
                    "shape_name": worst["shape_name"],
                    "op": worst["op"],
                    "measured": worst["speedup"],
                    "bound": ">=",
                    "target": target,
                    "met": worst["speedup"] >= target,
                }
            )
        kept = [r for r in rows_here if r["op"] == "dropout train fwd+bwd" and r["shape_name"] == shape_of["largest"]]
        for row in kept:
            measured = row["normdrop_saved_beyond_input_bytes_per_element"]
            results.append(
                {
                    "goal": "dropout keeps ~0 bytes per element for backward (a constant: its (seed, offset) pair)",
                    "threads": threads,
                    "shape_name": row["shape_name"],
                    "op": row["op"],
                    "measured": measured,
                    "bound": "<",
                    "target": SAVED_BYTES_PER_ELEMENT_BOUND,
                    "met": measured < SAVED_BYTES_PER_ELEMENT_BOUND,
                }
            )
    return results


def format_seconds(seconds: float) -> str:
    """A duration in us or ms, nine characters wide."""
    return f"{seconds * 1e6:7.1f}us" if seconds < 1e-3 else f"{seconds * 1e3:7.2f}ms"


def format_row(row: dict[str, Any]) -> str:
    """One line of the plain-text table (the CLI draws a rich table from the same rows)."""
    floor = row["normdrop_floor_percent"]
    saved = row["normdrop_saved_bytes_per_element"]
    return (
        f"{row['shape_name']:<7} {row['threads']:>3} {row['op']:<22} {format_seconds(row['normdrop_seconds'])} "
        f"{format_seconds(row['torch_seconds'])} {row['speedup']:7.2f}x "
        + (f"{floor:6.0f}%" if floor is not None else f"{'-':>7}")
        + (f" {saved:5.2f} {row['torch_saved_bytes_per_element']:5.2f}" if saved is not None else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer and shorter rounds")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per case (default 7, quick 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    round_seconds = ROUND_SECONDS / 5 if args.quick else ROUND_SECONDS
    rows = []
    for case in cases(QUICK_SHAPES if args.quick else SHAPES, args.threads):
        rows.append(measure(case, repeats, args.clock, round_seconds))
        if not args.json:
            print(format_row(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        speedups = [row["speedup"] for row in rows]
        print(f"geometric mean speedup (torch time / normdrop time): {math.prod(speedups) ** (1 / len(speedups)):.2f}x")


if __name__ == "__main__":
    main()
