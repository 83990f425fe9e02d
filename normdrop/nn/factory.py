"""Norm and dropout layers by name: the one registry that model builders, sweep files and model surgery use.

    make_norm("batch" | "ghost" | "noisy" | "renorm" | "sync" | "frozen" | "none", num_features, dims=1, **kwargs)
    make_dropout("standard" | "channel" | "alpha" | "feature_alpha" | "gaussian" | "droppath" | "dropblock"
                 | "uout" | "concrete" | "none", p, dims=1, **kwargs)

``dims`` is the number of spatial dims of the layer's input: 0 for (N, C) features, 1 for (N, C, L), 2 for
(N, C, H, W), 3 for (N, C, D, H, W). Norms with dims 0 or 1 are the ``1d`` classes. Extra keyword arguments go to
the layer's constructor (``ghost_batch_size`` for "ghost", ``noise`` for "noisy", ``r_max`` ... for "renorm",
``block_size`` for "dropblock", ``eps`` / ``momentum`` for the BNs). ``layers="torch"`` builds torch.nn's class
where one exists, to compare against torch. ``norm_names()`` / ``dropout_names()`` list the names; ``register_norm`` /
``register_dropout`` add one. The kinds, their sources and dims, and their options are also written as plain data in
:mod:`normdrop.layer_catalog`, which specs are validated against without importing torch (a test keeps the two equal;
a registered kind is added to both).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from normdrop.layer_catalog import ALL_DIMS, DROPOUT_KINDS, LAYER_SOURCES, NORM_KINDS, add_kind
from normdrop.nn import batchnorm, dropout
from normdrop.nn.batchnorm_variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
)
from normdrop.nn.dropout_variants import ConcreteDropout, DropBlock2d, DropPath, GaussianDropout, Uout
from normdrop.nn.sync_batchnorm import SyncBatchNorm

__all__ = [
    "ACTIVATIONS",
    "DIMS",
    "LAYER_SOURCES",
    "dropout_names",
    "make_dropout",
    "make_norm",
    "norm_builder",
    "norm_defaults",
    "norm_names",
    "register_dropout",
    "register_norm",
]

DIMS = ALL_DIMS

ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "tanh": torch.nn.Tanh,
    "selu": torch.nn.SELU,
    "elu": torch.nn.ELU,
    "identity": torch.nn.Identity,
}
"""Activation name (``RunSpec.activation``, ``normdrop.layer_catalog.ACTIVATION_NAMES``) -> its module class, built
with no arguments."""

NormBuilder = Callable[..., torch.nn.Module]  # (num_features, **kwargs) -> module
DropoutBuilder = Callable[..., torch.nn.Module]  # (p, **kwargs) -> module


def _by_rank(cls_1d: NormBuilder, cls_2d: NormBuilder, cls_3d: NormBuilder | None = None) -> dict[int, NormBuilder]:
    """dims -> class: (N, C) and (N, C, L) inputs both take the 1d class."""
    table = {0: cls_1d, 1: cls_1d, 2: cls_2d}
    if cls_3d is not None:
        table[3] = cls_3d
    return table


def _identity(*_args, **_kwargs) -> torch.nn.Module:
    return torch.nn.Identity()


# name -> {layers: {dims: builder}}
_NORMS: dict[str, dict[str, dict[int, NormBuilder]]] = {
    "batch": {
        "normdrop": _by_rank(batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d),
        "torch": _by_rank(torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d),
    },
    "ghost": {"normdrop": _by_rank(GhostBatchNorm1d, GhostBatchNorm2d)},
    "noisy": {"normdrop": _by_rank(NoisyBatchNorm1d, NoisyBatchNorm2d)},
    "renorm": {"normdrop": _by_rank(BatchRenorm1d, BatchRenorm2d)},
    "sync": {"normdrop": dict.fromkeys(DIMS, SyncBatchNorm), "torch": dict.fromkeys(DIMS, torch.nn.SyncBatchNorm)},
    "frozen": {"normdrop": _by_rank(FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)},
    "none": {"normdrop": dict.fromkeys(DIMS, _identity), "torch": dict.fromkeys(DIMS, _identity)},
}


def _uout(p: float, **kwargs) -> torch.nn.Module:
    return Uout(beta=p, **kwargs)


def _concrete(p: float, **kwargs) -> torch.nn.Module:
    return ConcreteDropout(init_p=p, **kwargs)


def _channel(namespace) -> dict[int, DropoutBuilder]:
    # A channel of flat (N, C) features is one unit: channel dropout there is element-wise dropout.
    return {0: namespace.Dropout, 1: namespace.Dropout1d, 2: namespace.Dropout2d, 3: namespace.Dropout3d}


_DROPOUTS: dict[str, dict[str, dict[int, DropoutBuilder]]] = {
    "standard": {"normdrop": dict.fromkeys(DIMS, dropout.Dropout), "torch": dict.fromkeys(DIMS, torch.nn.Dropout)},
    "channel": {"normdrop": _channel(dropout), "torch": _channel(torch.nn)},
    "alpha": {
        "normdrop": dict.fromkeys(DIMS, dropout.AlphaDropout),
        "torch": dict.fromkeys(DIMS, torch.nn.AlphaDropout),
    },
    "feature_alpha": {
        "normdrop": {0: dropout.AlphaDropout, **dict.fromkeys((1, 2, 3), dropout.FeatureAlphaDropout)},
        "torch": {0: torch.nn.AlphaDropout, **dict.fromkeys((1, 2, 3), torch.nn.FeatureAlphaDropout)},
    },
    "gaussian": {"normdrop": dict.fromkeys(DIMS, GaussianDropout)},
    "droppath": {"normdrop": dict.fromkeys(DIMS, DropPath)},
    "dropblock": {"normdrop": {2: DropBlock2d}},
    "uout": {"normdrop": dict.fromkeys(DIMS, _uout)},
    "concrete": {"normdrop": dict.fromkeys(DIMS, _concrete)},
    "none": {"normdrop": dict.fromkeys(DIMS, _identity), "torch": dict.fromkeys(DIMS, _identity)},
}


def norm_names() -> tuple[str, ...]:
    """The norm kinds ``make_norm`` knows, built-in and registered."""
    return tuple(_NORMS)


def dropout_names() -> tuple[str, ...]:
    """The dropout kinds ``make_dropout`` knows, built-in and registered."""
    return tuple(_DROPOUTS)


def _lookup(
    registry: dict[str, dict[str, dict[int, Callable[..., torch.nn.Module]]]],
    what: str,
    name: str,
    dims: int,
    layers: str,
) -> Callable[..., torch.nn.Module]:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known {what}s: {', '.join(registry)}")
    if layers not in LAYER_SOURCES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_SOURCES)}, got {layers!r}")
    sources = registry[name]
    if layers not in sources:
        raise ValueError(f"{what} {name!r} has no {layers} implementation; it exists in: {', '.join(sources)}")
    by_dims = sources[layers]
    if dims not in by_dims:
        supported = ", ".join(str(d) for d in by_dims)
        raise ValueError(f"{what} {name!r} supports dims {supported} (spatial dims of the input), got {dims!r}")
    return by_dims[dims]


def norm_defaults(name: str, *, momentum: float | None, eps: float) -> dict[str, float | None]:
    """The keyword arguments every norm kind ``name`` takes from a run's ``norm_momentum`` / ``norm_eps``: ``eps``,
    and ``momentum`` unless the kind's statistics are fixed (frozen BN)."""
    kind = NORM_KINDS.get(name)
    return {"eps": eps} if kind is not None and not kind.takes_momentum else {"momentum": momentum, "eps": eps}


def norm_builder(name: str, dims: int = 1, layers: str = "normdrop") -> NormBuilder:
    """The constructor ``make_norm`` calls for (name, dims, layers); same errors as ``make_norm``."""
    return _lookup(_NORMS, "norm", name, dims, layers)


def make_norm(name: str, num_features: int, dims: int = 1, *, layers: str = "normdrop", **kwargs) -> torch.nn.Module:
    """A normalization layer of kind ``name`` over ``num_features`` channels of an input with ``dims`` spatial dims.

    "none" gives ``nn.Identity``; unknown names, unsupported dims or a kind torch lacks (``layers="torch"``) raise
    a ValueError that lists what is available.
    """
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    return norm_builder(name, dims, layers)(num_features, **kwargs)


def make_dropout(name: str, p: float = 0.5, dims: int = 1, *, layers: str = "normdrop", **kwargs) -> torch.nn.Module:
    """A dropout layer of kind ``name`` with rate ``p`` (Uout's beta, ConcreteDropout's initial rate) for an input
    with ``dims`` spatial dims.

    "none" gives ``nn.Identity``; "channel" on flat features (dims=0) is element-wise dropout; "dropblock" needs
    dims=2 (``block_size=`` as keyword). Unknown names and unsupported dims raise a ValueError listing the options.
    """
    return _lookup(_DROPOUTS, "dropout", name, dims, layers)(p, **kwargs)


def _register(
    registry: dict, catalog: dict, what: str, name: str, builders: dict[int, Callable[..., torch.nn.Module]]
) -> None:
    if name in registry:
        raise ValueError(f"{what} {name!r} is already registered")
    unknown = [d for d in builders if d not in DIMS]
    if not builders or unknown:
        raise ValueError(f"builders must map dims from {DIMS} to a constructor, got dims {list(builders)}")
    registry[name] = {"normdrop": dict(builders)}
    add_kind(catalog, name, tuple(builders))


def register_norm(name: str, builders: dict[int, NormBuilder]) -> None:
    """Add a norm kind: ``builders`` maps each supported dims to a callable ``(num_features, **kwargs) -> module``."""
    _register(_NORMS, NORM_KINDS, "norm", name, builders)


def register_dropout(name: str, builders: dict[int, DropoutBuilder]) -> None:
    """Add a dropout kind: ``builders`` maps each supported dims to a callable ``(p, **kwargs) -> module``."""
    _register(_DROPOUTS, DROPOUT_KINDS, "dropout", name, builders)
