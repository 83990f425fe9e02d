"""Datasets for the lab: generated offline out of the box, plus loaders for real files the user already has.

Every dataset comes back as a :class:`Dataset` of torch tensors (float32 inputs, int64 labels), split into train
and test, through one entry point, :func:`load_dataset`. The names (``DATASET_NAMES``):

- ``mnist1d``: MNIST-1D (Greydanus 2020, "Scaling down deep learning", arXiv:2011.14439): ten 1-D templates
  (one per digit) padded, dilated, scaled, translated, sheared and noised into 40-sample signals. Generated locally
  by the ``mnist1d`` package's ``make_dataset`` with its default arguments (5000 signals, seed 42, first 4000 for
  train, last 1000 for test) and cached in the user's cache directory (:func:`cache_dir`) after the first call.
- ``digits``: scikit-learn's bundled handwritten digits (UCI optdigits test set): 1797 8x8 images with 17 grey
  levels, 10 classes. A fixed stratified split (independent of ``seed``): 1437 train, 360 test.
- ``blobs``: Gaussian blobs; one centre per class drawn from N(0, I), within-class noise N(0, noise^2 I).
- ``spirals``: 2-D interleaved spiral arms, one per class, with Gaussian noise on the coordinates.
- ``teacher``: teacher-student; Gaussian inputs N(0, I) labelled by the argmax of a random, fixed ReLU MLP.
- ``mnist``, ``fashion-mnist``: read from IDX files (gzipped or not) in a directory the user gives (``root=``).
- ``cifar10``: read from the python pickle batches of CIFAR-10 in ``root/cifar-10-batches-py/`` or ``root``.

Generated data are deterministic given ``seed`` (except MNIST-1D and digits, which are fixed datasets); the
synthetic sets take their size and noise knobs as keyword options (``SYNTHETIC_DEFAULTS``).

``input_shape`` convention: the per-example shape of ``x_train`` / ``x_test``, channels first as torch's layers
expect. Flat feature vectors are ``(num_features,)`` (blobs, spirals, teacher); 1-D signals are
``(channels, length)`` (MNIST-1D: ``(1, 40)``); images are ``(channels, height, width)`` (digits ``(1, 8, 8)``,
MNIST ``(1, 28, 28)``, CIFAR-10 ``(3, 32, 32)``). So ``len(input_shape)`` says which kind of model applies,
``input_shape[0]`` is the channel count of signals and images (``Dataset.in_channels``), and an MLP flattens to
``Dataset.num_features`` inputs.

Nothing here touches the network. Corrupt or missing input files raise :class:`DatasetFileError` (a ValueError)
or FileNotFoundError, with the file's path in the message; a corrupt cache file is never trusted: it is reported
with a :class:`DatasetCacheWarning` and regenerated.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import math
import numbers
import os
import pickle
import random
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from torch import Tensor

DATASET_NAMES: tuple[str, ...] = (
    "mnist1d",
    "digits",
    "blobs",
    "spirals",
    "teacher",
    "mnist",
    "fashion-mnist",
    "cifar10",
)
FILE_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10")
Root = str | os.PathLike[str] | None

# Size and noise knobs of the synthetic sets: the keyword options load_dataset accepts, with their defaults.
# An option's type is its default's type (int or float).
SYNTHETIC_DEFAULTS: dict[str, dict[str, int | float]] = {
    "blobs": {"n_train": 1000, "n_test": 1000, "n_features": 10, "n_classes": 4, "noise": 0.5},
    "spirals": {"n_train": 1000, "n_test": 1000, "n_classes": 3, "noise": 0.05, "n_turns": 1.0},
    "teacher": {
        "n_train": 1000,
        "n_test": 1000,
        "n_features": 20,
        "n_classes": 10,
        "teacher_width": 100,
        "teacher_depth": 2,
        "noise": 0.0,
    },
}

CACHE_DIR_ENV = "NORMDROP_CACHE_DIR"
MNIST1D_CACHE_FILE = "mnist1d-default-v1.npz"  # bump the suffix if the cached arrays' meaning changes
MNIST1D_NUM_TRAIN = 4000
MNIST1D_NUM_TEST = 1000
MNIST1D_LENGTH = 40
DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0  # the digits split is a property of the dataset, not of the run's seed

# Independent random streams derived from the run's seed, so that e.g. the training subset does not change when
# the label-noise fraction does.
_STREAM_GENERATE = 1
_STREAM_TEACHER = 2
_STREAM_SUBSET = 3
_STREAM_LABEL_NOISE = 4

_TEACHER_REFERENCE_SIZE = 10_000  # inputs used to centre and scale the teacher's logits (balances the classes)
_STD_FLOOR = 1e-8  # a feature this constant on train is left unscaled instead of divided by ~0
_STATS_CHUNK = 4096  # examples per chunk when accumulating squared deviations (bounds float64 temporaries)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_SUBDIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # <root>/<subdir>/raw also searched
_MNIST_IMAGE_SIZE = (28, 28)
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_BATCH = "test_batch"
_CIFAR10_SHAPE = (3, 32, 32)
# The only globals a CIFAR-10 batch pickle may name: numpy's array reconstructors (old and new module paths) and
# the codec protocol-2 pickles use for bytes. Anything else is refused, so a file cannot run code when loaded.
_CIFAR10_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


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


def load_dataset(
    name: str,
    *,
    root: Root = None,
    train_size: int | None = None,
    label_noise: float = 0.0,
    standardize: bool = True,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """Load (or generate) a dataset by name and apply the options the experiments need.

    Args:
        name: one of ``DATASET_NAMES``.
        root: directory holding the files of ``mnist``, ``fashion-mnist`` or ``cifar10`` (required for those,
            ignored by the others). MNIST files are looked up in ``root`` and ``root/MNIST/raw`` (Fashion-MNIST:
            ``root/FashionMNIST/raw``) under the standard names ``train-images-idx3-ubyte`` etc., with or without
            ``.gz``; CIFAR-10 batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) in
            ``root/cifar-10-batches-py`` or ``root``.
        train_size: keep a stratified random subset of this many training examples (at least one per class
            present, class proportions otherwise kept; see :func:`stratified_subset`), drawn from ``seed``;
            None keeps the whole training split.
        label_noise: fraction in [0, 1] of training labels (after subsetting) replaced by a different class drawn
            uniformly; exactly ``round(label_noise * n_train)`` labels change. Test labels are never touched.
            For one seed, the flipped examples of a smaller fraction are a subset of those of a larger one.
        standardize: subtract the mean and divide by the standard deviation (population, ddof=0) fitted on the
            training split only, per feature for flat inputs and per channel for signals and images; the same
            statistics are applied to the test split. False leaves inputs in their natural scale
            (pixels in [0, 1]; MNIST-1D as generated).
        seed: seeds the synthetic data, the training subset and the label noise (independent streams).
        **options: size and noise knobs of the synthetic sets; see ``SYNTHETIC_DEFAULTS`` for names and defaults.

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: an unknown name or option, a bad option value, ``train_size`` or ``label_noise`` out of
            range, or no ``root`` for a file dataset.
        FileNotFoundError: ``root`` or one of the expected files does not exist.
        DatasetFileError: a file exists but is corrupt or not in the expected format.
    """
    if not isinstance(name, str) or name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    _check_seed(seed)
    _check_label_noise(label_noise)
    splits = _BUILDERS[name](root, seed, options)
    x_train, y_train, x_test = splits.x_train, splits.y_train, splits.x_test
    notes = [splits.description]

    if train_size is not None:
        _check_train_size(train_size, name, len(y_train), splits.num_classes)
        if train_size < len(y_train):
            keep = stratified_subset(y_train, train_size, np.random.default_rng([seed, _STREAM_SUBSET]))
            x_train, y_train = x_train[keep], y_train[keep]
            notes.append(f"stratified training subset of {train_size} (seed {seed})")
    if label_noise > 0:
        rng = np.random.default_rng([seed, _STREAM_LABEL_NOISE])
        y_train = flip_labels(y_train, label_noise, splits.num_classes, rng)
        notes.append(f"{label_noise:g} of training labels flipped (seed {seed})")
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)
        notes.append("standardized with training statistics")

    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(splits.y_test, dtype=np.int64)),
        num_classes=splits.num_classes,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        description="; ".join(notes),
    )


def cache_dir() -> Path:
    """Directory for cached generated data: ``$NORMDROP_CACHE_DIR`` if set, else the user cache dir."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    return Path(platformdirs.user_cache_dir("normdrop"))


# ---------------------------------------------------------------------------------------------------------------
# Shared options: subset, label noise, standardization


def stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of a random subset of ``size`` examples with the class proportions of ``labels``.

    Class counts are the shares ``size * class_fraction`` rounded by largest remainder (ties to the smaller class
    index); then every class present that got none takes one from the class furthest above its share. So every
    class present gets at least one and at most its share rounded up, and when every share is at least one each
    count is within one of its share. Requires ``num_present <= size <= len(labels)``.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not len(classes) <= size <= len(labels):
        raise ValueError(f"subset size {size} must lie in [{len(classes)}, {len(labels)}]")
    quota = size * counts / len(labels)
    allocation = np.floor(quota).astype(np.int64)
    leftover = size - int(allocation.sum())
    # stable sort on the negated remainder: largest remainders first, ties to the smaller class index
    allocation[np.argsort(-(quota - allocation), kind="stable")[:leftover]] += 1
    for empty in np.flatnonzero(allocation == 0):
        donor = np.argmax(np.where(allocation > 1, allocation - quota, -np.inf))
        allocation[donor] -= 1
        allocation[empty] = 1
    chosen = [
        rng.permutation(np.flatnonzero(labels == cls))[:take] for cls, take in zip(classes, allocation, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``labels`` with exactly ``round(fraction * len(labels))`` of them changed to another class.

    The examples to flip are the first ones of a random permutation, and each new label is the old one plus an
    offset drawn uniformly from ``1 .. num_classes - 1`` (mod ``num_classes``), i.e. uniform over the other classes.
    Both are drawn for every example before choosing how many to flip, so with the same generator state a larger
    fraction flips a superset of the examples a smaller one flips, to the same new labels.
    """
    _check_label_noise(fraction)
    labels = np.array(labels, dtype=np.int64)
    order = rng.permutation(len(labels))
    offsets = rng.integers(1, num_classes, size=len(labels))
    flipped = order[: round(fraction * len(labels))]
    labels[flipped] = (labels[flipped] + offsets[flipped]) % num_classes
    return labels


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale both splits with the training split's per-feature (flat) or per-channel (signal/image) statistics."""
    axes = (0,) if x_train.ndim == 2 else (0, *range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, dtype=np.float64, keepdims=True)
    squared_deviation = np.zeros_like(mean)
    for start in range(0, len(x_train), _STATS_CHUNK):
        deviation = x_train[start : start + _STATS_CHUNK] - mean
        squared_deviation += np.square(deviation).sum(axis=axes, keepdims=True)
    std = np.sqrt(squared_deviation / (x_train.size // mean.size))
    std = np.where(std > _STD_FLOOR, std, 1.0)
    mean32, std32 = mean.astype(np.float32), std.astype(np.float32)
    return (x_train - mean32) / std32, (x_test - mean32) / std32


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_label_noise(label_noise: float) -> None:
    if (
        isinstance(label_noise, bool)
        or not isinstance(label_noise, numbers.Real)
        or not 0.0 <= float(label_noise) <= 1.0
    ):
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {label_noise!r}")


def _check_train_size(train_size: int, name: str, available: int, num_classes: int) -> None:
    expected = f"expected an integer in [{num_classes}, {available}] (at least one example per class)"
    if isinstance(train_size, bool) or not isinstance(train_size, numbers.Integral):
        raise ValueError(f"train_size must be an integer, got {train_size!r}; {expected}")
    if train_size > available:
        raise ValueError(
            f"train_size={train_size} is larger than the {available} training examples of {name!r}; {expected}"
        )
    if train_size < num_classes:
        raise ValueError(f"train_size={train_size} is smaller than the {num_classes} classes of {name!r}; {expected}")


def check_dataset_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError (naming the option and what is expected) unless ``load_dataset(name, **options)`` accepts
    ``options``: the synthetic sets' knobs of ``SYNTHETIC_DEFAULTS``, none for the other sets."""
    if name in SYNTHETIC_DEFAULTS:
        _resolve_options(name, options)
    else:
        _check_no_options(name, options)


def _check_no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        given = ", ".join(f"{key}={value!r}" for key, value in options.items())
        raise ValueError(f"dataset {name!r} takes no options, got {given}")


def _resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``name`` updated with ``options``; ints must be positive, floats finite and non-negative."""
    defaults = SYNTHETIC_DEFAULTS[name]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; expected some of {', '.join(defaults)}"
        )
    resolved = dict(defaults)
    for key, value in options.items():
        if isinstance(defaults[key], int):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} option {key} must be a positive integer, got {value!r}")
            resolved[key] = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"{name} option {key} must be a finite number >= 0, got {value!r}")
            resolved[key] = float(value)
    if resolved["n_classes"] < 2:
        raise ValueError(f"{name} option n_classes must be at least 2, got {resolved['n_classes']}")
    if resolved["n_train"] < resolved["n_classes"]:
        raise ValueError(
            f"{name} option n_train={resolved['n_train']} must be at least n_classes={resolved['n_classes']}"
        )
    return resolved


# ---------------------------------------------------------------------------------------------------------------
# MNIST-1D (generated, cached)


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """Run ``mnist1d``'s ``make_dataset`` with its default arguments (pure computation, no download).

    ``make_dataset`` seeds numpy's and Python's global generators; their states are restored afterwards so that
    loading data never changes the randomness of the caller. (``mnist1d.get_dataset`` would try a download, so it
    is not used.)
    """
    from mnist1d.data import make_dataset  # imports scipy and matplotlib: only when generating

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        generated = make_dataset()
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x_train": np.asarray(generated["x"], dtype=np.float64),
        "y_train": np.asarray(generated["y"], dtype=np.int64),
        "x_test": np.asarray(generated["x_test"], dtype=np.float64),
        "y_test": np.asarray(generated["y_test"], dtype=np.int64),
    }


_MNIST1D_SHAPES = {
    "x_train": ((MNIST1D_NUM_TRAIN, MNIST1D_LENGTH), np.float64),
    "y_train": ((MNIST1D_NUM_TRAIN,), np.int64),
    "x_test": ((MNIST1D_NUM_TEST, MNIST1D_LENGTH), np.float64),
    "y_test": ((MNIST1D_NUM_TEST,), np.int64),
}


def _arrays_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the arrays (in name order)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None (with a warning if the file exists but cannot be trusted)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in _MNIST1D_SHAPES}
            stored_checksum = str(archive["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        warnings.warn(
            f"MNIST-1D cache {path} could not be read ({type(error).__name__}: {error}); regenerating it",
            DatasetCacheWarning,
            stacklevel=4,
        )
        return None
    wrong_shape = [
        key
        for key, (shape, dtype) in _MNIST1D_SHAPES.items()
        if arrays[key].shape != shape or arrays[key].dtype != dtype
    ]
    if wrong_shape or _arrays_checksum(arrays) != stored_checksum:
        problem = f"unexpected shape or dtype of {', '.join(wrong_shape)}" if wrong_shape else "checksum mismatch"
        warnings.warn(
            f"MNIST-1D cache {path} is corrupt ({problem}); regenerating it", DatasetCacheWarning, stacklevel=4
        )
        return None
    return arrays


def _write_mnist1d_cache(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write atomically (temporary file + rename) so concurrent runs never read a half-written cache."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.savez(handle, sha256=np.array(_arrays_checksum(arrays)), **arrays)
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        warnings.warn(f"could not write the MNIST-1D cache {path} ({error})", DatasetCacheWarning, stacklevel=4)


def _build_mnist1d(root: Root, seed: int, options: Mapping[str, Any]) -> _Splits:
    _check_no_options("mnist1d", options)
    path = cache_dir() / MNIST1D_CACHE_FILE
    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        _write_mnist1d_cache(path, arrays)
    return _Splits(
        x_train=arrays["x_train"].astype(np.float32)[:, None, :],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"].astype(np.float32)[:, None, :],
        y_test=arrays["y_test"],
        num_classes=10,
        description="MNIST-1D (Greydanus 2020), mnist1d.make_dataset defaults: 4000 train / 1000 test signals",
    )


# ---------------------------------------------------------------------------------------------------------------
# scikit-learn digits


def _build_digits(root: Root, seed: int, options: Mapping[str, Any]) -> _Splits:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; reads a local file

    _check_no_options("digits", options)
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]  # 17 grey levels 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    test = stratified_subset(labels, DIGITS_NUM_TEST, np.random.default_rng(DIGITS_SPLIT_SEED))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return _Splits(
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        num_classes=10,
        description=(f"scikit-learn digits, 8x8 images, fixed stratified split {len(train)} train / {len(test)} test"),
    )


# ---------------------------------------------------------------------------------------------------------------
# Synthetic sets


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels with class counts differing by at most one, in random order."""
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


def _build_blobs(root: Root, seed: int, options: Mapping[str, Any]) -> _Splits:
    knobs = _resolve_options("blobs", options)
    rng = np.random.default_rng([seed, _STREAM_GENERATE])
    centers = rng.standard_normal((knobs["n_classes"], knobs["n_features"]))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = _balanced_labels(n, knobs["n_classes"], rng)
        x = centers[y] + knobs["noise"] * rng.standard_normal((n, knobs["n_features"]))
        return x.astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = draw(knobs["n_train"]), draw(knobs["n_test"])
    return _Splits(
        x_train,
        y_train,
        x_test,
        y_test,
        knobs["n_classes"],
        f"Gaussian blobs: {knobs['n_classes']} classes, centres N(0, I) in {knobs['n_features']}-D, "
        f"within-class std {knobs['noise']:g}, seed {seed}",
    )


def _build_spirals(root: Root, seed: int, options: Mapping[str, Any]) -> _Splits:
    knobs = _resolve_options("spirals", options)
    if knobs["n_turns"] <= 0:
        raise ValueError(f"spirals option n_turns must be positive, got {knobs['n_turns']}")
    rng = np.random.default_rng([seed, _STREAM_GENERATE])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = _balanced_labels(n, knobs["n_classes"], rng)
        position = rng.uniform(0.0, 1.0, n)  # along the arm: radius 0 at the centre, 1 at the tip
        angle = 2 * np.pi * (y / knobs["n_classes"] + knobs["n_turns"] * position)
        x = position[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        x += knobs["noise"] * rng.standard_normal((n, 2))
        return x.astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = draw(knobs["n_train"]), draw(knobs["n_test"])
    return _Splits(
        x_train,
        y_train,
        x_test,
        y_test,
        knobs["n_classes"],
        f"spirals: {knobs['n_classes']} arms of {knobs['n_turns']:g} turns, noise std {knobs['noise']:g}, seed {seed}",
    )


def _build_teacher(root: Root, seed: int, options: Mapping[str, Any]) -> _Splits:
    """Labels are argmax of a random ReLU MLP's logits, each logit centred and scaled over reference inputs.

    Centring and scaling the logits keeps the classes roughly balanced; ``noise`` is the std of Gaussian noise
    added to these standardized logits before the argmax (0: labels are a deterministic function of the input).
    """
    knobs = _resolve_options("teacher", options)
    teacher_rng = np.random.default_rng([seed, _STREAM_TEACHER])
    widths = [knobs["n_features"], *[knobs["teacher_width"]] * knobs["teacher_depth"], knobs["n_classes"]]
    # He initialization for the hidden ReLU layers keeps activations O(1) at any depth (He et al. 2015)
    gains = [2.0] * knobs["teacher_depth"] + [1.0]
    weights = [
        teacher_rng.standard_normal((fan_in, fan_out)) * np.sqrt(gain / fan_in)
        for gain, (fan_in, fan_out) in zip(gains, itertools.pairwise(widths), strict=True)
    ]

    def teacher_logits(x: np.ndarray) -> np.ndarray:
        for weight in weights[:-1]:
            x = np.maximum(x @ weight, 0.0)
        return x @ weights[-1]

    reference = teacher_logits(teacher_rng.standard_normal((_TEACHER_REFERENCE_SIZE, knobs["n_features"])))
    logit_mean, logit_std = reference.mean(axis=0), reference.std(axis=0) + _STD_FLOOR

    rng = np.random.default_rng([seed, _STREAM_GENERATE])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, knobs["n_features"]))
        logits = (teacher_logits(x) - logit_mean) / logit_std
        logits += knobs["noise"] * rng.standard_normal(logits.shape)
        return x.astype(np.float32), logits.argmax(axis=1).astype(np.int64)

    (x_train, y_train), (x_test, y_test) = draw(knobs["n_train"]), draw(knobs["n_test"])
    return _Splits(
        x_train,
        y_train,
        x_test,
        y_test,
        knobs["n_classes"],
        f"teacher-student: N(0, I) inputs in {knobs['n_features']}-D labelled by a random ReLU MLP "
        f"(depth {knobs['teacher_depth']}, width {knobs['teacher_width']}), logit noise {knobs['noise']:g}, "
        f"seed {seed}",
    )


# ---------------------------------------------------------------------------------------------------------------
# Files: IDX (MNIST, Fashion-MNIST) and CIFAR-10 pickle batches


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not (detected from the content).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, one big-endian uint32 per dimension, then the data, big-endian,
    row-major. Returns the array in native byte order.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetFileError: bad gzip stream, bad magic number, truncated header or data, or trailing bytes.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetFileError(f"{path}: corrupt gzip stream ({error}); expected a gzipped IDX file") from error
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DatasetFileError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; expected 0000TTNN with a type code TT "
            f"in {', '.join(f'{code:02x}' for code in _IDX_DTYPES)} and NN dimensions"
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetFileError(f"{path}: truncated IDX header; expected {ndim} dimension sizes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_size = header_size + math.prod(shape) * dtype.itemsize
    if len(raw) != expected_size:
        raise DatasetFileError(
            f"{path}: {'truncated' if len(raw) < expected_size else 'trailing bytes in'} IDX file: "
            f"{len(raw)} bytes, expected {expected_size} for a {dtype.name} array of shape {shape}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _check_root(name: str, root: Root) -> Path:
    if root is None:
        raise ValueError(
            f"dataset {name!r} is read from files: pass root=<directory holding them>; "
            f"the datasets generated without files are {', '.join(n for n in DATASET_NAMES if n not in FILE_DATASETS)}"
        )
    directory = Path(root)
    if not directory.is_dir():
        raise FileNotFoundError(f"{name} root directory {directory} does not exist (or is not a directory)")
    return directory


def _find_idx_file(name: str, directories: list[Path], base_name: str) -> Path:
    candidates = [directory / file for directory in directories for file in (base_name, f"{base_name}.gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{name}: IDX file {base_name}[.gz] not found; looked for {', '.join(str(c) for c in candidates)}"
    )


def _build_idx(name: str, root: Root, options: Mapping[str, Any]) -> _Splits:
    _check_no_options(name, options)
    directory = _check_root(name, root)
    directories = [directory, directory / _TORCHVISION_SUBDIR[name] / "raw"]
    split_arrays = {}
    for split in ("train", "test"):
        images_path = _find_idx_file(name, directories, _MNIST_FILES[f"{split}_images"])
        labels_path = _find_idx_file(name, directories, _MNIST_FILES[f"{split}_labels"])
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != _MNIST_IMAGE_SIZE:
            raise DatasetFileError(
                f"{images_path}: expected uint8 images of shape (n, 28, 28), got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise DatasetFileError(
                f"{labels_path}: expected {len(images)} uint8 labels (one per image in {images_path.name}), "
                f"got {labels.dtype} {labels.shape}"
            )
        if len(labels) and labels.max() >= 10:
            raise DatasetFileError(f"{labels_path}: expected labels in 0..9, found {labels.max()}")
        split_arrays[split] = (
            (images.astype(np.float32) / 255.0)[:, None, :, :],
            labels.astype(np.int64),
        )
    title = "MNIST" if name == "mnist" else "Fashion-MNIST"
    (x_train, y_train), (x_test, y_test) = split_arrays["train"], split_arrays["test"]
    return _Splits(
        x_train,
        y_train,
        x_test,
        y_test,
        10,
        f"{title} from IDX files in {directory}: {len(y_train)} train / {len(y_test)} test 28x28 images",
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and scalars; refuses every other global (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _CIFAR10_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(*allowed)


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 from one CIFAR-10 python batch file."""
    expected = "a CIFAR-10 python batch: a pickled dict with 'data' (n x 3072 uint8) and 'labels' (n ints 0..9)"
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as error:  # arbitrary bytes can fail inside pickle in many ways; all mean "corrupt"
        raise DatasetFileError(
            f"{path}: cannot unpickle ({type(error).__name__}: {error}); expected {expected}"
        ) from error
    if not isinstance(batch, dict):
        raise DatasetFileError(f"{path}: found a {type(batch).__name__}; expected {expected}")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetFileError(f"{path}: 'data' is {found}; expected {expected}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DatasetFileError(f"{path}: 'labels' are not integers; expected {expected}") from error
    if labels.shape != (len(data),):
        raise DatasetFileError(f"{path}: {len(data)} images but labels of shape {labels.shape}; expected {expected}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFileError(f"{path}: labels range {labels.min()}..{labels.max()}; expected {expected}")
    return data.reshape(-1, *_CIFAR10_SHAPE), labels


def _build_cifar10(root: Root, seed: int, options: Mapping[str, Any]) -> _Splits:
    _check_no_options("cifar10", options)
    directory = _check_root("cifar10", root)
    candidates = [directory / _CIFAR10_DIR, directory]
    batch_dir = next((d for d in candidates if (d / _CIFAR10_TRAIN_BATCHES[0]).is_file()), None)
    if batch_dir is None:
        raise FileNotFoundError(
            f"cifar10: batch file {_CIFAR10_TRAIN_BATCHES[0]} not found; looked in "
            f"{', '.join(str(d) for d in candidates)} (expected the python version of CIFAR-10: "
            f"{', '.join(_CIFAR10_TRAIN_BATCHES)}, {_CIFAR10_TEST_BATCH})"
        )
    for file in (*_CIFAR10_TRAIN_BATCHES, _CIFAR10_TEST_BATCH):
        if not (batch_dir / file).is_file():
            raise FileNotFoundError(f"cifar10: batch file {batch_dir / file} not found")
    train = [_read_cifar10_batch(batch_dir / file) for file in _CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar10_batch(batch_dir / _CIFAR10_TEST_BATCH)
    x_train = np.concatenate([images for images, _ in train]).astype(np.float32) / 255.0
    y_train = np.concatenate([labels for _, labels in train])
    return _Splits(
        x_train,
        y_train,
        test_images.astype(np.float32) / 255.0,
        test_labels,
        10,
        f"CIFAR-10 from {batch_dir}: {len(y_train)} train / {len(test_labels)} test 32x32 colour images",
    )


_BUILDERS: dict[str, Callable[[Root, int, Mapping[str, Any]], _Splits]] = {
    "mnist1d": _build_mnist1d,
    "digits": _build_digits,
    "blobs": _build_blobs,
    "spirals": _build_spirals,
    "teacher": _build_teacher,
    "mnist": lambda root, seed, options: _build_idx("mnist", root, options),
    "fashion-mnist": lambda root, seed, options: _build_idx("fashion-mnist", root, options),
    "cifar10": _build_cifar10,
}
