"""Batch normalization layers (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift"), drop-in replacements for torch.nn.BatchNorm{1,2,3}d.

They subclass torch's classes (and so ``_BatchNorm``): constructor, parameters, buffers, state_dict keys, repr and
input checks are torch's, so ``isinstance`` checks (``SyncBatchNorm.convert_sync_batchnorm``,
``torch.optim.swa_utils.update_bn``, ``fuse_conv_bn_eval``) keep working. The forward is normdrop's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normdrop.nn import functional as F
from normdrop.nn.interop import fx_leaf_call, scripted_batch_norm

_FORMULAS = r"""

    Training, per channel c over the batch (and spatial) dims, with n values per channel:

        mu_c = mean(x_c),   var_c = mean((x_c - mu_c)^2)        (biased, used to normalize)
        y = (x - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c
        running_mean <- (1 - m) running_mean + m mu_c
        running_var  <- (1 - m) running_var  + m var_c * n / (n - 1)   (unbiased)

    with m = momentum, or m = 1 / num_batches_tracked (a cumulative average) when momentum is None.
    Inference (``eval()``), if track_running_stats: the same y with running_mean / running_var in place of
    mu_c / var_c; without running statistics, batch statistics are used in both modes.
"""


_ABSENT = object()


def _member(store: dict[str, Tensor | None], module: torch.nn.Module, name: str) -> Tensor | None:
    """``module.<name>`` read from its parameter or buffer dict: ``nn.Module.__getattr__`` costs ~0.5 us per read,
    as long as a tiny layer's kernel; a name moved out of the dict (e.g. by a parametrization) is read the slow way."""
    value = store.get(name, _ABSENT)
    return getattr(module, name) if value is _ABSENT else value


class _NormdropBatchNorm:
    """The forward shared by the three ranks; mixed in before torch's class so it takes precedence."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        if isinstance(input, torch.fx.Proxy):  # symbolic tracing: a leaf module, as torch.nn's layers are
            return fx_leaf_call(self, input)
        return self._eager_forward(input)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """``_eager_forward`` in TorchScript: the same statistics and updates, through ``normdrop::batch_norm``."""
        self._check_input_dim(input)
        momentum = 0.0
        if self.momentum is not None:
            momentum = self.momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / float(num_batches_tracked.item())
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return scripted_batch_norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )

    @torch.jit.unused
    def _eager_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        buffers, parameters = self._buffers, self._parameters
        running_mean, running_var = _member(buffers, self, "running_mean"), _member(buffers, self, "running_var")
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = _member(buffers, self, "num_batches_tracked")
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    momentum = 1.0 / num_batches_tracked.double()
        # Batch statistics in training, and in eval when there are no running statistics to use.
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep_running = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            _member(parameters, self, "weight"),
            _member(parameters, self, "bias"),
            use_batch_stats,
            momentum,
            self.eps,
        )


class BatchNorm1d(_NormdropBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = "Batch norm over a 2D (N, C) or 3D (N, C, L) input; drop-in for torch.nn.BatchNorm1d." + _FORMULAS


class BatchNorm2d(_NormdropBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = "Batch norm over a 4D (N, C, H, W) input; drop-in for torch.nn.BatchNorm2d." + _FORMULAS


class BatchNorm3d(_NormdropBatchNorm, torch.nn.BatchNorm3d):
    __doc__ = "Batch norm over a 5D (N, C, D, H, W) input; drop-in for torch.nn.BatchNorm3d." + _FORMULAS
