"""The user's data and model, checked and fingerprinted for ``normdrop ablate``.

Data (:func:`prepare_data`) comes as ``(X_train, y_train, X_test, y_test)`` numpy arrays or tensors, a pair of
map-style ``torch.utils.data.Dataset`` s (stacked into tensors: they must fit in memory), or a pair of DataLoaders
(used as they are). Inputs become float32 tensors, labels int64 class indices in ``[0, num_classes)``; anything
else is a :class:`UserInputError` naming what was wrong, before any training.

Fingerprints (sha256, see :class:`normdrop.spec.UserRunSpec`): of the data, every tensor's dtype, shape and bytes (for
DataLoaders, of every batch of one pass over each, in order); of the model, its structure and the source of its
own classes; of its initial state, the values ``model_fn()`` draws under a given seed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normdrop.seeds import derive_seed


class UserInputError(ValueError):
    """The user's model or data cannot be used; the message says what was wrong and what was expected."""


@dataclass(frozen=True)
class UserData:
    """The data of an ablation: tensors (``train = (x, y)``) or DataLoaders, with what the report says of them."""

    train: Any
    test: Any
    fingerprint: str
    num_classes: int
    input_shape: tuple[int, ...]
    train_size: int
    test_size: int
    loaders: bool
    class_counts: tuple[int, ...]

    @property
    def sample(self) -> Tensor:
        """A few training inputs (to trace the model's layers)."""
        if not self.loaders:
            return self.train[0][:4]
        return next(iter(self.train))[0][:4]

    def training_inputs(self, limit: int) -> Tensor:
        """The first ``limit`` training inputs (all of them if fewer)."""
        if not self.loaders:
            return self.train[0][:limit]
        chunks, count = [], 0
        for batch in self.train:
            chunks.append(batch[0])
            count += len(batch[0])
            if count >= limit:
                break
        return torch.cat(chunks)[:limit]

    def describe(self) -> dict[str, Any]:
        """Plain values for the report."""
        return {
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train_size": self.train_size,
            "test_size": self.test_size,
            "class_counts_train": list(self.class_counts),
            "form": "DataLoaders" if self.loaders else "tensors",
            "fingerprint": self.fingerprint,
        }


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise UserInputError(f"{what}: expected a numpy array or a torch tensor, got {type(value).__name__}")


def _inputs(x: Any, what: str) -> Tensor:
    x = _as_tensor(x, what)
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise UserInputError(f"{what}: expected numeric inputs, got dtype {x.dtype}")
    if x.ndim < 2:
        raise UserInputError(f"{what}: expected inputs of shape (n, ...) with at least 2 dims, got {tuple(x.shape)}")
    return x.to(torch.float32)


def _labels(y: Any, what: str) -> Tensor:
    y = _as_tensor(y, what)
    if y.is_floating_point():
        if not torch.equal(y, y.round()) or not torch.isfinite(y).all():
            raise UserInputError(f"{what}: labels must be integer class indices, got non-integer values ({y.dtype})")
    elif y.dtype == torch.bool or y.is_complex():
        raise UserInputError(f"{what}: labels must be integer class indices, got dtype {y.dtype}")
    if y.ndim != 1:
        raise UserInputError(f"{what}: labels must have shape (n,), got {tuple(y.shape)}")
    y = y.to(torch.int64)
    if len(y) and int(y.min()) < 0:
        raise UserInputError(f"{what}: labels must be class indices >= 0, got {int(y.min())}")
    return y


def _hash_tensors(tensors: Iterable[Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _stack_dataset(dataset: Any, what: str) -> tuple[Tensor, Tensor]:
    try:
        length = len(dataset)
    except TypeError:
        kind = type(dataset).__name__
        raise UserInputError(f"{what}: expected a map-style Dataset with __len__, got {kind}") from None
    if length == 0:
        raise UserInputError(f"{what}: the Dataset is empty")
    xs, ys = [], []
    for index in range(length):
        item = dataset[index]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise UserInputError(f"{what}: items must be (input, label) pairs, item {index} is {type(item).__name__}")
        xs.append(_as_tensor(item[0], f"{what}[{index}] input"))
        ys.append(torch.as_tensor(item[1]).reshape(()))
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise UserInputError(f"{what}: inputs have different shapes {sorted(shapes)[:3]}; expected one")
    return torch.stack(xs), torch.stack(ys)


def _from_tensors(x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> UserData:
    x_train, x_test = _inputs(x_train, "X_train"), _inputs(x_test, "X_test")
    y_train, y_test = _labels(y_train, "y_train"), _labels(y_test, "y_test")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise UserInputError(f"X_{split} has {len(x)} examples but y_{split} has {len(y)} labels; expected equal")
        if len(x) == 0:
            raise UserInputError(f"X_{split} is empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise UserInputError(
            f"X_train examples have shape {tuple(x_train.shape[1:])} but X_test's {tuple(x_test.shape[1:])}; "
            "expected the same"
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    counts = torch.bincount(y_train, minlength=num_classes)
    return UserData(
        train=(x_train, y_train),
        test=(x_test, y_test),
        fingerprint=_hash_tensors((x_train, y_train, x_test, y_test)),
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        train_size=len(y_train),
        test_size=len(y_test),
        loaders=False,
        class_counts=tuple(int(c) for c in counts),
    )


def _from_loaders(train: Any, test: Any) -> UserData:
    tensors, labels, shapes, sizes = [], {"train": [], "test": []}, set(), {}
    for split, loader in (("train", train), ("test", test)):
        count = 0
        for batch in loader:
            if not isinstance(batch, tuple | list) or len(batch) < 2:
                raise UserInputError(f"{split} DataLoader: batches must be (inputs, labels, ...), got {type(batch)}")
            x, y = _inputs(batch[0], f"{split} batch inputs"), _labels(batch[1], f"{split} batch labels")
            if len(x) != len(y):
                raise UserInputError(f"{split} DataLoader: a batch has {len(x)} inputs but {len(y)} labels")
            if batch[0].dtype != torch.float32 or batch[1].dtype != torch.int64:
                raise UserInputError(
                    f"{split} DataLoader: expected float32 inputs and int64 labels, got {batch[0].dtype} and "
                    f"{batch[1].dtype}"
                )
            tensors += [x, y]
            labels[split].append(y)
            shapes.add(tuple(x.shape[1:]))
            count += len(y)
        if count == 0:
            raise UserInputError(f"the {split} DataLoader yielded no example")
        sizes[split] = count
    if len(shapes) != 1:
        raise UserInputError(f"the DataLoaders' examples have different shapes {sorted(shapes)}; expected one")
    y_train, y_test = torch.cat(labels["train"]), torch.cat(labels["test"])
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return UserData(
        train=train,
        test=test,
        fingerprint=_hash_tensors(tensors),
        num_classes=num_classes,
        input_shape=shapes.pop(),
        train_size=sizes["train"],
        test_size=sizes["test"],
        loaders=True,
        class_counts=tuple(int(c) for c in torch.bincount(y_train, minlength=num_classes)),
    )


def prepare_data(data: Any) -> UserData:
    """Check and convert the user's data (see the module docstring)."""
    if isinstance(data, UserData):
        return data
    if isinstance(data, Mapping) or hasattr(data, "files"):  # a dict or a loaded .npz
        keys = ("X_train", "y_train", "X_test", "y_test")
        missing = [key for key in keys if key not in data]
        if missing:
            raise UserInputError(f"data is missing {', '.join(missing)}; expected the keys {', '.join(keys)}")
        return _from_tensors(*(data[key] for key in keys))
    if isinstance(data, tuple | list):
        if len(data) == 4:
            return _from_tensors(*data)
        if len(data) == 2:
            train, test = data
            if isinstance(train, torch.utils.data.DataLoader) and isinstance(test, torch.utils.data.DataLoader):
                return _from_loaders(train, test)
            if isinstance(train, torch.utils.data.Dataset) and isinstance(test, torch.utils.data.Dataset):
                x_train, y_train = _stack_dataset(train, "train Dataset")
                x_test, y_test = _stack_dataset(test, "test Dataset")
                return _from_tensors(x_train, y_train, x_test, y_test)
    raise UserInputError(
        "data: expected (X_train, y_train, X_test, y_test) arrays or tensors, a (train, test) pair of Datasets or of "
        f"DataLoaders, or a mapping with those four keys; got {type(data).__name__}"
        + (f" of {len(data)} items" if isinstance(data, tuple | list) else "")
    )


# ---- the model -------------------------------------------------------------------------------------------------


def _own_classes(model: nn.Module) -> list[type]:
    """Module classes of ``model`` defined outside torch and normdrop, each once, in tree order."""
    found: dict[type, None] = {}
    for module in model.modules():
        cls = type(module)
        if not cls.__module__.startswith(("torch", "normdrop.nn")):
            found.setdefault(cls)
    return list(found)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the module tree, the parameters' and buffers' names, shapes and dtypes, and the source of the
    model's own classes (a class whose source cannot be read contributes its qualified name)."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    for cls in _own_classes(model):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = f"{cls.__module__}.{cls.__qualname__}"
        digest.update(source.encode())
    return digest.hexdigest()


def state_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer value, in state_dict order."""
    return _hash_tensors(model.state_dict().values())


def build_model(model_fn: Callable[[], Any], seed: int) -> nn.Module:
    """``model_fn()`` with torch's generator seeded from ``derive_seed(seed, "init")`` (the caller's RNG state is
    kept); a result that is not an ``nn.Module`` is a :class:`UserInputError`."""
    name = getattr(model_fn, "__name__", repr(model_fn))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        try:
            model = model_fn()
        except Exception as error:
            raise UserInputError(f"{name}() raised {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise UserInputError(f"{name}() returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def load_object(reference: str, what: str) -> Any:
    """``path/to/file.py:name`` or ``package.module:name`` -> that attribute (one-line errors)."""
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise UserInputError(f"{what} {reference!r}: expected FILE.py:NAME or MODULE:NAME")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UserInputError(f"{what} {reference!r}: no such file {target!r}")
        module_name = f"normdrop_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UserInputError(f"{what} {reference!r}: cannot load {target!r} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so inspect.getsource finds the classes it defines
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise UserInputError(f"{what} {reference!r}: cannot import {target!r} ({error})") from None
    if not hasattr(module, attribute):
        raise UserInputError(f"{what} {reference!r}: {target!r} has no attribute {attribute!r}")
    return getattr(module, attribute)
