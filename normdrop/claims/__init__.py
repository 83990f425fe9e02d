"""normdrop.claims: the claims of docs/claims.md, one module each, and the registry the study runs.

Each claim (a :class:`Claim`) says what it claims, asks for runs (:meth:`Claim.experiment`, from a
:class:`StudySetting`) and turns the finished runs into measurements and verdicts (:meth:`Claim.analyze`). The study
engine (:mod:`normdrop.study`) runs every registered claim; the report shows them in registry order.

Adding a claim: subclass :class:`Claim` and register an instance::

    from normdrop.claims import Claim, register

    class MyClaim(Claim):
        id = "my-claim"
        ...

    register(MyClaim())

Pointing the study at other data or another model: ``StudySetting.create(dataset="digits", overrides={"model":
"cnn1d"})`` (or ``normdrop study --dataset digits``); every claim builds its runs from the setting.
"""

from __future__ import annotations

import importlib

from normdrop.claims.base import (
    Analysis,
    Claim,
    ClaimData,
    ClaimResult,
    Experiment,
    Figure,
    Measurement,
    RunCounts,
    StudySetting,
    Table,
    measure,
    not_measurable,
)

CLAIM_IDS: tuple[str, ...] = (
    "bn-mechanics",
    "bn-faster",
    "bn-higher-lr",
    "bn-stable-inputs",
    "bn-smooth",
    "bn-regularizes",
    "bn-less-dropout",
    "dropout-mechanics",
    "dropout-overfit",
    "dropout-generalizes",
    "dropout-coadapt",
    "dropout-ensemble",
    "dropout-bn-shift",
    "summary",
)
"""The ids of docs/claims.md, in its order; the module of a claim is its id with underscores."""

_REGISTRY: dict[str, Claim] = {}


def module_name(claim_id: str) -> str:
    """``normdrop.claims.<id with underscores>``."""
    return f"normdrop.claims.{claim_id.replace('-', '_')}"


def register(claim: Claim, *, replace: bool = False) -> Claim:
    """Add a claim to the study (``replace=True`` swaps out a registered claim with the same id)."""
    if not isinstance(claim, Claim):
        raise TypeError(f"expected a Claim instance, got {type(claim).__name__}")
    if claim.id in _REGISTRY and not replace:
        raise ValueError(f"claim {claim.id!r} is already registered; pass replace=True to swap it")
    _REGISTRY[claim.id] = claim
    return claim


def unregister(claim_id: str) -> None:
    """Remove a claim from the registry."""
    if claim_id not in _REGISTRY:
        raise KeyError(f"no claim {claim_id!r} registered; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[claim_id]


def get(claim_id: str) -> Claim:
    """The registered claim with this id."""
    try:
        return _REGISTRY[claim_id]
    except KeyError:
        raise KeyError(f"no claim {claim_id!r} registered; registered: {sorted(_REGISTRY)}") from None


def all_claims() -> list[Claim]:
    """Registered claims in order (those of docs/claims.md first, in its order, then added ones); ``summary`` last,
    since it reads the others' results."""
    claims = list(_REGISTRY.values())
    return [c for c in claims if c.id != "summary"] + [c for c in claims if c.id == "summary"]


for _claim_id in CLAIM_IDS:
    register(importlib.import_module(module_name(_claim_id)).CLAIM)

__all__ = [
    "CLAIM_IDS",
    "Analysis",
    "Claim",
    "ClaimData",
    "ClaimResult",
    "Experiment",
    "Figure",
    "Measurement",
    "RunCounts",
    "StudySetting",
    "Table",
    "all_claims",
    "get",
    "measure",
    "module_name",
    "not_measurable",
    "register",
    "unregister",
]
