"""What the page may send the playground, validated by pydantic and bounded in size and value.

Two kinds of message come from the page, as JSON text frames of at most ``MAX_MESSAGE_BYTES``:

- ``{"type": "settings", "id": 7, "settings": {...}}`` replaces the whole experiment (:class:`Settings`): the data,
  the shared architecture and one :class:`NetworkSettings` per network (1 to ``MAX_NETWORKS``). ``id`` is echoed
  in every frame trained under these settings, so the page knows when a change has taken effect.
- ``{"type": "control", "action": "play" | "pause" | "step" | "reset"}``.

Every field is a literal from a fixed list or a number inside bounds (depth, width, batch size, grid resolution,
training-set size...): a page cannot make the server build a large network, allocate a large grid, or name a file
or a piece of code. Anything else is answered with an error frame (:func:`error_frame`) and changes nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

MAX_MESSAGE_BYTES = 8192
"""Longest message accepted from the page (a full settings message with four networks is ~1 KiB)."""
MAX_NETWORKS = 4
MAX_DEPTH = 8
MAX_WIDTH = 64
MAX_BATCH_SIZE = 256
MAX_GRID = 80
MAX_TRAIN_SIZE_2D = 1000
MAX_TRAIN_SIZE_MNIST1D = 4000

DatasetName = Literal["spirals", "circles", "xor", "blobs", "mnist1d"]
TWO_D_DATASETS: tuple[str, ...] = ("spirals", "circles", "xor", "blobs")
NormChoice = Literal["none", "batch", "ghost"]
OptimizerChoice = Literal["sgd", "momentum", "adam"]
ActivationChoice = Literal["relu", "tanh", "gelu", "elu", "selu", "identity"]
InitChoice = Literal["default", "kaiming", "xavier", "lecun", "orthogonal"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSettings(_Strict):
    """What one network chooses: where (and whether) BN and dropout sit, and how it is optimized."""

    norm: NormChoice = "none"
    norm_position: Literal["before_act", "after_act"] = "before_act"
    ghost_batch_size: int = Field(8, ge=2, le=MAX_BATCH_SIZE)
    dropout: float = Field(0.0, ge=0.0, le=0.9)
    dropout_position: Literal["after_norm", "before_norm", "before_head"] = "after_norm"
    lr: float = Field(0.01, ge=1e-4, le=10.0)
    optimizer: OptimizerChoice = "adam"
    init: InitChoice = "default"


class Settings(_Strict):
    """One experiment: the data, the architecture every network shares, and the networks side by side.

    All networks train on the same batches in the same order and start from the same seed.
    """

    dataset: DatasetName = "spirals"
    noise: float = Field(0.1, ge=0.0, le=1.0)
    train_size: int = Field(200, ge=16, le=MAX_TRAIN_SIZE_MNIST1D)
    depth: int = Field(4, ge=1, le=MAX_DEPTH)
    width: int = Field(16, ge=2, le=MAX_WIDTH)
    activation: ActivationChoice = "relu"
    batch_size: int = Field(32, ge=2, le=MAX_BATCH_SIZE)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    grid: int = Field(40, ge=10, le=MAX_GRID)
    networks: tuple[NetworkSettings, ...] = Field(
        (NetworkSettings(), NetworkSettings(norm="batch")), min_length=1, max_length=MAX_NETWORKS
    )

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        limit = MAX_TRAIN_SIZE_2D if self.dataset in TWO_D_DATASETS else MAX_TRAIN_SIZE_MNIST1D
        if self.train_size > limit:
            raise ValueError(f"train_size={self.train_size} is above {limit}, the most the {self.dataset} set allows")
        if self.batch_size > self.train_size:
            raise ValueError(f"batch_size={self.batch_size} must not exceed train_size={self.train_size}")
        for index, network in enumerate(self.networks, start=1):
            if network.norm == "ghost" and self.batch_size % network.ghost_batch_size != 0:
                raise ValueError(
                    f"network {index}: ghost BN needs batch_size ({self.batch_size}) divisible by "
                    f"ghost_batch_size ({network.ghost_batch_size})"
                )
        return self


class SettingsMessage(_Strict):
    type: Literal["settings"]
    id: int = Field(0, ge=0, le=2**53)
    settings: Settings


class ControlMessage(_Strict):
    type: Literal["control"]
    action: Literal["play", "pause", "step", "reset"]


ClientMessage = Annotated[SettingsMessage | ControlMessage, Field(discriminator="type")]
_CLIENT_MESSAGE: TypeAdapter[SettingsMessage | ControlMessage] = TypeAdapter(ClientMessage)


class MessageError(ValueError):
    """A message from the page that is refused; its text says what was wrong."""


def parse_message(text: str) -> SettingsMessage | ControlMessage:
    """Validate one text frame from the page; MessageError (one line naming the fault) if it is refused."""
    size = len(text.encode())
    if size > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {size} bytes refused: at most {MAX_MESSAGE_BYTES} bytes are accepted")
    try:
        return _CLIENT_MESSAGE.validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise MessageError(f"invalid message: {where}: {first['msg']}") from None


def error_frame(message: str) -> str:
    """The frame that tells the page a message was refused (or a session could not be built)."""
    return json.dumps({"type": "error", "message": message})
