"""The dataset type and the checks every data source shares."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from clafuse.errors import DataError

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "train"

Arrays = tuple[np.ndarray, np.ndarray]

# Limits on what a data file may make clafuse allocate, checked against the sizes a file declares
# before anything is decoded, so a small hostile file (a compressed bomb, a header that lies about
# its shape, aliased pickle rows, a huge image) is refused instead of exhausting memory.
MAX_DATA_BYTES = 4 << 30
"""Default bound on one data source's decoded arrays (bytes); ``CLAFUSE_MAX_DATA_BYTES`` overrides it."""
MAX_DATA_BYTES_ENV = "CLAFUSE_MAX_DATA_BYTES"
MAX_IMAGE_PIXELS = 1 << 25
"""Bound on one image's width x height (about 5,800 x 5,800), checked from its header before decoding."""
MAX_LABEL = 2**31 - 1
"""Largest class label accepted: labels index a model's outputs, so larger ones are mistakes."""


@dataclass
class Dataset:
    """Inputs ``x`` (float32, one sample per row) with optional int64 labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor | None
    name: str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int | None:
        """Largest label plus one, or None for unlabelled data."""
        if self.y is None or self.y.numel() == 0:
            return None
        return int(self.y.max()) + 1


def calibration_inputs(ds: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs drawn without replacement by a permutation seeded with ``seed`` (same seed, same samples)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise DataError(f"need at least 2 calibration samples, got {n}")
    if n > len(ds):
        raise DataError(f"asked for {n} calibration samples but {ds.name} has only {len(ds)}")
    if not -(2**63) <= int(seed) < 2**64:  # the range torch's generator takes
        raise DataError(f"the seed must be an integer from -2**63 to 2**64 - 1, got {seed}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(ds), generator=gen)[:n]
    return ds.x[idx].contiguous()


def max_data_bytes() -> int:
    """The bound on decoded data: ``$CLAFUSE_MAX_DATA_BYTES`` (a positive integer) or :data:`MAX_DATA_BYTES`."""
    raw = os.environ.get(MAX_DATA_BYTES_ENV, "").strip()
    if not raw:
        return MAX_DATA_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise DataError(f"{MAX_DATA_BYTES_ENV} must be a positive number of bytes, got {ascii(raw)[:40]}")
    return value


def human_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a number of at least 1 (``4.0 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def check_data_size(nbytes: int, what: str) -> None:
    """Refuse data that would take more than :func:`max_data_bytes` once decoded (as float32)."""
    limit = max_data_bytes()
    if nbytes > limit:
        raise DataError(f"{what} would take {human_bytes(nbytes)} in memory, more than the limit of "
                        f"{human_bytes(limit)} (set {MAX_DATA_BYTES_ENV} to a larger number of bytes to allow it)")


def decoded_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes an array of ``shape`` takes with ``itemsize`` and as float32, whichever is larger (exact,
    no integer overflow)."""
    return math.prod(int(d) for d in shape) * max(int(itemsize), 4)


def check_varied(x: torch.Tensor, what: str) -> None:
    """Refuse calibration inputs that are all the same sample (all-zero data, say): every layer's
    activations are then constant over the samples, so activation metrics are undefined."""
    if len(x) >= 2 and bool((x == x[:1]).all()):
        raise DataError(f"{what}: all {len(x)} calibration samples are identical, so activations cannot tell layers "
                        "apart; use varied data (or --metric neuron, which needs none)")


def check_split(split: str | None) -> str:
    if split is None:
        return DEFAULT_SPLIT
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    return split


def to_dataset(x: np.ndarray, y: np.ndarray | None, name: str) -> Dataset:
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Dataset(x=xt, y=yt, name=name)


def check_inputs(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as float32 with one sample per row: numeric, at least 2-D, samples present, all finite."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what} must be numeric, not {x.dtype}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{what} holds no samples (shape {x.shape})")
    if x.ndim == 1:
        raise DataError(f"{what} has shape {x.shape}, one number per sample; give one sample per row, "
                        f"shaped (samples, features...) (for one feature: x.reshape(-1, 1))")
    if x.size == 0:
        raise DataError(f"{what} has shape {x.shape}: its samples hold no values")
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{what} contains NaN or infinite values (or values too large for float32)")
    return x


def check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """``y`` as int64: one integer label per sample, from 0 to :data:`MAX_LABEL`."""
    if y.ndim != 1:
        raise DataError(f"{what} must be one label per sample, got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} samples")
    if y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{what} must hold integer class labels")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{what} must hold integer class labels, not {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{what} has negative labels")
    if len(y) and y.max() > MAX_LABEL:
        raise DataError(f"{what} has label {y.max():.0f}, larger than {MAX_LABEL}; labels are class indices from 0")
    return y.astype(np.int64)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
