"""Model surgery: swap, add and remove batch norm and dropout layers in an existing ``nn.Module``, so a user can
ablate their own model.

- ``convert(model, to="normdrop" | "torch")``: torch.nn's BN / dropout classes <-> normdrop's, state kept.
- ``add_norm`` / ``add_dropout``: insert a layer (built by ``normdrop.nn.factory``) after (or before) chosen
  modules; the module is replaced by ``nn.Sequential(module, new_layer)``, so its parameters move from ``name.*``
  to ``name.0.*`` in the state_dict.
- ``remove_norm`` / ``remove_dropout``: replace chosen BN / dropout layers by ``nn.Identity`` (a DropConnect by
  the plain Linear it wraps, a ConcreteDropout by its inner layer).
- ``replace_norm`` / ``replace_dropout``: change the kind of chosen BN / dropout layers (e.g. BN -> ghost BN).

A batch norm subclass that does more than normalize (timm's ``BatchNormAct2d``: BN, then its own ``drop`` and
``act`` child modules) keeps what it does beyond BN: ``remove_norm`` and ``replace_norm`` put its child modules,
in registration order, after the new layer. Before doing so they check, on a small random input in eval and in
train mode, that the old layer computes exactly BN followed by those children; a subclass whose forward does
something else raises a ValueError naming it, never a silently different model.

Places are chosen with ``where``: None (every candidate), a glob over qualified module names as
``model.named_modules()`` gives them ("features.*", "*.bn1"), a list of names, or a predicate
``(name, module) -> bool``. Every function works on a copy unless ``inplace=True`` and returns the result.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from normdrop.nn import batchnorm, dropout
from normdrop.nn.batchnorm_variants import (
    _FROZEN_FOR,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    _FrozenBatchNorm,
)
from normdrop.nn.dropout_variants import DROPOUT_LAYER_TYPES, ConcreteDropout, DropConnect
from normdrop.nn.factory import make_dropout, make_norm, norm_builder
from normdrop.nn.sync_batchnorm import SyncBatchNorm

__all__ = [
    "TORCH_EQUIVALENTS",
    "add_dropout",
    "add_norm",
    "convert",
    "remove_dropout",
    "remove_norm",
    "replace_dropout",
    "replace_norm",
]

Where = str | Iterable[str] | Callable[[str, torch.nn.Module], bool] | None

TORCH_EQUIVALENTS: tuple[tuple[type[torch.nn.Module], type[torch.nn.Module]], ...] = (
    (torch.nn.BatchNorm1d, batchnorm.BatchNorm1d),
    (torch.nn.BatchNorm2d, batchnorm.BatchNorm2d),
    (torch.nn.BatchNorm3d, batchnorm.BatchNorm3d),
    (torch.nn.SyncBatchNorm, SyncBatchNorm),
    (torch.nn.Dropout, dropout.Dropout),
    (torch.nn.Dropout1d, dropout.Dropout1d),
    (torch.nn.Dropout2d, dropout.Dropout2d),
    (torch.nn.Dropout3d, dropout.Dropout3d),
    (torch.nn.AlphaDropout, dropout.AlphaDropout),
    (torch.nn.FeatureAlphaDropout, dropout.FeatureAlphaDropout),
)
"""(torch.nn class, normdrop class) pairs that ``convert`` swaps; the classes are matched exactly, not by
isinstance (normdrop's subclass torch's)."""

_NORM_TYPES = (_BatchNorm, _FrozenBatchNorm)


def _selector(where: Where) -> Callable[[str, torch.nn.Module], bool]:
    if where is None:
        return lambda _name, _module: True
    if isinstance(where, str):
        return lambda name, _module: fnmatch.fnmatchcase(name, where)
    if callable(where):
        return where
    names = set(where)
    return lambda name, _module: name in names


def _rebuild(
    model: torch.nn.Module,
    where: Where,
    candidate: Callable[[torch.nn.Module], bool],
    build: Callable[[torch.nn.Module], torch.nn.Module],
    inplace: bool,
) -> torch.nn.Module:
    """Replace every selected candidate module by ``build(module)`` (outermost first; a replaced module's children
    are not visited). Returns the new model."""
    model = model if inplace else copy.deepcopy(model)
    selected = _selector(where)
    if candidate(model) and selected("", model):
        return build(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        if candidate(module) and selected(name, module):
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, build(module))
            replaced.append(name)
    return model


def _copy_state(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """``target`` with ``source``'s device, dtype, tensors (where names and shapes match), requires_grad flags and
    train/eval mode."""
    reference = next(iter(source.parameters()), None)
    if reference is None:
        reference = next(iter(source.buffers()), None)
    if reference is not None:
        target = target.to(device=reference.device, dtype=reference.dtype)
    target_state = target.state_dict()
    compatible = {
        k: v for k, v in source.state_dict().items() if k in target_state and v.shape == target_state[k].shape
    }
    target.load_state_dict(compatible, strict=False)
    target_params = dict(target.named_parameters())
    for name, param in source.named_parameters():
        if name in target_params:
            target_params[name].requires_grad_(param.requires_grad)
    return target.train(source.training)


# ------------------------------------------------------------------------------------------------- convert


def _converted(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    if isinstance(module, _BatchNorm):
        kwargs = {"bias": module.bias is not None or not module.affine}
        if issubclass(cls, torch.nn.SyncBatchNorm | SyncBatchNorm):
            kwargs["process_group"] = module.process_group
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **kwargs)
    else:
        new = cls(module.p, module.inplace)
    return _copy_state(module, new)


def convert(
    model: torch.nn.Module, to: str = "normdrop", inplace: bool = False, strict: bool = True
) -> torch.nn.Module:
    """Swap torch.nn's batch norm and dropout layers for normdrop's (``to="normdrop"``) or back (``to="torch"``),
    keeping hyper-parameters, parameters, buffers, requires_grad flags and train/eval mode (a normdrop dropout's
    ``generator`` is dropped when going to torch).

    Going to torch, normdrop layers with no torch counterpart (ghost BN, batch renorm, frozen BN, the dropout
    variants) raise a ValueError naming them, unless ``strict=False``, which leaves them in place.
    """
    if to not in ("normdrop", "torch"):
        raise ValueError(f"convert: to must be 'normdrop' or 'torch', got {to!r}")
    mapping = dict(TORCH_EQUIVALENTS) if to == "normdrop" else {nd: native for native, nd in TORCH_EQUIVALENTS}
    if to == "torch" and strict:
        torch_native = {cls for pair in TORCH_EQUIVALENTS for cls in pair}
        stranded = [
            f"{name or '<model>'} ({type(module).__name__})"
            for name, module in model.named_modules()
            if isinstance(module, _NORM_TYPES + DROPOUT_LAYER_TYPES) and type(module) not in torch_native
        ]
        if stranded:
            raise ValueError(
                f"convert(to='torch'): no torch.nn counterpart for {', '.join(stranded)}; pass strict=False to leave "
                "them as they are"
            )
    return _rebuild(model, None, lambda m: type(m) in mapping, lambda m: _converted(m, mapping[type(m)]), inplace)


# ------------------------------------------------------------------------------------------------- add layers


def _output_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(output channels, spatial dims of the output) of a Linear or Conv layer."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, 0
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.out_channels, len(module.kernel_size)
    raise ValueError(
        f"cannot infer the number of features and dims after a {type(module).__name__}; pass num_features= and dims="
    )


def add_norm(
    model: torch.nn.Module,
    after: Where,
    kind: str = "batch",
    *,
    num_features: int | None = None,
    dims: int | None = None,
    inplace: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """Put a norm layer ``make_norm(kind, num_features, dims, **kwargs)`` after every module chosen by ``after``
    (None: after every Linear and ConvNd).

    ``num_features`` and ``dims`` default to the chosen module's output channels and spatial dims (Linear: features,
    0; ConvNd: out_channels, N); give them for other modules (an activation, a block). The new layer takes the
    chosen module's device, dtype and train/eval mode.
    """

    def build(module: torch.nn.Module) -> torch.nn.Module:
        features, spatial = num_features, dims
        if features is None or spatial is None:
            inferred_features, inferred_dims = _output_shape(module)
            features = inferred_features if features is None else features
            spatial = inferred_dims if spatial is None else spatial
        norm = _placed_like(module, make_norm(kind, features, spatial, **kwargs))
        return torch.nn.Sequential(module, norm)

    return _rebuild(model, after, _insertion_candidate(after), build, inplace)


def add_dropout(
    model: torch.nn.Module,
    where: Where,
    kind: str = "standard",
    p: float = 0.5,
    *,
    before: bool = False,
    dims: int | None = None,
    inplace: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """Put a dropout layer ``make_dropout(kind, p, dims, **kwargs)`` after (or, with ``before=True``, before) every
    module chosen by ``where`` (None: every Linear and ConvNd). ``dims`` defaults to the spatial dims of a Linear's
    or ConvNd's output (after) or input (before; the same for these layers); give it for other modules."""

    def build(module: torch.nn.Module) -> torch.nn.Module:
        spatial = dims if dims is not None else _output_shape(module)[1]
        layer = _placed_like(module, make_dropout(kind, p, spatial, **kwargs))
        return torch.nn.Sequential(layer, module) if before else torch.nn.Sequential(module, layer)

    return _rebuild(model, where, _insertion_candidate(where), build, inplace)


def _insertion_candidate(where: Where) -> Callable[[torch.nn.Module], bool]:
    """Where no place is named, layers go next to every Linear and ConvNd; a named place may be any module."""
    if where is None:
        return lambda module: isinstance(module, torch.nn.Linear | torch.nn.modules.conv._ConvNd)
    return lambda _module: True


def _placed_like(module: torch.nn.Module, new: torch.nn.Module) -> torch.nn.Module:
    reference = next(iter(module.parameters()), None)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    return new.train(module.training)


# ---------------------------------------------------------------------------------------------- remove layers


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES)


def _is_dropout(module: torch.nn.Module) -> bool:
    return isinstance(module, DROPOUT_LAYER_TYPES)


_PLAIN_NORM_TYPES: frozenset[type[torch.nn.Module]] = frozenset(
    {
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm2d,
        torch.nn.BatchNorm3d,
        torch.nn.SyncBatchNorm,
        batchnorm.BatchNorm1d,
        batchnorm.BatchNorm2d,
        batchnorm.BatchNorm3d,
        SyncBatchNorm,
        GhostBatchNorm1d,
        GhostBatchNorm2d,
        BatchRenorm1d,
        BatchRenorm2d,
        FrozenBatchNorm1d,
        FrozenBatchNorm2d,
        FrozenBatchNorm3d,
    }
)
"""Norm classes that only normalize: surgery replaces them by a single layer."""

_CHECK_BATCH = 4  # samples of the random input that checks a norm subclass (batch statistics need more than one)
_CHECK_SIZE = 3  # extent of each spatial dim of that input


def _plain_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A plain BN (or frozen BN) of the same kind, size and hyper-parameters as ``module``, with its state."""
    dims = _dims_of(module, _NORM_DIMS, None)
    if isinstance(module, _FrozenBatchNorm):
        twin_cls = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}[max(dims, 1)]
        twin = twin_cls(module.num_features, module.eps, trainable_affine=module.trainable_affine)
    else:
        twin_cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[max(dims, 1)]
        bias = module.bias is not None or not module.affine
        twin = twin_cls(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, bias=bias
        )
    return _copy_state(module, twin)


def _extras_match(module: torch.nn.Module, extras: list[torch.nn.Module]) -> bool:
    """Whether ``module`` computes BN followed by ``extras``, on a random input, in eval and in train mode."""
    dims = _dims_of(module, _NORM_DIMS, None)
    generator = torch.Generator().manual_seed(0)
    reference = next(iter(module.parameters()), next(iter(module.buffers()), None))
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    shape = (_CHECK_BATCH, module.num_features) + (_CHECK_SIZE,) * dims
    x = torch.randn(shape, generator=generator).to(**factory)
    for training in (False, True):
        original = copy.deepcopy(module).train(training)
        rebuilt = torch.nn.Sequential(_plain_twin(module), *copy.deepcopy(extras)).train(training)
        outputs = []
        for candidate in (original, rebuilt):
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                outputs.append(candidate(x))
        if outputs[0].shape != outputs[1].shape or not torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-4):
            return False
    return True


def _norm_extras(module: torch.nn.Module) -> list[torch.nn.Module]:
    """What a norm layer applies beyond normalizing (a BatchNormAct's dropout and activation), checked.

    A plain norm class gives ``[]``. Any other norm (a subclass) gives its child modules in registration order,
    after checking that it computes BN followed by them; otherwise a ValueError.
    """
    if type(module) in _PLAIN_NORM_TYPES:
        return []
    extras = list(module.children())
    if not _extras_match(module, extras):
        found = ", ".join(type(child).__name__ for child in extras) or "none"
        raise ValueError(
            f"{type(module).__name__} subclasses a batch norm but does not compute batch norm followed by its child "
            f"modules ({found}); surgery cannot replace it without changing what the model computes"
        )
    return extras


def _followed_by(layer: torch.nn.Module, extras: list[torch.nn.Module]) -> torch.nn.Module:
    """``layer``, or ``nn.Sequential(layer, *extras)`` when there are extras (an Identity layer is left out)."""
    if not extras:
        return layer
    if isinstance(layer, torch.nn.Identity):
        return extras[0] if len(extras) == 1 else torch.nn.Sequential(*extras)
    return torch.nn.Sequential(layer, *extras)


def remove_norm(model: torch.nn.Module, where: Where = None, inplace: bool = False) -> torch.nn.Module:
    """Replace the batch norm layers (any BatchNorm, SyncBatchNorm, ghost, renorm, frozen) chosen by ``where`` by
    ``nn.Identity``; a BN subclass with a built-in activation is replaced by its activation (see the module
    docstring)."""
    return _rebuild(model, where, _is_norm, lambda m: _followed_by(torch.nn.Identity(), _norm_extras(m)), inplace)


def _without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, DropConnect):
        linear = torch.nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        return linear.train(module.training)
    if isinstance(module, ConcreteDropout):
        return module.layer if module.layer is not None else torch.nn.Identity()
    return torch.nn.Identity()


def remove_dropout(model: torch.nn.Module, where: Where = None, inplace: bool = False) -> torch.nn.Module:
    """Remove the dropout-like layers chosen by ``where``: ``nn.Identity`` in their place, except a DropConnect
    (replaced by the plain Linear with its weights) and a ConcreteDropout wrapping a layer (replaced by that
    layer)."""
    return _rebuild(model, where, _is_dropout, _without_dropout, inplace)


# --------------------------------------------------------------------------------------------- replace layers

_NORM_DIMS = (
    (torch.nn.BatchNorm1d, 1),
    (torch.nn.BatchNorm2d, 2),
    (torch.nn.BatchNorm3d, 3),
    (FrozenBatchNorm1d, 1),
    (FrozenBatchNorm2d, 2),
    (FrozenBatchNorm3d, 3),
)
_DROPOUT_DIMS = ((torch.nn.Dropout1d, 1), (torch.nn.Dropout2d, 2), (torch.nn.Dropout3d, 3))


def _dims_of(module: torch.nn.Module, table: tuple[tuple[type, int], ...], default: int | None) -> int:
    for cls, dims in table:
        if isinstance(module, cls):
            return dims
    if default is None:
        raise ValueError(f"cannot tell the input dims of {type(module).__name__}; pass dims=")
    return default


_NORM_HYPERPARAMETERS = ("eps", "momentum", "affine", "track_running_stats")


def _accepted_keywords(builder: Callable[..., torch.nn.Module], candidates: dict[str, object]) -> dict[str, object]:
    """The entries of ``candidates`` that ``builder`` takes as keyword arguments."""
    parameters = inspect.signature(builder).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return candidates
    return {name: value for name, value in candidates.items() if name in parameters}


def replace_norm(
    model: torch.nn.Module,
    kind: str,
    where: Where = None,
    *,
    dims: int | None = None,
    inplace: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """Replace the batch norm layers chosen by ``where`` by ``make_norm(kind, num_features, dims, **kwargs)``,
    carrying over the hyper-parameters the new layer takes (eps, momentum, affine, track_running_stats; ``kwargs``
    win), and parameters and running statistics where it has them (e.g. BN -> ghost BN keeps everything; BN ->
    frozen keeps the statistics and affine map; ``kind="frozen", trainable_affine=True`` freezes the statistics and
    keeps training gamma and beta). ``dims`` defaults to the old layer's. A BN subclass with a built-in activation
    keeps it (``nn.Sequential(new, *its children)``, see the module docstring). Freezing a BN that keeps no running
    statistics raises a ValueError."""

    def build(module: torch.nn.Module) -> torch.nn.Module:
        extras = _norm_extras(module)
        if kind == "frozen" and getattr(module, "running_mean", None) is None:
            raise ValueError(
                f"cannot freeze {type(module).__name__} without running statistics (track_running_stats=False)"
            )
        spatial = dims if dims is not None else _dims_of(module, _NORM_DIMS, None)
        builder = norm_builder(kind, spatial)
        carried = {name: getattr(module, name) for name in _NORM_HYPERPARAMETERS if hasattr(module, name)}
        if getattr(module, "affine", False) and module.bias is None:
            carried["bias"] = False
        accepted = _accepted_keywords(builder, carried)
        return _followed_by(_copy_state(module, builder(module.num_features, **{**accepted, **kwargs})), extras)

    return _rebuild(model, where, _is_norm, build, inplace)


def replace_dropout(
    model: torch.nn.Module,
    kind: str,
    p: float | None = None,
    where: Where = None,
    *,
    dims: int | None = None,
    inplace: bool = False,
    **kwargs,
) -> torch.nn.Module:
    """Replace the dropout layers (torch's, normdrop's and the element/channel/path/block variants with a ``p``)
    chosen by ``where`` by ``make_dropout(kind, p, dims, **kwargs)``; ``p`` defaults to the old layer's rate and
    ``dims`` to its dims (channel dropout's, else 0)."""

    def candidate(module: torch.nn.Module) -> bool:
        return _is_dropout(module) and not isinstance(module, DropConnect | ConcreteDropout)

    def build(module: torch.nn.Module) -> torch.nn.Module:
        rate = p if p is not None else getattr(module, "p", getattr(module, "beta", None))
        spatial = dims if dims is not None else _dims_of(module, _DROPOUT_DIMS, 0)
        return make_dropout(kind, rate, spatial, **kwargs).train(module.training)

    return _rebuild(model, where, candidate, build, inplace)


def convert_frozen_batchnorm(
    module: torch.nn.Module, *, inplace: bool = False, trainable_affine: bool = False
) -> torch.nn.Module:
    """Replace every BatchNorm{1,2,3}d (torch's, normdrop's or a variant) in ``module`` by a frozen copy.

    Works on a copy of ``module`` unless ``inplace=True`` (like every surgery function) and returns the result.
    ``trainable_affine=True`` freezes only the statistics (gamma and beta stay trainable parameters). A BatchNorm
    subclass with a built-in activation (or other child modules, as timm's ``BatchNormAct2d``) keeps them: it
    becomes ``nn.Sequential(frozen, *children)``, checked to compute what the original did (see
    :func:`replace_norm`). A BatchNorm without running statistics raises a ValueError.
    """

    def is_batch_norm(_name: str, candidate: torch.nn.Module) -> bool:
        return isinstance(candidate, tuple(_FROZEN_FOR))

    return replace_norm(module, "frozen", is_batch_norm, inplace=inplace, trainable_affine=trainable_affine)
