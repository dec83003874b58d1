"""``.npz`` files: one set of inputs ``x`` with optional labels ``y``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from clafuse.data.common import check_labels, first_line
from clafuse.errors import DataError


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate ``x`` (numeric, finite) and optional ``y`` (non-negative integer labels)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read .npz file ({first_line(exc)})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (an .npy file holds one array; use np.savez)")
    with data:
        if "x" not in data.files:
            raise DataError(f"{path}: no array named 'x' (found: {', '.join(data.files) or 'none'})")
        try:
            x = data["x"]
            y = data["y"] if "y" in data.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{path}: cannot read .npz file ({first_line(exc)})") from exc
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: 'x' must be numeric, not {x.dtype}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{path}: 'x' holds no samples (shape {x.shape})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or infinite values")
    if y is not None:
        y = check_labels(y, len(x), f"{path}: 'y'")
    return x, y
