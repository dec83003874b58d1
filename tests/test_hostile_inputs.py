"""Hostile inputs on the reading side: shard names leaving the index's folder, odd tensors in
checkpoints, FIFOs, devices and oversized documents, maps with duplicate alignments, and the
calibration file digest. Each refusal is one ``clafuse: error:`` line with exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clafuse import api
from clafuse.align.mapfile import DataEntry, check_data_digest, read_map
from clafuse.arch.registry import load_spec
from clafuse.errors import CheckpointError, MapError, SpecError
from clafuse.io.atomic import sha256_file
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint, read_metadata
from clafuse.io.inputs import MAX_TEXT_BYTES
from clafuse.io.tensors import MAX_EXPANDED_BYTES
from tests.cli_runner import Outcome, invoke


def assert_refused(res: Outcome, *needles: str) -> str:
    """Exit code 2 and exactly one ``clafuse: error:`` line, with no traceback; the line is returned."""
    assert res.code == 2, str(res)
    assert "Traceback" not in res.stdout + res.stderr, str(res)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: "), str(res)
    for needle in needles:
        assert needle in lines[0], str(res)
    return lines[0]


@contextlib.contextmanager
def no_hang(seconds: int = 30) -> Iterator[None]:
    """Turn a read that blocks forever (the bug these tests catch) into a failing test."""
    def expired(*_: object) -> None:
        raise TimeoutError("blocked on a FIFO or device")

    before = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _mlp(widths: list[int]) -> dict[str, torch.Tensor]:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, o in zip([64, *widths], widths):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 10))
    return {k: v.detach().clone() for k, v in nn.Sequential(*layers).state_dict().items()}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    deep, shallow = root / "deep.safetensors", root / "shallow.safetensors"
    save_file(_mlp([16, 12, 8]), str(deep))
    save_file(_mlp([16, 8]), str(shallow))
    return deep, shallow


# --- sharded indexes ----------------------------------------------------------------------------


def _sharded(folder: Path, state: dict[str, torch.Tensor]) -> tuple[Path, dict[str, str]]:
    """``state`` in two shards in ``folder`` and the index naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, weight_map


def _with_shard(index: Path, weight_map: dict[str, str], name: object) -> None:
    first = sorted(weight_map)[0]
    index.write_text(json.dumps({"weight_map": {**weight_map, first: name}}))


READERS: dict[str, Callable[[Path], object]] = {
    "load": load_checkpoint, "open": open_checkpoint, "metadata": read_metadata}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_shard_names_leaving_the_folder_are_refused_without_telling_whether_they_exist(
        tmp_path: Path, reader: str) -> None:
    secret = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(2)}, str(secret))
    index, weight_map = _sharded(tmp_path / "model", _mlp([8]))
    (index.parent / "link.safetensors").symlink_to(secret)
    (index.parent / "dangling.safetensors").symlink_to(tmp_path / "absent.safetensors")
    (index.parent / "sub").symlink_to(tmp_path)
    messages = {}
    for name in ("../secret.safetensors", "../absent.safetensors", str(secret), str(tmp_path / "absent.safetensors"),
                 "link.safetensors", "dangling.safetensors", "sub/secret.safetensors", "sub/absent.safetensors",
                 "./../secret.safetensors", "..\\secret.safetensors"):
        _with_shard(index, weight_map, name)
        if reader == "metadata":  # reads the first shard the index lists
            index.write_text(json.dumps({"weight_map": {"a": name, **weight_map}}))
        with pytest.raises(CheckpointError) as info:
            READERS[reader](index)
        messages[name] = str(info.value)
        assert "leaves the index's folder" in messages[name] and repr(name) in messages[name]
    # an existing and a missing file outside get the same message, but for the name itself
    for existing, missing in (("../secret.safetensors", "../absent.safetensors"),
                              ("link.safetensors", "dangling.safetensors"),
                              ("sub/secret.safetensors", "sub/absent.safetensors")):
        assert messages[existing].replace(existing, "N") == messages[missing].replace(missing, "N")


def test_shard_refusal_through_the_cli(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    index, weight_map = _sharded(tmp_path / "model", load_checkpoint(pair[0]))
    _with_shard(index, weight_map, "../../../../../../etc/passwd")
    assert_refused(invoke("inspect", index), "leaves the index's folder")
    out = tmp_path / "map.json"
    assert_refused(invoke("align", index, pair[1], "--metric", "neuron", "-o", out), "leaves the index's folder")
    assert not out.exists()


def test_shards_in_subfolders_and_a_hugging_face_cache_layout_are_accepted(tmp_path: Path) -> None:
    """Shards below the index's folder are fine; so are the hub cache's symlinks, whose targets
    lie beside the index's own (symlinked) file."""
    state = _mlp([8])
    index, weight_map = _sharded(tmp_path / "plain" / "sub", state)
    moved = tmp_path / "plain" / index.name
    moved.write_text(json.dumps({"weight_map": {k: f"sub/{v}" for k, v in weight_map.items()}}))
    assert set(load_checkpoint(moved)) == set(state)

    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    index, weight_map = _sharded(blobs, state)
    snapshot.mkdir(parents=True)
    for name in {*weight_map.values(), index.name}:
        (snapshot / name).symlink_to(Path("..", "..", "blobs", name))
    for reader in READERS.values():
        reader(snapshot / index.name)
    assert set(open_checkpoint(snapshot / index.name)) == set(state)


@pytest.mark.parametrize("entry", [{"format": "pt"}, "model-00001-of-00002.safetensors", None, 3, ["a"]])
def test_metadata_and_non_string_entries_in_a_weight_map(tmp_path: Path, pair: tuple[Path, Path],
                                                         entry: object) -> None:
    index, weight_map = _sharded(tmp_path / "model", load_checkpoint(pair[0]))
    key = "__metadata__" if isinstance(entry, (dict, str)) else sorted(weight_map)[0]
    index.write_text(json.dumps({"weight_map": {**weight_map, key: entry}}))
    for reader in READERS.values():
        with pytest.raises(CheckpointError, match='"weight_map"') as info:
            reader(index)
        assert "\n" not in str(info.value)
    assert_refused(invoke("inspect", index), '"weight_map"')
    assert_refused(invoke("align", index, pair[1], "--metric", "neuron", "-o", tmp_path / "m.json"), '"weight_map"')


# --- tensors in checkpoints ---------------------------------------------------------------------


def _quantized(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors
        return torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)


ODD_TENSORS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "meta": (lambda w: torch.empty(w.shape, device="meta"), "meta tensor"),
    "sparse": (lambda w: w.to_sparse(), "sparse tensor"),
    "quantized": (_quantized, "quantized tensor"),
    "int8": (lambda w: w.to(torch.int8), "dtype int8 and shape"),
    "bool": (lambda w: w > 0, "dtype bool and shape"),
    "uint16": (lambda w: w.abs().to(torch.uint16), "dtype uint16"),
    "complex": (lambda w: w.to(torch.complex64), "dtype complex64"),
    "float8": (lambda w: w.to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
    "huge-expanded": (lambda w: torch.zeros(1).expand(2**20, 2**20), "expanded view"),
}


@pytest.mark.parametrize("case", sorted(ODD_TENSORS))
def test_odd_tensors_in_torch_files_are_refused_naming_the_key(tmp_path: Path, pair: tuple[Path, Path],
                                                               case: str) -> None:
    make, needle = ODD_TENSORS[case]
    state = load_checkpoint(pair[0])
    state["3.weight"] = make(state["3.weight"])
    path = tmp_path / f"{case}.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_checkpoint(path)
    assert "'state_dict.3.weight'" in str(info.value) and "\n" not in str(info.value)
    assert_refused(invoke("inspect", path), needle, "3.weight")
    out = tmp_path / "map.json"
    assert_refused(invoke("align", path, pair[1], "--metric", "neuron", "-o", out), needle)
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_non_float_weights_in_safetensors_are_refused_eagerly_and_lazily(tmp_path: Path, pair: tuple[Path, Path],
                                                                         dtype: torch.dtype) -> None:
    state = load_checkpoint(pair[0])
    state["3.weight"] = state["3.weight"].to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    for reader in (load_checkpoint, open_checkpoint):
        with pytest.raises(CheckpointError, match=rf"'3.weight' has dtype {str(dtype)[6:]} and shape \[12, 16\]"):
            reader(path)
    assert_refused(invoke("align", path, pair[1], "--metric", "neuron", "-o", tmp_path / "m.json"), "'3.weight'")


def test_integer_scalars_and_small_expanded_tensors_are_accepted(tmp_path: Path) -> None:
    """BatchNorm's int64 counter loads as today; an expanded view within the limit is materialised."""
    bias = torch.tensor([0.5]).expand(6)
    state = {"bn.num_batches_tracked": torch.tensor(7), "bn.weight": bias, "flag": torch.tensor(True)}
    torch.save(state, tmp_path / "ok.pt")
    got = load_checkpoint(tmp_path / "ok.pt")
    assert got["bn.num_batches_tracked"].dtype == torch.int64 and int(got["bn.num_batches_tracked"]) == 7
    assert got["bn.weight"].is_contiguous() and got["bn.weight"].stride() == (1,)
    assert torch.equal(got["bn.weight"], torch.full((6,), 0.5))


def test_expanded_tensors_share_one_size_budget(tmp_path: Path) -> None:
    """Each view alone fits the limit, together they exceed it: refused before allocating the rest."""
    rows = MAX_EXPANDED_BYTES // 4 // 1024 // 2 + 1  # a bit over half the budget each, in float32
    state = {f"w{i}": torch.zeros(1).expand(rows, 1024) for i in range(2)}
    torch.save(state, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="'w1' is an expanded view"):
        load_checkpoint(tmp_path / "two.pt")


# --- bounded reads: FIFOs, devices, oversized documents -----------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


def test_fifos_and_devices_are_refused_at_once_by_every_reader(tmp_path: Path, fifo: Path,
                                                               pair: tuple[Path, Path]) -> None:
    with no_hang():
        for special, kind in ((fifo, "is a FIFO"), (Path("/dev/zero"), "is a character device")):
            with pytest.raises(MapError, match=kind):
                read_map(special)
            with pytest.raises(SpecError, match=kind):
                load_spec(special)
            for reader in READERS.values():
                with pytest.raises(CheckpointError, match=kind):
                    reader(special)
            assert_refused(invoke("fuse", "--map", special, "-o", tmp_path / "f.safetensors"), kind)
            assert_refused(invoke("inspect", pair[0], "--arch", special), kind)
            assert_refused(invoke("inspect", special), kind)
        index, weight_map = _sharded(tmp_path / "model", load_checkpoint(pair[0]))
        os.mkfifo(index.parent / "pipe.safetensors")
        _with_shard(index, weight_map, "pipe.safetensors")
        assert_refused(invoke("inspect", index), "is a FIFO")
        assert_refused(invoke("align", index, pair[1], "--metric", "neuron", "-o", tmp_path / "m.json"), "is a FIFO")
        os.unlink(index)
        os.mkfifo(index)
        assert_refused(invoke("inspect", index), "is a FIFO")


def test_documents_over_the_size_limit_are_refused_before_reading(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    for name in ("big.json", "big.yaml", "model.safetensors.index.json"):
        path = tmp_path / name
        with open(path, "wb") as fh:  # sparse: no disk space used
            fh.truncate(MAX_TEXT_BYTES + 1)
    assert_refused(invoke("fuse", "--map", tmp_path / "big.json", "-o", tmp_path / "f.safetensors"), "64 MiB")
    assert_refused(invoke("inspect", pair[0], "--arch", tmp_path / "big.yaml"), "64 MiB")
    assert_refused(invoke("inspect", tmp_path / "model.safetensors.index.json"), "64 MiB")


# --- maps ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neuron_map(pair: tuple[Path, Path]) -> Path:
    out = pair[0].parent / "neuron.json"
    api.align(list(pair), out, metric="neuron")
    return out


def test_a_map_with_two_alignments_of_one_pair_is_refused(tmp_path: Path, neuron_map: Path) -> None:
    doc = json.loads(neuron_map.read_text())
    first = doc["alignments"][0]
    swapped = {**first, "deep": first["shallow"], "shallow": first["deep"]}
    for extra in (first, swapped):
        bad = neuron_map.parent / "dup.json"
        bad.write_text(json.dumps({**doc, "alignments": [first, extra]}))
        with pytest.raises(MapError, match="one alignment per pair"):
            read_map(bad)
        out = tmp_path / "fused.safetensors"
        assert_refused(invoke("fuse", "--map", bad, "-o", out), "one alignment per pair")
        assert not out.exists()


def test_check_data_digest(tmp_path: Path, neuron_map: Path) -> None:
    doc = read_map(neuron_map)
    data = tmp_path / "calib.npz"
    data.write_bytes(b"calibration bytes")
    recorded = sha256_file(data)

    def with_data(source: str, sha256: str | None) -> object:
        return doc.model_copy(update={"data": DataEntry(source=source, split="train", samples=20, seed=0,
                                                        sha256=sha256)})

    check_data_digest(doc, tmp_path)  # no data entry
    check_data_digest(with_data("digits", None), tmp_path)  # a named data set has no digest
    check_data_digest(with_data("calib.npz", recorded), tmp_path)
    check_data_digest(with_data(str(data), recorded), Path("/nonexistent"))  # absolute source
    data.write_bytes(b"calibration bytez")
    with pytest.raises(MapError, match=r"calib.npz changed since align \(sha256 [0-9a-f]{12}…, the map has "
                                       + recorded[:12]):
        check_data_digest(with_data("calib.npz", recorded), tmp_path)
    data.unlink()
    with pytest.raises(MapError, match="no such calibration data file"):
        check_data_digest(with_data("calib.npz", recorded), tmp_path)
    os.mkfifo(data)
    with no_hang(), pytest.raises(MapError, match="is a FIFO"):
        check_data_digest(with_data("calib.npz", recorded), tmp_path)


def test_map_and_spec_readers_keep_their_messages(tmp_path: Path) -> None:
    with pytest.raises(MapError, match="no such map file"):
        read_map(tmp_path / "absent.json")
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(SpecError, match="not valid UTF-8 at byte 0"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(MapError, match="is a directory"):
        read_map(tmp_path / "dir.json")


def test_fuse_refuses_calibration_data_changed_since_align(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """The map records the calibration file's digest; ``fuse`` with the map's own data checks it."""
    import numpy as np

    deep, shallow = pair
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((40, 64)).astype(np.float32), y=rng.integers(0, 10, 40))
    map_path = tmp_path / "map.json"
    assert invoke("align", deep, shallow, "--data", data, "--samples", 30, "-o", map_path).code == 0
    out = tmp_path / "fused.safetensors"
    np.savez(data, x=rng.random((40, 64)).astype(np.float32), y=rng.integers(0, 10, 40))
    assert_refused(invoke("fuse", "--map", map_path, "-o", out), "changed since align")
    assert not out.exists()
    assert invoke("fuse", "--map", map_path, "--data", data, "-o", out).code == 0  # explicit data: the user's choice
