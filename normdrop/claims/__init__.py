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

from normdrop.claims import (
    bn_faster,
    bn_higher_lr,
    bn_less_dropout,
    bn_mechanics,
    bn_regularizes,
    bn_smooth,
    bn_stable_inputs,
    dropout_bn_shift,
    dropout_coadapt,
    dropout_ensemble,
    dropout_generalizes,
    dropout_mechanics,
    dropout_overfit,
    summary,
)
from normdrop.claims.base import Claim, ClaimData, ClaimResult
from normdrop.claims.experiment import Experiment
from normdrop.claims.results import Analysis, Figure, Measurement, RunCounts, Table, measure, not_measurable
from normdrop.claims.setting import StudySetting

_CLAIMS_MD: tuple[Claim, ...] = tuple(
    module.CLAIM
    for module in (
        bn_mechanics,
        bn_faster,
        bn_higher_lr,
        bn_stable_inputs,
        bn_smooth,
        bn_regularizes,
        bn_less_dropout,
        dropout_mechanics,
        dropout_overfit,
        dropout_generalizes,
        dropout_coadapt,
        dropout_ensemble,
        dropout_bn_shift,
        summary,
    )
)
"""The claims of docs/claims.md, in its order; each module holds one claim, its id (the module's name with dashes)."""

CLAIM_IDS: tuple[str, ...] = tuple(claim.id for claim in _CLAIMS_MD)
"""The ids of docs/claims.md, in its order."""

_REGISTRY: dict[str, Claim] = {}


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


for _claim in _CLAIMS_MD:
    register(_claim)

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
    "not_measurable",
    "register",
    "unregister",
]
