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
time / normdrop time. ``--tiny`` times only the two tiny shapes (64x32x2x2 and 64x128, where call overhead is most
of the time; channel dropout of the 2D one warns, in both libraries, as torch.nn.Dropout2d does, and the warnings are
silenced); ``--trials N`` measures every row N times in the process and reports the median speed-up (and the range),
since on a shared machine one measurement of a 50 us call moves by 20%. Usage:

    python -m benchmarks.bench_variants [--quick | --tiny] [--threads 1 2] [--trials 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from collections.abc import Callable

import torch

import normdrop.nn as nd
from normdrop.bench.timing import CLOCKS, ROUND_SECONDS, num_threads, time_round_robin

SHAPES = {"large": (128, 64, 32, 32), "tiny": (64, 32, 2, 2)}
QUICK_SHAPES = {"medium": (16, 32, 16, 16), "tiny": (64, 32, 2, 2)}
TINY_SHAPES = {"tiny": (64, 32, 2, 2), "tiny 2d": (64, 128)}


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


def measure(
    shapes: dict[str, tuple[int, ...]], threads: list[int], repeats: int, round_seconds: float, trials: int = 1
) -> list[dict]:
    """One row per (threads, shape, variant): seconds of forward + backward for normdrop and the reference (the
    medians over ``trials`` measurements), and the median, min and max of the per-trial speed-ups."""
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
                trial_best = []
                with num_threads(count), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # channel dropout of a 2D input warns in both libraries
                    for _ in range(trials):
                        trial_best.append(time_round_robin(impls, repeats, CLOCKS["wall"], round_seconds))
                speedups = [best["reference"] / best["normdrop"] for best in trial_best]
                rows.append(
                    {
                        "variant": name,
                        "shape_name": shape_name,
                        "shape": list(shape),
                        "threads": count,
                        "trials": trials,
                        "normdrop_seconds": statistics.median(best["normdrop"] for best in trial_best),
                        "reference_seconds": statistics.median(best["reference"] for best in trial_best),
                        "speedup": statistics.median(speedups),
                        "speedup_min": min(speedups),
                        "speedup_max": max(speedups),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer and shorter rounds")
    parser.add_argument("--tiny", action="store_true", help="only the tiny shapes, 64x32x2x2 and 64x128")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--trials", type=int, default=1, help="measurements per row; the median is reported")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    rows = measure(
        TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else SHAPES,
        args.threads,
        3 if args.quick else 5,
        ROUND_SECONDS / 5 if args.quick else ROUND_SECONDS,
        args.trials,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'variant':22} {'shape':7} {'thr':>3} {'normdrop':>10} {'reference':>10} {'speedup':>8}  range")
    for row in rows:
        print(
            f"{row['variant']:22} {row['shape_name']:7} {row['threads']:>3} {row['normdrop_seconds'] * 1e3:8.3f}ms "
            f"{row['reference_seconds'] * 1e3:8.3f}ms {row['speedup']:7.2f}x  "
            f"{row['speedup_min']:.2f}-{row['speedup_max']:.2f}"
        )


if __name__ == "__main__":
    main()
