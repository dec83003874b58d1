"""CIFAR-10 / CIFAR-100 python folders, read with an unpickler that only admits numpy arrays."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np

from clafuse.data.cache import cached_split
from clafuse.data.common import Arrays, check_data_size, check_labels, first_line
from clafuse.errors import DataError

_CIFAR10_TRAIN_PREFIX = "data_batch_"
CIFAR_LAYOUTS = {  # kind: (test file, label key, classes)
    "cifar10": ("test_batch", "labels", 10),
    "cifar100": ("test", "fine_labels", 100),
}
_CIFAR_PIXELS = 3 * 32 * 32
# The only globals a CIFAR pickle needs: numpy's array reconstruction (numpy 1 and 2 module names).
_NP_RECONSTRUCT = np.array(0).__reduce__()[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _cifar_train_files(directory: Path, kind: str) -> list[Path]:
    if kind == "cifar100":
        train = directory / "train"
        return [train] if train.is_file() else []
    numbered = []
    for p in directory.glob(f"{_CIFAR10_TRAIN_PREFIX}*"):
        suffix = p.name[len(_CIFAR10_TRAIN_PREFIX):]
        if suffix.isdigit() and p.is_file():
            numbered.append((int(suffix), p))
    return [p for _, p in sorted(numbered)]


def cifar_kind(directory: Path) -> str | None:
    """"cifar10", "cifar100" or None, by the file names of the python versions of the sets."""
    if (directory / "test_batch").is_file() or (directory / f"{_CIFAR10_TRAIN_PREFIX}1").is_file():
        return "cifar10"
    if (directory / "meta").is_file() and ((directory / "train").is_file() or (directory / "test").is_file()):
        return "cifar100"
    return None


def load_cifar_folder(directory: Path, split: str, kind: str) -> Arrays:
    """Splits of a CIFAR folder as (N, 3, 32, 32) float32 in [0, 1] with int64 labels.

    CIFAR-10 trains on ``data_batch_N`` (in numeric order), CIFAR-100 on ``train`` with its
    ``fine_labels`` (100 classes). val is the last fifth of the training images (10,000 of 50,000:
    exactly ``data_batch_5`` for CIFAR-10), the same size as the test set, as IDX folders do;
    train is the rest. test is ``test_batch`` / ``test``.
    """
    test_name, label_key, classes = CIFAR_LAYOUTS[kind]
    train_files = _cifar_train_files(directory, kind)
    test_file = directory / test_name if (directory / test_name).is_file() else None
    if split == "test" and test_file is None:
        raise DataError(f"{directory}: no {test_name} file for the test split")
    if split != "test" and not train_files:
        expected = "data_batch_1..5" if kind == "cifar10" else "train"
        raise DataError(f"{directory}: no {expected} file for the {split} split")

    def build() -> dict[str, Arrays]:
        out: dict[str, Arrays] = {}
        if train_files:
            batches = [_read_cifar_batch(p, label_key, classes) for p in train_files]
            x = _cifar_pixels(np.concatenate([b[0] for b in batches]))
            y = np.concatenate([b[1] for b in batches])
            n_train = len(x) - len(x) // 5
            out["train"] = (x[:n_train], y[:n_train])
            out["val"] = (x[n_train:], y[n_train:])
        if test_file is not None:
            x, y = _read_cifar_batch(test_file, label_key, classes)
            out["test"] = (_cifar_pixels(x), y)
        return out

    sources = [*train_files, *([test_file] if test_file is not None else [])]
    x, y = cached_split(f"{kind}-{directory.resolve().name}", sources, split, build)
    if len(x) == 0:
        raise DataError(f"{directory}: the {split} split is empty")
    return x, y


def _cifar_pixels(rows: np.ndarray) -> np.ndarray:
    """uint8 rows of 3072 values (the red, green, then blue 32x32 planes) as (N, 3, 32, 32) in [0, 1]."""
    x = rows.reshape(-1, 3, 32, 32).astype(np.float32)
    x /= 255.0
    return x


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused before it is
    imported or called, so a crafted file cannot run code. Arrays are bounded by the file: an
    array may not be created larger than the file's size, nor with Python objects as elements
    (whose count the pickle could declare without holding them)."""

    def __init__(self, file: BinaryIO, path: Path, size: int) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._size = size

    def find_class(self, module: str, name: str) -> object:
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise DataError(
                f"{self._path}: refusing to load: the pickle references {ascii(f'{module}.{name}')[:100]}, "
                "but a CIFAR batch holds only numpy arrays, lists and bytes"
            )
        if allowed is _NP_RECONSTRUCT:
            return self._reconstruct
        if allowed is np.dtype:
            return self._dtype
        return allowed

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not np.ndarray:
            raise DataError(f"{self._path}: not a CIFAR batch (it pickles an array of an unknown kind)")
        dt = self._dtype(dtype)
        count = math.prod(int(d) for d in shape) if isinstance(shape, tuple) else int(shape)
        if count * dt.itemsize > self._size:
            raise DataError(f"{self._path}: not a CIFAR batch: it declares an array larger than the file")
        return _NP_RECONSTRUCT(np.ndarray, shape, dt)

    def _dtype(self, *args: object) -> np.dtype:
        dt = np.dtype(*args)
        if dt.hasobject:
            raise DataError(f"{self._path}: not a CIFAR batch: it holds an array of Python objects")
        return dt


def _read_cifar_batch(path: Path, label_key: str, classes: int) -> Arrays:
    """One CIFAR pickle: a dict with ``data`` (N x 3072 uint8) and ``label_key`` (N integer labels)."""
    try:
        size = path.stat().st_size
        # Decoded float32 pixels take four times the file's bytes.
        check_data_size(4 * size, str(path))
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, path, size).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read CIFAR batch ({first_line(exc)})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR batch (a pickled {type(batch).__name__}, expected a dict)")
    data, labels = _batch_entry(batch, "data"), _batch_entry(batch, label_key)
    if data is None or labels is None:
        found = ", ".join(sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in batch))
        raise DataError(f"{path}: not a CIFAR batch: needs 'data' and '{label_key}' (found: {found or 'none'})")
    rows = len(data) if isinstance(data, (list, tuple)) else None
    if rows is not None and rows * _CIFAR_PIXELS > size:
        raise DataError(f"{path}: not a CIFAR batch: 'data' lists {rows} rows of {_CIFAR_PIXELS} pixels, more than "
                        f"the file's {size} bytes can hold (rows shared by reference?)")
    if rows is not None and isinstance(labels, (list, tuple)) and len(labels) != rows:
        raise DataError(f"{path}: '{label_key}' has {len(labels)} labels for {rows} images")
    try:
        x, labels = np.asarray(data), np.asarray(labels)
    except ValueError as exc:
        raise DataError(f"{path}: not a CIFAR batch: 'data' or '{label_key}' is ragged ({first_line(exc)})") from exc
    if x.ndim != 2 or x.shape[1] != _CIFAR_PIXELS:
        raise DataError(f"{path}: 'data' must hold rows of {_CIFAR_PIXELS} pixels (3x32x32), got shape {x.shape}")
    if x.dtype != np.uint8:
        if x.dtype.kind not in "iu" or x.dtype.hasobject or (x.size and (x.min() < 0 or x.max() > 255)):
            raise DataError(f"{path}: 'data' must hold 8-bit pixel values, not {x.dtype}")
        x = x.astype(np.uint8)
    y = check_labels(labels, len(x), f"{path}: '{label_key}'")
    if len(y) and int(y.max()) >= classes:
        raise DataError(f"{path}: '{label_key}' has label {int(y.max())}, but the set has {classes} classes")
    return x, y


def _batch_entry(batch: dict, key: str) -> object:
    """``batch[b"key"]`` (the original Python 2 pickles) or ``batch["key"]`` (re-pickled ones)."""
    value = batch.get(key.encode())
    return batch.get(key) if value is None else value
