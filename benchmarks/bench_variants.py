"""Dropout variants, forward + backward, against torch.nn's layer where it has one and a plain torch formulation
where it does not, on the same tensors, in one process (``normdrop.bench.timing``: interleaved rounds, best kept).

=====================  =======================================  ==============================================
variant                normdrop                                 reference
=====================  =======================================  ==============================================
dropout2d              ``nd.Dropout2d(0.3)``                    ``torch.nn.Dropout2d(0.3)``
alpha dropout          ``nd.AlphaDropout(0.3)``                 ``torch.nn.AlphaDropout(0.3)``
feature alpha dropout  ``nd.FeatureAlphaDropout(0.3)``          ``torch.nn.FeatureAlphaDropout(0.3)``
gaussian dropout       ``nd.GaussianDropout(0.3)``              ``x * (1 + s * torch.randn_like(x))``
uout                   ``nd.Uout(0.1)``                         ``x * (1 + beta * (2 * torch.rand_like(x) - 1))``
drop path              ``nd.DropPath(0.2)``                     a per-sample Bernoulli mask, as timm writes it
=====================  =======================================  ==============================================

The references keep their noise for backward (4 bytes per element); normdrop regenerates it. Speed-up = reference
time / normdrop time. Usage:

    python -m benchmarks.bench_variants [--quick] [--threads 1 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch

import normdrop.nn as nd
from normdrop.bench.timing import CLOCKS, ROUND_SECONDS, num_threads, time_round_robin

SHAPES = {"large": (128, 64, 32, 32), "tiny": (64, 32, 2, 2)}
QUICK_SHAPES = {"medium": (16, 32, 16, 16), "tiny": (64, 32, 2, 2)}


def _drop_path_reference(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


def variants() -> dict[str, tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """name -> (normdrop layer, reference callable)."""
    sigma = math.sqrt(0.3 / 0.7)
    return {
        "dropout2d": (nd.Dropout2d(0.3), torch.nn.Dropout2d(0.3)),
        "alpha dropout": (nd.AlphaDropout(0.3), torch.nn.AlphaDropout(0.3)),
        "feature alpha dropout": (nd.FeatureAlphaDropout(0.3), torch.nn.FeatureAlphaDropout(0.3)),
        "gaussian dropout": (nd.GaussianDropout(0.3), lambda x: x * (1 + sigma * torch.randn_like(x))),
        "uout": (nd.Uout(0.1), lambda x: x * (1 + 0.1 * (2 * torch.rand_like(x) - 1))),
        "drop path": (nd.DropPath(0.2), _drop_path_reference),
    }


def _forward_backward(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> Callable:
    return lambda: torch.autograd.grad(f(x), [x], grad)


def measure(shapes: dict[str, tuple[int, ...]], threads: list[int], repeats: int, round_seconds: float) -> list[dict]:
    """One row per (threads, shape, variant): seconds of forward + backward for normdrop and the reference."""
    rows = []
    for count in threads:
        for shape_name, shape in shapes.items():
            torch.manual_seed(0)
            x = torch.randn(shape, requires_grad=True)
            grad = torch.randn(shape)
            for name, (layer, reference) in variants().items():
                impls = {
                    "normdrop": _forward_backward(layer.train(), x, grad),
                    "reference": _forward_backward(reference, x, grad),
                }
                with num_threads(count):
                    best = time_round_robin(impls, repeats, CLOCKS["wall"], round_seconds)
                rows.append(
                    {
                        "variant": name,
                        "shape_name": shape_name,
                        "shape": list(shape),
                        "threads": count,
                        "normdrop_seconds": best["normdrop"],
                        "reference_seconds": best["reference"],
                        "speedup": best["reference"] / best["normdrop"],
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer and shorter rounds")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = measure(
        QUICK_SHAPES if args.quick else SHAPES,
        args.threads,
        3 if args.quick else 5,
        ROUND_SECONDS / 5 if args.quick else ROUND_SECONDS,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'variant':22} {'shape':7} {'thr':>3} {'normdrop':>10} {'reference':>10} {'speedup':>8}")
    for row in rows:
        print(
            f"{row['variant']:22} {row['shape_name']:7} {row['threads']:>3} {row['normdrop_seconds'] * 1e3:8.2f}ms "
            f"{row['reference_seconds'] * 1e3:8.2f}ms {row['speedup']:7.2f}x"
        )


if __name__ == "__main__":
    main()
