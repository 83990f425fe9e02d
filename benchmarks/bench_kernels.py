"""Speed of normdrop's numba CPU kernels against the torch composite backend and torch's own ops.

Two levels, each timed per call including Python overhead:

- ``kernel``: the backend functions called directly (``numba_cpu.*`` / ``composite.*``) against torch's ATen ops
  (``native_batch_norm`` / ``native_batch_norm_backward``, ``native_dropout`` / ``native_dropout_backward``);
  fwd+bwd is one forward call plus one backward call, no autograd.
- ``functional``: what a model pays: ``normdrop.nn.functional`` with the backend forced (custom op, autograd)
  against ``torch.nn.functional``; fwd+bwd runs ``.backward()``.

Ops: batch norm train forward, train forward+backward, eval forward; dropout (p=0.5) forward, forward+backward.
Sizes: tiny (100, 100), medium (128, 64, 16, 16), large (128, 64, 32, 32), float32, contiguous (``--channels-last``
for the 4D ones in channels_last); 1 and 2 threads (torch.set_num_threads; the numba kernels follow it).

Implementations are timed round-robin and the best of ``--repeats`` rounds is kept, so the ratios of one run are
comparable on a noisy machine; compare ratios, not absolute times, across runs. On a machine shared with other
work, ``--clock cpu`` (process CPU time) gives steadier one-thread numbers than wall time.

    python -m benchmarks.bench_kernels [--sizes tiny medium large] [--threads 1 2] [--levels kernel functional]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as TF

from normdrop.bench.timing import CLOCKS, time_round_robin
from normdrop.nn import functional as NF
from normdrop.nn import kernels
from normdrop.nn.kernels import composite, numba_cpu

SIZES = {"tiny": (100, 100), "medium": (128, 64, 16, 16), "large": (128, 64, 32, 32)}
OPS = ("bn train fwd", "bn train fwd+bwd", "bn eval fwd", "dropout fwd", "dropout fwd+bwd")
IMPLS = ("numba", "composite", "torch")
EPS = 1e-5
P = 0.5


def kernel_callables(x: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """op -> implementation -> a no-argument callable, at the kernel level."""
    channels = x.shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    running_mean, running_var = torch.randn(channels), torch.rand(channels) + 0.5
    grad = torch.randn_like(x)

    def backend_ops(backend) -> dict[str, Callable[[], object]]:
        def bn_train_fwd_bwd():
            _, batch_mean, batch_var = backend.batch_norm_forward(x, weight, bias, None, None, True, EPS)
            return backend.batch_norm_backward(grad, x, weight, batch_mean, batch_var, True, EPS)

        def dropout_fwd_bwd():
            backend.dropout_forward(x, 1234, 0, P, x.ndim, False, True)
            return backend.dropout_forward(grad, 1234, 0, P, x.ndim, False, False)

        return {
            "bn train fwd": lambda: backend.batch_norm_forward(x, weight, bias, None, None, True, EPS),
            "bn train fwd+bwd": bn_train_fwd_bwd,
            "bn eval fwd": lambda: backend.batch_norm_forward(x, weight, bias, running_mean, running_var, False, EPS),
            "dropout fwd": lambda: backend.dropout_forward(x, 1234, 0, P, x.ndim, False, True),
            "dropout fwd+bwd": dropout_fwd_bwd,
        }

    aten = torch.ops.aten

    def torch_bn_fwd_bwd():
        _, batch_mean, batch_invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, EPS)
        return aten.native_batch_norm_backward(
            grad, x, weight, None, None, batch_mean, batch_invstd, True, EPS, [True, True, True]
        )

    def torch_dropout_fwd_bwd():
        _, mask = aten.native_dropout(x, P, True)
        return aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - P))

    torch_ops = {
        "bn train fwd": lambda: aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, EPS),
        "bn train fwd+bwd": torch_bn_fwd_bwd,
        "bn eval fwd": lambda: aten.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.1, EPS),
        "dropout fwd": lambda: aten.native_dropout(x, P, True),
        "dropout fwd+bwd": torch_dropout_fwd_bwd,
    }
    per_impl = {"numba": backend_ops(numba_cpu), "composite": backend_ops(composite), "torch": torch_ops}
    return {op: {impl: per_impl[impl][op] for impl in IMPLS} for op in OPS}


def functional_callables(x: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """op -> implementation -> a no-argument callable, through normdrop.nn.functional / torch.nn.functional."""
    channels = x.shape[1]
    weight = (torch.rand(channels) + 0.5).requires_grad_()
    bias = torch.randn(channels).requires_grad_()
    running_mean, running_var = torch.randn(channels), torch.rand(channels) + 0.5
    x_leaf = x.detach().clone().requires_grad_()
    grad = torch.randn_like(x)

    def with_backend(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run():
            kernels.set_backend(name)
            return fn()

        return run

    def lib_ops(lib) -> dict[str, Callable[[], object]]:
        def bn_train_fwd_bwd():
            lib.batch_norm(x_leaf, running_mean, running_var, weight, bias, True).backward(grad)

        def dropout_fwd_bwd():
            lib.dropout(x_leaf, P, True).backward(grad)

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn()

            return run

        return {
            "bn train fwd": no_grad(lambda: lib.batch_norm(x, running_mean, running_var, weight, bias, True)),
            "bn train fwd+bwd": bn_train_fwd_bwd,
            "bn eval fwd": no_grad(lambda: lib.batch_norm(x, running_mean, running_var, weight, bias, False)),
            "dropout fwd": no_grad(lambda: lib.dropout(x, P, True)),
            "dropout fwd+bwd": dropout_fwd_bwd,
        }

    ours, theirs = lib_ops(NF), lib_ops(TF)
    return {
        op: {
            "numba": with_backend("numba", ours[op]),
            "composite": with_backend("composite", ours[op]),
            "torch": theirs[op],
        }
        for op in OPS
    }


def format_time(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:9.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--levels", nargs="+", choices=["kernel", "functional"], default=["kernel", "functional"])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, robust to other processes on a busy machine with "
        "one thread (with several it also counts threads waiting for work)",
    )
    parser.add_argument("--channels-last", action="store_true", help="4D inputs in channels_last memory format")
    args = parser.parse_args()

    threads_before = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, float32, {args.clock} clock, best of {args.repeats} interleaved rounds; "
        "ratio = time / torch's"
    )
    header = f"{'size':<7} {'thr':>3} {'level':<10} {'op':<17} " + " ".join(f"{name:>12}" for name in IMPLS)
    print(header + f" {'numba/torch':>12} {'comp/torch':>11}")
    ratios: dict[tuple[str, str], list[float]] = {}
    try:
        for size in args.sizes:
            x = torch.randn(SIZES[size])
            if args.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for level in args.levels:
                    table = kernel_callables(x) if level == "kernel" else functional_callables(x)
                    for op in args.ops:
                        best = time_round_robin(table[op], args.repeats, CLOCKS[args.clock])
                        ratio = best["numba"] / best["torch"]
                        ratios.setdefault((level, op), []).append(ratio)
                        print(
                            f"{size:<7} {threads:>3} {level:<10} {op:<17} "
                            + " ".join(f"{format_time(best[name]):>12}" for name in IMPLS)
                            + f" {ratio:>11.2f}x {best['composite'] / best['torch']:>10.2f}x",
                            flush=True,
                        )
    finally:
        torch.set_num_threads(threads_before)
        kernels.set_backend(None)
    print("\ngeometric mean of numba/torch over sizes and threads:")
    for (level, op), values in ratios.items():
        print(f"  {level:<10} {op:<17} {statistics.geometric_mean(values):6.2f}x")


if __name__ == "__main__":
    main()
