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

- **layout**: hidden activations are (B, K, C) contiguous, so batch norm is normdrop's own kernel over a
  (B, K*C) input: channel (k, c) is reduced over the B rows exactly as the solo run reduces channel c;
- **linear layers** are batched matmuls of the solo formulas (custom backward) on contiguous (K, B, in) copies:
  ``y_k = b_k + x_k W_k^T`` (``baddbmm``), ``dx_k = g_k W_k``, ``dW_k = g_k^T x_k`` (torch's mm backward of a
  transposed weight) and ``db_k = sum_b g_k`` over a contiguous (K, B, C) copy. torch picks its gemm kernel by
  shape and stride, and bmm does not always pick mm's (a strided operand, or 50 x 37 -> 10, rounds otherwise), so
  each layer shape is checked once per process (:func:`batched_linear_exact`) and runs member by member with the
  solo ``F.linear`` where the batched form would differ; evaluation (long chunks) always runs member by member;
- **dropout** masks from a kernel that takes one key per member: member k's element (b, c) is kept iff
  ``bits(seed_k, b C + c) >= threshold(p_k)`` (:mod:`normdrop.nn.rng`), with ``seed_k`` drawn from the member's own
  dropout stream (``derive_seed(seed, "dropout")``) once per dropout layer and step, as its solo run draws it;
- **batch order** from each member's own ``"batch_order"`` generator, over its own dataset (its ``data_seed``'s
  subset, noisy labels and standardization; stacked (K, N, D) when the members' datasets differ) and evaluated on
  its own train and test splits;
- **BN momentum / eps** per member: members are ordered by setting and each run of one setting is one kernel call
  on its contiguous (B, K_run*C) block (a strided block would take another kernel path, which rounds otherwise);
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
from normdrop.nn.kernels import composite, numba_cpu
from normdrop.nn.kernels.numba_cpu.dropout import _counter_bits
from normdrop.nn.rng import MASK32, SEED_BOUND, drop_threshold, round_keys
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
    kernels (and their C++ fast path). With ``NORMDROP_BACKEND=composite`` batch norm runs as torch ops over the
    (B, K*C) input, whose vectorized and scalar tails fall on other channels as K changes: members then differ
    from their solo runs by rounding."""
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
    """y[:, k] = b_k + x[:, k] W_k^T on (B, K, in) -> (B, K, out), with the solo path's backward formulas."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        xt = x.transpose(0, 1).contiguous()  # (K, B, in): a strided operand takes another gemm kernel in torch

        if bias is None:
            y = torch.bmm(xt, weight.transpose(1, 2))
        else:
            y = torch.baddbmm(bias.unsqueeze(1), xt, weight.transpose(1, 2))
        ctx.save_for_backward(xt, weight)
        ctx.has_bias = bias is not None
        return y.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        xt, weight = ctx.saved_tensors
        gt = grad.transpose(0, 1).contiguous()  # (K, B, out): each member's gradient as its solo run holds it
        grad_x = torch.bmm(gt, weight).transpose(0, 1) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(gt.transpose(1, 2), xt) if ctx.needs_input_grad[1] else None
        grad_b = gt.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


_EXACT_SHAPES: dict[tuple[int, int, int, int, bool, int], bool] = {}


def batched_linear_exact(rows: int, members: int, in_features: int, out_features: int, bias: bool) -> bool:
    """Whether :class:`_FleetLinear` on this shape gives, member by member, the solo ``F.linear``'s forward and
    gradients bit for bit. torch picks its gemm kernel by shape, and ``bmm`` and ``mm`` do not always pick the same
    one (e.g. 50 x 37 -> 10 rounds differently): the answer is measured once per shape and process on random data
    (a different kernel shows up as a difference there), and a shape that fails runs member by member."""
    key = (rows, members, in_features, out_features, bias, torch.get_num_threads())
    if key not in _EXACT_SHAPES:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(rows, members, in_features, generator=generator)
        weight = torch.randn(members, out_features, in_features, generator=generator)
        b = torch.randn(members, out_features, generator=generator) if bias else None
        grad = torch.randn(rows, members, out_features, generator=generator)
        xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
        bs = None if b is None else b.clone().requires_grad_()
        with torch.enable_grad():
            y = _FleetLinear.apply(xs, ws, bs)
            y.backward(grad)
        exact = True
        for k in range(members):
            xk, wk = x[:, k].contiguous().requires_grad_(), weight[k].clone().requires_grad_()
            bk = None if b is None else b[k].clone().requires_grad_()
            with torch.enable_grad():
                yk = F.linear(xk, wk, bk)
                yk.backward(grad[:, k].contiguous())
            exact &= (
                torch.equal(yk, y[:, k]) and torch.equal(xk.grad, xs.grad[:, k]) and torch.equal(wk.grad, ws.grad[k])
            )
            if bk is not None:
                exact &= torch.equal(bk.grad, bs.grad[k])
        _EXACT_SHAPES[key] = bool(exact)
    return _EXACT_SHAPES[key]


@njit(cache=True, parallel=False)
def _fleet_mask(out, rows, members, channels, keys, thresholds, keep_scales, drop_scales):
    """out[b, k, c] = keep_scale_k if bits(seed_k, b * channels + c) >= threshold_k else drop_scale_k."""
    for b in prange(rows):
        for k in range(members):
            k0, k1, k2 = np.uint32(keys[k, 0]), np.uint32(keys[k, 1]), np.uint32(keys[k, 2])
            bound = np.uint32(thresholds[k])
            keep_scale, drop_scale = keep_scales[k], drop_scales[k]
            row = out[b, k]
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
    per counter c = b C + c' with member k's round keys (:mod:`normdrop.nn.rng`), broadcast over (B, K, C)."""
    rows, members, channels = shape

    def column(values: np.ndarray, dtype: torch.dtype) -> Tensor:
        return torch.from_numpy(values).to(device=device, dtype=dtype).view(1, members, 1)

    k = torch.from_numpy(keys).to(device)
    k0, k1, k2 = (k[:, i].view(1, members, 1) for i in range(3))
    counter = torch.arange(rows * channels, dtype=torch.int64, device=device).view(rows, 1, channels)
    high = counter >> 32
    h = composite._mix32_((counter & MASK32) ^ k0)
    h = composite._mix32_(h ^ high ^ k1)
    h = composite._mix32_(h ^ k2)
    keep = h >= column(thresholds, torch.int64)
    return torch.where(keep, column(keep_scales, torch.float32), column(drop_scales, torch.float32))


class _FleetDropout(torch.autograd.Function):
    """y = x * m with m[b, k, c] the member's scaled keep mask; backward multiplies by the same m."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, multiplier: Tensor) -> Tensor:
        ctx.save_for_backward(multiplier)
        return x * multiplier

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (multiplier,) = ctx.saved_tensors
        return grad * multiplier, None


@functools.lru_cache(maxsize=1024)
def _scales(p: float) -> tuple[int, np.ndarray]:
    """normdrop's float32 dropout constants for ``p`` (cached: building them costs tensor ops, once per member
    and layer call otherwise)."""
    return numba_cpu._dropout_constants(p, False, True, torch.float32)


def fleet_dropout_multiplier(
    shape: tuple[int, int, int], seeds: Sequence[int], ps: Sequence[float], device: torch.device | str = "cpu"
) -> Tensor:
    """The (B, K, C) float32 multiplier of one dropout layer: member k's keep mask for seed ``seeds[k]`` and
    probability ``ps[k]``, scaled as normdrop's kernels scale it (keep: ``float32(1 / (1 - p))``, drop: 0).

    On CPU a numba kernel; on other devices the same counter hash in torch int64 ops (:func:`_torch_multiplier`)."""
    rows, members, channels = shape
    keys = np.array([round_keys(seed) for seed in seeds], dtype=np.int64).reshape(members, 3)
    thresholds = np.array([drop_threshold(p) for p in ps], dtype=np.int64)
    constants = [_scales(p) for p in ps]
    drop_scales = np.array([c[1][0] for c in constants], dtype=np.float32)
    keep_scales = np.array([c[1][1] for c in constants], dtype=np.float32)
    if torch.device(device).type != "cpu":
        return _torch_multiplier(shape, keys, thresholds, keep_scales, drop_scales, torch.device(device))
    out = np.empty((rows, members, channels), dtype=np.float32)
    _fleet_mask(out, rows, members, channels, keys, thresholds, keep_scales, drop_scales)
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


def _column(values: Sequence[float], ndim: int, device: torch.device) -> Tensor:
    """Per-member scalars as a float32 (K, 1, ..., 1) tensor of ``ndim`` dims (each value rounded to float32, as
    torch rounds a Python scalar against a float32 tensor)."""
    column = torch.tensor(list(values), dtype=torch.float64).to(torch.float32).view(-1, *([1] * (ndim - 1)))
    return column.to(device)


def norm_setting(spec: RunSpec) -> tuple[float | None, float]:
    """A spec's batch-norm (momentum, eps): members with equal settings share one kernel call per layer."""
    return (spec.norm_momentum, spec.norm_eps)


def _norm_blocks(specs: Sequence[RunSpec]) -> list[tuple[int, float | None, float]]:
    """Runs of consecutive members with one :func:`norm_setting`: (members, momentum, eps) per run, in order."""
    blocks: list[tuple[int, float | None, float]] = []
    for spec in specs:
        setting = norm_setting(spec)
        if blocks and blocks[-1][1:] == setting:
            blocks[-1] = (blocks[-1][0] + 1, *setting)
        else:
            blocks.append((1, *setting))
    return blocks


class Fleet:
    """K MLP members as stacked tensors: ``params[name]`` is (K, *shape) for each parameter name of the solo model
    (in the solo model's order), ``buffers[name]`` likewise for batch-norm statistics."""

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
        self.norm_blocks = _norm_blocks(self.specs)

    @property
    def size(self) -> int:
        return len(self.specs)

    # ---- forward
    def _dropout(self, h: Tensor, seeds: Sequence[int] | None) -> Tensor:
        if seeds is None:  # eval: identity
            return h
        multiplier = fleet_dropout_multiplier(tuple(h.shape), seeds, [s.dropout for s in self.specs], h.device)
        return _FleetDropout.apply(h, multiplier)

    def _norm(self, h: Tensor, index: int, training: bool) -> Tensor:
        """Batch norm of (B, K, C) with normdrop's kernel over (B, K*C): channel (k, c) reduced over the B rows as
        member k's solo run reduces channel c. Members with their own BN momentum / eps come in runs of equal
        settings (:attr:`norm_blocks`), one kernel call per run on its (B, K_run*C) block; the blocks are split
        and joined by copies (``torch.split`` / ``torch.cat``, whose backward copies too), so no value changes."""
        rows, _, channels = h.shape
        prefix = f"hidden{index}.norm."
        tracked = self.buffers[prefix + "num_batches_tracked"]
        if training:
            tracked.add_(1)
        sizes = [size for size, _, _ in self.norm_blocks]
        if len(sizes) == 1:
            pieces = [(h, *(self.params[prefix + n] for n in ("weight", "bias")))]
            stats = [(self.buffers[prefix + "running_mean"], self.buffers[prefix + "running_var"])]
        else:
            pieces = list(
                zip(
                    torch.split(h, sizes, dim=1),
                    torch.split(self.params[prefix + "weight"], sizes),
                    torch.split(self.params[prefix + "bias"], sizes),
                    strict=True,
                )
            )
            stats = list(
                zip(
                    torch.split(self.buffers[prefix + "running_mean"], sizes),
                    torch.split(self.buffers[prefix + "running_var"], sizes),
                    strict=True,
                )
            )
        outputs = []
        for (block, weight, bias), (mean, var), (size, setting, eps) in zip(
            pieces, stats, self.norm_blocks, strict=True
        ):
            # as the solo module: a float momentum, or 1 / num_batches_tracked (a 0-dim double) when it is None
            momentum: float | Tensor = 0.0 if setting is None else setting
            if training and setting is None:
                momentum = 1.0 / tracked[0].double()
            y = ndF.batch_norm(
                # contiguous, as the solo run's input: a strided (B, K_run*C) view takes another kernel path,
                # which rounds differently
                block.reshape(rows, size * channels).contiguous(),
                mean.view(-1),
                var.view(-1),
                weight.reshape(-1),
                bias.reshape(-1),
                training,
                momentum,
                eps,
            )
            outputs.append(y.view(rows, size, channels))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def forward(self, x: Tensor, draw_seeds: Callable[[], list[int]] | None) -> Tensor:
        """Logits (B, K, classes) of inputs (B, K, D); ``draw_seeds`` gives each member's next dropout seed (None:
        eval mode, running statistics and no dropout)."""
        spec = self.template
        training = draw_seeds is not None
        h = x
        for index in range(1, spec.depth + 1):
            prefix = f"hidden{index}.linear."
            h = self._linear(h, prefix, training)
            for op in self.unit:
                if op == "norm":
                    h = self._norm(h, index, training)
                elif op == "act":
                    h = torch.relu(h) if spec.activation == "relu" else h
                else:
                    h = self._dropout(h, draw_seeds() if training else None)
        if spec.dropout > 0 and spec.dropout_position == "before_head":
            h = self._dropout(h, draw_seeds() if training else None)
        return self._linear(h, "classifier.", training)

    def _linear(self, h: Tensor, prefix: str, training: bool) -> Tensor:
        """One linear layer: batched where torch's bmm rounds as its mm does (:func:`batched_linear_exact`), else
        member by member with the solo call ``F.linear`` (always so in eval: long chunks take other kernels)."""
        weight, bias = self.params[prefix + "weight"], self.params.get(prefix + "bias")
        rows, members, in_features = h.shape
        if not self.exact or (
            training and batched_linear_exact(rows, members, in_features, weight.shape[1], bias is not None)
        ):
            return _FleetLinear.apply(h, weight, bias)
        shared = h.stride(1) == 0  # the eval input: one chunk seen by every member
        outputs = [
            F.linear(h[:, 0] if shared else h[:, k].contiguous(), weight[k], None if bias is None else bias[k])
            for k in range(members)
        ]
        return torch.stack(outputs, dim=1)

    # ---- optimizer
    def step(self, lrs: Sequence[float]) -> None:
        """One stacked optimizer step with member k's learning rate ``lrs[k]``: torch.optim's update, bit for bit."""
        spec = self.template
        if spec.optimizer == "sgd":
            self._sgd(lrs)
        else:
            self._adam(lrs, decoupled=spec.optimizer == "adamw")

    def _sgd(self, lrs: Sequence[float]) -> None:
        specs = self.specs
        with torch.no_grad():
            for name in self.param_names:
                param = self.params[name]
                grad = param.grad
                if grad is None:
                    continue
                ndim = param.ndim
                if specs[0].weight_decay > 0:
                    grad = grad.addcmul(param, _column([s.weight_decay for s in specs], ndim, param.device))
                if specs[0].momentum > 0:
                    momenta = _column([s.momentum for s in specs], ndim, param.device)
                    buf = self.state[name].get("momentum_buffer")
                    if buf is None:
                        buf = grad.detach().clone()
                        self.state[name]["momentum_buffer"] = buf
                    else:
                        buf.mul_(momenta).add_(grad, alpha=1)
                    grad = grad.addcmul(buf, momenta) if specs[0].nesterov else buf
                param.addcmul_(grad, _column([-lr for lr in lrs], ndim, param.device))

    def _adam(self, lrs: Sequence[float], decoupled: bool) -> None:
        specs = self.specs
        beta1, beta2 = ADAM_BETAS
        self.adam_step += 1.0
        step = self.adam_step
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
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
                if specs[0].weight_decay > 0:
                    if decoupled:
                        param.mul_(
                            _column(
                                [1 - lr * s.weight_decay for lr, s in zip(lrs, specs, strict=False)], ndim, param.device
                            )
                        )
                    else:
                        grad = grad.addcmul(param, _column([s.weight_decay for s in specs], ndim, param.device))
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
                step_size = _column([-lr / bias_correction1 for lr in lrs], ndim, param.device)
                param.add_((exp_avg * step_size).div_(denom))

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
        self.norm_blocks = _norm_blocks(self.specs)

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
    shape (:func:`_data_shapes`; in practice always one fleet), order each fleet's members by BN setting (one
    kernel call per setting: :func:`norm_setting`), train them; the members back in the order of ``specs``."""
    datasets = [load_run_dataset(spec, data_root) for spec in specs]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, data in enumerate(datasets):
        groups.setdefault(_data_shapes(data), []).append(k)
    members: list[_Member | None] = [None] * len(specs)
    for group in groups.values():

        def by_setting(k: int) -> tuple[bool, float, float]:
            momentum, eps = norm_setting(specs[k])
            return (momentum is None, 0.0 if momentum is None else momentum, eps)

        order = sorted(group, key=by_setting)
        trained = _train_fleet(
            [specs[k] for k in order], [datasets[k] for k in order], [hooks[k] for k in order], device, exact
        )
        for k, member in zip(order, trained, strict=True):
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

    def draw_seeds() -> list[int]:
        return [
            int(torch.randint(0, SEED_BOUND, (1,), generator=everyone[p].dropout_rng, dtype=torch.int64).item())
            for p in alive
        ]

    evaluate_at(0)
    call_hooks_at(0)
    for step in range(template.steps):
        step_start = time.perf_counter()
        lrs = [learning_rate(everyone[p].spec, step) for p in alive]
        indices = torch.stack([next(everyone[p].batches) for p in alive], dim=1).to(device)  # (B, K)
        if shared:
            x, labels = x_train[indices], y_train[indices]
        else:  # member k's rows of its own training set
            owner = torch.tensor(alive, dtype=torch.int64, device=device).view(1, -1)
            x, labels = x_train[owner, indices], y_train[owner, indices]
        logits = fleet.forward(x, draw_seeds)
        if fleet.exact:  # each member's loss as its solo run computes it
            losses = list(torch.stack([F.cross_entropy(logits[:, k], labels[:, k]) for k in range(len(alive))]))
        else:  # one batched reduction (off CPU: a tolerance, not bit for bit)
            per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            losses = list(per_example.view(labels.shape).mean(0))
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
        if per_member:  # (n, K, D) and (n, K)
            chunk = inputs[:, start : start + EVAL_CHUNK].transpose(0, 1)
            chunk_labels = labels[:, start : start + EVAL_CHUNK].transpose(0, 1)
        else:  # one chunk seen by every member (stride 0 over members)
            shared = inputs[start : start + EVAL_CHUNK]
            chunk = shared.unsqueeze(1).expand(len(shared), members, shared.shape[1])
            chunk_labels = labels[start : start + EVAL_CHUNK].unsqueeze(1).expand(len(shared), members)
        logits = fleet.forward(chunk, None)
        if not fleet.exact:  # off CPU: all members in one reduction, one device sync per evaluation
            flat_logits = logits.reshape(-1, logits.shape[-1])
            losses = F.cross_entropy(flat_logits, chunk_labels.reshape(-1), reduction="none").view(chunk_labels.shape)
            batched_totals += losses.double().sum(0)
            batched_correct += (logits.argmax(dim=2) == chunk_labels).sum(0)
            continue
        for k in range(members):
            member_logits = logits[:, k]
            member_labels = chunk_labels[:, k].contiguous() if per_member else chunk_labels[:, 0]
            totals[k] += F.cross_entropy(member_logits, member_labels, reduction="sum").item()
            correct[k] += int((member_logits.argmax(dim=1) == member_labels).sum())
    if not fleet.exact:
        totals, correct = batched_totals.tolist(), batched_correct.tolist()
    return [(totals[k] / count, correct[k] / count) for k in range(members)]
