"""Hostile calibration and training data through the command line: small files that declare huge
arrays (lying headers, compressed bombs, aliased pickle rows, huge images), and arrays a user can
write that the models cannot use (1-D, identical samples, overflowing values, absurd labels).

Each case ends in exit code 2 and one ``clafuse: error:`` line, with no traceback and no warning,
or, where the data is usable, in a clean success.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clafuse.data.common import MAX_IMAGE_PIXELS, MAX_LABEL
from tests.cli_runner import Outcome, invoke
from tests.helpers import deflated_zeros, gzip_zeros, npy_header, save_mlp, write_zip

pytestmark = pytest.mark.usefixtures("private_cache")


def assert_refused(res: Outcome, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr, ``clafuse: error: ...`` holding every needle."""
    assert res.code == 2, str(res)
    assert "Traceback" not in res.stdout + res.stderr, str(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: "), str(res)
    for needle in needles:
        assert needle in lines[0], str(res)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """A deep (two hidden layers) and a shallow MLP on 64 inputs and 10 classes."""
    return save_mlp(tmp_path / "a.safetensors", 0, [16, 12]), save_mlp(tmp_path / "b.safetensors", 1, 16)


def _align(pair: tuple[Path, Path], data: Path, tmp_path: Path, samples: int = 8) -> Outcome:
    return invoke("align", *pair, "--data", data, "--samples", samples, "-o", tmp_path / "map.json")


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# --- .npz members: sizes declared before anything is allocated --------------------------------------


def test_npz_header_declaring_a_terabyte_is_refused_before_allocating(tmp_path: Path, pair) -> None:
    head = npy_header((1 << 38, 64))
    stream, crc = deflated_zeros(head, 256)
    bad = write_zip(tmp_path / "lying.npz", {"x.npy": (stream, crc, len(head) + 256)})
    res = _align(pair, bad, tmp_path)
    assert_refused(res, "lying.npz: 'x'", "declares shape (274877906944, 64)", "holds 256 B")
    assert not (tmp_path / "map.json").exists()


def test_npz_compressed_bomb_over_the_limit_is_refused_unread(tmp_path: Path, pair,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """64 MiB of zeros in 70 KB, under a limit of 1 MiB: refused from the header alone."""
    head = npy_header((1 << 18, 64))
    stream, crc = deflated_zeros(head, 64 << 20)
    assert len(stream) < 100_000
    bomb = write_zip(tmp_path / "bomb.npz", {"x.npy": (stream, crc, len(head) + (64 << 20))})
    monkeypatch.setenv("CLAFUSE_MAX_DATA_BYTES", str(1 << 20))
    assert_refused(_align(pair, bomb, tmp_path), "bomb.npz: 'x'", "64.0 MiB", "limit of 1.0 MiB",
                   "CLAFUSE_MAX_DATA_BYTES")
    assert_refused(invoke("eval", pair[0], "--data", bomb), "limit of 1.0 MiB")


@pytest.mark.parametrize("value", ["0", "-5", "many", "1e9"])
def test_bad_data_limit_setting_is_refused(tmp_path: Path, pair, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    data = _npz(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(20, 64)))
    monkeypatch.setenv("CLAFUSE_MAX_DATA_BYTES", value)
    assert_refused(_align(pair, data, tmp_path), "CLAFUSE_MAX_DATA_BYTES must be a positive number of bytes")


def test_npz_object_member_is_refused_without_unpickling(tmp_path: Path, pair) -> None:
    data = tmp_path / "obj.npz"
    np.savez(data, x=np.array([[1.0, 2.0], None], dtype=object))
    assert_refused(_align(pair, data, tmp_path), "obj.npz: 'x' holds Python objects")


@pytest.mark.parametrize(("dtype", "member"), [("complex64", "x"), ("<U3", "x"), ("datetime64[s]", "x"),
                                               ("complex64", "y"), ("<U3", "y"), ("bool", "y")])
def test_npz_members_of_unusable_dtypes(tmp_path: Path, pair, dtype: str, member: str) -> None:
    x = np.random.default_rng(0).normal(size=(20, 64))
    arrays = {"x": x, "y": np.arange(20) % 10}
    arrays[member] = np.zeros(arrays[member].shape, dtype=dtype)
    data = _npz(tmp_path / "d.npz", **arrays)
    res = invoke("eval", pair[0], "--data", data)
    assert_refused(res, f"'{member}'", "numeric" if member == "x" else "integer class labels")


def test_npz_with_other_member_names_only(tmp_path: Path, pair) -> None:
    data = _npz(tmp_path / "d.npz", inputs=np.zeros((4, 64)), labels=np.zeros(4))
    assert_refused(_align(pair, data, tmp_path), "no array named 'x' (found: inputs, labels)")


def test_npz_extra_members_and_other_numeric_dtypes_are_used(tmp_path: Path, pair) -> None:
    rng = np.random.default_rng(0)
    for dtype in ("int16", "uint8", "bool", "float16", ">f8"):
        data = _npz(tmp_path / f"{dtype}.npz", x=(rng.normal(size=(20, 64)) * 3).astype(dtype),
                    y=(np.arange(20) % 10).astype("uint8"), notes=np.array(["ignored"]))
        res = invoke("eval", pair[0], "--data", data, "--json")
        assert res.code == 0 and res.stderr == "", str(res)
        assert json.loads(res.stdout)["num_samples"] == 20


# --- arrays a user can write that the model cannot use ----------------------------------------------


@pytest.mark.parametrize("command", ["align", "fuse"])
def test_one_dimensional_calibration_data(tmp_path: Path, pair, command: str) -> None:
    data = _npz(tmp_path / "flat.npz", x=np.random.default_rng(0).normal(size=64))
    good = _npz(tmp_path / "good.npz", x=np.random.default_rng(0).normal(size=(40, 64)))
    if command == "align":
        res = _align(pair, data, tmp_path)
    else:
        assert _align(pair, good, tmp_path).code == 0
        res = invoke("fuse", "--map", tmp_path / "map.json", "--data", data, "-o", tmp_path / "f.safetensors")
    assert_refused(res, "flat.npz: 'x' has shape (64,), one number per sample", "reshape")
    assert not (tmp_path / "f.safetensors").exists()


def test_identical_samples_refused_by_align_and_fused_finite(tmp_path: Path, pair) -> None:
    """All-zero data makes every layer's activations constant: align's activation metrics are
    undefined, so it refuses; fuse still works (its activations only weight the transport) and
    writes finite weights."""
    good = _npz(tmp_path / "good.npz", x=np.random.default_rng(0).normal(size=(40, 64)))
    for x in (np.zeros((40, 64)), np.full((40, 64), 0.5)):
        data = _npz(tmp_path / "same.npz", x=x)
        for metric in ("cka", "euclidean", "wd"):
            res = invoke("align", *pair, "--data", data, "--samples", 8, "--metric", metric,
                         "-o", tmp_path / "same.json")
            assert_refused(res, "all 8 calibration samples are identical", "--metric neuron")
        assert _align(pair, good, tmp_path).code == 0
        out = tmp_path / "fused.safetensors"
        res = invoke("fuse", "--map", tmp_path / "map.json", "--data", data, "--samples", 8, "-o", out)
        assert res.code == 0, str(res)
        assert all(torch.isfinite(t).all() for t in load_file(str(out)).values())


def test_inputs_that_overflow_the_model_are_refused_by_align(tmp_path: Path, pair) -> None:
    """Finite inputs near float32's largest value overflow the first layer (CKA would come out as
    0 for every pair and the map look valid)."""
    x = np.random.default_rng(0).choice([-3e38, 3e38], size=(40, 64)).astype(np.float32)
    data = _npz(tmp_path / "big.npz", x=x)
    assert_refused(_align(pair, data, tmp_path), "gives NaN or infinite activations", "values too large")
    assert not (tmp_path / "map.json").exists()


def test_values_beyond_float32_refused_without_warnings(tmp_path: Path, pair) -> None:
    data = _npz(tmp_path / "huge.npz", x=np.full((20, 64), 1e300))
    assert_refused(_align(pair, data, tmp_path), "'x' contains NaN or infinite values (or values too large")


@pytest.mark.parametrize("labels", [np.full(20, 2**64 - 1, dtype=np.uint64), np.full(20, 1e30),
                                    np.full(20, 2.0**62), np.full(20, MAX_LABEL + 1, dtype=np.int64)])
@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_huge_labels(tmp_path: Path, pair, labels: np.ndarray, command: str) -> None:
    data = _npz(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(20, 64)), y=labels)
    if command == "eval":
        res = invoke("eval", pair[0], "--data", data)
    else:
        res = invoke("finetune", pair[0], "--data", data, "--val", data, "-o", tmp_path / "t.safetensors")
    assert_refused(res, "d.npz: 'y' has label", f"larger than {MAX_LABEL}")
    assert not (tmp_path / "t.safetensors").exists()


def test_labels_beyond_the_model_outputs(tmp_path: Path, pair) -> None:
    data = _npz(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(20, 64)), y=np.full(20, 10.0))
    assert_refused(invoke("eval", pair[0], "--data", data), "labels up to 10", "only 10 outputs")


# --- CIFAR pickles ------------------------------------------------------------------------------------


def _cifar_folder(root: Path, batch: object, raw: bytes | None = None) -> Path:
    root.mkdir()
    (root / "test_batch").write_bytes(raw if raw is not None else pickle.dumps(batch, protocol=4))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=4))
    return root


def test_cifar_rows_shared_by_reference_are_refused(tmp_path: Path, pair) -> None:
    """One row pickled once and referenced 20,000 times: a 40 KB file that would decode to 60 MB."""
    row = list(range(256)) * 12
    folder = _cifar_folder(tmp_path / "cifar", {b"data": [row] * 20_000, b"labels": [1] * 20_000})
    assert (folder / "test_batch").stat().st_size < 100_000
    res = invoke("eval", pair[0], "--data", f"{folder}:test")
    assert_refused(res, "test_batch: not a CIFAR batch: 'data' lists 20000 rows", "shared by reference")


def _reduce_array(shape: tuple[int, ...], dtype: bytes = b"b") -> bytes:
    """A protocol-2 pickle of ``{b'data': numpy's _reconstruct(ndarray, shape, dtype), b'labels': []}``."""
    return (b"\x80\x02}q\x00(C\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
            + pickle.dumps(shape, protocol=2)[2:-1] + b"C" + bytes([len(dtype)]) + dtype + b"\x87q\x04Rq\x05"
            + b"C\x06labelsq\x06]q\x07u.")


def test_cifar_array_declaring_more_than_the_file_is_refused(tmp_path: Path, pair) -> None:
    raw = _reduce_array((1 << 40,))
    assert pickle.loads(_reduce_array((3,)))[b"data"].shape == (3,)
    folder = _cifar_folder(tmp_path / "cifar", None, raw)
    res = invoke("eval", pair[0], "--data", f"{folder}:test")
    assert_refused(res, "test_batch: not a CIFAR batch: it declares an array larger than the file")


def test_cifar_object_array_is_refused(tmp_path: Path, pair) -> None:
    data = np.empty((2, 3072), dtype=object)
    data[:] = 1
    folder = _cifar_folder(tmp_path / "cifar", {b"data": data, b"labels": [0, 1]})
    res = invoke("eval", pair[0], "--data", f"{folder}:test")
    assert_refused(res, "test_batch: not a CIFAR batch: it holds an array of Python objects")


# --- images ---------------------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size).save(path)
    return path


def test_image_over_the_pixel_bound_is_refused_before_decoding(tmp_path: Path, pair) -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    _png(tmp_path / "imgs" / "a" / "0.png", (side, side))
    for i in range(3):
        _png(tmp_path / "imgs" / "b" / f"{i}.png", (8, 8))
    res = invoke("eval", pair[0], "--data", tmp_path / "imgs")
    assert_refused(res, f"0.png: image is {side}x{side} pixels, more than the {MAX_IMAGE_PIXELS} pixels")


def test_pillow_bomb_warning_becomes_a_one_line_refusal(tmp_path: Path, pair, monkeypatch) -> None:
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # Pillow warns from 100 pixels, fails from 200
    for i in range(3):
        _png(tmp_path / "imgs" / "a" / f"{i}.png", (12, 12))
        _png(tmp_path / "imgs" / "b" / f"{i}.png", (12, 12))
    res = invoke("eval", pair[0], "--data", tmp_path / "imgs")
    assert_refused(res, "cannot read image", "decompression bomb")


def test_image_folder_over_the_data_limit(tmp_path: Path, pair, monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in "ab":
        for i in range(3):
            _png(tmp_path / "imgs" / cls / f"{i}.png", (300, 300))
    monkeypatch.setenv("CLAFUSE_MAX_DATA_BYTES", str(1 << 20))
    res = invoke("eval", pair[0], "--data", tmp_path / "imgs")
    assert_refused(res, "6 images of 300x300 would take 2.1 MiB", "limit of 1.0 MiB")


# --- IDX --------------------------------------------------------------------------------------------------


def _idx_head(code: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


def test_idx_gzip_over_the_limit_is_refused_unread(tmp_path: Path, pair, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    gzip_zeros(folder / "t10k-images-idx3-ubyte.gz", _idx_head(0x08, (20_000, 8, 8)), 20_000 * 64)
    gzip_zeros(folder / "t10k-labels-idx1-ubyte.gz", _idx_head(0x08, (20_000,)), 20_000)
    monkeypatch.setenv("CLAFUSE_MAX_DATA_BYTES", str(1 << 20))
    res = invoke("eval", pair[0], "--data", f"{folder}:test")
    assert_refused(res, "t10k-images-idx3-ubyte.gz (shape (20000, 8, 8)) would take 4.9 MiB", "limit of 1.0 MiB")


def test_idx_gzip_holding_more_than_its_header(tmp_path: Path, pair) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    gzip_zeros(folder / "t10k-images-idx3-ubyte.gz", _idx_head(0x08, (4, 8, 8)), 64 << 20)
    gzip_zeros(folder / "t10k-labels-idx1-ubyte.gz", _idx_head(0x08, (4,)), 4)
    res = invoke("eval", pair[0], "--data", f"{folder}:test")
    assert_refused(res, "holds more data than the 256 bytes its header declares")


def test_idx_float_images_with_nan(tmp_path: Path, pair) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    images = np.full((4, 8, 8), np.nan, dtype=">f4")
    (folder / "t10k-images-idx3-ubyte").write_bytes(_idx_head(0x0D, images.shape) + images.tobytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_head(0x08, (4,)) + bytes(4))
    res = invoke("eval", pair[0], "--data", f"{folder}:test")
    assert_refused(res, "t10k-images-idx3-ubyte contains NaN or infinite values")


def test_hostile_file_builders_write_what_numpy_and_gzip_read(tmp_path: Path) -> None:
    """The bombs above are valid files: numpy and gzip read them back in full."""
    head = npy_header((300, 64))
    stream, crc = deflated_zeros(head, 300 * 64 * 4, chunk=4096)
    write_zip(tmp_path / "z.npz", {"x.npy": (stream, crc, len(head) + 300 * 64 * 4)})
    with np.load(tmp_path / "z.npz") as archive:
        x = archive["x"]
    assert x.shape == (300, 64) and x.dtype == np.float32 and not x.any()
    gz = gzip_zeros(tmp_path / "z.gz", b"head", 10_001)
    assert gzip.decompress(gz.read_bytes()) == b"head" + bytes(10_001)
