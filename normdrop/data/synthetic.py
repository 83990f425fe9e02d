"""The synthetic sets: Gaussian blobs, spirals and a teacher network's labels, generated from the seed."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from normdrop.data.base import _STREAM_GENERATE, _STREAM_TEACHER, Root, _Splits
from normdrop.data.options import _STD_FLOOR, _resolve_options

_TEACHER_REFERENCE_SIZE = 10_000  # inputs used to centre and scale the teacher's logits (balances the classes)


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
