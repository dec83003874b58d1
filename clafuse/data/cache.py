"""The ``.npy`` cache of decoded splits: memory-mapped on later loads, keyed by the source files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clafuse.data.common import Arrays
from clafuse.errors import ClafuseError
from clafuse.io.atomic import atomic_output

_CACHE_FORMAT = 1


def _cache_root() -> Path:
    env = os.environ.get("CLAFUSE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clafuse"


def _fingerprint(name: str, sources: list[Path], extra: str = "") -> str:
    """Key a cache entry to its source files, so replacing or upgrading them invalidates it."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}:{name}:{extra}".encode())
    for src in sources:
        st = src.stat()
        digest.update(f"|{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_split(
    name: str, sources: list[Path], split: str, build: Callable[[], dict[str, Arrays]], extra: str = "",
    standardise: tuple[float, float] | None = None,
) -> Arrays:
    """Return ``split`` from the ``.npy`` cache, building and storing all splits on a miss.

    ``standardise`` (mean, std) is applied before caching, so that a cached split loads as a plain
    memory map and a few calibration samples cost no pass over the whole set. Caching is best
    effort: an unwritable cache directory only costs speed.
    """
    if standardise is not None:
        name = f"{name}-std"
        extra = f"{extra}:{standardise}"
    directory = _cache_root() / f"{name}-{_fingerprint(name, sources, extra)}"
    hit = _read_cached(directory, split)
    if hit is not None:
        return hit
    arrays = build()
    if standardise is not None:
        mean, std = standardise
        arrays = {part: (_standardised(x, mean, std), y) for part, (x, y) in arrays.items()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for part, (x, y) in arrays.items():
            _save_npy(directory / f"{part}_x.npy", x)
            _save_npy(directory / f"{part}_y.npy", y)
    except (OSError, ClafuseError):
        pass
    return arrays[split]


def _standardised(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x - mean) / std`` as a new float32 array, in two passes over one allocation (the whole set
    is standardised once, when it is cached)."""
    out = np.subtract(x, np.float32(mean), dtype=np.float32)
    out /= np.float32(std)
    return out


def _save_npy(target: Path, array: np.ndarray) -> None:
    with atomic_output(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def _read_cached(directory: Path, split: str) -> Arrays | None:
    """Memory-map a cached split (copy-on-write, so tensors over it stay writable); None if absent or bad."""
    xp, yp = directory / f"{split}_x.npy", directory / f"{split}_y.npy"
    if not (xp.is_file() and yp.is_file()):
        return None
    try:
        x = np.load(xp, mmap_mode="c", allow_pickle=False)
        y = np.load(yp, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if x.dtype != np.float32 or y.dtype != np.int64 or x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        return None
    return x, y
