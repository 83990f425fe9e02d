"""What every probe shares: the :class:`Probe` base class (what it needs, when it runs, tidy records) and the
measurement helpers that put a model in a stated mode and restore it afterwards.

A probe is a hook of :func:`normdrop.train.run` (see the "Hooks" section of ``normdrop/train.py``): an object with
``every`` and ``__call__(ctx) -> list[dict]``. The trainer restores the model, the optimizer and the RNG around each
call, so probes may run forward and backward passes freely; the helpers here also restore what they change, so a
probe called outside the trainer (in a test, on a finished model) leaves the model as it found it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from normdrop.nn.modes import batch_norms, layer_modes
from normdrop.probe_catalog import DEFAULT_EVERY, PROBES, When
from normdrop.tensors import global_norm
from normdrop.train import HookContext

BNMode = Literal["batch", "running"]
"""How batch norm layers normalize during a measurement: with the batch's statistics (train mode, what the
optimizer sees) or with their running statistics (eval mode, what inference sees)."""

Record = dict[str, Any]

ONCE_EVERY = 2**62
"""The hook ``every`` of a probe that runs once at step 0: no later step is a multiple of it."""

MASK_SEED = 20140601
"""Seed of the dropout masks a probe draws when it keeps dropout on: every forward pass of one measurement uses the
same masks, so a loss and its gradients are those of one thinned network (Srivastava et al. 2014, June 2014)."""

CONTEXT_FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(HookContext))
"""What a :class:`~normdrop.train.HookContext` offers; a probe's ``needs`` is a subset."""


class Probe(ABC):
    """One instrument: declares what it needs and when it runs, and measures at the steps it is called.

    Subclasses set ``name`` (the registry name, also the ``"probe"`` field of their records), ``needs`` (the
    :class:`~normdrop.train.HookContext` fields it reads, checked before each call) and implement :meth:`measure`;
    a probe outside :data:`normdrop.probe_catalog.PROBES` (which holds the cadences of the registered ones) may set
    ``default_when``. Every record is a flat dict of JSON values with ``"probe"`` and ``"step"`` first.

    Args:
        every: cadence in steps when the probe runs ``"every"`` k steps (ignored for ``"end"`` and ``"once"``).
        when: ``"every"``, ``"end"`` or ``"once"``; ``None``: the probe's default (the catalogue's, else
            ``default_when``).
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    default_when: ClassVar[When] = "every"

    def __init__(self, every: int = DEFAULT_EVERY, when: When | None = None) -> None:
        if when is None:  # a probe of the catalogue runs when it says; another one when its class says
            when = PROBES.get(self.name, self.default_when)
        if when not in ("every", "end", "once"):
            raise ValueError(f"when must be 'every', 'end' or 'once', got {when!r}")
        if when == "every" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int for a probe that runs every k steps, got {every!r}")
        unknown = set(self.needs) - set(CONTEXT_FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__}.needs names unknown context fields {sorted(unknown)}")
        self.when: When = when
        self.every = {"every": every, "end": 0, "once": ONCE_EVERY}[when]

    def __call__(self, ctx: HookContext) -> list[Record]:
        missing = [field for field in sorted(self.needs) if getattr(ctx, field, None) is None]
        if missing:
            raise ValueError(f"probe {self.name!r} needs {', '.join(missing)} in its context, which are missing")
        return [tidy_record(self.name, ctx.step, record) for record in self.measure(ctx)]

    @abstractmethod
    def measure(self, ctx: HookContext) -> list[Record]:
        """The measurement at ``ctx.step``: a list of flat records (``"probe"`` and ``"step"`` are added)."""

    def __repr__(self) -> str:
        cadence = f"every={self.every}" if self.when == "every" else f"when={self.when!r}"
        return f"{type(self).__name__}({cadence})"


def json_value(value: Any) -> Any:
    """A record value as a plain JSON value: 0-dim tensors and numpy scalars become Python numbers."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a probe record value must be a JSON scalar, got {type(value).__name__}: {value!r}")


def tidy_record(probe: str, step: int, record: Mapping[str, Any]) -> Record:
    """``{"probe": probe, "step": step, **record}`` with every value a JSON scalar."""
    return {"probe": probe, "step": int(step), **{key: json_value(value) for key, value in record.items()}}


# ------------------------------------------------------------------------------------------------ model modes


def bn_mode_label(model: nn.Module, bn_mode: BNMode) -> str:
    """What a record says about batch norm: ``"batch"``, ``"running"``, or ``"no_bn"`` for a model without BN."""
    return bn_mode if batch_norms(model) else "no_bn"


@contextlib.contextmanager
def measurement_mode(model: nn.Module, bn_mode: BNMode = "batch", dropout: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in a stated mode for a measurement, and restore every module's mode and every BN buffer after.

    Batch norm layers are in train mode for ``bn_mode="batch"`` (normalize with the batch's statistics) and in eval
    mode for ``"running"``; dropout layers are in train mode iff ``dropout``; every other module is in eval mode
    (:func:`normdrop.nn.modes.layer_modes`). Running statistics updated by a ``"batch"`` forward are put back, so
    the measurement leaves no trace.
    """
    if bn_mode not in ("batch", "running"):
        raise ValueError(f"bn_mode must be 'batch' or 'running', got {bn_mode!r}")
    with layer_modes(model, batch_norm=bn_mode == "batch", dropout=dropout):
        yield model


def capture_units(
    model: nn.Module,
    inputs: Tensor,
    module_types: tuple[type[nn.Module], ...],
    bn_mode: BNMode,
    where: Literal["input", "output"],
) -> dict[str, Tensor]:
    """The input or output of every module of ``module_types`` as (samples, units), in forward order, from one
    no-grad forward pass in the stated BN mode with dropout off."""
    watched = [(name, m) for name, m in model.named_modules() if isinstance(m, module_types)]
    if not watched:
        raise ValueError(f"the model has no {', '.join(t.__name__ for t in module_types)} layer to watch")
    captured: dict[str, Tensor] = {}
    if where == "input":
        handles = [
            module.register_forward_pre_hook(
                lambda _module, args, name=name: captured.__setitem__(name, units_last(args[0].detach()))
            )
            for name, module in watched
        ]
    else:
        handles = [
            module.register_forward_hook(
                lambda _module, _args, output, name=name: captured.__setitem__(name, units_last(output.detach()))
            )
            for name, module in watched
        ]
    try:
        with torch.no_grad(), measurement_mode(model, bn_mode, dropout=False):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def loss_function(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], batch: tuple[Tensor, Tensor]
) -> Callable[[dict[str, Tensor]], Tensor]:
    """``L(parameters)``: the loss of ``model`` on ``batch`` with the given parameters swapped in
    (``torch.func.functional_call``). The global RNG is seeded with :data:`MASK_SEED` for each call (and restored
    after), so with dropout on every call draws the same masks."""
    x, y = batch

    def loss_at(parameters: dict[str, Tensor]) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MASK_SEED)
            return loss_fn(functional_call(model, parameters, (x,)), y)

    return loss_at


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that require a gradient, by name, detached (sharing storage)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def gradients(loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """d loss / d input for each input; zeros for an input the loss does not depend on."""
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


# ---------------------------------------------------------------------------------------------- shapes, groups


def units_last(activations: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C): the samples of each unit (channel) along dim 0."""
    if activations.ndim == 2:
        return activations
    if activations.ndim < 2:
        raise ValueError(f"expected activations of shape (N, C, *), got {tuple(activations.shape)}")
    return activations.movedim(1, -1).reshape(-1, activations.shape[1])


def parameter_groups(model: nn.Module, by: Literal["block", "module"] = "block") -> list[tuple[str, list[str]]]:
    """The trainable parameters of ``model`` grouped into layers, in registration (forward) order.

    ``by="block"``: by top-level child (``hidden1`` = its linear + norm, ``classifier``, a residual block);
    ``by="module"``: by the module that owns the parameter (``hidden1.linear``, ``hidden1.norm``).
    Returns ``(layer name, [parameter names])`` pairs.
    """
    if by not in ("block", "module"):
        raise ValueError(f"by must be 'block' or 'module', got {by!r}")
    groups: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = name.split(".", 1)[0] if by == "block" and "." in name else name.rpartition(".")[0] or name
        groups.setdefault(layer, []).append(name)
    return list(groups.items())


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """sum_i <a_i, b_i> over two lists of same-shaped tensors, as a 0-dim float64 tensor."""
    return sum((x.detach().double() * y.detach().double()).sum() for x, y in zip(a, b, strict=True))


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """<a, b> / (||a|| ||b||) over lists of tensors; NaN when either is zero."""
    denominator = float(global_norm(a) * global_norm(b))
    return float(dot(a, b)) / denominator if denominator > 0 else math.nan
