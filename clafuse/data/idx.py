"""IDX folders (the MNIST file format), optionally gzipped."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from clafuse.data.cache import cached_split
from clafuse.data.common import Arrays, check_data_size, check_inputs, check_labels, decoded_bytes, first_line
from clafuse.errors import DataError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_paths(directory: Path) -> dict[str, Path | None]:
    found: dict[str, Path | None] = {}
    for key, stem in IDX_FILES.items():
        found[key] = next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)
    return found


def load_idx_folder(directory: Path, split: str, cache_name: str = "idx",
                     standardise: tuple[float, float] | None = None) -> Arrays:
    """Splits of an IDX folder: the last sixth of the training files is val (10k of 60k), t10k is test."""
    paths = idx_paths(directory)
    needed = ["train_images", "train_labels"] if split != "test" else ["test_images", "test_labels"]
    missing = [IDX_FILES[k] for k in needed if paths[k] is None]
    if missing:
        raise DataError(f"{directory}: no {' or '.join(missing)}[.gz] for the {split} split")

    def build() -> dict[str, Arrays]:
        out: dict[str, Arrays] = {}
        if paths["train_images"] is not None and paths["train_labels"] is not None:
            x, y = _read_idx_pair(paths["train_images"], paths["train_labels"])
            n_val = len(x) // 6
            out["train"] = (x[: len(x) - n_val], y[: len(x) - n_val])
            out["val"] = (x[len(x) - n_val :], y[len(x) - n_val :])
        if paths["test_images"] is not None and paths["test_labels"] is not None:
            out["test"] = _read_idx_pair(paths["test_images"], paths["test_labels"])
        return out

    sources = [p for p in paths.values() if p is not None]
    name = cache_name if cache_name != "idx" else f"idx-{directory.resolve().name}"
    x, y = cached_split(name, sources, split, build, standardise=standardise)
    if len(x) == 0:
        raise DataError(f"{directory}: the {split} split is empty")
    return x, y


def _read_idx_pair(images: Path, labels: Path) -> Arrays:
    x = _read_idx(images)
    y = _read_idx(labels)
    if x.ndim < 2:
        raise DataError(f"{images}: expected images with at least 2 dimensions, got shape {x.shape}")
    x = np.divide(x, np.float32(255), dtype=np.float32) if x.dtype == np.uint8 else check_inputs(x, str(images))
    if x.ndim == 3:
        x = x[:, None, :, :]
    return np.ascontiguousarray(x), check_labels(y, len(x), str(labels))


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0 0 <type> <ndim>, big-endian sizes, then data.

    The header is read first and the declared size checked against the size limit and, for a plain
    file, against the file's length, so no more than the declared bytes are ever read or
    decompressed (a gzip bomb or a lying header costs nothing).
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            magic = fh.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an IDX file")
            ndim = magic[3]
            sizes = fh.read(4 * ndim)
            if ndim == 0 or len(sizes) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", sizes)
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            expected = math.prod(shape) * dtype.itemsize
            header = 4 + 4 * ndim
            if path.suffix != ".gz" and path.stat().st_size - header != expected:
                raise DataError(f"{path}: IDX data is {path.stat().st_size - header} bytes, header says {expected}")
            check_data_size(decoded_bytes(shape, dtype.itemsize), f"{path} (shape {shape})")
            raw = fh.read(expected + 1)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file ({first_line(exc)})") from exc
    if len(raw) > expected:
        raise DataError(f"{path}: the file holds more data than the {expected} bytes its header declares")
    if len(raw) < expected:
        raise DataError(f"{path}: IDX data is {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
