"""Curvature of the loss: the top Hessian eigenvalue and the Hessian trace, from Hessian-vector products.

- Hessian-vector product (Pearlmutter 1994, "Fast Exact Multiplication by the Hessian"): H v = grad_w <grad L(w), v>,
  one double-backward pass, the Hessian never formed.
- Top eigenvalue by power iteration: v <- H v / ||H v||; the estimate is the Rayleigh quotient v'Hv. It converges to
  the eigenvalue of largest magnitude (as in Yao et al. 2020, "PyHessian"), at a rate set by the ratio of the two
  largest magnitudes.
- Trace by Hutchinson's estimator (Hutchinson 1989): tr(H) = E[z'Hz] for z with independent Rademacher (+-1)
  entries; the mean of m samples, with standard error std / sqrt(m). For a diagonal H every sample is exact.

Santurkar et al. (2018) and Ghorbani, Krishnan & Xiao (2019, "An Investigation into Neural Net Optimization via
Hessian Eigenvalue Density") relate BN to smaller top eigenvalues. A BN network's loss depends on which statistics
BN normalizes with, so every record says which was measured: ``"batch"`` (train mode, the loss the optimizer
descends) or ``"running"`` (eval mode, the loss at inference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from normdrop.nn.modes import batch_norms
from normdrop.probe_catalog import DEFAULT_EVERY, When
from normdrop.probes.base import BNMode, Probe, Record, dot, loss_function, measurement_mode, trainable
from normdrop.tensors import global_norm
from normdrop.train import HookContext

CURVATURE_SEED = 19890101
"""Seed of the power iteration's start vector and of Hutchinson's probe vectors (Hutchinson 1989)."""


def hessian_vector_product(loss: Tensor, parameters: Sequence[Tensor]) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """``v -> H v`` for the Hessian of ``loss`` with respect to ``parameters`` (leaves that require grad).

    The gradient graph is built once; each product is one backward pass through it.
    """
    grads = torch.autograd.grad(loss, list(parameters), create_graph=True, allow_unused=True)
    pairs = [(g, p) for g, p in zip(grads, parameters, strict=True)]

    def product(vector: Sequence[Tensor]) -> list[Tensor]:
        live = [(g, v) for (g, _), v in zip(pairs, vector, strict=True) if g is not None and g.requires_grad]
        if not live:
            return [torch.zeros_like(p) for p in parameters]
        inner = sum((g * v).sum() for g, v in live)
        hv = torch.autograd.grad(inner, list(parameters), retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, parameters, strict=True)]

    return product


def top_eigenvalue(
    hvp: Callable[[Sequence[Tensor]], list[Tensor]],
    shapes: Sequence[Tensor],
    iterations: int = 20,
    tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[float, int, bool]:
    """Power iteration: (eigenvalue of largest magnitude, iterations used, converged).

    Stops when the Rayleigh quotient changes by less than ``tolerance`` times its magnitude between iterations.
    ``shapes``: tensors with the parameters' shapes, dtypes and devices.
    """
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in shapes]
    norm = global_norm(vector)
    vector = [v / norm.to(v.dtype) for v in vector]
    eigenvalue = math.nan
    for iteration in range(1, iterations + 1):
        hv = hvp(vector)
        estimate = float(dot(vector, hv))
        norm = global_norm(hv)
        if float(norm) == 0.0:
            return 0.0, iteration, True
        vector = [h / norm.to(h.dtype) for h in hv]
        if math.isfinite(eigenvalue) and abs(estimate - eigenvalue) <= tolerance * abs(estimate):
            return estimate, iteration, True
        eigenvalue = estimate
    return eigenvalue, iterations, False


def hutchinson_trace(
    hvp: Callable[[Sequence[Tensor]], list[Tensor]],
    shapes: Sequence[Tensor],
    samples: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(mean of z'Hz over ``samples`` Rademacher vectors z, its standard error; NaN for one sample)."""
    values = []
    for _ in range(samples):
        z = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype).to(p.device) for p in shapes]
        values.append(float(dot(z, hvp(z))))
    estimates = torch.tensor(values, dtype=torch.float64)
    stderr = float(estimates.std() / math.sqrt(samples)) if samples > 1 else math.nan
    return float(estimates.mean()), stderr


class CurvatureProbe(Probe):
    """Top Hessian eigenvalue (power iteration) and trace (Hutchinson) of the loss on the probe batch.

    One record per BN mode in ``bn_modes`` (one ``"no_bn"`` record for a model without BN): ``bn_mode``,
    ``dropout`` (masks fixed when on), ``top_eigenvalue``, ``power_iterations``, ``converged``, ``trace``,
    ``trace_stderr``, ``trace_samples``, ``parameters`` (number of scalars the Hessian is over).
    """

    name = "curvature"
    needs = frozenset({"model", "loss_fn", "probe_batch"})

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        when: When | None = None,
        *,
        bn_modes: Sequence[BNMode] = ("batch",),
        dropout: bool = True,
        iterations: int = 50,
        tolerance: float = 1e-3,
        trace_samples: int = 10,
        seed: int = CURVATURE_SEED,
    ) -> None:
        super().__init__(every, when)
        if not bn_modes or any(mode not in ("batch", "running") for mode in bn_modes):
            raise ValueError(f"bn_modes must list 'batch' and/or 'running', got {list(bn_modes)}")
        if iterations < 1 or trace_samples < 1:
            raise ValueError(f"iterations and trace_samples must be >= 1, got {iterations} and {trace_samples}")
        self.bn_modes = tuple(dict.fromkeys(bn_modes))
        self.dropout = dropout
        self.iterations = iterations
        self.tolerance = tolerance
        self.trace_samples = trace_samples
        self.seed = seed

    def measure(self, ctx: HookContext) -> list[Record]:
        model = ctx.model
        modes: list[tuple[BNMode, str]] = [(mode, mode) for mode in self.bn_modes]
        if not batch_norms(model):
            modes = [(self.bn_modes[0], "no_bn")]
        records: list[Record] = []
        for bn_mode, label in modes:
            with measurement_mode(model, bn_mode, self.dropout):
                loss_at = loss_function(model, ctx.loss_fn, ctx.probe_batch)
                at = {name: value.requires_grad_(True) for name, value in trainable(model).items()}
                leaves = list(at.values())
                hvp = hessian_vector_product(loss_at(at), leaves)
                generator = torch.Generator().manual_seed(self.seed)
                eigenvalue, used, converged = top_eigenvalue(hvp, leaves, self.iterations, self.tolerance, generator)
                trace, stderr = hutchinson_trace(hvp, leaves, self.trace_samples, generator)
            records.append(
                {
                    "bn_mode": label,
                    "dropout": self.dropout,
                    "top_eigenvalue": eigenvalue,
                    "power_iterations": used,
                    "converged": converged,
                    "trace": trace,
                    "trace_stderr": stderr,
                    "trace_samples": self.trace_samples,
                    "parameters": sum(leaf.numel() for leaf in leaves),
                }
            )
        return records
