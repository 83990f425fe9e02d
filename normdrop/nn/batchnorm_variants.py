"""Batch norm variants that torch.nn lacks, built on normdrop's batch norm op.

- GhostBatchNorm1d/2d: Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the generalization
  gap in large batch training of neural networks" (ghost batch normalization).
- BatchRenorm1d/2d: Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
  Models".
- NoisyBatchNorm1d/2d: batch norm followed by time-varying noise, the control of Santurkar, Tsipras, Ilyas & Madry
  2018, "How Does Batch Normalization Help Optimization?", section 2.1 ("noisy" BN): the next layer's input
  distribution is made unstable on purpose, to test whether stable input distributions are why BN helps.
- FrozenBatchNorm1d/2d/3d: batch norm with fixed statistics and affine parameters (buffers, not parameters), the
  layer detection and segmentation backbones fine-tune with (He et al. 2016, "Deep Residual Learning for Image
  Recognition", appendix A: BN statistics computed on ImageNet, then fixed when fine-tuning for detection).

Ghost BN and batch renorm subclass normdrop's BatchNorm classes: same parameters, buffers and state_dict keys, and
in eval mode they *are* batch norm (normalize with running_mean / running_var), so ``fold_batch_norm``,
``recalibrate_bn`` and torch's own BN utilities apply to them unchanged. Only their training forward differs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normdrop.nn import functional as F
from normdrop.nn import ops
from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d
from normdrop.nn.interop import fx_leaf_layer
from normdrop.nn.kernels.composite import channel_view
from normdrop.nn.rng import draw_seed

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "ghost_batch_sizes",
    "noise_draw",
]


def _check_values_per_channel(input: Tensor, layer: str) -> None:
    values_per_channel = input.numel() // max(input.shape[1], 1)
    if values_per_channel <= 1:
        raise ValueError(
            f"{layer} expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
        )


# ------------------------------------------------------------------------------------------------ ghost BN


def ghost_batch_sizes(batch: int, ghost_batch_size: int, spatial_size: int = 1) -> list[int]:
    """The sizes of the ghost batches a batch of ``batch`` samples is split into, in order: as many full ghost
    batches of ``ghost_batch_size`` as fit, then the remainder as a smaller last one (a DataLoader's last batch),
    unless it would hold a single value per channel (one sample of an (N, C) input, ``spatial_size`` 1), which
    cannot be normalized by its own statistics: then it joins the ghost batch before it. A batch of at most one
    ghost batch is one piece (and fails, as batch norm does, if it holds a single value per channel)."""
    full, remainder = divmod(batch, ghost_batch_size)
    if full == 0:
        return [batch]
    sizes = [ghost_batch_size] * full
    if remainder * spatial_size == 1:
        sizes[-1] += remainder
    elif remainder:
        sizes.append(remainder)
    return sizes


@fx_leaf_layer
class _GhostBatchNorm:
    """Training forward of ghost batch norm; mixed in before normdrop's BatchNorm class."""

    ghost_batch_size: int

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be a positive int, got {ghost_batch_size!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: Tensor) -> Tensor:
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch_stats:
            return super().forward(input)
        self._check_input_dim(input)
        # Each virtual batch is one BatchNorm step: its own statistics, and one update of the running statistics
        # (and of num_batches_tracked), in order -- Algorithm 1 of Hoffer et al.
        ghosts = ghost_batch_sizes(input.shape[0], self.ghost_batch_size, math.prod(input.shape[2:]))
        if len(ghosts) == 1:
            return super().forward(input)
        return torch.cat([super(_GhostBatchNorm, self).forward(ghost) for ghost in input.split(ghosts)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


_GHOST_DOC = r"""

    Training: the batch of N = k * G samples is split along dim 0 into k virtual ("ghost") batches of
    G = ``ghost_batch_size`` samples, and each is batch-normalized with its own statistics:

        y[j] = (x[j] - mu_j) / sqrt(var_j + eps) * gamma + beta,   mu_j, var_j over ghost batch j (and spatial dims)

    The running statistics take one momentum step per ghost batch, in order, with the unbiased ghost-batch
    variance (so ``num_batches_tracked`` counts ghost batches). Inference: plain batch norm with the running
    statistics. When N is not a multiple of G (a DataLoader's last batch), the remainder N mod G is a last, smaller
    ghost batch with its own statistics and its own momentum step, as in TabNet's and Ludwig's ghost batch norm;
    a remainder of one sample without spatial dims (one value per channel, which has no variance) joins the ghost
    batch before it instead. G >= N is plain batch norm.

    Hoffer, Hubara & Soudry 2017, "Train longer, generalize better".
"""


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    __doc__ = "Ghost batch norm over (N, C) or (N, C, L) inputs." + _GHOST_DOC


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    __doc__ = "Ghost batch norm over (N, C, H, W) inputs." + _GHOST_DOC


# ------------------------------------------------------------------------------------------------ noisy BN


def noise_draw(seed: int, channels: int, noise: float) -> tuple[Tensor, Tensor]:
    """The per-channel ``(scale, shift)`` of one training step of noisy BN, a pure function of the step's seed.

    ``shift_c ~ U(-noise, noise)`` and ``log scale_c ~ U(-log(1 + noise), log(1 + noise))``, independent per
    channel, drawn (shift first, then scale) from a ``torch.Generator`` seeded with ``seed``; float64 draws, so the
    draw does not depend on the layer's dtype. ``noise = 0`` gives scale 1 and shift 0."""
    generator = torch.Generator().manual_seed(seed)
    shift = (2 * torch.rand(channels, generator=generator, dtype=torch.float64) - 1) * noise
    log_scale = (2 * torch.rand(channels, generator=generator, dtype=torch.float64) - 1) * math.log1p(noise)
    return log_scale.exp(), shift


class _NoisyBatchNorm:
    """Training forward of noisy batch norm; mixed in before normdrop's BatchNorm class."""

    noise: float
    last_noise_seed: int | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        noise: float = 1.0,
        bias: bool = True,
    ) -> None:
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.noise = float(noise)
        self.last_noise_seed = None

    def forward(self, input: Tensor) -> Tensor:
        output = super().forward(input)
        if not self.training:
            return output
        # One seed per training step from torch's default generator, as normdrop's dropout layers draw their mask
        # seeds (normdrop.nn.rng.draw_seed): torch.manual_seed(run seed) makes the noise of a run reproducible.
        seed = draw_seed()
        self.last_noise_seed = seed
        scale, shift = noise_draw(seed, output.shape[1], self.noise)
        view = (1, -1) + (1,) * (output.dim() - 2)
        return output * scale.to(output).view(view) + shift.to(output).view(view)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise:g}"


_NOISY_DOC = r"""

    Training: batch norm, then a per-channel scale and shift redrawn at every training forward (one draw per
    step, shared by the batch and the spatial positions):

        y = scale_t * BN(x) + shift_t,   shift_t ~ U(-noise, noise),   log scale_t ~ U(-log(1+noise), log(1+noise))

    so the next layer's input has a non-zero mean and a non-unit variance that change from step to step
    (Santurkar et al. 2018, section 2.1). The running statistics are batch norm's (of x). The step's seed is drawn
    from torch's default generator (``last_noise_seed``; :func:`noise_draw` recomputes the draw). Inference: plain
    batch norm, no noise. ``noise = 0`` is batch norm exactly.
"""


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    __doc__ = "Noisy batch norm over (N, C) or (N, C, L) inputs." + _NOISY_DOC


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    __doc__ = "Noisy batch norm over (N, C, H, W) inputs." + _NOISY_DOC


# ----------------------------------------------------------------------------------------------- batch renorm

# Ioffe 2017, experiments: r_max = 1 and d_max = 0 (plain batch norm) for the first 5000 steps, then relaxed to reach
# r_max = 3 at step 40k and d_max = 5 at step 25k.
RENORM_R_MAX = 3.0
RENORM_D_MAX = 5.0
RENORM_WARMUP_STEPS = 5_000
RENORM_R_MAX_STEPS = 40_000
RENORM_D_MAX_STEPS = 25_000


def _ramp(start: float, final: float, step: int, warmup_steps: int, full_steps: int) -> float:
    """``start`` until ``warmup_steps``, then linear to ``final`` at ``full_steps``, ``final`` after."""
    if step < warmup_steps:
        return start
    if full_steps <= warmup_steps:
        return final
    fraction = min((step - warmup_steps) / (full_steps - warmup_steps), 1.0)
    return start + (final - start) * fraction


@fx_leaf_layer
class _BatchRenorm:
    """Training forward of batch renormalization; mixed in before normdrop's BatchNorm class."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = RENORM_R_MAX,
        d_max: float = RENORM_D_MAX,
        warmup_steps: int = RENORM_WARMUP_STEPS,
        r_max_steps: int = RENORM_R_MAX_STEPS,
        d_max_steps: int = RENORM_D_MAX_STEPS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        if not (math.isfinite(r_max) and r_max >= 1.0):
            raise ValueError(f"r_max must be a finite number >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}")
        if not (math.isfinite(d_max) and d_max >= 0.0):
            raise ValueError(f"d_max must be a finite number >= 0 (d is clipped to [-d_max, d_max]), got {d_max}")
        for name, steps in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"{name} must be a non-negative int, got {steps!r}")
        for name, steps in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if steps < warmup_steps:
                raise ValueError(
                    f"{name} (the step at which the limit is fully relaxed) must be >= warmup_steps={warmup_steps}, "
                    f"got {steps}"
                )
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) in force for the next training step, from the warm-up schedule and num_batches_tracked."""
        step = int(self.num_batches_tracked)
        r_max = _ramp(1.0, self.r_max, step, self.warmup_steps, self.r_max_steps)
        d_max = _ramp(0.0, self.d_max, step, self.warmup_steps, self.d_max_steps)
        return r_max, d_max

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        if not input.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {input.dtype}")
        _check_values_per_channel(input, type(self).__name__)
        r_max, d_max = self.current_limits()
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x_hat, mean, var = ops.batch_norm(input, None, None, None, None, True, self.eps)
        with torch.no_grad():
            # r and d are treated as constants in backward ("stop_gradient" in the paper).
            running_std = torch.sqrt(self.running_var.to(mean.dtype) + self.eps)
            running_mean = self.running_mean.to(mean.dtype)
            r = (torch.sqrt(var + self.eps) / running_std).clamp(1.0 / r_max, r_max)
            d = ((mean - running_mean) / running_std).clamp(-d_max, d_max)
            n = input.numel() // input.shape[1]
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
            unbiased_var = (var * (n / (n - 1))).to(self.running_var.dtype)
            self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)
        r, d = r.to(input.dtype), d.to(input.dtype)
        scale, shift = (r, d) if self.weight is None else (r * self.weight, d * self.weight)
        if self.bias is not None:
            shift = shift + self.bias
        return x_hat * channel_view(scale, input.ndim) + channel_view(shift, input.ndim)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}"
        )


_RENORM_DOC = r"""

    Training, per channel, with batch statistics mu_B, sigma_B = sqrt(var_B + eps) and the running ones
    mu, sigma = sqrt(running_var + eps):

        r = clip(sigma_B / sigma, 1 / r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max)   (no gradient)
        y = ((x - mu_B) / sigma_B * r + d) * gamma + beta
        running_mean <- running_mean + m (mu_B - running_mean),  running_var likewise with the unbiased var_B

    (The paper averages sigma; this layer averages the variance, as batch norm does, so its buffers mean what a
    BatchNorm's mean.) With r = 1, d = 0 it is batch norm; with unclipped r, d the output is the inference-mode
    output, whatever the batch. Inference: plain batch norm with the running statistics.

    Warm-up schedule (the paper's experiments): r_max = 1, d_max = 0 for ``warmup_steps`` training steps, then both
    limits grow linearly to ``r_max`` (reached at step ``r_max_steps``) and ``d_max`` (at ``d_max_steps``); the
    step count is ``num_batches_tracked``. Defaults are the paper's (3, 5, 5k, 40k, 25k); pass
    ``warmup_steps=r_max_steps=d_max_steps=0`` for no schedule. Running statistics are always tracked.

    Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models".
"""


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    __doc__ = "Batch renormalization over (N, C) or (N, C, L) inputs." + _RENORM_DOC


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    __doc__ = "Batch renormalization over (N, C, H, W) inputs." + _RENORM_DOC


# ------------------------------------------------------------------------------------------------ frozen BN


@fx_leaf_layer
class _FrozenBatchNorm(torch.nn.Module):
    """Batch norm with fixed statistics and affine map, all buffers (an optimizer never sees them)."""

    input_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        trainable_affine: bool = False,
    ) -> None:
        super().__init__()
        if eps < 0.0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if not isinstance(trainable_affine, bool):
            raise ValueError(f"trainable_affine must be a bool, got {trainable_affine!r}")
        self.num_features = num_features
        self.eps = eps
        self.trainable_affine = trainable_affine
        factory = {"device": device, "dtype": dtype}
        if trainable_affine:
            # Statistics frozen, gamma and beta learned: the usual way to fine-tune a BN network on small batches.
            self.weight = torch.nn.Parameter(torch.ones(num_features, **factory))
            self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_buffer("weight", torch.ones(num_features, **factory))
            self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batch_norm(
        cls, bn: torch.nn.modules.batchnorm._BatchNorm, *, trainable_affine: bool = False
    ) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s running statistics and affine parameters (1 and 0 when it has none);
        ``trainable_affine=True`` keeps the affine map as parameters that an optimizer trains."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot freeze {type(bn).__name__} without running statistics (track_running_stats)")
        frozen = cls(
            bn.num_features,
            bn.eps,
            device=bn.running_mean.device,
            dtype=bn.running_mean.dtype,
            trainable_affine=trainable_affine,
        )
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A BatchNorm's state_dict loads into a frozen one: its step counter means nothing here, and a BatchNorm
        # without affine parameters is one with weight 1 and bias 0.
        state_dict.pop(prefix + "num_batches_tracked", None)
        if prefix + "running_mean" in state_dict:
            state_dict.setdefault(prefix + "weight", torch.ones_like(self.weight))
            state_dict.setdefault(prefix + "bias", torch.zeros_like(self.bias))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def forward(self, input: Tensor) -> Tensor:
        if input.ndim not in self.input_dims:
            expected = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"{type(self).__name__} expected a {expected} input, got a {input.ndim}D input")
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        trainable = ", trainable_affine=True" if self.trainable_affine else ""
        return f"{self.num_features}, eps={self.eps}{trainable}"


_FROZEN_DOC = r"""

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, in training and inference alike. The
    statistics are buffers, never updated; weight and bias are buffers too (nothing is learned: gradients flow to
    the input only) unless ``trainable_affine=True``, which makes them parameters an optimizer trains (statistics
    frozen, gamma and beta learned). ``from_batch_norm(bn)`` freezes a trained BatchNorm; a BatchNorm state_dict
    loads directly.
"""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm over (N, C) or (N, C, L) inputs." + _FROZEN_DOC
    input_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm over (N, C, H, W) inputs." + _FROZEN_DOC
    input_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm over (N, C, D, H, W) inputs." + _FROZEN_DOC
    input_dims = (5,)


_FROZEN_FOR = {
    torch.nn.BatchNorm1d: FrozenBatchNorm1d,
    torch.nn.BatchNorm2d: FrozenBatchNorm2d,
    torch.nn.BatchNorm3d: FrozenBatchNorm3d,
}
