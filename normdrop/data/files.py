"""Datasets read from files the user has: IDX (MNIST, Fashion-MNIST) and CIFAR-10's python pickle batches."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from normdrop.data.base import DATASET_NAMES, FILE_DATASETS, DatasetFileError, Root, _Splits
from normdrop.data.options import _check_no_options

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
