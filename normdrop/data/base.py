"""What every dataset module shares: the :class:`Dataset` a loader returns, the raw splits a builder hands
back, the errors and warnings, and the seed streams."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from normdrop.dataset_catalog import DATASET_NAMES, FILE_DATASETS  # noqa: F401 (re-exported)

Root = str | os.PathLike[str] | None

# Independent random streams derived from the run's seed, so that e.g. the training subset does not change when
# the label-noise fraction does.
_STREAM_GENERATE = 1
_STREAM_TEACHER = 2
_STREAM_SUBSET = 3
_STREAM_LABEL_NOISE = 4


class DatasetFileError(ValueError):
    """A dataset file exists but is not what was expected (bad magic number, truncated, wrong shape, ...)."""


class DatasetCacheWarning(UserWarning):
    """A cached dataset file could not be trusted (or written); it is regenerated and the run goes on."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split of a classification dataset, as torch tensors.

    Attributes:
        name: one of ``DATASET_NAMES``.
        x_train, x_test: float32 inputs of shape ``(n, *input_shape)``.
        y_train, y_test: int64 labels of shape ``(n,)`` in ``[0, num_classes)``.
        num_classes: number of classes (all of them, whether or not each appears in a small subset).
        input_shape: per-example input shape, channels first: ``(features,)``, ``(channels, length)`` or
            ``(channels, height, width)`` (see the module docstring).
        description: one line saying what the data are and what was done to them (subset, noise, scaling).

    The dataclass is frozen but tensors are mutable: copy before modifying them in place.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    description: str

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise ValueError(
                    f"{self.name} {split}: expected float32 inputs and int64 labels, got {x.dtype} and {y.dtype}"
                )
            if tuple(x.shape[1:]) != self.input_shape or y.shape != (x.shape[0],):
                raise ValueError(
                    f"{self.name} {split}: expected inputs (n, *{self.input_shape}) and labels (n,), "
                    f"got {tuple(x.shape)} and {tuple(y.shape)}"
                )
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"{self.name} {split}: labels must lie in [0, {self.num_classes})")

    @property
    def num_features(self) -> int:
        """Number of input values per example (what an MLP sees after flattening)."""
        return math.prod(self.input_shape)

    @property
    def in_channels(self) -> int | None:
        """Channel count of a signal or image dataset (``input_shape[0]``); None for flat feature vectors."""
        return self.input_shape[0] if len(self.input_shape) >= 2 else None

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


@dataclass(frozen=True)
class _Splits:
    """What a builder returns: numpy arrays (float32 inputs it owns, int64 labels) before the shared options."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    description: str
