"""Data folders beyond IDX: CIFAR-10/100 python pickles and image folders (one sub-folder per class)."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clafuse import api
from clafuse.data import describe_source, load_source
from clafuse.errors import DataError
from clafuse.io.checkpoint import load_checkpoint
from tests.helpers import save_mlp


pytestmark = pytest.mark.usefixtures("private_cache")


def _raises(match: str, src: str, split: str | None = None) -> str:
    """Load ``src`` expecting a one-line DataError matching ``match``; return its message."""
    with pytest.raises(DataError, match=match) as info:
        load_source(src, split)
    assert "\n" not in str(info.value)
    return str(info.value)


def _rows(x: np.ndarray) -> Counter:
    return Counter(row.tobytes() for row in x)


# --- CIFAR: fake folders written like the original (Python 2) pickles -----------------------------


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` opcodes, as the original CIFAR files hold them
    (loaded with encoding='bytes', their keys come back as bytes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: str | bytes) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The originals were written by numpy 1, whose arrays refer to numpy.core.multiarray.
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _batch(rng: np.random.Generator, n: int, label_key: bytes, classes: int) -> dict:
    labels = rng.integers(0, classes, size=n)
    labels[0] = classes - 1
    return {b"batch_label": b"fake", b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in labels]}


def _cifar10(root: Path, per_batch: int = 8, n_test: int = 10) -> dict[str, dict]:
    """data_batch_1..5 of ``per_batch`` images, test_batch and batches.meta; returns the batches."""
    rng = np.random.default_rng(10)
    root.mkdir(parents=True)
    batches = {f"data_batch_{i}": _batch(rng, per_batch, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _batch(rng, n_test, b"labels", 10)
    for name, batch in batches.items():
        (root / name).write_bytes(_py2_pickle(batch))
    (root / "batches.meta").write_bytes(_py2_pickle({b"label_names": [b"class%d" % i for i in range(10)]}))
    return batches


def _cifar100(root: Path, n_train: int = 40, n_test: int = 6) -> dict[str, dict]:
    rng = np.random.default_rng(100)
    root.mkdir(parents=True)
    files = {}
    for name, n in (("train", n_train), ("test", n_test)):
        files[name] = _batch(rng, n, b"fine_labels", 100)
        files[name][b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, size=n)]
        (root / name).write_bytes(_py2_pickle(files[name]))
    (root / "meta").write_bytes(_py2_pickle({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    return files


def _chw(batch: dict) -> np.ndarray:
    return batch[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0


def test_cifar10_splits_pixels_and_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = _cifar10(folder)
    train, val, test = (load_source(str(folder), s) for s in ("train", "val", "test"))

    assert (len(train), len(val), len(test)) == (32, 8, 10)
    for ds in (train, val, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (3, 32, 32)
        assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
    assert train.name == f"{folder}:train" and load_source(f"{folder}:val").name == f"{folder}:val"
    # Train is data_batch_1..4 in order, val exactly data_batch_5, test the test batch (CHW rows).
    expected_train = np.concatenate([_chw(batches[f"data_batch_{i}"]) for i in range(1, 5)])
    assert np.array_equal(train.x.numpy(), expected_train)
    assert train.y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 5)), [])
    assert np.array_equal(val.x.numpy(), _chw(batches["data_batch_5"]))
    assert val.y.tolist() == batches["data_batch_5"][b"labels"]
    assert np.array_equal(test.x.numpy(), _chw(batches["test_batch"]))
    assert test.y.tolist() == batches["test_batch"][b"labels"]
    assert train.num_classes == 10
    # The red plane comes first: pixel (0, 0) of channel c is byte c * 1024 of the row.
    row = batches["test_batch"][b"data"][0]
    assert [round(float(test.x[0, c, 0, 0]) * 255) for c in range(3)] == [row[0], row[1024], row[2048]]
    assert not (_rows(train.x.numpy()) & _rows(val.x.numpy()))
    assert describe_source(f"{folder}:val") == {"source": f"{folder}:val", "split": "val", "num_samples": 8,
                                                "input_shape": [3, 32, 32]}


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    files = _cifar100(folder)
    train, val, test = (load_source(str(folder), s) for s in ("train", "val", "test"))

    assert (len(train), len(val), len(test)) == (32, 8, 6)
    assert train.x.shape == (32, 3, 32, 32) and test.x.dtype == torch.float32
    fine = files["train"][b"fine_labels"]
    assert train.y.tolist() == fine[:32] and val.y.tolist() == fine[32:]
    assert train.num_classes == 100 and max(fine) == 99
    assert np.array_equal(val.x.numpy(), _chw(files["train"])[32:])
    assert np.array_equal(test.x.numpy(), _chw(files["test"]))
    assert test.y.tolist() == files["test"][b"fine_labels"]


def _loads_from_cache(monkeypatch: pytest.MonkeyPatch, reader: str, src: str):
    """Load ``src`` twice, the second time with ``clafuse.data.<reader>`` failing: the same data must come
    back from the cache. Returns the first load."""
    first = load_source(src)

    def not_called(*args: object) -> None:
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as patch:
        patch.setattr(f"clafuse.data.{reader}", not_called)
        again = load_source(src)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    return first


def test_cifar_loads_are_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "c10"
    _cifar10(folder)
    first = _loads_from_cache(monkeypatch, "cifar._read_cifar_batch", f"{folder}:val")

    monkeypatch.setenv("CLAFUSE_CACHE", str(tmp_path / "fresh-cache"))
    fresh = load_source(f"{folder}:val")
    assert torch.equal(first.x, fresh.x) and torch.equal(first.y, fresh.y)

    # Replacing a file invalidates the cached entry.
    rng = np.random.default_rng(5)
    (folder / "data_batch_5").write_bytes(_py2_pickle(_batch(rng, 8, b"labels", 10)))
    changed = load_source(f"{folder}:val")
    assert not torch.equal(first.x, changed.x)


def test_cifar_repickled_with_python3_str_keys(tmp_path: Path) -> None:
    folder = tmp_path / "c10"
    folder.mkdir()
    x = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072) % 256
    (folder / "test_batch").write_bytes(pickle.dumps({"data": x, "labels": [3, 1, 4, 1]}, protocol=4))
    test = load_source(str(folder), "test")
    assert test.y.tolist() == [3, 1, 4, 1]
    assert np.array_equal(test.x.numpy(), x.reshape(4, 3, 32, 32).astype(np.float32) / 255.0)


class RunsCommand:
    """Unpickling runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class MakesDir:
    """Unpickling runs ``os.mkdir(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class ExecsCode:
    """Unpickling runs ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize(
    ("payload", "file", "refused"),
    [
        ("system", "data_batch_1", "system"),
        ("mkdir", "test_batch", "mkdir"),
        ("exec", "data_batch_3", "builtins.exec"),
        ("system-py2", "test_batch", "system"),
    ],
)
def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path: Path, payload: str, file: str,
                                                         refused: str) -> None:
    folder = tmp_path / "evil-cifar"
    _cifar10(folder)
    marker = tmp_path / "marker"
    evil = {
        "system": lambda: RunsCommand(f"touch {marker}"),
        "system-py2": lambda: RunsCommand(f"touch {marker}"),
        "mkdir": lambda: MakesDir(marker),
        "exec": lambda: ExecsCode(f"open({str(marker)!r}, 'w').write('ran')"),
    }[payload]()
    batch = {b"data": np.zeros((8, 3072), dtype=np.uint8), b"labels": evil}
    raw = _py2_pickle(batch) if payload.endswith("py2") else pickle.dumps(batch, protocol=4)
    (folder / file).write_bytes(raw)

    message = _raises("refusing to load", str(folder), "test" if file == "test_batch" else "train")
    assert refused in message and str(folder / file) in message
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    pickle.loads(raw, encoding="bytes")
    assert marker.exists()


def _write_bad_cifar(folder: Path, kind: str) -> tuple[str, str]:
    """Damage a fake CIFAR-10 folder; return (split to load, expected message part)."""
    test_batch = folder / "test_batch"
    if kind == "truncated":
        test_batch.write_bytes(test_batch.read_bytes()[:500])
        return "test", "cannot read CIFAR batch"
    if kind == "not-a-dict":
        test_batch.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
        return "test", "expected a dict"
    if kind == "no-labels":
        test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=4))
        return "test", "needs 'data' and 'labels'"
    if kind == "wrong-shape":
        test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, protocol=4))
        return "test", "rows of 3072 pixels"
    if kind == "ragged":
        test_batch.write_bytes(pickle.dumps({b"data": [[1, 2], [3]], b"labels": [0, 1]}, protocol=4))
        return "test", "ragged"
    if kind == "float-pixels":
        test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}, protocol=4))
        return "test", "8-bit pixel values"
    if kind == "label-out-of-range":
        test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=4))
        return "test", "label 10, but the set has 10 classes"
    if kind == "label-count":
        test_batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=4))
        return "test", "1 labels for 2 samples"
    if kind == "no-test":
        test_batch.unlink()
        return "test", "no test_batch file"
    if kind == "no-train":
        for i in range(1, 6):
            (folder / f"data_batch_{i}").unlink()
        return "val", "no data_batch_1..5 file"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "not-a-dict", "no-labels", "wrong-shape", "ragged", "float-pixels",
                                  "label-out-of-range", "label-count", "no-test", "no-train"])
def test_cifar_errors(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "c10"
    _cifar10(folder)
    split, needle = _write_bad_cifar(folder, kind)
    _raises(needle, str(folder), split)


def test_cifar_folder_one_level_down_and_unknown_folders(tmp_path: Path) -> None:
    _cifar10(tmp_path / "download" / "cifar-10-batches-py")
    message = _raises("sub-folder cifar-10-batches-py/", str(tmp_path / "download"))
    assert str(tmp_path / "download" / "cifar-10-batches-py") in message

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    message = _raises("not a data folder", str(empty))
    for expected in ("IDX", "CIFAR-10", "CIFAR-100", "image folder"):
        assert expected in message


# --- image folders --------------------------------------------------------------------------------


def _gray(seed: int, size: tuple[int, int] = (6, 4)) -> np.ndarray:
    """A distinct grayscale image of (width, height) ``size``, as an (H, W) uint8 array."""
    w, h = size
    return ((np.arange(w * h) * 3 + seed * 11) % 256).astype(np.uint8).reshape(h, w)


def _save(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)


def _gray_folder(root: Path, classes: dict[str, int], start: int = 0) -> dict[Path, tuple[np.ndarray, str]]:
    """``classes`` {name: count} of distinct grayscale PNGs; returns {path: (pixels, class)}."""
    written, seed = {}, start
    for name, count in classes.items():
        for i in range(count):
            pixels = _gray(seed)
            path = root / name / f"img{i:02d}.png"
            _save(path, pixels)
            written[path] = (pixels, name)
            seed += 1
    return written


def test_image_folder_grayscale_whole_folder_split(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    written = _gray_folder(root, {"zeta": 5, "alpha": 5, "mid": 5})
    (root / "alpha" / ".DS_Store").write_bytes(b"junk")
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / "README.md").write_text("a file beside the class folders")

    splits = {s: load_source(str(root), s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 9, "val": 3, "test": 3}
    for ds in splits.values():
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 4, 6)
    # Labels follow the sorted class names; the split is a permutation seeded with 0 of the images
    # sorted by class, then file name: 60/20/20.
    classes = ["alpha", "mid", "zeta"]
    ordered = sorted(written, key=lambda p: (classes.index(written[p][1]), p.name))
    perm = np.random.default_rng(0).permutation(15)
    bounds = {"train": perm[:9], "val": perm[9:12], "test": perm[12:]}
    for split, idx in bounds.items():
        expected_x = np.stack([written[ordered[i]][0] for i in idx])[:, None] / 255.0
        expected_y = [classes.index(written[ordered[i]][1]) for i in idx]
        assert np.allclose(splits[split].x.numpy(), expected_x)
        assert splits[split].y.tolist() == expected_y
    everything = sum((_rows(d.x.numpy()) for d in splits.values()), Counter())
    assert len(everything) == 15 and max(everything.values()) == 1
    assert float(splits["train"].x.min()) >= 0.0 and float(splits["train"].x.max()) <= 1.0


def test_image_folder_rgb_when_any_image_has_colour(tmp_path: Path) -> None:
    root = tmp_path / "colours"
    rgb = np.zeros((3, 5, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    rgb[0, 0] = (1, 2, 3)
    _save(root / "a" / "rgb.png", rgb)
    _save(root / "a" / "gray.png", np.full((3, 5), 77, dtype=np.uint8))
    _save(root / "b" / "palette.gif", rgb, mode="P")
    _save(root / "b" / "rgba.png", np.dstack([rgb, np.full((3, 5), 255, np.uint8)]))
    _save(root / "b" / "photo.jpg", rgb)

    x = np.concatenate([load_source(str(root), s).x.numpy() for s in ("train", "val", "test")])
    assert x.shape == (5, 3, 3, 5)
    everything = load_source(str(root))
    assert everything.x.shape[1] == 3
    # Gray images repeat their value in all three channels; RGB keeps the channel order (CHW).
    assert any(np.allclose(img, 77 / 255.0) for img in x)
    exact = [img for img in x if np.isclose(img[0, 1, 1] * 255, 200) and np.isclose(img[2, 1, 1] * 255, 50)]
    assert any(np.allclose(img[:, 0, 0] * 255, [1, 2, 3]) for img in exact)


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "split"
    _gray_folder(root / "train", {"cat": 4, "dog": 3, "emu": 3})
    val = _gray_folder(root / "val", {"cat": 1, "emu": 2}, start=50)
    test = _gray_folder(root / "test", {"dog": 2}, start=80)

    train_ds, val_ds, test_ds = (load_source(str(root), s) for s in ("train", "val", "test"))
    assert (len(train_ds), len(val_ds), len(test_ds)) == (10, 3, 2)
    assert train_ds.y.tolist() == [0] * 4 + [1] * 3 + [2] * 3
    # val/ has no dog: emu keeps label 2, the index of emu among train/'s classes.
    assert val_ds.y.tolist() == [0, 2, 2] and test_ds.y.tolist() == [1, 1]
    assert np.allclose(val_ds.x.numpy()[:, 0], np.stack([v[0] for v in val.values()]) / 255.0)
    assert np.allclose(test_ds.x.numpy()[:, 0], np.stack([v[0] for v in test.values()]) / 255.0)


def test_image_folder_train_only_carves_val_and_has_no_test(tmp_path: Path) -> None:
    root = tmp_path / "trainonly"
    _gray_folder(root / "train", {"a": 5, "b": 5})
    train, val = load_source(str(root)), load_source(f"{root}:val")
    assert (len(train), len(val)) == (8, 2)
    assert not (_rows(train.x.numpy()) & _rows(val.x.numpy()))
    perm = np.random.default_rng(0).permutation(10)
    assert val.y.tolist() == [int(i >= 5) for i in perm[8:]]
    _raises(r"no test/ folder for the test split \(found: train/\)", str(root), "test")


def test_image_folder_is_cached_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cached"
    _gray_folder(root, {"a": 5, "b": 5})
    _loads_from_cache(monkeypatch, "images._read_images", f"{root}:test")

    _save(root / "b" / "extra.png", _gray(99))
    assert sum(len(load_source(str(root), s)) for s in ("train", "val", "test")) == 11



def _into_split(root: Path, split: str) -> None:
    """Move the class folders ``a`` and ``b`` of ``root`` into ``root/split/``."""
    for name in ("a", "b"):
        (root / name).rename(root / f"{name}-tmp")
        (root / split).mkdir(exist_ok=True)
        (root / f"{name}-tmp").rename(root / split / name)

def _bad_image_folder(root: Path, kind: str) -> tuple[str, str, str]:
    """Build a broken image folder; return (split, expected message part, file the message names)."""
    _gray_folder(root, {"a": 3, "b": 3})
    if kind == "mixed-sizes":
        _save(root / "b" / "wide.png", _gray(7, size=(8, 4)))
        return "train", "image is 8x4 pixels but .* is 6x4; all images must have the same size", "b/wide.png"
    if kind == "garbage":
        (root / "b" / "broken.png").write_bytes(b"definitely not a png")
        return "train", "cannot read image", "b/broken.png"
    if kind == "truncated":
        raw = (root / "a" / "img00.png").read_bytes()
        (root / "a" / "img00.png").write_bytes(raw[: len(raw) // 2])
        return "train", "cannot read image", "a/img00.png"
    if kind == "empty-class":
        (root / "c").mkdir()
        (root / "c" / "notes.txt").write_text("no images")
        return "train", "class folder holds no images", "c"
    if kind == "sixteen-bit":
        Image.fromarray(np.full((4, 6), 1000, dtype=np.uint16)).save(root / "a" / "deep.png")
        return "train", "16-bit or float pixels", "a/deep.png"
    if kind == "unknown-val-class":
        _into_split(root, "train")
        _gray_folder(root / "val", {"z": 1})
        return "val", "class 'z' is not among the training classes", "val/z"
    if kind == "no-train-folder":
        _into_split(root, "val")
        return "val", r"split folders need a train/ folder.*found: val/", ""
    if kind == "too-few":
        for p in sorted((root / "b").iterdir()) + sorted((root / "a").iterdir())[1:]:
            p.unlink()
        (root / "b").rmdir()
        return "val", "the val split is empty", ""
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["mixed-sizes", "garbage", "truncated", "empty-class", "sixteen-bit",
                                  "unknown-val-class", "no-train-folder", "too-few"])
def test_image_folder_errors(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "imgs"
    split, needle, names = _bad_image_folder(root, kind)
    message = _raises(needle, str(root), split)
    if names:
        assert str(root / names) in message


def test_empty_split_folder_and_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    (root / "cls").mkdir(parents=True)
    _raises("class folder holds no images", str(root))
    (root / "cls").rmdir()
    (root / "train").mkdir()
    _raises("no class sub-folders", str(root))


# --- end to end -----------------------------------------------------------------------------------


def _digit_folder(root: Path) -> None:
    """Two classes of 8x8 grayscale images a small MLP can tell apart: bright left or right half."""
    rng = np.random.default_rng(3)
    for label, name in enumerate(("left", "right")):
        for i in range(15):
            pixels = rng.integers(0, 60, size=(8, 8)).astype(np.uint8)
            pixels[:, 4 * label : 4 * label + 4] += 180
            _save(root / name / f"{i:02d}.png", pixels)


def test_cli_finetune_and_eval_on_an_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "halves"
    _digit_folder(root)
    ckpt = save_mlp(tmp_path / "mlp.safetensors", 0, [16], classes=2)
    out = tmp_path / "ft.safetensors"
    env = {**os.environ, "CLAFUSE_CACHE": str(tmp_path / "cache")}

    def cli(*args: object) -> dict:
        proc = subprocess.run([sys.executable, "-m", "clafuse", *map(str, args), "--json"], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    # No --val: an image folder has its own val split.
    report = cli("finetune", ckpt, "--data", root, "-o", out, "--epochs", 1, "--batch-size", 8, "--lr", 0.05)
    assert len(report["history"]) == 1 and out.exists()
    assert load_checkpoint(out).keys() == load_checkpoint(ckpt).keys()

    evaluated = cli("eval", ckpt, out, "--data", root)
    assert evaluated["num_samples"] == 6 and len(evaluated["models"]) == 2
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in evaluated["models"])


def test_align_records_a_folder_source_without_a_digest(tmp_path: Path) -> None:
    root = tmp_path / "halves"
    _digit_folder(root)
    deep = save_mlp(tmp_path / "deep.safetensors", 1, [16, 12, 8], classes=2)
    shallow = save_mlp(tmp_path / "shallow.safetensors", 2, [16, 8], classes=2)
    doc = api.align([deep, shallow], tmp_path / "map.json", data=str(root), samples=10)
    assert doc.data.sha256 is None and doc.data.samples == 10
    assert (tmp_path / doc.data.source).resolve() == root.resolve()
