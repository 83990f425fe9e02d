"""The options every dataset takes (training subset, label noise, standardization) and the checks of the
arguments of :func:`normdrop.data.load_dataset`."""

from __future__ import annotations

import numbers

import numpy as np

from normdrop.dataset_catalog import (  # noqa: F401 (re-exported: the checks live with the names)
    SYNTHETIC_DEFAULTS,
    _check_no_options,
    _resolve_options,
    check_dataset_options,
)

_STD_FLOOR = 1e-8  # a feature this constant on train is left unscaled instead of divided by ~0
_STATS_CHUNK = 4096  # examples per chunk when accumulating squared deviations (bounds float64 temporaries)


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
