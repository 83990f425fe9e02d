"""What one run of a *user's* model on the user's data is (``normdrop ablate``): :class:`UserRunSpec`.

A :class:`~normdrop.spec.RunSpec` names a built-in model and dataset; a user's model and data cannot be named, so a
user run is identified by fingerprints instead (computed by :mod:`normdrop.ablation.inputs`):

- ``model_fingerprint``: sha256 of the model as ``model_fn()`` returns it: its module tree (``repr``), the name,
  shape and dtype of every parameter and buffer, and the source code of every module class not defined by torch or
  normdrop (so editing ``forward`` changes it);
- ``init_fingerprint``: sha256 of the initial parameter and buffer values, ``model_fn()`` called with torch's
  generator seeded from ``derive_seed(seed, "init")`` (the initial-state recipe: a changed init changes it);
- ``data_fingerprint``: sha256 of the data (every array's dtype, shape and bytes, train and test);
- ``arm``: the surgery applied to the model (e.g. ``"remove_bn+remove_dropout"``), and the training settings.

Its :attr:`UserRunSpec.run_id` hashes all of these, so the store reuses a run exactly when all of them are equal.
The training fields are those of :class:`~normdrop.spec.RunSpec`, with the same meaning, bounds and defaults.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from normdrop.spec import TRAINING_SEMANTICS_VERSION, RunSpec

USER_RUN_KIND = "user"
"""Value of ``UserRunSpec.kind``: how a stored spec says it is a user run (``normdrop.spec.parse_spec``)."""

TRAINING_FIELDS: tuple[str, ...] = (
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "lr_step_size",
    "lr_gamma",
    "lr_min",
    "steps",
    "eval_every",
    "seed",
    "diverge_loss",
)
"""Fields a user run shares with :class:`RunSpec` (one definition: they are RunSpec's own fields)."""

_FIELDS = RunSpec.model_fields


class UserRunSpec(BaseModel):
    """Every input of one run of a user's model (see the module docstring). Frozen and strict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["user"] = USER_RUN_KIND
    model: str = Field(description="how the user named the model (e.g. 'model.py:build'); not in the run id")
    model_fingerprint: str = Field(min_length=1, description="sha256 of the model's structure and classes' source")
    init_fingerprint: str = Field(min_length=1, description="sha256 of the initial state for this seed")
    data_fingerprint: str = Field(min_length=1, description="sha256 of the training and test data")
    arm: str = Field("given", description="surgery applied to the model, knobs joined by '+' ('given': none)")
    probes: tuple[str, ...] = Field((), description="end-of-training measurements (normdrop.ablation.arms)")
    batch_size: int | None = Field(
        None, ge=1, description="examples per step (None: the batches of the user's DataLoader)"
    )
    optimizer: Any = _FIELDS["optimizer"]
    lr: Any = _FIELDS["lr"]
    momentum: Any = _FIELDS["momentum"]
    nesterov: Any = _FIELDS["nesterov"]
    weight_decay: Any = _FIELDS["weight_decay"]
    schedule: Any = _FIELDS["schedule"]
    warmup_steps: Any = _FIELDS["warmup_steps"]
    lr_step_size: Any = _FIELDS["lr_step_size"]
    lr_gamma: Any = _FIELDS["lr_gamma"]
    lr_min: Any = _FIELDS["lr_min"]
    steps: Any = _FIELDS["steps"]
    eval_every: Any = _FIELDS["eval_every"]
    seed: Any = _FIELDS["seed"]
    diverge_loss: Any = _FIELDS["diverge_loss"]

    @model_validator(mode="after")
    def _consistent(self) -> UserRunSpec:
        # The same cross-field rules as RunSpec: validate the training fields through it.
        RunSpec(**{name: getattr(self, name) for name in TRAINING_FIELDS})
        return self

    @property
    def run_id(self) -> str:
        """Stable identity: the first 16 hex digits of sha256(canonical JSON of all fields but ``model``, the name,
        + the semantics version). The same model named differently (``build`` in Python, ``model.py:build`` on the
        command line) is the same run."""
        fields = self.model_dump(mode="json", exclude={"model"})
        payload = {"training_semantics_version": TRAINING_SEMANTICS_VERSION, "user_spec": fields}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
