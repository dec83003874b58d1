"""Checkpoint loading/saving and atomic output: round trips, wrapper unwrapping, and refusals."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clafuse.errors import CheckpointError, ClafuseError
from clafuse.io.atomic import atomic_output, sha256_file, write_text_atomic
from clafuse.io.checkpoint import format_of, load_checkpoint, read_metadata, save_checkpoint


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(4, 3, generator=g),
        "fc1.bias": torch.randn(4, generator=g).half(),
        "fc2.weight": torch.randn(2, 4, generator=g).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def _refusal(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def _tmp_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.pth", "model.bin"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    sd = _sample()
    out = tmp_path / name
    save_checkpoint(out, sd)
    _assert_same(load_checkpoint(out), sd)
    assert _tmp_leftovers(tmp_path) == []


def test_saved_torch_file_loads_strictly_into_a_module(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    save_checkpoint(tmp_path / "m.pt", model.state_dict())
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert type(raw) is dict and list(raw) == list(model.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fresh.load_state_dict(raw, strict=True)
    _assert_same(fresh.state_dict(), model.state_dict())


def test_metadata_round_trip(tmp_path: Path) -> None:
    meta = {"clafuse.version": "0.1.0", "inputs": json.dumps(["a.pt", "b.pt"])}
    save_checkpoint(tmp_path / "m.safetensors", _sample(), metadata=meta)
    assert read_metadata(tmp_path / "m.safetensors") == meta
    save_checkpoint(tmp_path / "m.pt", _sample(), metadata=meta)
    assert read_metadata(tmp_path / "m.pt") == {}


def test_shared_views_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    weight = torch.nn.Parameter(base.reshape(3, 4).clone())
    sd = {"a": base, "tied": base, "view": base[2:5], "t": base.reshape(3, 4).T, "p": weight}
    for name in ("s.safetensors", "s.pt"):
        save_checkpoint(tmp_path / name, sd)
        got = load_checkpoint(tmp_path / name)
        _assert_same(got, {k: v.detach() for k, v in sd.items()})
        assert not got["p"].requires_grad


def test_unsupported_output_extension(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unsupported output extension"):
        save_checkpoint(tmp_path / "m.npz", _sample())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_unwraps_training_checkpoints(tmp_path: Path, wrapper: str) -> None:
    sd = _sample()
    torch.save({wrapper: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "c.ckpt")
    _assert_same(load_checkpoint(tmp_path / "c.ckpt"), sd)


def test_strips_dataparallel_prefix_only_when_universal(tmp_path: Path) -> None:
    sd = _sample()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    _assert_same(load_checkpoint(tmp_path / "ddp.pt"), sd)
    mixed = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    torch.save(mixed, tmp_path / "mixed.pt")
    assert set(load_checkpoint(tmp_path / "mixed.pt")) == {"module.a", "b"}


def test_sharded_index(tmp_path: Path) -> None:
    sd = _sample()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:2]}, tmp_path / "model-00001-of-00002.safetensors", {"format": "pt"})
    save_file({k: sd[k] for k in keys[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    _assert_same(load_checkpoint(index), sd)
    assert format_of(index) == "safetensors"
    assert read_metadata(index) == {"format": "pt"}

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _refusal(index)


def test_unknown_extension_is_sniffed(tmp_path: Path) -> None:
    sd = _sample()
    save_checkpoint(tmp_path / "a.safetensors", sd)
    save_checkpoint(tmp_path / "b.pt", sd)
    os.replace(tmp_path / "a.safetensors", tmp_path / "a.weights")
    os.replace(tmp_path / "b.pt", tmp_path / "b.weights")
    assert format_of(tmp_path / "a.weights") == "safetensors"
    assert format_of(tmp_path / "b.weights") == "torch"
    _assert_same(load_checkpoint(tmp_path / "a.weights"), sd)
    _assert_same(load_checkpoint(tmp_path / "b.weights"), sd)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "no such file" in _refusal(tmp_path / "nope.safetensors")
    assert "directory" in _refusal(tmp_path)


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_truncated_files(tmp_path: Path, name: str) -> None:
    full = tmp_path / ("full" + Path(name).suffix)
    save_checkpoint(full, {"w": torch.randn(256, 256)})
    data = full.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    _refusal(cut)


@pytest.mark.parametrize("name", ["r.safetensors", "r.pt", "r.weights", "empty.pt", "empty.safetensors"])
def test_random_or_empty_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"\x13" + os.urandom(4095))
    _refusal(path)


class _WritesMarker:
    """Unpickling this creates a file: stands in for any code a malicious checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["zip", "raw_pickle"])
def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    payload = {"w": torch.ones(2), "x": _WritesMarker(marker)}
    if container == "zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))

    message = _refusal(evil)
    assert "refusing to load" in message and "never executes pickled code" in message
    assert not marker.exists()

    if container == "zip":
        torch.load(evil, weights_only=False)
    else:
        pickle.loads(evil.read_bytes())
    assert marker.exists(), "the payload should run under an unsafe load, else this test proves nothing"


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "a.pt")
    message = _refusal(tmp_path / "a.pt")
    assert "'step'" in message and "int" in message

    torch.save({"state_dict": {"w": torch.ones(2), "cfg": "x"}, "epoch": 1}, tmp_path / "b.pt")
    message = _refusal(tmp_path / "b.pt")
    assert "'cfg'" in message and "str" in message

    torch.save([torch.ones(2)], tmp_path / "c.pt")
    assert "list" in _refusal(tmp_path / "c.pt")


def test_empty_mapping_is_refused(tmp_path: Path) -> None:
    torch.save({}, tmp_path / "e.pt")
    assert "no tensors" in _refusal(tmp_path / "e.pt")


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path, exc_type: type[BaseException]) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(exc_type):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-")
            tmp.write_bytes(b"half")
            raise exc_type("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_keeps_old_file_until_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("new, incomplete")
            assert target.read_text() == "old"
            raise RuntimeError
    assert target.read_text() == "old"
    write_text_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert _tmp_leftovers(tmp_path) == []


def test_save_checkpoint_failure_mid_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m.pt", _sample())
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "out.safetensors"
    with pytest.raises(ClafuseError, match="cannot write .*: directory .*missing does not exist"):
        save_checkpoint(target, _sample())


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 123)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
