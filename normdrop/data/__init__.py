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

One module per concern: :mod:`~normdrop.data.base` (the :class:`Dataset`, errors, seed streams),
:mod:`~normdrop.data.options` (subset, label noise, standardization and the argument checks), one module per
dataset family (:mod:`~normdrop.data.mnist1d`, :mod:`~normdrop.data.digits`, :mod:`~normdrop.data.synthetic`) and
the file loaders (:mod:`~normdrop.data.files`); this module is the entry point that joins them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from normdrop.data.base import (
    _STREAM_LABEL_NOISE,
    _STREAM_SUBSET,
    DATASET_NAMES,
    FILE_DATASETS,
    Dataset,
    DatasetCacheWarning,
    DatasetFileError,
    Root,
    _Splits,
)
from normdrop.data.digits import DIGITS_NUM_TEST, _build_digits
from normdrop.data.files import _build_cifar10, _build_idx, read_idx
from normdrop.data.mnist1d import (
    CACHE_DIR_ENV,
    MNIST1D_CACHE_FILE,
    MNIST1D_LENGTH,
    MNIST1D_NUM_TEST,
    MNIST1D_NUM_TRAIN,
    _build_mnist1d,
    cache_dir,
)
from normdrop.data.options import (
    SYNTHETIC_DEFAULTS,
    _check_label_noise,
    _check_seed,
    _check_train_size,
    _standardize,
    flip_labels,
    stratified_subset,
)
from normdrop.data.synthetic import _build_blobs, _build_spirals, _build_teacher


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

__all__ = [
    "CACHE_DIR_ENV",
    "DATASET_NAMES",
    "DIGITS_NUM_TEST",
    "FILE_DATASETS",
    "MNIST1D_CACHE_FILE",
    "MNIST1D_LENGTH",
    "MNIST1D_NUM_TEST",
    "MNIST1D_NUM_TRAIN",
    "SYNTHETIC_DEFAULTS",
    "Dataset",
    "DatasetCacheWarning",
    "DatasetFileError",
    "cache_dir",
    "flip_labels",
    "load_dataset",
    "read_idx",
    "stratified_subset",
]
