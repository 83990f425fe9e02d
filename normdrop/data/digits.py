"""scikit-learn's bundled handwritten digits, with a fixed stratified split."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from normdrop.data.base import Root, _Splits
from normdrop.data.options import _check_no_options, stratified_subset

DIGITS_NUM_TEST = 360
DIGITS_SPLIT_SEED = 0  # the digits split is a property of the dataset, not of the run's seed


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
