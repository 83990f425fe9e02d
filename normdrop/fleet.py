"""Fleet training: K MLP runs that share a shape trained as one batched model, each member bit for bit its solo run.

A *fleet* is a list of :class:`~normdrop.spec.RunSpec` whose :func:`fleet_key` is equal: the same architecture,
widths, batch size, steps, dataset and every other field that fixes tensor shapes or the code path. The members may
differ in learning rate, momentum, weight decay, schedule, warmup, dropout p, BN momentum and eps, init, seed, data
seed (each member on its own training subset, label noise and standardization; :data:`PER_MEMBER_FIELDS`) and
divergence threshold.
:func:`run_fleet` trains them together and returns one ordinary :class:`~normdrop.spec.RunResult` per member.

The contract (at one torch thread, on CPU): every member's metrics equal, bit for bit, those of
:func:`normdrop.train.run` on its spec (``train_time`` aside: it is the fleet's training time divided among the
members still training). What makes it hold:

- **layout**: activations are (K, B, C) contiguous, so member k's (B, C) slice is one contiguous block, laid out
  as its solo run's input;
- **batch norm** per member: one C++ autograd node per layer (:func:`normdrop.nn.kernels.fastpath.fleet_batch_norm`)
  calls, on each member's slice, the numba kernel that the solo run's fast path calls on its (B, C) input, with the
  member's own BN momentum and eps (momentum None: ``1 / num_batches_tracked``, as the solo module); where a solo
  input would not take the fast path (it is off, or the input too large), the solo call
  ``normdrop.nn.functional.batch_norm`` member by member;
- **linear layers** are batched matmuls of the solo formulas (custom backward) on the (K, B, in) activations:
  ``y_k = b_k + x_k W_k^T`` (``baddbmm``), ``dx_k = g_k W_k``, ``dW_k = g_k^T x_k`` (torch's mm backward of a
  transposed weight) and ``db_k = sum_b g_k``. torch picks its gemm kernel by shape and stride, and bmm does not
  always pick mm's (50 x 37 -> 10 rounds otherwise), so each layer shape is checked once per process
  (:func:`batched_linear_exact`) and runs member by member with the solo ``F.linear`` where the batched form would
  differ; evaluation (long chunks) always runs member by member;
- **dropout** per member: one C++ node per layer (:func:`normdrop.nn.kernels.fastpath.fleet_dropout_drawing_seeds`)
  draws member k's seed from the member's own dropout stream (``derive_seed(seed, "dropout")``), as its solo layer
  draws it, and masks its slice with the solo kernel: element (b, c) kept iff ``bits(seed_k, b C + c) >=
  threshold(p_k)`` (:mod:`normdrop.nn.rng`); without the fast path, the same bits as a (K, B, C) multiplier
  (:func:`fleet_dropout_multiplier`);
- **batch order** from each member's own ``"batch_order"`` generator, over its own dataset (its ``data_seed``'s
  subset, noisy labels and standardization; stacked (K, N, D) when the members' datasets differ) and evaluated on
  its own train and test splits;
- **losses** per member: ``F.cross_entropy`` on the member's (B, classes) logits, as the solo run computes it;
- **optimizers** stacked over members with per-member hyperparameters as (K, 1, ...) tensors, in the formulas that
  round exactly as torch.optim's single-tensor paths (torch 2.13): ``p.add_(g, alpha=-lr)`` becomes
  ``p.addcmul_(g, -lr_k)``, ``g.add(p, alpha=wd)`` becomes ``g.addcmul(p, wd_k)`` and Adam's
  ``p.addcdiv_(m, d, value=-s)`` becomes ``p.add_((m * -s_k).div_(d))`` (torch's addcdiv computes
  ``p + (s m) / d``);
- **divergence** per member, checked on its batch loss before backward exactly as the solo run does; a diverged
  member is recorded at its step and compacted out of every stacked tensor, and the others go on unchanged;
- **evaluation** of all members in one pass per chunk of ``EVAL_CHUNK`` examples, the solo chunking;
- **hooks and probes** run on a member extracted as the ordinary ``nn.Module`` of its spec (:meth:`Fleet.member_model`)
  with its exact weights, buffers, gradients, a ``torch.optim`` optimizer holding its state, and the global RNG
  set to its dropout stream, so every probe works unchanged and records what it records in the solo run. As the
  trainer, the fleet knows no probe registry: each member's probe hooks come in ``probe_hooks`` (built by
  :func:`normdrop.lab.run_fleet_specs`, as :func:`normdrop.lab.run_spec` builds a solo run's);
- **what a run keeps** (``spec.keep``): ``"final_weights"`` stores ``torch.save`` of a finished member's state dict
  (that of :meth:`Fleet.member_model`) in ``RunResult.artifacts``, the bytes the solo run stores.

Not fleeted (:func:`fleet_key` returns None, and the sweep trains them solo): CNNs and ResNets (the prototype
measured grouped convolutions no faster per member at this size, and a grouped conv does not reduce as the solo conv
does), activations other than ReLU/identity (torch's vectorized and scalar tails of tanh, GELU, ELU, SELU may
round differently and the tail moves with K), norms other than batch norm and dropout kinds other than standard
(their kernels take one key or one set of statistics per call), ``layers="torch"`` with a norm or dropout, and
members that differ in Nesterov, or in whether momentum / weight decay / dropout is zero (those pick different code
paths in the solo run, so they go to different fleets).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import Tensor, nn

from normdrop.data import Dataset
from normdrop.models import _unit, build_model
from normdrop.nn import functional as ndF
from normdrop.nn.kernels import composite, fastpath, numba_cpu
from normdrop.nn.kernels.numba_cpu.dropout import _counter_bits
from normdrop.nn.rng import MASK32, draw_seed, drop_threshold, round_keys
from normdrop.seeds import derive_seed
from normdrop.spec import RunResult, RunSpec
from normdrop.tensors import global_norm
from normdrop.train import (
    EVAL_CHUNK,
    Hook,
    HookContext,
    _batch_indices,
    _call_hook,
    _diverged_summary,
    _due,
    _reproducible,
    learning_rate,
    load_run_dataset,
    make_optimizer,
    record_evaluation,
)

PER_MEMBER_FIELDS = (
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "lr_step_size",
    "lr_gamma",
    "lr_min",
    "dropout",
    "init",
    "seed",
    "data_seed",
    "norm_momentum",
    "norm_eps",
    "diverge_loss",
)
"""Spec fields that may differ between the members of one fleet (none of them changes a tensor's shape).

``data_seed`` draws a member's training subset, label noise and synthetic data: for one dataset, ``train_size``,
``label_noise``, ``standardize`` and options, every seed gives splits of the same shapes, so those members train
together, each on its own splits (:func:`run_fleet` checks the shapes once loaded and splits a fleet whose shapes
differ into fleets whose shapes agree)."""

FLEET_ACTIVATIONS = ("relu", "identity")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def fleet_key(spec: RunSpec) -> tuple[Any, ...] | None:
    """The grouping key of a spec: specs with equal keys train as one fleet; None: this spec is not fleeted.

    The key is every field but :data:`PER_MEMBER_FIELDS`, plus the code-path flags that those fields switch in the
    solo run (momentum > 0, weight decay > 0, dropout > 0)."""
    if spec.model != "mlp" or spec.activation not in FLEET_ACTIVATIONS:
        return None
    if spec.norm not in ("none", "batch") or spec.norm_options:
        return None
    if spec.dropout > 0 and (spec.dropout_kind != "standard" or spec.dropout_options):
        return None
    if spec.layers != "normdrop" and (spec.norm != "none" or spec.dropout > 0):
        return None
    fields = spec.model_dump()
    for name in PER_MEMBER_FIELDS:
        fields.pop(name)
    flags = (spec.momentum > 0, spec.weight_decay > 0, spec.dropout > 0)
    return (tuple(sorted((name, repr(value)) for name, value in fields.items())), flags)


def bitwise_backend() -> bool:
    """Whether this process's CPU kernels are the ones the bitwise contract was established with: normdrop's numba
    kernels (and their C++ fast path). With ``NORMDROP_BACKEND=composite`` the layers run as torch ops, for which
    the fleet's dropout multiplier and batched formulas were not proven bitwise: no fleets then."""
    from normdrop.nn import kernels

    return kernels.backend_for_device(torch.device("cpu")) is numba_cpu


def group_specs(specs: Sequence[RunSpec]) -> tuple[list[list[RunSpec]], list[RunSpec]]:
    """Split specs into fleets (groups of >= 2 with one :func:`fleet_key`, in first-seen order) and solo runs.

    No fleets at all when :func:`bitwise_backend` is false: a fleet must store what the solo runs would."""
    groups: dict[tuple[Any, ...], list[RunSpec]] = {}
    solo: list[RunSpec] = []
    if not bitwise_backend():
        return [], list(specs)
    for spec in specs:
        key = fleet_key(spec)
        if key is None:
            solo.append(spec)
        else:
            groups.setdefault(key, []).append(spec)
    fleets = [group for group in groups.values() if len(group) > 1]
    solo += [group[0] for group in groups.values() if len(group) == 1]
    return fleets, solo


# ---------------------------------------------------------------------------------------------------- layers


class _FleetLinear(torch.autograd.Function):
    """y_k = b_k + x_k W_k^T on (K, B, in) -> (K, B, out), with the solo path's backward formulas."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            y = torch.bmm(x, weight.transpose(1, 2))
        else:
            y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (K, B, out): each member's gradient as its solo run holds it (a no-op in training)
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


_EXACT_SHAPES: dict[tuple[int, int, int, int, bool, int], bool] = {}


def batched_linear_exact(members: int, rows: int, in_features: int, out_features: int, bias: bool) -> bool:
    """Whether :class:`_FleetLinear` on a (members, rows, in_features) input gives, member by member, the solo
    ``F.linear``'s forward and gradients bit for bit. torch picks its gemm kernel by shape, and ``bmm`` and ``mm``
    do not always pick the same one (e.g. 50 x 37 -> 10 rounds differently): the answer is measured once per shape
    and process on random data (a different kernel shows up as a difference there), and a shape that fails runs
    member by member."""
    key = (members, rows, in_features, out_features, bias, torch.get_num_threads())
    if key not in _EXACT_SHAPES:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(members, rows, in_features, generator=generator)
        weight = torch.randn(members, out_features, in_features, generator=generator)
        b = torch.randn(members, out_features, generator=generator) if bias else None
        grad = torch.randn(members, rows, out_features, generator=generator)
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        with torch.enable_grad():
            y = _FleetLinear.apply(xs, ws, bs)
            y.backward(grad)
        exact = True
        for k in range(members):
            xk, wk = x[k].clone().requires_grad_(), weight[k].clone().requires_grad_()
            bk = None if b is None else b[k].clone().requires_grad_()
            with torch.enable_grad():
                yk = F.linear(xk, wk, bk)
                yk.backward(grad[k].clone())
            exact &= torch.equal(yk, y[k]) and torch.equal(xk.grad, xs.grad[k]) and torch.equal(wk.grad, ws.grad[k])
            if bk is not None:
                exact &= torch.equal(bk.grad, bs.grad[k])
        _EXACT_SHAPES[key] = bool(exact)
    return _EXACT_SHAPES[key]


@njit(cache=True, parallel=False)
def _fleet_mask(out, members, rows, channels, keys, thresholds, keep_scales, drop_scales):
    """out[k, b, c] = keep_scale_k if bits(seed_k, b * channels + c) >= threshold_k else drop_scale_k."""
    for k in prange(members):
        k0, k1, k2 = np.uint32(keys[k, 0]), np.uint32(keys[k, 1]), np.uint32(keys[k, 2])
        bound = np.uint32(thresholds[k])
        keep_scale, drop_scale = keep_scales[k], drop_scales[k]
        for b in range(rows):
            row = out[k, b]
            for c in range(channels):
                keep = _counter_bits(np.int64(b * channels + c), k0, k1, k2) >= bound
                row[c] = keep_scale if keep else drop_scale


def _torch_multiplier(
    shape: tuple[int, int, int],
    keys: np.ndarray,
    thresholds: np.ndarray,
    keep_scales: np.ndarray,
    drop_scales: np.ndarray,
    device: torch.device,
) -> Tensor:
    """:func:`fleet_dropout_multiplier` in torch ops on ``device``: h = mix(mix(mix(lo(c) ^ k0) ^ hi(c) ^ k1) ^ k2)
    per counter c = b C + c' with member k's round keys (:mod:`normdrop.nn.rng`), broadcast over (K, B, C)."""
    members, rows, channels = shape

    def column(values: np.ndarray, dtype: torch.dtype) -> Tensor:
        return torch.from_numpy(values).to(device=device, dtype=dtype).view(members, 1, 1)

    k = torch.from_numpy(keys).to(device)
    k0, k1, k2 = (k[:, i].view(members, 1, 1) for i in range(3))
    counter = torch.arange(rows * channels, dtype=torch.int64, device=device).view(1, rows, channels)
    high = counter >> 32
    h = composite._mix32_((counter & MASK32) ^ k0)
    h = composite._mix32_(h ^ high ^ k1)
    h = composite._mix32_(h ^ k2)
    keep = h >= column(thresholds, torch.int64)
    return torch.where(keep, column(keep_scales, torch.float32), column(drop_scales, torch.float32))


class _FleetDropout(torch.autograd.Function):
    """y = x * m with m[k, b, c] the member's scaled keep mask; backward multiplies by the same m."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, multiplier: Tensor) -> Tensor:
        ctx.save_for_backward(multiplier)
        return x * multiplier

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None


def _batched_norm(
    h: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momenta: Sequence[float],
    eps: Sequence[float],
) -> Tensor:
    """Batch norm of (K, B, C) over the B rows of each member in torch ops (the fleet off CPU, where no solo kernel
    is to be matched): ``y = (x - mu_k) / sqrt(var_k + eps_k) * w_k + b_k`` with the biased batch variance in
    training, and ``running = (1 - m_k) running + m_k batch`` with the unbiased one (B / (B - 1) times the biased),
    as torch.nn.BatchNorm1d; the running statistics in eval."""
    members, rows, _ = h.shape
    eps_column = _column(eps, h.device).view(members, 1, 1)
    if training:
        mean = h.mean(1, keepdim=True)
        var = (h - mean).square().mean(1, keepdim=True)
        with torch.no_grad():
            m = _column(momenta, h.device).view(members, 1)
            unbiased = var.squeeze(1) * (rows / max(rows - 1, 1))
            running_mean.mul_(1 - m).add_(m * mean.squeeze(1))
            running_var.mul_(1 - m).add_(m * unbiased)
    else:
        mean, var = running_mean.unsqueeze(1), running_var.unsqueeze(1)
    return (h - mean) * torch.rsqrt(var + eps_column) * weight.unsqueeze(1) + bias.unsqueeze(1)


@functools.lru_cache(maxsize=1024)
def _scales(p: float) -> tuple[int, np.ndarray]:
    """normdrop's float32 dropout constants for ``p`` (cached: building them costs tensor ops, once per member
    and layer call otherwise)."""
    return numba_cpu._dropout_constants(p, False, True, torch.float32)


def fleet_dropout_multiplier(
    shape: tuple[int, int, int], seeds: Sequence[int], ps: Sequence[float], device: torch.device | str = "cpu"
) -> Tensor:
    """The (K, B, C) float32 multiplier of one dropout layer: member k's keep mask for seed ``seeds[k]`` and
    probability ``ps[k]``, scaled as normdrop's kernels scale it (keep: ``float32(1 / (1 - p))``, drop: 0).

    On CPU a numba kernel; on other devices the same counter hash in torch int64 ops (:func:`_torch_multiplier`)."""
    members, rows, channels = shape
    keys = np.array([round_keys(seed) for seed in seeds], dtype=np.int64).reshape(members, 3)
    thresholds = np.array([drop_threshold(p) for p in ps], dtype=np.int64)
    constants = [_scales(p) for p in ps]
    drop_scales = np.array([c[1][0] for c in constants], dtype=np.float32)
    keep_scales = np.array([c[1][1] for c in constants], dtype=np.float32)
    if torch.device(device).type != "cpu":
        return _torch_multiplier(shape, keys, thresholds, keep_scales, drop_scales, torch.device(device))
    out = np.empty((members, rows, channels), dtype=np.float32)
    _fleet_mask(out, members, rows, channels, keys, thresholds, keep_scales, drop_scales)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ the fleet


@dataclass
class _Member:
    spec: RunSpec
    batches: Any
    dropout_rng: torch.Generator
    metrics: list[tuple[int, str, float]]
    probe_records: list[dict[str, Any]]
    summary: dict[str, float | bool | None]
    diverged_step: int | None = None
    train_time: float = 0.0
    artifacts: dict[str, bytes] = field(default_factory=dict)


def _column(values: Sequence[float], device: torch.device) -> Tensor:
    """Per-member scalars as a float32 (K,) tensor (each value rounded to float32, as torch rounds a Python scalar
    against a float32 tensor); :func:`_as_column` views it as (K, 1, ..., 1)."""
    return torch.tensor(list(values), dtype=torch.float64).to(torch.float32).to(device)


ALIGNMENT = 64
"""Bytes to which torch's CPU allocator aligns a fresh tensor, as the solo run's activations are aligned."""


def _aligned(x: Tensor) -> Tensor:
    """``x`` (a member's slice of stacked tensors) itself if it starts on an :data:`ALIGNMENT` boundary, else a
    fresh copy, aligned as the solo run's activations and weights are (fresh tensors): torch's ``mm`` rounds
    differently on an operand that is not 16-byte aligned (measured on this project's machine: a 50 x 37 -> 10
    linear layer on member 1's slice of a (2, 50, 37) tensor, 7400 bytes in; offsets of 16, 32 and 48 bytes did not
    change it)."""
    return x if x.data_ptr() % ALIGNMENT == 0 else x.clone()


def _as_column(values: Tensor, ndim: int) -> Tensor:
    """A (K,) tensor viewed as (K, 1, ..., 1) with ``ndim`` dims, to broadcast over stacked (K, ...) parameters."""
    return values.view(-1, *([1] * (ndim - 1)))


class Fleet:
    """K MLP members as stacked tensors: ``params[name]`` is (K, *shape) for each parameter name of the solo model
    (in the solo model's order), ``buffers[name]`` likewise for batch-norm statistics; activations are (K, B, C)."""

    def __init__(
        self,
        specs: Sequence[RunSpec],
        input_shape: Sequence[int],
        num_classes: int,
        device: torch.device | str = "cpu",
        exact: bool | None = None,
    ) -> None:
        keys = {fleet_key(spec) for spec in specs}
        if len(keys) != 1 or None in keys:
            raise ValueError("a fleet needs specs with one (non-None) fleet_key; use group_specs to form fleets")
        self.specs = list(specs)
        self.template = specs[0]
        self.device = torch.device(device)
        # the bitwise contract (and its costs: per-shape checks, per-member losses) on CPU; exact=False forces the
        # batched, tolerance-only path that other devices take (a CPU test of the GPU path)
        self.exact = self.device.type == "cpu" if exact is None else exact
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        models = [build_model(spec, input_shape, num_classes) for spec in specs]
        self.param_names = [name for name, p in models[0].named_parameters() if p.requires_grad]
        self.params = {
            name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).to(device).requires_grad_()
            for name in self.param_names
        }
        self.buffer_names = [name for name, _ in models[0].named_buffers()]
        self.buffers = {
            name: torch.stack([dict(m.named_buffers())[name] for m in models]).to(device) for name in self.buffer_names
        }
        self.unit = [name for name, _ in _unit(self.template, self.template.width, 0)]
        self.state: dict[str, dict[str, Tensor]] = {name: {} for name in self.param_names}
        self.adam_step = 0.0
        self._members_changed()

    def _members_changed(self) -> None:
        """Recompute what depends on the membership: per-member settings as lists and as (K,) columns."""
        self.dropout_ps = [float(s.dropout) for s in self.specs]
        self.norm_eps = [float(s.norm_eps) for s in self.specs]
        self.norm_momenta = [None if s.norm_momentum is None else float(s.norm_momentum) for s in self.specs]
        self._columns: dict[str, Tensor] = {}

    def _member_column(self, field_name: str) -> Tensor:
        """The (K,) float32 column of a spec field over the members (built once per membership)."""
        if field_name not in self._columns:
            self._columns[field_name] = _column([getattr(s, field_name) for s in self.specs], self.device)
        return self._columns[field_name]

    @property
    def size(self) -> int:
        return len(self.specs)

    # ---- forward
    def _dropout(self, h: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
        """Member k's dropout on its (B, C) slice, its seed drawn from ``generators[k]`` as its solo layer draws it
        (None: eval, identity). On CPU one C++ node over the members (:func:`fastpath.fleet_dropout_drawing_seeds`,
        the solo fast path's kernel per slice); else a (K, B, C) multiplier with the same bits."""
        if generators is None:
            return h
        y = fastpath.fleet_dropout_drawing_seeds(h, list(generators), self.dropout_ps)
        if y is not None:
            return y
        seeds = [draw_seed(generator) for generator in generators]
        multiplier = fleet_dropout_multiplier(tuple(h.shape), seeds, self.dropout_ps, h.device)
        return _FleetDropout.apply(h, multiplier)

    def _norm(self, h: Tensor, index: int, training: bool) -> Tensor:
        """Batch norm of (K, B, C): member k's (B, C) slice normalized as its solo run normalizes its input, with its
        own BN momentum and eps. Exact (CPU): one C++ node that calls the solo fast path's kernel on each slice
        (:func:`fastpath.fleet_batch_norm`), or, where a solo input would not take the fast path, the solo call
        ``normdrop.nn.functional.batch_norm`` member by member. Otherwise (other devices) :func:`_batched_norm`."""
        prefix = f"hidden{index}.norm."
        tracked = self.buffers[prefix + "num_batches_tracked"]
        weight, bias = self.params[prefix + "weight"], self.params[prefix + "bias"]
        mean, var = self.buffers[prefix + "running_mean"], self.buffers[prefix + "running_var"]
        if training:
            tracked.add_(1)
        # as the solo module: a float momentum, or 1 / num_batches_tracked when it is None (members train in step,
        # so their counts agree)
        cumulative = 1.0 / float(tracked[0].item()) if training and None in self.norm_momenta else 0.0
        momenta = [cumulative if m is None else m for m in self.norm_momenta]
        if not self.exact:
            return _batched_norm(h, weight, bias, mean, var, training, momenta, self.norm_eps)
        y = fastpath.fleet_batch_norm(h, weight, bias, mean, var, training, momenta, self.norm_eps)
        if y is not None:
            return y
        outputs = [
            ndF.batch_norm(h[k], mean[k], var[k], weight[k], bias[k], training, momenta[k], self.norm_eps[k])
            for k in range(len(self.specs))
        ]
        return torch.stack(outputs)

    def forward(self, x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
        """Logits (K, B, classes) of inputs (K, B, D); ``generators[k]``: member k's dropout stream, from which each
        dropout layer draws the member's seed (None: eval mode, running statistics and no dropout)."""
        spec = self.template
        training = generators is not None
        h = x
        for index in range(1, spec.depth + 1):
            h = self._linear(h, f"hidden{index}.linear.", training)
            for op in self.unit:
                if op == "norm":
                    h = self._norm(h, index, training)
                elif op == "act":
                    h = torch.relu(h) if spec.activation == "relu" else h
                else:
                    h = self._dropout(h, generators)
        if spec.dropout > 0 and spec.dropout_position == "before_head":
            h = self._dropout(h, generators)
        return self._linear(h, "classifier.", training)

    def _linear(self, h: Tensor, prefix: str, training: bool) -> Tensor:
        """One linear layer: batched where torch's bmm rounds as its mm does (:func:`batched_linear_exact`), else
        member by member with the solo call ``F.linear`` (always so in eval: long chunks take other kernels)."""
        weight, bias = self.params[prefix + "weight"], self.params.get(prefix + "bias")
        members, rows, in_features = h.shape
        if not self.exact or (
            training and batched_linear_exact(members, rows, in_features, weight.shape[1], bias is not None)
        ):
            return _FleetLinear.apply(h, weight, bias)
        shared = h.stride(0) == 0  # the eval input: one chunk seen by every member
        outputs = [
            # the shared eval chunk is the dataset's own memory, as the solo run evaluates it: passed as it is
            F.linear(h[0] if shared else _aligned(h[k]), _aligned(weight[k]), None if bias is None else bias[k])
            for k in range(members)
        ]
        return torch.stack(outputs)

    # ---- optimizer
    def step(self, lrs: Sequence[float]) -> None:
        """One stacked optimizer step with member k's learning rate ``lrs[k]``: torch.optim's update, bit for bit."""
        spec = self.template
        if spec.optimizer == "sgd":
            self._sgd(lrs)
        else:
            self._adam(lrs, decoupled=spec.optimizer == "adamw")

    def _sgd(self, lrs: Sequence[float]) -> None:
        spec = self.template
        step_sizes = _column([-lr for lr in lrs], self.device)
        with torch.no_grad():
            for name in self.param_names:
                param = self.params[name]
                grad = param.grad
                if grad is None:
                    continue
                ndim = param.ndim
                if spec.weight_decay > 0:
                    grad = grad.addcmul(param, _as_column(self._member_column("weight_decay"), ndim))
                if spec.momentum > 0:
                    momenta = _as_column(self._member_column("momentum"), ndim)
                    buf = self.state[name].get("momentum_buffer")
                    if buf is None:
                        buf = grad.detach().clone()
                        self.state[name]["momentum_buffer"] = buf
                    else:
                        buf.mul_(momenta).add_(grad, alpha=1)
                    grad = grad.addcmul(buf, momenta) if spec.nesterov else buf
                param.addcmul_(grad, _as_column(step_sizes, ndim))

    def _adam(self, lrs: Sequence[float], decoupled: bool) -> None:
        specs = self.specs
        beta1, beta2 = ADAM_BETAS
        self.adam_step += 1.0
        step = self.adam_step
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_sizes = _column([-lr / bias_correction1 for lr in lrs], self.device)
        decays = None
        if specs[0].weight_decay > 0 and decoupled:
            decays = _column([1 - lr * s.weight_decay for lr, s in zip(lrs, specs, strict=True)], self.device)
        with torch.no_grad():
            for name in self.param_names:
                param = self.params[name]
                grad = param.grad
                if grad is None:
                    continue
                ndim = param.ndim
                state = self.state[name]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                if decays is not None:
                    param.mul_(_as_column(decays, ndim))
                elif specs[0].weight_decay > 0:
                    grad = grad.addcmul(param, _as_column(self._member_column("weight_decay"), ndim))
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
                param.add_((exp_avg * _as_column(step_sizes, ndim)).div_(denom))

    # ---- membership
    def keep(self, indices: Sequence[int]) -> None:
        """Compact the fleet to the members at ``indices`` (in order); the others stop costing compute."""
        index = torch.tensor(list(indices), dtype=torch.int64, device=self.device)
        self.specs = [self.specs[i] for i in indices]
        with torch.no_grad():
            for name in self.param_names:
                old = self.params[name]
                new = old.detach().index_select(0, index).requires_grad_()
                if old.grad is not None:
                    new.grad = old.grad.index_select(0, index)
                self.params[name] = new
                self.state[name] = {key: value.index_select(0, index) for key, value in self.state[name].items()}
            self.buffers = {name: value.index_select(0, index) for name, value in self.buffers.items()}
        self._members_changed()

    def member_model(self, k: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Member ``k`` as the ordinary model of its spec, with its exact weights, buffers and gradients, and a
        ``torch.optim`` optimizer of its spec holding its optimizer state."""
        spec = self.specs[k]
        model = build_model(spec, self.input_shape, self.num_classes)
        with torch.no_grad():
            named = dict(model.named_parameters())
            for name in self.param_names:
                named[name].copy_(self.params[name][k])
                grad = self.params[name].grad
                named[name].grad = None if grad is None else grad[k].cpu().clone()
            buffers = dict(model.named_buffers())
            for name in self.buffer_names:
                buffers[name].copy_(self.buffers[name][k])
        parameters = [named[name] for name in self.param_names]
        optimizer = make_optimizer(spec, parameters)
        for name, parameter in zip(self.param_names, parameters, strict=False):
            state = self.state[name]
            if not state:
                continue
            if spec.optimizer == "sgd":
                optimizer.state[parameter] = {"momentum_buffer": state["momentum_buffer"][k].cpu().clone()}
            else:
                optimizer.state[parameter] = {
                    "step": torch.tensor(self.adam_step, dtype=torch.float32),
                    "exp_avg": state["exp_avg"][k].cpu().clone(),
                    "exp_avg_sq": state["exp_avg_sq"][k].cpu().clone(),
                }
        model.train()
        return model, optimizer


# ------------------------------------------------------------------------------------------------ training


def run_fleet(
    specs: Sequence[RunSpec],
    *,
    data_root: str | None = None,
    num_threads: int | None = 1,
    hooks_factory: Callable[[RunSpec], Sequence[Hook]] | None = None,
    probe_hooks: Sequence[Sequence[Hook]] | None = None,
    device: torch.device | str = "cpu",
    exact: bool | None = None,
) -> list[RunResult]:
    """Train the specs of one fleet together; one :class:`RunResult` per spec, in order, each equal to
    :func:`normdrop.train.run` of that spec (metrics bit for bit; see the module docstring), ``spec.keep`` honoured
    as there (``"final_weights"``: ``torch.save`` of a finished member's state dict in ``RunResult.artifacts``).

    ``hooks_factory(spec)`` gives extra hooks per member (``hooks`` of :func:`normdrop.train.run`);
    ``probe_hooks[k]`` are the hooks of ``specs[k].probes`` (``probe_hooks`` of :func:`normdrop.train.run`; one list
    per member, built by :func:`normdrop.lab.run_fleet_specs`), called after the extra ones. A failure of the fleet
    as a whole (e.g. a bad dataset) makes every member ``"failed"`` with the error's text.

    ``device``: where the fleet trains. Off CPU (e.g. CUDA, through normdrop's composite backend) losses and
    evaluation are batched over members too and the bitwise contract does not hold: members match their solo runs
    to rounding (the solo run's reduction orders are CPU kernels'), a tolerance, not bit for bit.

    Raises:
        ValueError: a member lists probes and no ``probe_hooks`` came with the fleet, or ``probe_hooks`` does not
            have one list per spec (before any training, as :func:`normdrop.train.run` refuses).
    """
    specs = list(specs)
    if probe_hooks is not None and len(probe_hooks) != len(specs):
        raise ValueError(f"probe_hooks has {len(probe_hooks)} lists for {len(specs)} specs; expected one per spec")
    with_probes = [s for s in specs if s.probes]
    if with_probes and probe_hooks is None:
        raise ValueError(
            f"spec.probes={list(with_probes[0].probes)} needs the probes' hooks: run the fleet with "
            "normdrop.lab.run_fleet_specs (or pass probe_hooks=[normdrop.probes.make_probes(s) for s in specs])"
        )
    start = time.perf_counter()
    if not specs:
        return []
    hooks = [
        [*(hooks_factory(s) if hooks_factory else []), *(probe_hooks[k] if probe_hooks is not None else [])]
        for k, s in enumerate(specs)
    ]
    try:
        on_cpu = torch.device(device).type == "cpu"
        with _reproducible(specs[0].seed, num_threads) if on_cpu else contextlib.nullcontext():
            members = _train_fleets(specs, data_root, hooks, torch.device(device), exact)
    except Exception as error:
        text = "".join(traceback.format_exception_only(error)).strip()
        wall = time.perf_counter() - start
        return [
            RunResult(run_id=s.run_id, spec=s, status="failed", error=text, summary={"diverged": False}, wall_time=wall)
            for s in specs
        ]
    wall = (time.perf_counter() - start) / len(specs)
    return [
        RunResult(
            run_id=m.spec.run_id,
            spec=m.spec,
            status="finished" if m.diverged_step is None else "diverged",
            diverged_step=m.diverged_step,
            metrics=m.metrics,
            probe_records=m.probe_records,
            summary=m.summary,
            wall_time=wall,
            artifacts=m.artifacts,
        )
        for m in members
    ]


def _data_shapes(data: Dataset) -> tuple[Any, ...]:
    """What must agree between the datasets of one fleet's members: every split's shape and the class count."""
    splits = (data.x_train, data.y_train, data.x_test, data.y_test)
    return (*(tuple(t.shape) for t in splits), data.num_classes, tuple(data.input_shape))


def _train_fleets(
    specs: list[RunSpec],
    data_root: str | None,
    hooks: list[list[Hook]],
    device: torch.device,
    exact: bool | None = None,
) -> list[_Member]:
    """Load each member's dataset (its own ``data_seed``), split the members into fleets whose datasets have one
    shape (:func:`_data_shapes`; in practice always one fleet), train them; the members back in the order of
    ``specs``."""
    datasets = [load_run_dataset(spec, data_root) for spec in specs]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, data in enumerate(datasets):
        groups.setdefault(_data_shapes(data), []).append(k)
    members: list[_Member | None] = [None] * len(specs)
    for group in groups.values():
        trained = _train_fleet(
            [specs[k] for k in group], [datasets[k] for k in group], [hooks[k] for k in group], device, exact
        )
        for k, member in zip(group, trained, strict=True):
            members[k] = member
    return [member for member in members if member is not None]


def _train_fleet(
    specs: list[RunSpec],
    datasets: list[Dataset],
    hooks: list[list[Hook]],
    device: torch.device,
    exact: bool | None = None,
) -> list[_Member]:
    """Train one fleet whose members' datasets have one shape. When they are one dataset (the same ``data_seed``,
    or one the seed does not change) every member reads it; else member k reads its own, stacked (K, N, ...)."""
    for hook in (hook for member_hooks in hooks for hook in member_hooks):
        if not isinstance(hook.every, int) or hook.every < 0:
            raise ValueError(f"hook {hook!r}: every must be an integer >= 0, got {hook.every!r}")
    template, data = specs[0], datasets[0]
    shared = all(d is data for d in datasets)
    num_train = len(data.y_train)
    if template.batch_size > num_train:
        raise ValueError(f"batch_size={template.batch_size} exceeds the {num_train} training examples")
    if shared:  # (N, D) inputs and (N,) labels read by every member
        x_train, y_train = data.x_train.to(device).reshape(num_train, -1), data.y_train.to(device)
        x_test, y_test = data.x_test.to(device).reshape(len(data.y_test), -1), data.y_test.to(device)
    else:  # (K, N, D) and (K, N): member k's own splits
        x_train = torch.stack([d.x_train.reshape(num_train, -1) for d in datasets]).to(device)
        y_train = torch.stack([d.y_train for d in datasets]).to(device)
        x_test = torch.stack([d.x_test.reshape(len(d.y_test), -1) for d in datasets]).to(device)
        y_test = torch.stack([d.y_test for d in datasets]).to(device)
    fleet = Fleet(specs, data.input_shape, data.num_classes, device, exact)
    everyone = [
        _Member(
            spec=s,
            batches=_batch_indices(
                num_train, s.batch_size, torch.Generator().manual_seed(derive_seed(s.seed, "batch_order"))
            ),
            dropout_rng=torch.Generator().manual_seed(derive_seed(s.seed, "dropout")),
            metrics=[],
            probe_records=[],
            summary={},
        )
        for s in specs
    ]
    alive = list(range(len(specs)))  # positions in `everyone` of the fleet's members, in fleet order

    def alive_splits(*splits: Tensor) -> list[Tensor]:
        """Per-member splits restricted to the members still training (shared splits as they are)."""
        if shared or len(alive) == len(specs):
            return list(splits)
        index = torch.tensor(alive, dtype=torch.int64, device=device)
        return [split.index_select(0, index) for split in splits]

    def evaluate_at(step: int) -> None:
        train_split, test_split = alive_splits(x_train, y_train), alive_splits(x_test, y_test)
        results = [_fleet_evaluate(fleet, *train_split), _fleet_evaluate(fleet, *test_split)]
        for position, k in zip(alive, range(fleet.size), strict=False):
            member = everyone[position]
            record_evaluation(step, results[0][k], results[1][k], member.train_time, member.summary, member.metrics)

    def call_hooks_at(step: int) -> None:
        for k, position in enumerate(alive):
            member = everyone[position]
            due = [hook for hook in hooks[position] if _due(hook, step, member.spec.steps)]
            if not due:
                continue
            model, optimizer = fleet.member_model(k)
            lr = learning_rate(member.spec, min(step, member.spec.steps - 1))
            own = datasets[position]
            probe_batch = (own.x_train[: template.probe_batch_size], own.y_train[: template.probe_batch_size])
            for hook in due:
                ctx = HookContext(
                    member.spec, step, lr, model, optimizer, F.cross_entropy, probe_batch, own, member.metrics
                )
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(member.dropout_rng.get_state())
                    member.probe_records.extend(_call_hook(hook, ctx))

    evaluate_at(0)
    call_hooks_at(0)
    for step in range(template.steps):
        step_start = time.perf_counter()
        lrs = [learning_rate(everyone[p].spec, step) for p in alive]
        indices = torch.stack([next(everyone[p].batches) for p in alive]).to(device)  # (K, B)
        if shared:
            x, labels = x_train[indices], y_train[indices]
        else:  # member k's rows of its own training set
            owner = torch.tensor(alive, dtype=torch.int64, device=device).view(-1, 1)
            x, labels = x_train[owner, indices], y_train[owner, indices]
        logits = fleet.forward(x, [everyone[p].dropout_rng for p in alive])
        if fleet.exact:  # each member's loss as its solo run computes it
            losses = [F.cross_entropy(logits[k], labels[k]) for k in range(len(alive))]
        else:  # one batched reduction (off CPU: a tolerance, not bit for bit)
            per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            losses = list(per_example.view(labels.shape).mean(1))
        loss_values = torch.stack([loss.detach() for loss in losses]).tolist()
        survivors: list[int] = []
        for k, position in enumerate(alive):
            member = everyone[position]
            member.metrics.append((step, "batch_loss", loss_values[k]))
            if not math.isfinite(loss_values[k]) or loss_values[k] > member.spec.diverge_loss:
                member.diverged_step = step
            else:
                survivors.append(k)
        for param in fleet.params.values():
            param.grad = None
        if survivors:
            torch.stack([losses[k] for k in survivors]).sum().backward()
        diagnostics = step % template.eval_every == 0
        before = {name: p.detach().clone() for name, p in fleet.params.items()} if diagnostics else {}
        fleet.step(lrs)
        elapsed = (time.perf_counter() - step_start) / len(alive)
        if diagnostics:
            for k in survivors:
                member = everyone[alive[k]]
                member.metrics.append((step, "lr", lrs[k]))
                _record_diagnostics(step, fleet, before, k, member.metrics)
        for position in alive:
            member = everyone[position]
            member.train_time += elapsed
            if member.diverged_step is not None:
                member.summary = _diverged_summary(step, member.train_time)
        if len(survivors) < len(alive):
            alive = [alive[k] for k in survivors]
            if not alive:
                break
            fleet.keep(survivors)
        done = step + 1
        if done % template.eval_every == 0 or done == template.steps:
            evaluate_at(done)
        call_hooks_at(done)
    for k, position in enumerate(alive):
        member = everyone[position]
        member.summary.update(diverged=False, steps_completed=template.steps, train_time=member.train_time)
        if "final_weights" in member.spec.keep:  # as normdrop.train.run keeps them
            buffer = io.BytesIO()
            torch.save(fleet.member_model(k)[0].state_dict(), buffer)
            member.artifacts["final_weights"] = buffer.getvalue()
    return everyone


def _record_diagnostics(
    step: int, fleet: Fleet, before: dict[str, Tensor], k: int, metrics: list[tuple[int, str, float]]
) -> None:
    """||g_t||, ||w_t|| and ||w_{t+1} - w_t|| / ||w_t|| of member k, computed as the solo run computes them."""
    grads = [fleet.params[n].grad[k] for n in fleet.param_names if fleet.params[n].grad is not None]
    grad_norm = float(global_norm(grads))
    previous = [before[n][k] for n in fleet.param_names]
    weight_norm = float(global_norm(previous))
    update_norm = float(
        global_norm(torch._foreach_sub([fleet.params[n].detach()[k] for n in fleet.param_names], previous))
    )
    metrics.extend(
        [
            (step, "grad_norm", grad_norm),
            (step, "weight_norm", weight_norm),
            (step, "update_ratio", update_norm / weight_norm if weight_norm > 0 else math.inf),
        ]
    )


@torch.no_grad()
def _fleet_evaluate(fleet: Fleet, inputs: Tensor, labels: Tensor) -> list[tuple[float, float]]:
    """(mean cross-entropy, accuracy) of every member in eval mode, chunked as :func:`normdrop.train.evaluate`.

    ``inputs`` (N, D) and ``labels`` (N,) are one split every member reads; (K, N, D) and (K, N), member k's own."""
    members = fleet.size
    per_member = labels.ndim == 2
    count = labels.shape[-1]
    totals = [0.0] * members
    correct = [0] * members
    batched_totals = torch.zeros(members, dtype=torch.float64, device=inputs.device)
    batched_correct = torch.zeros(members, dtype=torch.int64, device=inputs.device)
    for start in range(0, count, EVAL_CHUNK):
        if per_member:  # (K, n, D) and (K, n)
            chunk = inputs[:, start : start + EVAL_CHUNK]
            chunk_labels = labels[:, start : start + EVAL_CHUNK]
        else:  # one chunk seen by every member (stride 0 over members)
            shared = inputs[start : start + EVAL_CHUNK]
            chunk = shared.unsqueeze(0).expand(members, *shared.shape)
            chunk_labels = labels[start : start + EVAL_CHUNK].unsqueeze(0).expand(members, len(shared))
        logits = fleet.forward(chunk, None)
        if not fleet.exact:  # off CPU: all members in one reduction, one device sync per evaluation
            flat_logits = logits.reshape(-1, logits.shape[-1])
            losses = F.cross_entropy(flat_logits, chunk_labels.reshape(-1), reduction="none").view(chunk_labels.shape)
            batched_totals += losses.double().sum(1)
            batched_correct += (logits.argmax(dim=2) == chunk_labels).sum(1)
            continue
        for k in range(members):
            member_logits = logits[k]
            member_labels = chunk_labels[k] if per_member else chunk_labels[0]
            totals[k] += F.cross_entropy(member_logits, member_labels, reduction="sum").item()
            correct[k] += int((member_logits.argmax(dim=1) == member_labels).sum())
    if not fleet.exact:
        totals, correct = batched_totals.tolist(), batched_correct.tolist()
    return [(totals[k] / count, correct[k] / count) for k in range(members)]
