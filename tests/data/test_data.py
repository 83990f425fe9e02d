"""Tests of normdrop.data: generated datasets, the MNIST-1D cache, the shared options and the file loaders.

MNIST-1D is generated once per session (a few seconds) into a temporary cache directory; every other test uses
tiny data. File-loader tests write small IDX files and CIFAR-10 pickle batches into tmp_path. No network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import random
import shutil
import socket
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from normdrop.data import (
    CACHE_DIR_ENV,
    DATASET_NAMES,
    DIGITS_NUM_TEST,
    MNIST1D_CACHE_FILE,
    SYNTHETIC_DEFAULTS,
    Dataset,
    DatasetCacheWarning,
    DatasetFileError,
    cache_dir,
    flip_labels,
    load_dataset,
    read_idx,
    stratified_subset,
)
from normdrop.data import mnist1d as mnist1d_module

SYNTHETIC = tuple(SYNTHETIC_DEFAULTS)


# ---------------------------------------------------------------------------------------------------------------
# MNIST-1D and its cache


@dataclass(frozen=True)
class GeneratedMnist1d:
    cache_dir: Path
    dataset: Dataset
    seconds: float
    global_rng_unchanged: bool


def _refuse_network(*args, **kwargs):
    raise AssertionError("normdrop.data tried to open a network connection")


@pytest.fixture(scope="module")
def mnist1d(tmp_path_factory) -> GeneratedMnist1d:
    """Generate MNIST-1D once, into an empty cache directory, with sockets disabled."""
    directory = tmp_path_factory.mktemp("normdrop-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(directory))
        patch.setattr(socket.socket, "connect", _refuse_network)
        patch.setattr(socket, "create_connection", _refuse_network)
        np.random.seed(1234)
        random.seed(1234)
        numpy_before, python_before = np.random.get_state()[1].copy(), random.getstate()
        start = time.perf_counter()
        dataset = load_dataset("mnist1d", standardize=False)
        seconds = time.perf_counter() - start
        unchanged = np.array_equal(np.random.get_state()[1], numpy_before) and random.getstate() == python_before
    return GeneratedMnist1d(directory, dataset, seconds, unchanged)


def test_mnist1d_shapes_and_sizes(mnist1d):
    ds = mnist1d.dataset
    assert ds.name == "mnist1d"
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 40) and ds.in_channels == 1 and ds.num_features == 40
    assert ds.num_classes == 10
    assert set(ds.y_train.tolist()) == set(range(10)) and set(ds.y_test.tolist()) == set(range(10))
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()
    assert "Greydanus 2020" in ds.description


def test_mnist1d_is_the_package_output_unchanged(mnist1d):
    # make_dataset centres and scales the 5000 signals jointly; a second transform here would break this.
    everything = torch.cat([mnist1d.dataset.x_train, mnist1d.dataset.x_test]).double()
    assert abs(everything.mean().item()) < 1e-4
    assert abs(everything.std(unbiased=False).item() - 1.0) < 1e-4


def test_mnist1d_generation_leaves_global_random_state_alone(mnist1d):
    assert mnist1d.global_rng_unchanged


def test_mnist1d_second_call_reads_the_cache(mnist1d, monkeypatch):
    assert (mnist1d.cache_dir / MNIST1D_CACHE_FILE).is_file()
    monkeypatch.setenv(CACHE_DIR_ENV, str(mnist1d.cache_dir))
    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", _refuse_generation)
    start = time.perf_counter()
    again = load_dataset("mnist1d", standardize=False)
    seconds = time.perf_counter() - start
    assert seconds <= mnist1d.seconds
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, field), getattr(mnist1d.dataset, field))


def _refuse_generation():
    raise AssertionError("MNIST-1D was regenerated although a valid cache exists")


def _cached_arrays(directory: Path) -> dict[str, np.ndarray]:
    with np.load(directory / MNIST1D_CACHE_FILE) as archive:
        return {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _garble(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # zero a stretch inside the array data
    path.write_bytes(bytes(raw))


def _swap_data_keep_checksum(path: Path) -> None:
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["y_train"] = (arrays["y_train"] + 1) % 10  # a loadable file whose contents no longer match
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize("corrupt", [_truncate, _garble, _swap_data_keep_checksum])
def test_mnist1d_corrupt_cache_is_regenerated_with_a_warning(mnist1d, tmp_path, monkeypatch, corrupt):
    good = _cached_arrays(mnist1d.cache_dir)
    shutil.copy(mnist1d.cache_dir / MNIST1D_CACHE_FILE, tmp_path / MNIST1D_CACHE_FILE)
    corrupt(tmp_path / MNIST1D_CACHE_FILE)
    calls = []

    def generate():
        calls.append(1)
        return {key: value.copy() for key, value in good.items()}

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", generate)
    with pytest.warns(DatasetCacheWarning, match=MNIST1D_CACHE_FILE):
        regenerated = load_dataset("mnist1d", standardize=False)
    assert calls == [1]
    assert torch.equal(regenerated.x_train, mnist1d.dataset.x_train)
    assert torch.equal(regenerated.y_train, mnist1d.dataset.y_train)

    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", _refuse_generation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reread = load_dataset("mnist1d", standardize=False)  # the rewritten cache is valid again
    assert torch.equal(reread.y_train, mnist1d.dataset.y_train)


def test_mnist1d_unwritable_cache_warns_and_still_loads(mnist1d, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    good = _cached_arrays(mnist1d.cache_dir)
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker))
    monkeypatch.setattr(mnist1d_module, "_generate_mnist1d", lambda: {key: value.copy() for key, value in good.items()})
    with pytest.warns(DatasetCacheWarning, match="could not write"):
        ds = load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 1, 40)


def test_cache_dir_env_override_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert cache_dir() == Path(platformdirs.user_cache_dir("normdrop"))


# ---------------------------------------------------------------------------------------------------------------
# digits


def _row_multiset(x: np.ndarray) -> np.ndarray:
    rows = x.reshape(len(x), -1)
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_split_is_stratified_fixed_and_complete():
    reference = load_digits()
    ds = load_dataset("digits", standardize=False, seed=0)
    other_seed = load_dataset("digits", standardize=False, seed=7)
    assert ds.x_train.shape == (1797 - DIGITS_NUM_TEST, 1, 8, 8) and ds.x_test.shape == (DIGITS_NUM_TEST, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8) and ds.in_channels == 1 and ds.num_classes == 10
    assert torch.equal(ds.x_test, other_seed.x_test) and torch.equal(ds.y_train, other_seed.y_train)

    fractions = np.bincount(reference.target) / len(reference.target)
    assert np.all(np.abs(np.bincount(ds.y_test.numpy(), minlength=10) - DIGITS_NUM_TEST * fractions) <= 1)

    # train and test together are exactly the 1797 bundled images (pixels were divided by 16)
    together = torch.cat([ds.x_train, ds.x_test]).numpy().reshape(1797, 64) * 16
    labels = torch.cat([ds.y_train, ds.y_test]).numpy()
    assert np.array_equal(
        _row_multiset(np.column_stack([together, labels])),
        _row_multiset(np.column_stack([reference.data, reference.target])),
    )

    # a pinned fingerprint: the split must not drift between versions
    assert hashlib.sha256(ds.y_test.numpy().tobytes()).hexdigest()[:16] == DIGITS_TEST_FINGERPRINT


DIGITS_TEST_FINGERPRINT = "08619f706911b413"  # sha256 of y_test bytes, first 16 hex digits


# ---------------------------------------------------------------------------------------------------------------
# Shared options: train_size, label_noise, standardize


def test_train_size_subset_is_stratified_deterministic_and_from_train():
    full = load_dataset("digits", standardize=False)
    subset = load_dataset("digits", train_size=100, standardize=False, seed=3)
    again = load_dataset("digits", train_size=100, standardize=False, seed=3)
    other = load_dataset("digits", train_size=100, standardize=False, seed=4)
    assert subset.x_train.shape == (100, 1, 8, 8) and subset.y_train.shape == (100,)
    fractions = np.bincount(full.y_train.numpy()) / len(full.y_train)
    assert np.all(np.abs(np.bincount(subset.y_train.numpy(), minlength=10) - 100 * fractions) <= 1)
    assert torch.equal(subset.x_train, again.x_train) and torch.equal(subset.y_train, again.y_train)
    assert not torch.equal(subset.x_train, other.x_train)
    assert torch.equal(subset.x_test, full.x_test) and torch.equal(subset.y_test, full.y_test)
    # every chosen example is a training example with its own label
    full_rows = {(tuple(x.flatten().tolist()), int(y)) for x, y in zip(full.x_train, full.y_train, strict=True)}
    assert all(
        (tuple(x.flatten().tolist()), int(y)) in full_rows for x, y in zip(subset.x_train, subset.y_train, strict=True)
    )


def test_stratified_subset_keeps_every_class_of_imbalanced_labels():
    labels = np.repeat([0, 1, 2], [90, 9, 1])
    chosen = stratified_subset(labels, 10, np.random.default_rng(0))
    assert len(chosen) == len(set(chosen.tolist())) == 10
    assert np.bincount(labels[chosen]).tolist() == [8, 1, 1]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=2, max_size=8),
    size_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_subset_properties(counts, size_fraction, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    size = len(counts) + round(size_fraction * (len(labels) - len(counts)))
    chosen = stratified_subset(labels, size, np.random.default_rng(seed))
    assert len(chosen) == len(np.unique(chosen)) == size
    taken = np.bincount(labels[chosen], minlength=len(counts))
    quota = size * np.asarray(counts) / len(labels)
    assert taken.min() >= 1 and np.all(taken <= np.ceil(quota - 1e-9))
    if quota.min() >= 1:  # no class needed topping up: every count is within one of its exact share
        assert np.all(np.abs(taken - quota) < 1)
    assert np.array_equal(chosen, stratified_subset(labels, size, np.random.default_rng(seed)))


@pytest.mark.parametrize("fraction", [0.0, 0.1234, 0.1236, 0.5, 1.0])
def test_label_noise_flips_exactly_round_fraction_of_train_labels(fraction):
    clean = load_dataset("blobs", seed=5)
    noisy = load_dataset("blobs", seed=5, label_noise=fraction)
    changed = (clean.y_train != noisy.y_train).sum().item()
    assert changed == round(fraction * len(clean.y_train))
    assert torch.equal(clean.y_test, noisy.y_test)
    assert torch.equal(clean.x_train, noisy.x_train) and torch.equal(clean.x_test, noisy.x_test)
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < clean.num_classes


def test_label_noise_applies_to_the_training_subset_and_is_nested_across_fractions():
    clean = load_dataset("digits", train_size=200, seed=2)
    low = load_dataset("digits", train_size=200, seed=2, label_noise=0.1)
    high = load_dataset("digits", train_size=200, seed=2, label_noise=0.3)
    assert torch.equal(clean.x_train, low.x_train)  # the subset does not depend on the noise fraction
    flipped_low, flipped_high = clean.y_train != low.y_train, clean.y_train != high.y_train
    assert flipped_low.sum() == 20 and flipped_high.sum() == 60
    assert torch.all(flipped_high[flipped_low]) and torch.equal(low.y_train[flipped_low], high.y_train[flipped_low])


def test_flipped_labels_reach_every_other_class():
    labels = np.repeat(np.arange(4), 250)
    noisy = flip_labels(labels, 1.0, 4, np.random.default_rng(0))
    for cls in range(4):
        assert set(noisy[labels == cls].tolist()) == set(range(4)) - {cls}


def test_standardize_uses_training_statistics_only():
    raw = load_dataset("blobs", standardize=False, seed=1, n_train=200, n_test=300)
    scaled = load_dataset("blobs", standardize=True, seed=1, n_train=200, n_test=300)
    train = scaled.x_train.double()
    assert torch.allclose(train.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(train.std(0, unbiased=False), torch.ones(10, dtype=torch.float64), atol=1e-5)
    assert scaled.x_test.double().mean(0).abs().max() > 1e-3  # the test split is not re-centred on itself
    mean, std = raw.x_train.double().mean(0), raw.x_train.double().std(0, unbiased=False)
    assert torch.allclose(scaled.x_test.double(), (raw.x_test.double() - mean) / std, atol=1e-5)


def test_standardize_is_per_channel_for_images():
    scaled = load_dataset("digits")
    raw = load_dataset("digits", standardize=False)
    assert abs(scaled.x_train.double().mean().item()) < 1e-5
    assert abs(scaled.x_train.double().std(unbiased=False).item() - 1.0) < 1e-5
    # one statistic for the whole channel: the pixel-wise ordering is unchanged and the map is affine
    ratio = (scaled.x_train - scaled.x_train[0, 0, 0, 0]) / (raw.x_train - raw.x_train[0, 0, 0, 0] + 1e-12)
    nonzero = (raw.x_train - raw.x_train[0, 0, 0, 0]).abs() > 1e-3
    assert ratio[nonzero].std() < 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Synthetic sets


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_sets_are_deterministic_by_seed(name):
    first, again, other = (load_dataset(name, seed=s, standardize=False) for s in (11, 11, 12))
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert not torch.equal(first.x_train, other.x_train)
    assert first.description == again.description


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_size_knobs(name):
    options = {"n_train": 60, "n_test": 30, "n_classes": 3}
    if "n_features" in SYNTHETIC_DEFAULTS[name]:
        options["n_features"] = 7
    ds = load_dataset(name, **options)
    features = options.get("n_features", 2)
    assert ds.x_train.shape == (60, features) and ds.x_test.shape == (30, features)
    assert ds.input_shape == (features,) and ds.in_channels is None and ds.num_features == features
    assert ds.num_classes == 3 and ds.y_train.max() < 3
    defaults = load_dataset(name)
    assert len(defaults.y_train) == SYNTHETIC_DEFAULTS[name]["n_train"]
    assert len(defaults.y_test) == SYNTHETIC_DEFAULTS[name]["n_test"]


def _nearest_centroid_accuracy(ds: Dataset) -> float:
    centroids = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(ds.num_classes)])
    predicted = torch.cdist(ds.x_test, centroids).argmin(1)
    return (predicted == ds.y_test).float().mean().item()


def test_blobs_noise_knob_controls_overlap():
    assert _nearest_centroid_accuracy(load_dataset("blobs", noise=0.05)) == 1.0
    assert _nearest_centroid_accuracy(load_dataset("blobs", noise=5.0)) < 0.8


def test_spirals_geometry():
    ds = load_dataset("spirals", noise=0.0, standardize=False)
    radius = ds.x_train.norm(dim=1)
    assert radius.max() <= 1.0 + 1e-6
    noisy = load_dataset("spirals", noise=0.5, standardize=False)
    assert noisy.x_train.norm(dim=1).max() > 1.2


def test_teacher_labels_are_a_function_of_the_inputs_and_roughly_balanced():
    ds = load_dataset("teacher", standardize=False, n_train=2000)
    counts = np.bincount(ds.y_train.numpy(), minlength=10)
    assert counts.min() > 0.4 * 200 and counts.max() < 2.0 * 200
    # a k-nearest-neighbour guess beats chance by far when labels are a smooth function of x; with heavy logit
    # noise the same guess is much worse
    noisy = load_dataset("teacher", standardize=False, n_train=2000, noise=5.0)
    assert _one_nn_accuracy(ds) > _one_nn_accuracy(noisy) + 0.1


def _one_nn_accuracy(ds: Dataset) -> float:
    nearest = torch.cdist(ds.x_test, ds.x_train).argmin(1)
    return (ds.y_train[nearest] == ds.y_test).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="'imagenet'") as error:
        load_dataset("imagenet")
    assert all(name in str(error.value) for name in DATASET_NAMES)


@pytest.mark.parametrize(
    ("train_size", "match"),
    [
        (1438, "1438.*larger than the 1437"),
        (9, "train_size=9 is smaller than the 10 classes"),
        (1.5, "1.5"),
        (True, "True"),
    ],
)
def test_bad_train_size(train_size, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits", train_size=train_size)


@pytest.mark.parametrize("label_noise", [-0.1, 1.5, float("nan"), "0.1"])
def test_bad_label_noise(label_noise):
    with pytest.raises(ValueError, match=r"label_noise must be a fraction in \[0, 1\]"):
        load_dataset("blobs", label_noise=label_noise)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_file_datasets_need_a_root(name, tmp_path):
    with pytest.raises(ValueError, match="root="):
        load_dataset(name)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(name, root=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("blobs", {"n_samples": 10}, "n_samples"),
        ("blobs", {"n_classes": 1}, "n_classes must be at least 2"),
        ("blobs", {"n_train": 2, "n_classes": 3}, "n_train=2"),
        ("spirals", {"noise": -1.0}, "noise"),
        ("spirals", {"n_turns": 0.0}, "n_turns"),
        ("teacher", {"teacher_width": 2.5}, "teacher_width"),
        ("digits", {"n_train": 10}, "takes no options"),
        ("mnist1d", {"noise": 0.1}, "takes no options"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(name, **options)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        load_dataset("blobs", seed=-1)


# ---------------------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

IDX_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    header = struct.pack(">HBB", 0, IDX_TYPE_CODES[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    encoded = idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        encoded = gzip.compress(encoded)
    path.write_bytes(encoded)
    return path


def write_mnist(directory: Path, compress: bool, n_train: int = 5, n_test: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    return {name: (write_idx(directory / name, array, compress), array) for name, array in arrays.items()}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trips(tmp_path, dtype, compress):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4) * (3 if dtype != np.int8 else 1)
    path = write_idx(tmp_path / "array-idx3", array, compress)
    read = read_idx(path)
    assert read.dtype == np.dtype(dtype) and read.shape == (2, 3, 4)
    assert np.array_equal(read, array)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_files_round_trip(tmp_path, name, compress):
    written = write_mnist(tmp_path, compress)
    ds = load_dataset(name, root=tmp_path, standardize=False)
    assert ds.input_shape == (1, 28, 28) and ds.in_channels == 1 and ds.num_classes == 10
    assert np.array_equal(np.rint(ds.x_train[:, 0].numpy() * 255), written["train-images-idx3-ubyte"][1])
    assert np.array_equal(ds.y_train.numpy(), written["train-labels-idx1-ubyte"][1])
    assert np.array_equal(np.rint(ds.x_test[:, 0].numpy() * 255), written["t10k-images-idx3-ubyte"][1])
    assert np.array_equal(ds.y_test.numpy(), written["t10k-labels-idx1-ubyte"][1])


def test_mnist_files_in_the_torchvision_layout(tmp_path):
    written = write_mnist(tmp_path / "FashionMNIST" / "raw", compress=True)
    ds = load_dataset("fashion-mnist", root=tmp_path, standardize=False)
    assert np.array_equal(ds.y_train.numpy(), written["train-labels-idx1-ubyte"][1])


def test_constant_images_standardize_to_finite_values(tmp_path):
    directory = tmp_path / "zeros"
    directory.mkdir()
    for file, shape in [("train-images-idx3-ubyte", (4, 28, 28)), ("t10k-images-idx3-ubyte", (2, 28, 28))]:
        write_idx(directory / file, np.zeros(shape, np.uint8), compress=False)
    write_idx(directory / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8), compress=False)
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(2, dtype=np.uint8), compress=False)
    ds = load_dataset("mnist", root=directory)
    assert torch.equal(ds.x_train, torch.zeros(4, 1, 28, 28)) and torch.equal(ds.x_test, torch.zeros(2, 1, 28, 28))


def test_missing_idx_file_is_named(tmp_path):
    written = write_mnist(tmp_path, compress=False)
    written["t10k-labels-idx1-ubyte"][0].unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"\x08\x03" + path.read_bytes()[2:])


def _trailing(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\x00")


def _header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:6])


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_cut, "truncated IDX file"),
        (_bad_magic, "bad IDX magic"),
        (_trailing, "trailing bytes"),
        (_header_only, "truncated IDX header"),
    ],
)
def test_corrupt_idx_file_is_named(tmp_path, corrupt, match):
    written = write_mnist(tmp_path, compress=False)
    path = written["train-images-idx3-ubyte"][0]
    corrupt(path)
    with pytest.raises(DatasetFileError, match=match) as error:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(error.value)


def test_truncated_gzip_is_named(tmp_path):
    written = write_mnist(tmp_path, compress=True)
    path = written["t10k-images-idx3-ubyte"][0]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DatasetFileError, match="corrupt gzip") as error:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(error.value)


def test_idx_label_count_and_image_size_are_checked(tmp_path):
    write_mnist(tmp_path, compress=False)
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), compress=False)
    with pytest.raises(DatasetFileError, match="expected 5 uint8 labels") as error:
        load_dataset("mnist", root=tmp_path)
    assert str(labels) in str(error.value)

    write_mnist(tmp_path, compress=False)
    images = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 10, 10), np.uint8), compress=False)
    with pytest.raises(DatasetFileError, match=r"\(n, 28, 28\)") as error:
        load_dataset("mnist", root=tmp_path)
    assert str(images) in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10 pickle batches

CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def write_cifar(directory: Path, protocol: int = 2, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Batches shaped like the python CIFAR-10 release: a dict with bytes keys, uint8 data rows, a label list."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for index, batch in enumerate(CIFAR_BATCHES):
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        content = {
            b"batch_label": f"batch {index}".encode(),
            b"labels": labels,
            b"data": images,
            b"filenames": [f"image_{index}_{i}.png".encode() for i in range(per_batch)],
        }
        (directory / batch).write_bytes(pickle.dumps(content, protocol=protocol))
        written[batch] = (images, labels)
    return written


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("subdir", ["cifar-10-batches-py", ""])
def test_cifar10_batches_round_trip(tmp_path, protocol, subdir):
    written = write_cifar(tmp_path / subdir if subdir else tmp_path, protocol)
    ds = load_dataset("cifar10", root=tmp_path, standardize=False)
    assert ds.input_shape == (3, 32, 32) and ds.in_channels == 3 and ds.num_classes == 10
    train_rows = np.concatenate([written[b][0] for b in CIFAR_BATCHES[:5]])
    assert np.array_equal(np.rint(ds.x_train.numpy().reshape(15, 3072) * 255), train_rows)
    assert ds.y_train.tolist() == [label for b in CIFAR_BATCHES[:5] for label in written[b][1]]
    assert np.array_equal(np.rint(ds.x_test.numpy().reshape(3, 3072) * 255), written["test_batch"][0])
    assert ds.y_test.tolist() == written["test_batch"][1]
    # channel 0 is the red plane: the first 1024 values of a row, row-major 32x32
    assert np.array_equal(np.rint(ds.x_test[0, 0].numpy() * 255), written["test_batch"][0][0, :1024].reshape(32, 32))


def test_cifar10_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_no_batches_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", root=tmp_path)


def _pickle_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _pickle_wrong_width(path: Path) -> None:
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}))


def _pickle_label_count(path: Path) -> None:
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}))


def _pickle_label_range(path: Path) -> None:
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 10]}))


def _pickle_not_a_dict(path: Path) -> None:
    path.write_bytes(pickle.dumps([1, 2, 3]))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (_pickle_truncated, "cannot unpickle"),
        (_pickle_wrong_width, "'data' is uint8"),
        (_pickle_label_count, "labels of shape"),
        (_pickle_label_range, "labels range 0..10"),
        (_pickle_not_a_dict, "found a list"),
    ],
)
def test_cifar10_corrupt_batch_is_named(tmp_path, corrupt, match):
    write_cifar(tmp_path)
    corrupt(tmp_path / "data_batch_3")
    with pytest.raises(DatasetFileError, match=match) as error:
        load_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "data_batch_3") in str(error.value)


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): a stand-in for a pickle that runs code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (io.open, (str(self.path), "w"))


def test_cifar10_pickle_cannot_run_code(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "marker"
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": _CreatesAFile(marker), b"labels": []}))
    with pytest.raises(DatasetFileError, match="refusing to load"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()
