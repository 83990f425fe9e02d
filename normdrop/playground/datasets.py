"""The playground's data: four 2-D sets a learner can see whole, and MNIST-1D as the bigger option.

Spirals and blobs come from ``normdrop.data`` (unstandardized, so the picture keeps its shape); circles and XOR,
which the lab does not need, are generated here:

- ``circles``: two concentric rings, radius 0.5 (class 0) and 1 (class 1), angle uniform, Gaussian noise of std
  ``noise`` on both coordinates;
- ``xor``: points uniform in [-1, 1]^2, labelled by the sign of x1 * x2 (class 1 where the signs agree), then
  noised the same way.

``noise`` is the std of that coordinate noise (for blobs: the within-class std around centres drawn from N(0, I)).
The test split always has ``TEST_SIZE`` points, drawn from the same distribution with the same seed stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from normdrop.data import load_dataset
from normdrop.playground.messages import TWO_D_DATASETS, Settings

TEST_SIZE = 500
BLOB_CLASSES = 3
EXTENT_MARGIN = 1.1  # the map shows the data's bounding square, widened by 10%


@dataclass(frozen=True, eq=False)
class PlaygroundData:
    """A train/test split; ``extent`` is the half-width of the square the decision-boundary map covers (2-D only)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    two_d: bool
    extent: float
    description: str


def _rings(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n) % 2)
    angle = rng.uniform(0.0, 2 * np.pi, n)
    radius = np.where(labels == 0, 0.5, 1.0)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return points + noise * rng.standard_normal((n, 2)), labels


def _xor(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    points = rng.uniform(-1.0, 1.0, (n, 2))
    labels = (points[:, 0] * points[:, 1] > 0).astype(np.int64)
    return points + noise * rng.standard_normal((n, 2)), labels


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def make_data(settings: Settings) -> PlaygroundData:
    """The split ``settings`` asks for (dataset, noise, train_size, seed); deterministic given them."""
    name, seed, n_train = settings.dataset, settings.seed, settings.train_size
    if name in ("circles", "xor"):
        generate = _rings if name == "circles" else _xor
        x_train, y_train = generate(n_train, settings.noise, np.random.default_rng([seed, 1]))
        x_test, y_test = generate(TEST_SIZE, settings.noise, np.random.default_rng([seed, 2]))
        (x_train, y_train), (x_test, y_test) = _tensors(x_train, y_train), _tensors(x_test, y_test)
        num_classes, description = 2, f"{name}, noise std {settings.noise:g}, seed {seed}"
    elif name in ("spirals", "blobs"):
        options = (
            {"n_classes": 2, "n_turns": 1.0} if name == "spirals" else {"n_classes": BLOB_CLASSES, "n_features": 2}
        )
        dataset = load_dataset(
            name, standardize=False, seed=seed, n_train=n_train, n_test=TEST_SIZE, noise=settings.noise, **options
        )
        x_train, y_train, x_test, y_test = dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test
        num_classes, description = dataset.num_classes, dataset.description
    else:
        dataset = load_dataset("mnist1d", train_size=settings.train_size, seed=seed)
        # The MLP flattens (1, 40) signals itself; keeping them flat makes every view's code 2-D-agnostic.
        x_train, x_test = dataset.x_train.flatten(1), dataset.x_test.flatten(1)
        y_train, y_test = dataset.y_train, dataset.y_test
        num_classes, description = dataset.num_classes, dataset.description
    two_d = name in TWO_D_DATASETS
    extent = EXTENT_MARGIN * float(torch.cat([x_train, x_test]).abs().max()) if two_d else 0.0
    return PlaygroundData(x_train, y_train, x_test, y_test, num_classes, two_d, extent, description)


def grid_points(extent: float, resolution: int) -> Tensor:
    """(resolution^2, 2) cell centres of the square [-extent, extent]^2, row by row from the top (y = +extent)."""
    step = 2 * extent / resolution
    centres = -extent + step * (torch.arange(resolution, dtype=torch.float32) + 0.5)
    ys, xs = torch.meshgrid(centres.flip(0), centres, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
