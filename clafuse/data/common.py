"""The dataset type and the checks every data source shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clafuse.errors import DataError

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "train"

Arrays = tuple[np.ndarray, np.ndarray]


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


def check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
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
    return y.astype(np.int64)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
