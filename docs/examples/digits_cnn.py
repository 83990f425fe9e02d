"""A user's CNN for scikit-learn's 8x8 digits: the worked example of docs/ablate.md.

    python docs/examples/digits_cnn.py digits.npz      # writes the data as X_train, y_train, X_test, y_test
    normdrop ablate docs/examples/digits_cnn.py:build --data digits.npz
"""

from __future__ import annotations

import sys

import numpy as np
from torch import nn


def build() -> nn.Module:
    """Two conv blocks with BatchNorm2d, a dropout before a BatchNorm1d, and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(32 * 4 * 4, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def save_digits(path: str) -> None:
    """scikit-learn's digits (bundled with scikit-learn: no download), scaled to [0, 1], 80/20 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    np.savez(path, X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)


if __name__ == "__main__":
    save_digits(sys.argv[1] if len(sys.argv) > 1 else "digits.npz")
