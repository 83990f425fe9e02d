"""What one training run is: its spec (the inputs, whose hash is the run's identity) and its result.

A :class:`RunSpec` names everything that decides a run's numbers: data, architecture, optimizer, schedule,
step budget and seed. Two equal specs give bitwise-equal metrics on the same machine (see
:func:`normdrop.train.run`), so the store can key runs by :attr:`RunSpec.run_id` and reuse finished ones.

Machine-specific inputs that do not change the numbers (the directory holding real dataset files, the number of
torch threads) are deliberately *not* spec fields.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from normdrop.dataset_catalog import DATASET_NAMES, check_dataset_options
from normdrop.layer_catalog import ACTIVATION_NAMES, DROPOUT_KINDS, LAYER_SOURCES, NORM_KINDS, surely_accepted
from normdrop.probe_catalog import DEFAULT_EVERY, KEEPABLE, expand_probes, kept_by_default

TRAINING_SEMANTICS_VERSION: int = 1
"""Bump whenever the trainer or the builders change what a given spec computes; it is part of every run id."""

ModelName = Literal["mlp", "cnn1d", "cnn2d", "resnet"]
DropoutPosition = Literal["after_norm", "before_norm", "before_head"]
NormPosition = Literal["before_act", "after_act"]
Init = Literal["default", "kaiming", "xavier", "lecun", "orthogonal"]
Keepable = Literal[KEEPABLE]  # type: ignore[valid-type]
OptimizerName = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "step", "cosine"]
RunStatus = Literal["finished", "diverged", "failed"]

_CONV_MODELS = ("cnn1d", "cnn2d", "resnet")
# Spatial dims of the layers each model builds (normdrop.models): the dims its norm and dropout layers are made for.
_MODEL_SPATIAL_DIMS = {"mlp": 0, "cnn1d": 1, "cnn2d": 2, "resnet": 2}

MAX_STEPS: int = 100_000_000
"""Upper bound of ``RunSpec.steps``: a run of more steps is a typo (10**12 steps would not finish in a lifetime)."""
_PROBE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RunSpec(BaseModel):
    """Every input of one training run. Frozen, hashable, and strict: unknown fields are errors.

    The defaults are the MNIST-1D MLP baseline of Greydanus (2020): 40 -> 100 -> 100 -> 10 ReLU network,
    Adam with learning rate 1e-2, batches of 100 (the paper trains for 6000 steps; the default here is shorter).
    """

    # allow_inf_nan=False: every float field (and every option value) must be finite; inf/NaN would also make the
    # run id, a hash of the spec's JSON, impossible to compute.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # data
    dataset: str = Field("mnist1d", description="dataset name (normdrop.data.DATASET_NAMES)")
    train_size: int | None = Field(None, ge=1, description="use only this many training examples")
    label_noise: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of training labels replaced at random")
    standardize: bool = Field(True, description="standardize inputs with statistics of the training set")
    data_seed: int = Field(0, ge=0, description="seed of synthetic data, the training subset and the label noise")
    dataset_options: tuple[tuple[str, int | float], ...] = Field(
        (), description="size/noise knobs of the synthetic datasets, as (name, value) pairs"
    )

    # architecture
    model: ModelName = Field("mlp", description="architecture: mlp, cnn1d, cnn2d or resnet")
    depth: int = Field(
        2, ge=1, le=64, description="mlp: hidden layers; cnn: conv layers; resnet: residual blocks per stage"
    )
    width: int = Field(100, ge=1, le=4096, description="hidden units (mlp) or channels of the first stage (cnn)")
    activation: str = Field("relu", description="nonlinearity of every hidden layer (normdrop.nn.factory.ACTIVATIONS)")
    init: Init = Field("default", description="weight init: default (torch's), kaiming, xavier, lecun, orthogonal")
    norm: str = Field(
        "none", description="normalization layer: none, batch, ghost, renorm, frozen, ... (normdrop.nn.factory)"
    )
    norm_options: tuple[tuple[str, int | float], ...] = Field(
        (), description="extra norm arguments as (name, value) pairs, e.g. ghost_batch_size for ghost BN"
    )
    norm_position: NormPosition = Field("before_act", description="norm before or after the activation")
    norm_momentum: float | None = Field(
        0.1, gt=0.0, le=1.0, description="running-statistics momentum of the norm (None: cumulative average)"
    )
    norm_eps: float = Field(1e-5, gt=0.0, description="epsilon added to the variance by the norm")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability p (0 disables dropout)")
    dropout_kind: str = Field(
        "standard",
        description="standard, channel, alpha, feature_alpha, gaussian, droppath, dropblock, uout, ... "
        "(normdrop.nn.factory)",
    )
    dropout_options: tuple[tuple[str, int | float], ...] = Field(
        (), description="extra dropout arguments as (name, value) pairs, e.g. block_size for dropblock"
    )
    dropout_position: DropoutPosition = Field(
        "after_norm",
        description="in every hidden layer after the norm, before the norm, or only once before the classifier",
    )
    layers: str = Field(
        "normdrop", description="take BatchNorm/Dropout from normdrop.nn or from torch.nn (nn.factory.LAYER_SOURCES)"
    )

    # optimization
    optimizer: OptimizerName = Field("adam", description="sgd, adam or adamw")
    lr: float = Field(1e-2, gt=0.0, description="peak learning rate")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD with momentum > 0)")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 penalty (sgd, adam) or decoupled decay (adamw)")
    schedule: Schedule = Field("constant", description="learning-rate schedule after warmup")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from lr/warmup_steps to lr")
    lr_step_size: int = Field(
        1000, ge=1, description="step schedule: multiply the lr by lr_gamma every this many steps"
    )
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0, description="step schedule: decay factor")
    lr_min: float = Field(0.0, ge=0.0, description="cosine schedule: final learning rate")
    batch_size: int = Field(100, ge=1, description="examples per optimizer step")
    steps: int = Field(2000, ge=1, le=MAX_STEPS, description="optimizer steps")
    eval_every: int = Field(250, ge=1, description="evaluate on the full train and test sets every this many steps")
    seed: int = Field(0, ge=0, description="seed of weight init, batch order and dropout masks")
    diverge_loss: float = Field(
        100.0, gt=0.0, description="a batch loss above this (or non-finite) stops the run as diverged"
    )

    # instruments
    probes: tuple[str, ...] = Field((), description="names of probes to attach (normdrop.probe_catalog.PROBES)")
    probe_every: int = Field(DEFAULT_EVERY, ge=1, description="run the probes every this many steps")
    probe_batch_size: int = Field(256, ge=1, description="size of the fixed probe batch given to probes and hooks")
    keep: tuple[Keepable, ...] = Field(
        (),
        description="what the store keeps of the run besides metrics and probe records: final_weights; "
        "when not given, what its probes need (normdrop.probe_catalog.KEPT_WITH)",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_keep(cls, data: Any) -> Any:
        # A spec that does not say what it keeps keeps what its probes need, so the same run id always stores the
        # same things, whoever runs it (unknown probe names are left to the probes validator to report).
        if isinstance(data, Mapping) and data.get("keep") is None:
            try:
                probes = expand_probes(data.get("probes", ()))
            except (TypeError, ValueError):
                return data
            return {**data, "keep": kept_by_default(probes)}
        return data

    @field_validator("dataset", "norm", "dropout_kind", "activation", "layers")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        what, names, listing = _name_table(info.field_name)
        if value not in names:
            raise ValueError(f"unknown {what} {value!r}; expected one of {listing}")
        return value

    @field_validator("dataset_options", "norm_options", "dropout_options", mode="before")
    @classmethod
    def _options_as_pairs(cls, value: Any) -> Any:
        # A mapping is accepted for convenience and stored as sorted pairs, so the spec stays hashable and the
        # order in which options are given does not change the run id.
        pairs = value.items() if isinstance(value, Mapping) else value
        return tuple(sorted((str(key), option) for key, option in pairs))

    @field_validator("keep")
    @classmethod
    def _canonical_keep(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(value)))

    @field_validator("probes")
    @classmethod
    def _canonical_probes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _PROBE_NAME.match(name):
                raise ValueError(f"probe name {name!r} must be lower_snake_case")
        # Presets expand to their probes; sorted and unique, so listing order does not change the run id.
        return expand_probes(value)

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        for field_name in ("dataset_options", "norm_options", "dropout_options"):
            option_names = [name for name, _ in getattr(self, field_name)]
            if len(set(option_names)) != len(option_names):
                raise ValueError(f"{field_name} names must be unique, got {option_names}")
        if self.dropout_kind in ("channel", "feature_alpha") and self.model not in _CONV_MODELS:
            raise ValueError(
                f"dropout_kind={self.dropout_kind!r} drops whole channels and needs a conv model "
                f"({', '.join(_CONV_MODELS)}), got model={self.model!r}"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0.0):
            raise ValueError(
                f"nesterov=True needs optimizer='sgd' and momentum > 0, got optimizer={self.optimizer!r} "
                f"and momentum={self.momentum}"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than steps={self.steps}")
        if self.schedule == "cosine" and self.lr_min > self.lr:
            raise ValueError(f"lr_min={self.lr_min} must not exceed lr={self.lr}")
        _check_dataset_options(self)
        _check_layer_options(self)
        return self

    @property
    def run_id(self) -> str:
        """Stable identity: the first 16 hex digits of sha256(canonical JSON of all fields + semantics version).

        ``keep`` enters the hash only when it differs from what the spec's probes keep by default, so the ids of
        specs written before the field existed are unchanged (and they stored exactly that default).
        """
        fields = self.model_dump(mode="json")
        if self.keep == kept_by_default(self.probes):
            del fields["keep"]
        payload = {"training_semantics_version": TRAINING_SEMANTICS_VERSION, "spec": fields}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_dataset_options(spec: RunSpec) -> None:
    """The dataset's own check of its options (names it knows, value ranges), run when the spec is made."""
    check_dataset_options(spec.dataset, dict(spec.dataset_options))


def _check_layer_options(spec: RunSpec) -> None:
    """Check that the spec's norm and dropout layers can be built with the keyword arguments the model builder
    (``normdrop.models``) will pass: an unknown option, a missing required one (``ghost`` without
    ``ghost_batch_size``) or a value the layer rejects fails here, with the layer's own message, not mid-run.

    The common case is decided without torch: when :func:`normdrop.layer_catalog.surely_accepted` vouches for the
    arguments (a kind that exists for the model's dims, no options or options whose values pass the catalog's rules,
    which are at least as strict as the layers'), nothing is built. Otherwise the layer is built once, on one
    feature, and its error is the message; so the messages do not depend on the catalog."""
    dims = _MODEL_SPATIAL_DIMS[spec.model]
    norm_options = dict(spec.norm_options)
    if spec.norm == "none":
        if norm_options:
            raise ValueError(f"norm='none' takes no norm_options, got {norm_options}")
    elif not surely_accepted(NORM_KINDS.get(spec.norm), spec.layers, dims, norm_options):
        from normdrop.nn.factory import make_norm, norm_defaults

        kwargs = {**norm_defaults(spec.norm, momentum=spec.norm_momentum, eps=spec.norm_eps), **norm_options}
        try:
            make_norm(spec.norm, 1, dims, layers=spec.layers, **kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"norm={spec.norm!r} with norm_options={norm_options}: {error}") from error
    dropout_options = dict(spec.dropout_options)
    if spec.dropout_kind == "none":
        if dropout_options:
            raise ValueError(f"dropout_kind='none' takes no dropout_options, got {dropout_options}")
        return
    dropout_dims = 0 if spec.dropout_position == "before_head" else dims
    if surely_accepted(DROPOUT_KINDS.get(spec.dropout_kind), spec.layers, dropout_dims, dropout_options):
        return
    from normdrop.nn.factory import make_dropout

    # dropout=0 builds no layer, but a grid over p often includes 0 beside options for the others: check the options
    # with a rate the layer accepts.
    rate = spec.dropout if spec.dropout > 0 else 0.5
    try:
        make_dropout(spec.dropout_kind, rate, dropout_dims, layers=spec.layers, **dropout_options)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"dropout_kind={spec.dropout_kind!r} with dropout_options={dropout_options}: {error}"
        ) from error


@dataclass
class RunResult:
    """What one run produced.

    ``metrics`` is long format ``(step, name, value)``; step ``t`` means "measured at the parameters after ``t``
    optimizer updates". ``summary`` holds the final evaluation (``None`` values when the run did not finish).
    """

    run_id: str
    spec: RunSpec | UserRunSpec
    status: RunStatus
    diverged_step: int | None = None
    error: str | None = None
    metrics: list[tuple[int, str, float]] = field(default_factory=list)
    probe_records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, float | bool | None] = field(default_factory=dict)
    wall_time: float = 0.0
    artifacts: dict[str, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict form (the spec as a dict of its fields, artifacts base64); non-finite floats are kept as
        Python floats."""
        data = asdict(self)
        data["spec"] = self.spec.model_dump(mode="json")
        data["metrics"] = [list(row) for row in self.metrics]
        data["artifacts"] = {name: base64.b64encode(blob).decode("ascii") for name, blob in self.artifacts.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_dict`."""
        fields = dict(data)
        fields["spec"] = parse_spec(fields["spec"])
        fields["metrics"] = [(int(step), str(name), float(value)) for step, name, value in fields["metrics"]]
        fields["artifacts"] = {name: base64.b64decode(text) for name, text in fields.get("artifacts", {}).items()}
        return cls(**fields)


def _name_table(field_name: str) -> tuple[str, tuple[str, ...], str]:
    """(what the field names, the valid names, how an error lists them) for a field naming a dataset or a layer.

    The names come from the torch-free catalogs (:mod:`normdrop.dataset_catalog`, :mod:`normdrop.layer_catalog`),
    which ``normdrop.data`` and ``normdrop.nn.factory`` are kept equal to, so validating a spec imports no torch.
    """
    if field_name == "dataset":
        return "dataset", DATASET_NAMES, ", ".join(DATASET_NAMES)
    if field_name == "norm":
        return "norm", tuple(NORM_KINDS), str(sorted(NORM_KINDS))
    if field_name == "dropout_kind":
        return "dropout kind", tuple(DROPOUT_KINDS), str(sorted(DROPOUT_KINDS))
    if field_name == "activation":
        return "activation", ACTIVATION_NAMES, ", ".join(ACTIVATION_NAMES)
    return "layer source", LAYER_SOURCES, ", ".join(LAYER_SOURCES)


def parse_spec(data: Mapping[str, Any]) -> RunSpec | UserRunSpec:
    """A stored spec's fields back as a spec: a :class:`UserRunSpec` (a run of a user's model,
    ``kind == "user"``) or a :class:`RunSpec`."""
    if data.get("kind") == "user":
        return UserRunSpec.model_validate(data)
    return RunSpec.model_validate(data)


# ---- a run of a user's model on the user's data (normdrop ablate) -------------------------------------------

# What one run of a *user's* model on the user's data is (``normdrop ablate``): :class:`UserRunSpec`.
#
# A :class:`~normdrop.spec.RunSpec` names a built-in model and dataset; a user's model and data cannot be named, so a
# user run is identified by fingerprints instead (computed by :mod:`normdrop.ablation.inputs`):
#
# - ``model_fingerprint``: sha256 of the model as ``model_fn()`` returns it: its module tree (``repr``), the name,
#   shape and dtype of every parameter and buffer, and the source code of every module class not defined by torch or
#   normdrop (so editing ``forward`` changes it);
# - ``init_fingerprint``: sha256 of the initial parameter and buffer values, ``model_fn()`` called with torch's
#   generator seeded from ``derive_seed(seed, "init")`` (the initial-state recipe: a changed init changes it);
# - ``data_fingerprint``: sha256 of the data (every array's dtype, shape and bytes, train and test);
# - ``arm``: the surgery applied to the model (e.g. ``"remove_bn+remove_dropout"``), and the training settings.
#
# Its :attr:`UserRunSpec.run_id` hashes all of these, so the store reuses a run exactly when all of them are equal.
# The training fields are those of :class:`~normdrop.spec.RunSpec`, with the same meaning, bounds and defaults.

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
