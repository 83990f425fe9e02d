"""Lightning callbacks for batch norm and dropout (``pip install 'normdrop[lightning]'``; works with ``lightning``
or ``pytorch_lightning``, whichever is installed).

- :class:`PreciseBN`: at the end of training epochs, re-estimate every batch norm's running statistics from data
  (``normdrop.nn.recalibrate_bn``: the population mean and unbiased variance of each BN input, Wu & Johnson 2021).
- :class:`FreezeBN`: batch norm layers keep their running statistics (eval mode: they normalize with them and do
  not update them) and, with ``affine=True``, their scale and shift, through every ``.train()`` Lightning calls.
- :class:`MCDropoutPrediction`: during ``trainer.predict``, an MC-dropout prediction of every batch
  (``normdrop.nn.mc.mc_predict``: k passes with dropout sampling and everything else in eval mode).
- :class:`ProbeCallback`: any normdrop probe (``normdrop.probes.make_probe``) run every k optimizer steps on a fixed
  batch, observing only: the model, optimizer state, modes and RNG are restored after each call, so training goes
  on exactly as without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError(
            "normdrop.integrations.lightning needs Lightning: pip install 'normdrop[lightning]'"
        ) from error

from normdrop.nn.inference import recalibrate_bn
from normdrop.nn.mc import MCPrediction, mc_predict

__all__ = ["FreezeBN", "MCDropoutPrediction", "PreciseBN", "ProbeCallback"]


def _inputs(batch: Any) -> Tensor:
    """The input of a batch: the batch itself, or the first item of a (input, target, ...) sequence."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"expected a tensor batch or an (input, target, ...) sequence, got {type(batch).__name__}")


def _positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class PreciseBN(pl.Callback):
    """Re-estimate batch norm's running statistics at the end of every ``every_n_epochs``-th training epoch.
    Lightning runs an epoch's validation before ``on_train_epoch_end``: the re-estimated statistics serve from the
    next validation on, and in the fitted model.

    Per channel over the ``n_samples`` first samples of ``data`` (default: the trainer's training dataloader):
    running_mean = mean of the BN input, running_var = its unbiased variance.

    Args:
        data: batches to estimate from (tensors or (input, target) sequences); None: the training dataloader.
        n_samples: how many samples (None: all of ``data``).
        every_n_epochs: re-estimate after every this many epochs.
    """

    def __init__(
        self, data: Iterable[Any] | None = None, n_samples: int | None = None, every_n_epochs: int = 1
    ) -> None:
        _positive(every_n_epochs, "every_n_epochs")
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2):
            raise ValueError(f"n_samples must be an int >= 2 (or None for all the data), got {n_samples!r}")
        self.data, self.n_samples, self.every_n_epochs = data, n_samples, every_n_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        data = self.data if self.data is not None else trainer.train_dataloader
        recalibrate_bn(pl_module, data, self.n_samples)


class FreezeBN(pl.Callback):
    """Freeze every batch norm layer of the module (or those of ``modules``): its running statistics always (the
    layer stays in eval mode, normalizing with them and not updating them, whatever ``.train()`` Lightning calls),
    and with ``affine=True`` its scale and shift too (``requires_grad=False``; an optimizer built before the freeze
    then leaves them unchanged, their gradient being None).

    Args:
        affine: freeze the affine parameters as well as the statistics.
        modules: the names (``named_modules``) of the layers to freeze; None: every batch norm of the module.
    """

    def __init__(self, affine: bool = False, modules: Iterable[str] | None = None) -> None:
        self.affine = affine
        self.modules = None if modules is None else tuple(modules)

    def frozen(self, pl_module: torch.nn.Module) -> list[_BatchNorm]:
        """The layers this callback freezes in ``pl_module``; a name that is not a batch norm is an error."""
        if self.modules is None:
            return [m for m in pl_module.modules() if isinstance(m, _BatchNorm)]
        layers = dict(pl_module.named_modules())
        wrong = [name for name in self.modules if not isinstance(layers.get(name), _BatchNorm)]
        if wrong:
            raise ValueError(f"FreezeBN modules must name batch norm layers; not batch norm: {', '.join(wrong)}")
        return [layers[name] for name in self.modules]

    def _freeze(self, pl_module: torch.nn.Module) -> None:
        for layer in self.frozen(pl_module):
            layer.eval()
            if self.affine:
                for parameter in (layer.weight, layer.bias):
                    if parameter is not None:
                        parameter.requires_grad_(False)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._freeze(pl_module)  # before configure_optimizers: frozen affine parameters get no gradient

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._freeze(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._freeze(pl_module)  # after any .train() in between (validation ends with one)


class MCDropoutPrediction(pl.Callback):
    """MC-dropout predictions during ``trainer.predict``: for every batch, ``mc_predict(pl_module, input, k)``
    (softmax of (N, C) logits averaged over k dropout samples, with predictive entropy, expected entropy and
    mutual information), collected in ``self.predictions`` in batch order (reset at each ``predict`` call).

    Args:
        k: samples per input.
        samples_per_pass: inputs x samples evaluated in one forward pass (None: all k at once).
        keep_samples: keep the (k, N, C) samples in each prediction.
    """

    def __init__(self, k: int = 32, samples_per_pass: int | None = None, keep_samples: bool = False) -> None:
        _positive(k, "k")
        _positive(samples_per_pass, "samples_per_pass")
        self.k, self.samples_per_pass, self.keep_samples = k, samples_per_pass, keep_samples
        self.predictions: list[MCPrediction] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.predictions = []

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with torch.no_grad():
            prediction = mc_predict(pl_module, _inputs(batch), self.k, self.samples_per_pass, self.keep_samples)
        self.predictions.append(prediction)


class ProbeCallback(pl.Callback):
    """Run a normdrop probe (a ``normdrop.probes`` instrument, or any trainer hook) after every ``every_n_steps``-th
    optimizer step (global steps k, 2k, ...), on a fixed ``probe_batch``; its records, with ``"probe"`` and
    ``"step"`` (the global step), go to ``self.records``.

    The probe sees what normdrop's trainer gives a hook (``normdrop.train.HookContext``): the module, the first
    optimizer, ``loss_fn``, ``probe_batch``, the learning rate of its first parameter group and the step; probes
    that need the lab's ``spec`` or ``dataset`` are refused. Afterwards the module's state, its modes, the optimizer
    state and the RNG are restored, so training continues as without the callback.

    Args:
        probe: the probe (e.g. ``make_probe("layer_inputs")``).
        probe_batch: an (input, target) pair of tensors.
        every_n_steps: cadence in optimizer steps (default: the probe's own ``every``).
        loss_fn: ``loss_fn(outputs, targets)``, the loss the module minimizes (default: cross-entropy).
    """

    PROVIDED = frozenset({"step", "lr", "model", "optimizer", "loss_fn", "probe_batch"})

    def __init__(
        self,
        probe: Callable[[Any], list[dict[str, Any]]],
        probe_batch: tuple[Tensor, Tensor],
        every_n_steps: int | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        needs = frozenset(getattr(probe, "needs", frozenset()))
        if needs - self.PROVIDED:
            name = getattr(probe, "name", type(probe).__name__)
            raise ValueError(
                f"probe {name!r} needs {', '.join(sorted(needs - self.PROVIDED))}, which only normdrop's trainer "
                f"provides; a Lightning callback offers {', '.join(sorted(self.PROVIDED))}"
            )
        every = getattr(probe, "every", None) if every_n_steps is None else every_n_steps
        _positive(every, "every_n_steps")
        if not (isinstance(probe_batch, tuple | list) and len(probe_batch) == 2):
            raise ValueError("probe_batch must be an (input, target) pair of tensors")
        self.probe, self.every, self.loss_fn = probe, every, loss_fn
        self.probe_batch = (probe_batch[0], probe_batch[1])
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every:
            return
        self.records.extend(self.run(pl_module, trainer.optimizers[0], step))

    def run(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> list[dict[str, Any]]:
        """One call of the probe at ``step``, restoring everything it could have changed."""
        from normdrop.train import HookContext

        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        probe_batch = tuple(t.to(device) for t in self.probe_batch)
        lr = float(optimizer.param_groups[0]["lr"])
        ctx = HookContext(None, step, lr, module, optimizer, self.loss_fn, probe_batch, None)  # type: ignore[arg-type]
        state = {key: value.clone() for key, value in module.state_dict().items()}
        optimizer_state = copy.deepcopy(optimizer.state_dict())
        modes = {m: m.training for m in module.modules()}
        grads = {p: None if p.grad is None else p.grad.clone() for p in module.parameters()}
        try:
            with torch.random.fork_rng(devices=[]):
                records = self.probe(ctx)
        finally:
            module.load_state_dict(state)
            optimizer.load_state_dict(optimizer_state)
            for m, training in modes.items():
                m.training = training
            for p, grad in grads.items():
                p.grad = grad
        name = getattr(self.probe, "name", type(self.probe).__name__)
        return [{"probe": name, "step": step, **record} for record in records]
