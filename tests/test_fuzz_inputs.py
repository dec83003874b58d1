"""Property tests on the reading side, continuing ``test_fuzz``: checkpoint entries of odd dtypes,
layouts, devices and strides in torch files, and shard indexes naming odd shard paths.

Same rules as there (derandomized, no example database, ``CLAFUSE_FUZZ_SCALE`` for more
examples): every run ends cleanly, as a success or one ``clafuse: error:`` line with exit code 2.
Beyond that, tensors clafuse cannot fuse are always refused, accepted ones are dense CPU tensors,
and no data from outside a sharded index's folder is ever read.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from clafuse.errors import CheckpointError
from clafuse.io.checkpoint import load_checkpoint
from clafuse.io.tensors import COUNTER_DTYPES, FLOAT_DTYPES
from tests.cli_runner import invoke
from tests.test_fuzz import assert_handled, assert_rejected, fuzz


def _mlp(widths: list[int]) -> dict[str, torch.Tensor]:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, o in zip([64, *widths], widths):
        layers += [nn.Linear(i, o), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], 10))
    return {k: v.detach().clone() for k, v in nn.Sequential(*layers).state_dict().items()}


@dataclass
class Inputs:
    root: Path
    state: dict[str, torch.Tensor]
    shallow: Path
    folder: Path  # a sharded copy of ``state``: shards a and b, a copy of a in sub/, symlinks in and out
    weight_map: dict[str, str]
    poison: float  # the value of every tensor stored outside ``folder``
    counter: int = 0

    def __repr__(self) -> str:
        return f"Inputs({self.root})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.root / "out" / f"{self.counter:05d}-{name}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("fuzz-inputs")
    (root / "out").mkdir()
    torch.manual_seed(0)
    state = _mlp([16, 12, 8])
    save_file(_mlp([16, 8]), str(root / "shallow.safetensors"))
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    for name, part in (("a.safetensors", keys[:3]), ("b.safetensors", keys[3:])):
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    save_file({k: state[k] for k in keys[:3]}, str(folder / "sub" / "a.safetensors"))
    poison = 7.25
    save_file({k: torch.full_like(state[k], poison) for k in keys}, str(root / "outside.safetensors"))
    (folder / "in-link.safetensors").symlink_to("a.safetensors")
    (folder / "out-link.safetensors").symlink_to(root / "outside.safetensors")
    (folder / "out-dir").symlink_to(root)
    (folder / "sub" / "up-link.safetensors").symlink_to(Path("..", "a.safetensors"))
    return Inputs(root, state, root / "shallow.safetensors", folder, weight_map, poison)


# --- odd tensors in torch files -----------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2]
FORMS = ["plain", "meta", "sparse", "csr", "quantized", "expanded", "huge-expanded", "transposed", "overlapping",
         "offset-view"]
UNFIT_FORMS = {"meta", "sparse", "csr", "quantized", "huge-expanded"}


def _odd(like: torch.Tensor, dtype: torch.dtype, form: str, shape: tuple[int, ...], huge: int) -> torch.Tensor:
    numel = int(torch.tensor(shape).prod()) if shape else 1
    base = torch.arange(numel, dtype=torch.float32).reshape(shape).to(dtype)
    if form == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if form == "sparse":
        return base.to_sparse()
    if form == "csr":
        return base.to_sparse_csr()
    if form == "quantized":
        return torch.quantize_per_tensor(base.float(), 0.5, 0, torch.qint8)
    if form == "expanded":
        return torch.zeros(1, dtype=dtype).expand(shape)
    if form == "huge-expanded":  # 2**34 elements at least: 16 GiB and more
        return torch.zeros(1, dtype=dtype).expand(2**huge, 2**huge)
    if form == "transposed":
        return base.t()
    if form == "overlapping":  # an n x n window sliding over 2n - 1 values
        n = max(2, shape[0] if shape else 2)
        return torch.arange(2 * n - 1).to(dtype).as_strided((n, n), (1, 1))
    if form == "offset-view":
        return torch.cat([torch.zeros(5, dtype=dtype), base.reshape(-1)])[5:].reshape(shape)
    return base


@fuzz(60)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), form=st.sampled_from(FORMS),
       command=st.sampled_from(["inspect", "inspect", "align"]), legacy=st.booleans())
def test_odd_tensors_in_torch_files(inputs: Inputs, data: st.DataObject, dtype: torch.dtype, form: str,
                                    command: str, legacy: bool) -> None:
    key = data.draw(st.sampled_from(sorted(inputs.state)), label="key")
    like = inputs.state[key]
    shape = data.draw(st.sampled_from([tuple(like.shape), (), (0,), (like.numel(),), (3, 0)]), label="shape")
    huge = data.draw(st.integers(17, 22), label="log2 side")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensor = _odd(like, dtype, form, shape, huge)
            path = inputs.fresh("odd.pt")
            torch.save({**inputs.state, key: tensor}, path, _use_new_zipfile_serialization=not legacy)
    except (RuntimeError, TypeError, ValueError, NotImplementedError, IndexError) as exc:
        note(f"torch cannot make or save this tensor: {exc}")
        assume(False)
    note(f"{key}: {tensor.dtype} {tensor.layout} {tensor.device} shape {tuple(tensor.shape)}")
    unfit = form in UNFIT_FORMS or dtype not in (*FLOAT_DTYPES, *COUNTER_DTYPES) \
        or (dtype in COUNTER_DTYPES and tensor.dim() > 0)
    if command == "inspect":
        res, out = invoke("inspect", path), None
    else:
        out = inputs.fresh("map.json")
        res = invoke("align", path, inputs.shallow, "--metric", "neuron", "-o", out)
    if unfit:
        assert_rejected(res, out)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - torch saved what it cannot load back: refused as corrupt
            return
        assert repr(key) in res.stderr, str(res)
        return
    assert_handled(res, out)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError:
        return
    for name, t in loaded.items():
        assert t.device.type == "cpu" and t.layout == torch.strided and not t.is_quantized, name
        assert t.dtype in FLOAT_DTYPES or (t.dtype in COUNTER_DTYPES and t.dim() == 0), name
        stored = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        assert t.numel() * t.element_size() <= stored, name  # expanded views were materialised
    if form in ("expanded", "overlapping", "offset-view", "transposed"):
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype))


# --- odd shard names ----------------------------------------------------------------------------

PIECES = ["..", ".", "", "sub", "a.safetensors", "b.safetensors", "in-link.safetensors", "out-link.safetensors",
          "out-dir", "up-link.safetensors", "outside.safetensors", "missing.safetensors", "model", "\\..",
          "..\\outside.safetensors", "\x00", "ümlaut", "x" * 300, "~", "$HOME", "%2e%2e"]


@st.composite
def shard_names(draw: st.DrawFn, inputs: Inputs) -> str:
    pieces = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=4))
    name = draw(st.sampled_from(["/", "\\"])).join(pieces)
    prefix = draw(st.sampled_from(["", "", "/", "./", str(inputs.folder) + "/", str(inputs.root) + "/"]))
    return prefix + name


@fuzz(80)
@given(data=st.data())
def test_odd_shard_names_never_read_outside_the_folder(inputs: Inputs, data: st.DataObject) -> None:
    names = {shard: data.draw(shard_names(inputs), label=f"shard {shard}") for shard in ("a.safetensors",
                                                                                          "b.safetensors")}
    weight_map = {k: names[v] if data.draw(st.booleans(), label=f"rename {k}") else v
                  for k, v in inputs.weight_map.items()}
    index = inputs.folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}, ensure_ascii=False), encoding="utf-8",
                     errors="surrogatepass")
    leaves = [n for n in weight_map.values()
              if ".." in n.replace("\\", "/").split("/") or n.startswith(("/", "\\")) or "out-" in n]
    res = invoke("inspect", index, "--json")
    assert_handled(res)
    if any(".." in n.replace("\\", "/").split("/") or n.startswith(("/", "\\")) for n in leaves):
        assert res.code == 2 and "leaves the index's folder" in res.stderr, str(res)
    try:
        loaded = load_checkpoint(index)
    except CheckpointError as exc:
        assert "does not exist" not in str(exc) or not leaves, str(exc)
        return
    assert not leaves
    for name, t in loaded.items():  # all read from inside: no poisoned tensor
        assert not bool((t == inputs.poison).all()), name
    os.unlink(index)
