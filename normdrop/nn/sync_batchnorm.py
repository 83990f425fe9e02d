"""Synchronized batch norm: batch statistics over the union of the batches of all processes of a group, on CPU
(gloo) and GPU (nccl) through the same code, with normdrop's kernels for the per-element work.

Cross-GPU batch norm was introduced for detection by Peng et al. 2018, "MegDet: A Large Mini-Batch Object
Detector"; the layer here replaces ``torch.nn.SyncBatchNorm`` (same constructor and state_dict).

Also here: ``convert_sync_batchnorm`` for a whole model, and ``run_in_process_group``, which spawns a local process
group (gloo on CPU by default) with timeouts, to try distributed code on one machine.
"""

from __future__ import annotations

import datetime
import math
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from normdrop.nn.batchnorm import _NormdropBatchNorm
from normdrop.nn.batchnorm_variants import BatchRenorm1d, BatchRenorm2d, GhostBatchNorm1d, GhostBatchNorm2d
from normdrop.nn.kernels import backend_for
from normdrop.nn.kernels.composite import channel_view, opmath_dtype, reduce_dims

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "global_batch_moments", "run_in_process_group"]


def _group_size(group: dist.ProcessGroup | None) -> int:
    """The number of processes batch statistics are shared over: 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def global_batch_moments(input: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, int]:
    r"""Per-channel mean and biased variance of the union of every process's ``input`` (N_r, C, \*), and its size.

    Each process contributes (n_r, mean_r, M2_r) with M2_r = sum (x - mean_r)^2 over its n_r values per channel
    (computed in two passes); one ``all_gather`` brings them together and they are combined exactly (Chan, Golub &
    LeVeque 1979), in float64, so processes may hold different batch sizes (even zero):

        n = sum n_r,   mean = sum n_r mean_r / n,   var = sum (M2_r + n_r (mean_r - mean)^2) / n

    Returns ``(mean, var, n)``, with mean and var in the input's compute dtype and no gradient.
    """
    channels = input.shape[1]
    count = input.numel() // channels if channels else 0
    with torch.no_grad():
        local = torch.zeros(3, channels, dtype=torch.float64, device=input.device)
        if count > 0:
            x = input.detach().to(torch.float64)
            dims = reduce_dims(input.ndim)
            mean = x.mean(dims)
            centered = x - channel_view(mean, input.ndim)
            local[0] = count
            local[1] = mean
            local[2] = (centered * centered).sum(dims)
        parts = [torch.empty_like(local) for _ in range(_group_size(group))]
        dist.all_gather(parts, local, group=group)
        counts, means, m2 = torch.stack(parts).unbind(1)
        total = counts.sum(0)
        safe_total = total.clamp(min=1.0)
        mean = (counts * means).sum(0) / safe_total
        var = (m2 + counts * (means - mean) ** 2).sum(0) / safe_total
    compute = opmath_dtype(input.dtype)
    return mean.to(compute), var.to(compute), int(total[0].item()) if channels else 0


class _SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the group's statistics; backward all-reduces the two
    per-channel sums the input gradient needs."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, eps, group):
        backend = backend_for(x)
        y, _, _ = backend.batch_norm_forward(x, weight, bias, mean, var, False, eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.count, ctx.eps, ctx.group, ctx.has_bias = count, eps, group, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, var = ctx.saved_tensors
        # The inference-mode backward gives g * gain and this process's sums: sum g (grad_bias) and
        # sum g * x_hat (grad_weight). The statistics' share of the gradient needs those sums over the group:
        #   dL/dx = gain * (g - sum_all(g) / n - x_hat * sum_all(g * x_hat) / n),   gain = weight / sqrt(var + eps)
        grad_scaled, grad_weight, grad_bias = backend_for(x).batch_norm_backward(
            grad_y, x, weight, mean, var, False, ctx.eps
        )
        compute = mean.dtype
        sums = torch.stack([grad_bias.to(torch.float64), grad_weight.to(torch.float64)])
        dist.all_reduce(sums, group=ctx.group)
        sum_g, sum_g_xhat = (s.to(compute) for s in sums)
        inv_std = torch.rsqrt(var + ctx.eps)
        gain = inv_std if weight is None else inv_std * weight.to(compute)
        slope = -gain * inv_std * sum_g_xhat / ctx.count
        offset = -gain * sum_g / ctx.count - mean * slope
        ndim = x.ndim
        grad_x = torch.addcmul(
            grad_scaled.to(compute) + channel_view(offset, ndim), x.to(compute), channel_view(slope, ndim)
        ).to(x.dtype)
        return (
            grad_x,
            grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None,
            None,
            None,
            None,
            None,
            None,
        )


class SyncBatchNorm(_NormdropBatchNorm, _BatchNorm):
    r"""Batch norm whose training statistics are those of the union of the batches of all processes in
    ``process_group`` (the default group when None); a replacement for ``torch.nn.SyncBatchNorm`` (same
    constructor and state_dict) that works on CPU too, for any input rank (N, C, \*).

    Training, with n = sum of every process's N_r * prod(spatial) values per channel:

        mu_c, var_c = mean and biased variance over the union batch   (count-aware: batch sizes may differ)
        y = (x - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c
        running_mean <- (1 - m) running_mean + m mu_c,   running_var <- (1 - m) running_var + m var_c n / (n - 1)

    so forward, input gradients and running statistics equal those of one BatchNorm over the concatenated batch;
    the running statistics stay identical on every process. ``weight.grad`` / ``bias.grad`` hold this process's
    share (their sum over the group is the union batch's gradient; DistributedDataParallel averages them).
    One ``all_gather`` of 3 x C numbers per forward, one ``all_reduce`` of 2 x C per backward.

    Without an initialised process group, with a group of one process, in eval mode (with running statistics),
    it is exactly normdrop's BatchNorm: no communication. Every process of the group must call it the same number
    of times in training mode (a collective waits for all of them), and the backward cannot be differentiated
    again.

    It subclasses torch's ``_BatchNorm``, not ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses the
    latter in CPU modules.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expected an input of shape (N, C, *), got a {input.dim()}D input")

    def _synchronizing(self) -> bool:
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return use_batch_stats and _group_size(self.process_group) > 1

    def forward(self, input: Tensor) -> Tensor:
        if not self._synchronizing():
            return super().forward(input)
        self._check_input_dim(input)
        if not input.is_floating_point():
            raise TypeError(f"SyncBatchNorm expects a floating-point input, got {input.dtype}")
        mean, var, count = global_batch_moments(input, self.process_group)
        if count <= 1:
            raise ValueError(
                f"SyncBatchNorm expected more than 1 value per channel over the process group when training, got "
                f"{count} (input size {tuple(input.shape)} on this process)"
            )
        momentum: float = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        y = _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, var, count, self.eps, self.process_group)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                unbiased = (var * (count / (count - 1))).to(self.running_var.dtype)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return y

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> torch.nn.Module:
        """See ``normdrop.nn.sync_batchnorm.convert_sync_batchnorm``."""
        return convert_sync_batchnorm(module, process_group)


def _is_plain_batch_norm(module: torch.nn.Module) -> bool:
    # Ghost BN and batch renorm compute their training statistics their own way: converting them would silently
    # change the method, so the conversion leaves them alone (and normdrop's SyncBatchNorms, already converted).
    variants = (GhostBatchNorm1d, GhostBatchNorm2d, BatchRenorm1d, BatchRenorm2d, SyncBatchNorm)
    return isinstance(module, _BatchNorm) and not isinstance(module, variants)


def convert_sync_batchnorm(module: torch.nn.Module, process_group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """Replace every plain BatchNorm{1,2,3}d (torch's or normdrop's) and every torch.nn.SyncBatchNorm in ``module``
    by a normdrop ``SyncBatchNorm`` with the same hyper-parameters, parameters, buffers, ``requires_grad`` flags
    and train/eval mode, in ``process_group`` (or the group a torch SyncBatchNorm had).

    Ghost BN, batch renorm and normdrop SyncBatchNorms are left as they are. Returns the converted module (a new
    object if ``module`` itself is a BatchNorm; otherwise ``module``, changed in place), like torch's
    ``SyncBatchNorm.convert_sync_batchnorm``.
    """
    if _is_plain_batch_norm(module):
        sync = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group if process_group is not None else getattr(module, "process_group", None),
            bias=module.bias is not None or not module.affine,
        )
        reference = module.running_mean if module.running_mean is not None else module.weight
        if reference is not None:
            sync = sync.to(device=reference.device, dtype=reference.dtype)
        sync.load_state_dict(module.state_dict())
        for name, param in module.named_parameters(recurse=False):
            getattr(sync, name).requires_grad_(param.requires_grad)
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


# -------------------------------------------------------------------------------------- local process groups


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_group_worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_method: str,
    backend: str,
    timeout_s: float,
    args: Sequence[Any],
    results: Any,
) -> None:
    """Body of one spawned process: join the group, run ``fn``, send back its pickled result or traceback."""
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        # Plain pickle: results are copied by value, not shared through memory that dies with this process.
        payload = pickle.dumps((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        payload = pickle.dumps((rank, False, traceback.format_exc()))
    # Report before leaving the group: leaving closes this rank's connections, which makes the others fail too,
    # and the caller should hear the cause first.
    results.put(payload)
    if dist.is_initialized():
        dist.destroy_process_group()


FAILURE_GRACE_S = 2.0
"""After a rank fails, how long to wait for the others' reports: one rank's error makes the others fail with
"connection closed", and the message should carry the cause whichever report arrived first."""


def _failures(results: Any, failed: dict[int, str], world_size: int) -> str:
    """The message for failed ranks: every traceback that arrives within ``FAILURE_GRACE_S``, in rank order."""
    deadline = time.monotonic() + FAILURE_GRACE_S
    while len(failed) < world_size and (remaining := deadline - time.monotonic()) > 0:
        try:
            rank, ok, value = pickle.loads(results.get(timeout=remaining))
        except queue.Empty:
            break
        if not ok:
            failed[rank] = value
    return "\n".join(f"rank {rank} of {world_size} failed:\n{failed[rank]}" for rank in sorted(failed))


def run_in_process_group(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout_s: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes that form a process group, and return
    the results in rank order.

    Processes are started with ``torch.multiprocessing``'s spawn method and join the group through
    ``tcp://127.0.0.1`` on a free port found at run time; ``fn`` and ``args`` must be picklable (``fn`` defined at
    module level) and so must the results. ``timeout_s`` bounds the whole run and every collective: past it the
    processes are terminated and a TimeoutError is raised, so a caller can never hang. An exception in any process
    is raised here as a RuntimeError carrying its traceback (and those of ranks that failed with it).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    context = mp.get_context("spawn")
    results = context.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    processes = [
        context.Process(
            target=_process_group_worker,
            args=(fn, rank, world_size, init_method, backend, timeout_s, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout_s
    received: dict[int, Any] = {}
    try:
        for process in processes:
            process.start()
        while len(received) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_in_process_group: {world_size - len(received)} of {world_size} processes did not finish "
                    f"within timeout_s={timeout_s}"
                )
            try:
                rank, ok, value = pickle.loads(results.get(timeout=min(remaining, 0.5)))
            except queue.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a process of the group exited with code {dead[0]} without a result") from None
                continue
            if not ok:
                raise RuntimeError(_failures(results, {rank: value}, world_size))
            received[rank] = value
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5.0)
            if process.is_alive():
                process.kill()
        results.close()
    return [received[rank] for rank in range(world_size)]
