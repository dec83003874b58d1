"""Property tests: whatever bytes come in as a map file, a spec file or a checkpoint, clafuse ends
with exactly one line ``clafuse: error: ...`` on stderr, exit code 2, no traceback and no output
file (or, where a mutation happens to leave the input valid, succeeds cleanly).

The command line runs in this process (no interpreter and torch start-up per example) with Python
warnings and clafuse's log records captured as a user would see them on stderr. Examples are
derandomized and no example database is kept, so every run tries the same inputs. Set
``CLAFUSE_FUZZ_SCALE`` (e.g. 20) to multiply the number of examples for a deeper search.

The ``@example`` cases and ``test_map_edge_cases`` hold inputs that once crashed clafuse (exit code 1).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from tests.cli_runner import Outcome, invoke
from clafuse import api
from clafuse.arch.resnet import ResNetFamily, ResNetSpec
from clafuse.arch.vgg import VGGFamily, VGGSpec, VGGLinear
from clafuse.io.checkpoint import load_checkpoint
from tests.helpers import mlp

SCALE = float(os.environ.get("CLAFUSE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Reproducible settings: derandomized, no example database, no deadline (a shared CPU)."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.tmp-*")) if out.parent.is_dir() else []


def assert_rejected(res: Outcome, out: Path | None = None) -> None:
    """Bad input: exit code 2, one ``clafuse: error:`` line (after any warnings), no traceback, no output."""
    assert res.code == 2, str(res)
    assert "Traceback" not in res.stdout + res.stderr, str(res)
    lines = [line for line in res.stderr.splitlines() if not line.startswith("clafuse: warning: ")]
    assert len(lines) == 1, str(res)
    assert lines[0].startswith("clafuse: error: ") and lines[0].strip() != "clafuse: error:", str(res)
    assert res.stderr.splitlines()[-1] == lines[0], str(res)
    if out is not None:
        assert not out.exists(), str(res)
        assert _leftovers(out) == [], str(res)


def assert_handled(res: Outcome, out: Path | None = None,
                   check_output: Callable[[Path], None] | None = None) -> None:
    """Either a clean success (exit 0, no traceback, a complete output) or a clean rejection."""
    if res.code != 0:
        assert_rejected(res, out)
        return
    assert "Traceback" not in res.stdout + res.stderr, str(res)
    assert all(line.startswith("clafuse: warning: ") for line in res.stderr.splitlines()), str(res)
    if out is not None:
        assert out.is_file() and _leftovers(out) == [], str(res)
        if check_output is not None:
            check_output(out)


# --- inputs -------------------------------------------------------------------------------------


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@dataclass(repr=False)
class World:
    root: Path
    out_dir: Path
    deep: Path
    shallow: Path
    deep_pt: Path
    legacy_pt: Path
    data_map: dict[str, Any]   # a valid map (CKA on digits), as JSON
    neuron_map: dict[str, Any]  # a valid data-free map
    specs: dict[str, tuple[Path, dict[str, Any]]]  # family -> (checkpoint, its valid spec)
    fuse_dir: Path  # deep.pt, shallow.safetensors and map.json: fuse runs on fuzzed copies of these
    index: dict[str, Any]  # the index of sharded/, the deep model in two shards
    originals: dict[str, bytes]
    counter: int = 0

    def __repr__(self) -> str:
        return f"World({self.root})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def fresh(self, name: str) -> Path:
        """A path in the output folder that no earlier example used."""
        self.counter += 1
        return self.out_dir / f"{self.counter:05d}-{name}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAFUSE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("CLAFUSE_DEBUG", raising=False)
        torch.manual_seed(0)
        deep, shallow = root / "deep.safetensors", root / "shallow.safetensors"
        deep_state, shallow_state = _state(mlp([16, 12, 8])), _state(mlp([16, 8]))
        save_file(deep_state, str(deep))
        save_file(shallow_state, str(shallow))
        deep_pt, legacy_pt = root / "deep.pt", root / "legacy.pt"
        torch.save(deep_state, deep_pt)
        torch.save(shallow_state, legacy_pt, _use_new_zipfile_serialization=False)

        api.align([deep, shallow], root / "map.json", data="digits", samples=20)
        api.align([deep, shallow], root / "neuron.json", metric="neuron")

        vgg_spec = VGGSpec(in_channels=1, config=[4, "M", 8, "M"], batch_norm=True, avgpool=None, input_size=(1, 8, 8),
                           classifier=[VGGLinear(index=0, in_features=32, out_features=16),
                                       VGGLinear(index=3, in_features=16, out_features=10)])
        resnet_spec = ResNetSpec(block="basic", layers=[1, 2], widths=[4, 8], stem_width=4, stem="small",
                                 in_channels=1, num_classes=10)
        specs: dict[str, tuple[Path, dict[str, Any]]] = {}
        for family, spec in (("vgg", vgg_spec), ("resnet", resnet_spec)):
            fam = VGGFamily() if family == "vgg" else ResNetFamily()
            path = root / f"{family}.safetensors"
            save_file(_state(fam.build(spec)), str(path))
            specs[family] = (path, api.inspect_checkpoint(path)["spec"])
        specs["mlp"] = (deep, api.inspect_checkpoint(deep)["spec"])

        fuse_dir = root / "fuse"
        fuse_dir.mkdir()
        shutil.copy(deep_pt, fuse_dir / "deep.pt")
        shutil.copy(shallow, fuse_dir / "shallow.safetensors")
        api.align([fuse_dir / "deep.pt", fuse_dir / "shallow.safetensors"], fuse_dir / "map.json", data="digits",
                  samples=20)
        originals = {name: (fuse_dir / name).read_bytes() for name in ("deep.pt", "shallow.safetensors")}
        sharded = root / "sharded"
        sharded.mkdir()
        keys = sorted(deep_state)
        weight_map = {}
        for i, part in enumerate((keys[:3], keys[3:])):
            shard = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: deep_state[k] for k in part}, str(sharded / shard))
            weight_map.update(dict.fromkeys(part, shard))
        index = {"metadata": {"total_size": sum(v.numel() * 4 for v in deep_state.values())}, "weight_map": weight_map}
        out_dir = root / "out"
        out_dir.mkdir()
        yield World(root=root, out_dir=out_dir, deep=deep, shallow=shallow, deep_pt=deep_pt, legacy_pt=legacy_pt,
                    data_map=json.loads((root / "map.json").read_text()),
                    neuron_map=json.loads((root / "neuron.json").read_text()), specs=specs, fuse_dir=fuse_dir,
                    index=index, originals=originals)


def test_the_inputs_are_valid(world: World) -> None:
    """The unmutated inputs succeed, so that the rejections below are due to the mutations."""
    for map_name in ("map.json", "neuron.json"):
        out = world.fresh("fused.safetensors")
        res = invoke("fuse", "--map", world.root / map_name, "-o", out)
        assert_handled(res, out)
        assert res.code == 0 and set(load_checkpoint(out)) == set(load_checkpoint(world.deep))
    for family, (ckpt, spec) in world.specs.items():
        path = world.fresh(f"{family}.yaml")
        path.write_text(yaml.safe_dump(spec))
        res = invoke("inspect", ckpt, "--arch", path, "--json")
        assert res.code == 0, str(res)
        assert json.loads(res.stdout)["spec"] == spec
    for ckpt in (world.deep_pt, world.legacy_pt):
        assert invoke("inspect", ckpt).code == 0
    index = world.root / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps(world.index))
    assert invoke("inspect", index).code == 0
    assert invoke("fuse", "--map", world.fuse_dir / "map.json", "-o", world.fresh("f.safetensors")).code == 0


# --- JSON documents and their mutations ---------------------------------------------------------

HUGE_INT = "9" * 5000  # more digits than Python converts by default (sys.get_int_max_str_digits)
_HUGE = "\x00huge-int\x00"


def to_json(doc: Any) -> str:
    """JSON text of ``doc``; NaN/Infinity as Python writes them, ``_HUGE`` as a 5000-digit number."""
    return json.dumps(doc).replace(json.dumps(_HUGE), HUGE_INT)


def _copy(doc: Any) -> Any:
    return json.loads(json.dumps(doc))


def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


def _get(doc: Any, path: tuple) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


EDGE_INTS = [0, -1, 1, 2, 3, 2**31, -(2**31), 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)]
nasty_text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=()), max_size=6),  # lone surrogates, control characters
    st.sampled_from(["", " ", "\n", "a\nb", "\u2028", "\x00", "../" * 8, "/", ".", "~", "mlp", "vgg", "resnet",
                     "F32", "M", "x" * 300, "digits:test", "digits:nope", "ümlaut/ß", "\ud800"]),
)
nasty_numbers = st.one_of(st.sampled_from(EDGE_INTS), st.integers(), st.just(_HUGE),
                          st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, -0.0, 1e308]))
json_leaves = st.one_of(st.none(), st.booleans(), nasty_numbers, nasty_text)
json_values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(nasty_text, inner, max_size=4)), max_leaves=12)


@st.composite
def mutated(draw: st.DrawFn, base: Any, steps: int = 3) -> Any:
    """``base`` with one to ``steps`` structural edits at random places."""
    doc = _copy(base)
    for _ in range(draw(st.integers(1, steps))):
        path = draw(st.sampled_from(list(_paths(doc))))
        value = _get(doc, path)
        op = draw(st.sampled_from(["delete", "replace", "duplicate", "wrap", "stringify", "number", "reverse",
                                   "add_key"]))
        note(f"{op} at {path!r}")
        if op == "delete" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif op == "duplicate" and path and isinstance(_get(doc, path[:-1]), list):
            _get(doc, path[:-1]).insert(path[-1], _copy(value))
        elif op == "wrap":
            doc = _set(doc, path, draw(st.sampled_from([[value], {"value": value}])))
        elif op == "stringify":
            doc = _set(doc, path, str(value) if draw(st.booleans()) else json.dumps(value))
        elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            doc = _set(doc, path, draw(st.sampled_from([value + 1, value - 1, -value, value * 2**40, _HUGE,
                                                        math.nan, math.inf, float(value)])))
        elif op == "reverse" and isinstance(value, list):
            doc = _set(doc, path, value[::-1])
        elif op == "add_key" and isinstance(value, dict):
            value[draw(nasty_text)] = draw(json_leaves)
        else:
            doc = _set(doc, path, draw(json_values))
    return doc


# --- map files ----------------------------------------------------------------------------------


def _fuse_map(world: World, content: bytes | str, name: str = "map.json") -> tuple[Outcome, Path]:
    path = world.root / name  # beside the checkpoints, so that the map's relative paths resolve
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    out = world.fresh("fused.safetensors")
    return invoke("fuse", "--map", path, "-o", out), out


def _fused_fits_a_parent(world: World) -> Callable[[Path], None]:
    parents = [load_checkpoint(world.deep), load_checkpoint(world.shallow)]

    def check(out: Path) -> None:
        fused = load_checkpoint(out)
        assert any(set(fused) == set(p) and all(fused[k].shape == p[k].shape for k in p) for p in parents)

    return check


@fuzz(60)
@given(content=st.binary(max_size=300))
@example(content=b"\xff\xfe{}")
@example(content=b"[" * 100_000)
@example(content=b'{"format": "clafuse-map", "version": 1, "anchor": ' + HUGE_INT.encode() + b"}")
def test_map_arbitrary_bytes(world: World, content: bytes) -> None:
    assert_rejected(*_fuse_map(world, content, "bytes_map.json"))


@fuzz(60)
@given(value=json_values)
def test_map_arbitrary_json(world: World, value: Any) -> None:
    assert_rejected(*_fuse_map(world, to_json(value), "value_map.json"))


def _mapping_edit(d: dict, mapping: list) -> None:
    d["alignments"][0]["groups"][0]["mapping"] = mapping


def _model(d: dict, which: int) -> dict:
    return d["models"][which]


INVALIDATING_MAP_EDITS: dict[str, Callable[[dict, Any], None]] = {
    "mapping": lambda d, v: _mapping_edit(d, v),
    "sha256": lambda d, v: _model(d, v % 2).update(sha256=f"{v:064x}"[-64:]),
    "path": lambda d, v: _model(d, 0).update(path=v),
    "anchor": lambda d, v: d.update(anchor=v),
    "alignment_indices": lambda d, v: d["alignments"][0].update(shallow=v[0], deep=v[1]),
    "samples": lambda d, v: d["data"].update(samples=v),
    "seed": lambda d, v: d["data"].update(seed=v),
    "data_source": lambda d, v: d["data"].update(source=v),
    "drop_key": lambda d, v: d.pop(v),
    "widths": lambda d, v: _model(d, 1)["spec"]["layers"][0].update(out_features=v),
    "family": lambda d, v: _model(d, 0)["spec"].update(family=v),
    "cost_shape": lambda d, v: d["alignments"][0]["groups"][0]["cost"].append([0.5] * v),
}


def _numeric(text: str) -> bool:
    """Whether pydantic's lax mode could read ``text`` as a number."""
    try:
        float(text)
    except ValueError:
        return False
    return True


@st.composite
def invalidating_map_edit(draw: st.DrawFn, base: dict) -> tuple[str, Any]:
    """An edit that certainly makes ``base`` (the digits map, deep 3 x shallow 2 layers) unusable. Values that
    pydantic's lax mode reads as valid (2.0 or "2" for 2, True for 1) are left out."""
    name = draw(st.sampled_from(sorted(INVALIDATING_MAP_EDITS)))
    ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers())
    text = nasty_text.filter(lambda t: not _numeric(t))
    fractions = st.floats(allow_nan=True).filter(lambda f: not f.is_integer())
    valid_mappings = [[0, 1], [0, 2], [1, 2]]
    if name == "mapping":
        value = draw(st.one_of(
            st.lists(st.integers(-3, 5), max_size=5).filter(lambda m: m not in valid_mappings),  # lengths, order, range
            st.lists(st.sampled_from([*EDGE_INTS, _HUGE]), min_size=2, max_size=2).filter(
                lambda m: m not in valid_mappings),
            st.sampled_from([[1, 0], [2, 1], [0, 0], [2, 2], [0, 3], [-1, 2], [0, 1, 2], [0.5, 2], ["a", 2],
                             [None, 2], [[0], 2], {"0": 0}])))
    elif name == "sha256":
        value = draw(st.integers(min_value=0, max_value=2**256 - 1).filter(
            lambda v: f"{v:064x}"[-64:] not in {m["sha256"] for m in base["models"]}))
    elif name == "path":
        value = draw(st.one_of(nasty_text, st.sampled_from(
            ["missing.safetensors", ".", "..", "out", "map.json", "neuron.json", "shallow.safetensors",
             "out/missing.pt", str(Path("/nonexistent") / "deep.safetensors"), "legacy.pt", "deep.pt"])))
    elif name == "anchor":
        value = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=2), st.just(_HUGE), fractions,
                               st.none(), text))
    elif name == "alignment_indices":
        value = draw(st.tuples(ints, ints).filter(lambda v: set(v) != {0, 1} or v[0] == v[1]))
    elif name == "samples":
        value = draw(st.one_of(st.integers(max_value=1), st.integers(min_value=10_000), st.just(_HUGE), fractions,
                               text))
    elif name == "seed":
        value = draw(st.one_of(st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1), st.just(_HUGE),
                               fractions, st.sampled_from([math.inf, None, "zero", [0]])))
    elif name == "data_source":
        value = draw(st.one_of(nasty_text.filter(lambda t: t.strip().lower().split(":")[0] not in
                                                 {"digits", "mnist", "fashion-mnist", "mnist-raw",
                                                  "fashion-mnist-raw"}),
                               st.sampled_from(["missing.npz", ".", "out", "map.json", "deep.safetensors",
                                                "digits:test:extra", "digits:nope"])))
    elif name == "drop_key":
        value = draw(st.sampled_from(["models", "alignments", "anchor", "settings", "data", "tool", "format",
                                      "version"]))
    elif name == "widths":
        value = draw(st.one_of(ints.filter(lambda v: v != 16), st.just(_HUGE), text))
    elif name == "family":
        value = draw(st.one_of(st.sampled_from(["vgg", "resnet", "MLP", ""]), nasty_text.filter(lambda t: t != "mlp")))
    else:
        value = draw(st.integers(0, 4))
    return name, value


def _assert_map_edit_rejected(world: World, name: str, value: Any) -> None:
    doc = _copy(world.data_map)
    INVALIDATING_MAP_EDITS[name](doc, value)
    assert_rejected(*_fuse_map(world, to_json(doc), "invalid_map.json"))


@pytest.mark.parametrize(("name", "value"), [
    ("seed", 10**30),  # torch's generator takes 64 bits: "Overflow when unpacking long long"
    ("seed", 2**64),
    ("samples", _HUGE),  # json.loads refuses to convert 5000 digits (ValueError)
    ("mapping", [0, _HUGE]),
    ("path", "x" * 300),  # Path.exists raises OSError (file name too long)
    ("data_source", "x" * 300),
    ("path", "deep\x1esafetensors"),  # the record separator split the error message into two lines
    ("path", "a\x00b"),
    ("data_source", "\ud800.npz"),
])
def test_map_edge_cases(world: World, name: str, value: Any) -> None:
    """Edits that once crashed clafuse (all but the last two), and file names the OS cannot take."""
    _assert_map_edit_rejected(world, name, value)


@fuzz(150)
@given(data=st.data())
def test_map_invalidating_mutations(world: World, data: st.DataObject) -> None:
    name, value = data.draw(invalidating_map_edit(world.data_map), label="edit")
    _assert_map_edit_rejected(world, name, value)


@fuzz(120)
@given(data=st.data())
def test_map_random_mutations(world: World, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([world.data_map, world.neuron_map]), label="base")
    doc = data.draw(mutated(base), label="map")
    res, out = _fuse_map(world, to_json(doc), "mutated_map.json")
    assert_handled(res, out, _fused_fits_a_parent(world))


# --- spec files ---------------------------------------------------------------------------------

SPEC_SUFFIXES = [".json", ".yaml", ".yml", ".spec"]


def _inspect_with_spec(world: World, family: str, content: bytes | str, suffix: str) -> Outcome:
    path = world.root / f"spec{suffix}"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    return invoke("inspect", world.specs[family][0], "--arch", path, "--json")


def _spec_text(doc: Any, as_yaml: bool) -> str:
    if as_yaml and _HUGE not in json.dumps(doc):
        return yaml.safe_dump(doc)
    return to_json(doc)


FAMILIES = ["mlp", "vgg", "resnet"]


@fuzz(60)
@given(content=st.binary(max_size=300), suffix=st.sampled_from(SPEC_SUFFIXES), family=st.sampled_from(FAMILIES))
@example(content=b"family: mlp\xff\xfe", suffix=".yaml", family="mlp")
@example(content=b"[" * 100_000, suffix=".yaml", family="mlp")
@example(content=b"[" * 100_000, suffix=".json", family="mlp")
@example(content=b"family: mlp\nlayers: " + HUGE_INT.encode(), suffix=".yaml", family="mlp")
@example(content=b'{"family": "mlp", "layers": ' + HUGE_INT.encode() + b"}", suffix=".json", family="mlp")
def test_spec_arbitrary_bytes(world: World, content: bytes, suffix: str, family: str) -> None:
    assert_rejected(_inspect_with_spec(world, family, content, suffix))


@fuzz(60)
@given(value=json_values, as_yaml=st.booleans(), family=st.sampled_from(FAMILIES))
def test_spec_arbitrary_values(world: World, value: Any, as_yaml: bool, family: str) -> None:
    assert_rejected(_inspect_with_spec(world, family, _spec_text(value, as_yaml), ".yaml" if as_yaml else ".json"))


@fuzz(150)
@given(data=st.data(), as_yaml=st.booleans(), family=st.sampled_from(FAMILIES))
def test_spec_mutations(world: World, data: st.DataObject, as_yaml: bool, family: str) -> None:
    doc = data.draw(mutated(world.specs[family][1]), label="spec")
    res = _inspect_with_spec(world, family, _spec_text(doc, as_yaml), ".yaml" if as_yaml else ".json")
    assert_handled(res)
    if res.code == 0:
        assert json.loads(res.stdout)["family"] == family


@pytest.mark.parametrize(("family", "edit"), [
    ("resnet", {"layers": [10**9, 1]}),
    ("resnet", {"widths": [2**62, 8]}),
    ("resnet", {"stem_width": 2**64}),
    ("resnet", {"num_classes": 10**30}),
    ("vgg", {"config": [2**63, "M", 8, "M"]}),
    ("vgg", {"kernel_size": 2**61 + 1}),
    ("mlp", {"layers": [{"name": str(i), "in_features": 64, "out_features": 64} for i in range(20_000)]}),
])
def test_specs_with_huge_sizes_are_refused_quickly(world: World, family: str, edit: dict[str, Any]) -> None:
    doc = {**world.specs[family][1], **edit}
    assert_rejected(_inspect_with_spec(world, family, json.dumps(doc), ".json"))


def test_yaml_tags_never_run_code(world: World) -> None:
    marker = world.root / "yaml-ran-code"
    text = f"family: mlp\nlayers: !!python/object/apply:os.mkdir [{json.dumps(str(marker))}]\n"
    assert_rejected(_inspect_with_spec(world, "mlp", text, ".yaml"))
    assert not marker.exists()


def test_yaml_alias_bombs_are_refused(world: World) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(lines) + "\nfamily: mlp\nlayers: *a8\n"
    assert_rejected(_inspect_with_spec(world, "mlp", text, ".yaml"))


# --- checkpoints --------------------------------------------------------------------------------

SAFETENSORS_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "U32",
                      "F32", "F64", "I64", "U64", "C64", "F4", "F6_E2M3", "F6_E3M2", "f32", "", "FLOAT"]
CHECKPOINT_NAMES = ["x.safetensors", "x.pt", "x.bin", "x.pth", "x.ckpt", "x.weights", "x"]


def _split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header_bytes: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data


@st.composite
def fuzzed_safetensors(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` (a valid safetensors file) with its header length, JSON header or data damaged."""
    header, data = _split_safetensors(raw)
    keys = [k for k in header if k != "__metadata__"]
    length: int | None = None
    header_bytes: bytes | None = None
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["length", "header_text", "dtype", "shape", "offsets", "overlap", "drop_field",
                                   "drop_tensor", "truncate", "append", "metadata", "mutate"]))
        key = draw(st.sampled_from(keys))
        note(f"{op} on {key!r}")
        entry = header.get(key) if isinstance(header.get(key), dict) else {}
        if op == "length":
            true = len(json.dumps(header).encode())
            length = draw(st.one_of(st.integers(true - 16, true + 16), st.integers(0, 2**64 - 1),
                                    st.sampled_from([0, 1, 7, 8, 2**63, 2**64 - 1, len(raw)])))
        elif op == "header_text":
            header_bytes = draw(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                                          st.just(json.dumps(header).encode()[:-1]),
                                          st.just(json.dumps(header).encode() + b"\x00")))
        elif op == "dtype":
            entry["dtype"] = draw(st.one_of(st.sampled_from(SAFETENSORS_DTYPES), json_leaves))
        elif op == "shape":
            entry["shape"] = draw(st.one_of(
                st.lists(st.one_of(st.integers(0, 70), st.sampled_from(EDGE_INTS)), max_size=4),
                json_values))
        elif op == "offsets":
            entry["data_offsets"] = draw(st.one_of(
                st.lists(st.one_of(st.integers(0, len(data) + 8), st.sampled_from(EDGE_INTS)), min_size=2,
                         max_size=2),
                json_values))
        elif op == "overlap":
            other = header.get(draw(st.sampled_from(keys)))
            if isinstance(other, dict) and "data_offsets" in other:
                entry["data_offsets"] = list(other["data_offsets"])
        elif op == "drop_field" and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif op == "drop_tensor":
            header.pop(key, None)
        elif op == "truncate":
            data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "metadata":
            header["__metadata__"] = draw(json_values)
        else:
            header = draw(mutated(header, steps=2))
            if not isinstance(header, dict):
                header_bytes = to_json(header).encode("utf-8", "surrogatepass")
                header = {}
            keys = [k for k in header if k != "__metadata__"] or keys
    if header_bytes is None:
        header_bytes = to_json(header).encode("utf-8", "surrogatepass")
    return _join_safetensors(header_bytes, data, length)


def _zip_members(raw: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def _rebuild_zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name")
        for name, content in members:
            zf.writestr(name, content)
    return buf.getvalue()


_ODD_PICKLES = [
    pickle.dumps([1, 2, 3], protocol=2),
    pickle.dumps({"w": 1.0}, protocol=2),
    pickle.dumps({(1, 2): "x"}, protocol=2),
    pickle.dumps("text", protocol=2),
    b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01",  # a pickle cut short
    b"\x80\x02" + b"(" * 5000 + b".",  # an absurdly deep stack of marks
    b"\x80\x02]" + b"q\x00" * 3 + b"h\x09.",  # a memo lookup that was never stored
]


@st.composite
def fuzzed_torch_zip(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` (a ``torch.save`` zip) with one of its members damaged, dropped or replaced."""
    members = _zip_members(raw)
    index = draw(st.integers(0, len(members) - 1))
    info, content = members[index]
    op = draw(st.sampled_from(["overwrite_in_place", "replace", "truncate", "flip", "drop", "odd_pickle", "extra"]))
    note(f"{op} on {info.filename}")
    if op == "overwrite_in_place":
        (name_len, extra_len) = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        patch = draw(st.binary(min_size=1, max_size=max(1, min(16, len(content)))))
        pos = start + draw(st.integers(0, max(0, len(content) - len(patch))))
        return raw[:pos] + patch + raw[pos + len(patch):]
    if op == "replace":
        content = draw(st.binary(max_size=128))
    elif op == "truncate":
        content = content[:draw(st.integers(0, max(0, len(content) - 1)))]
    elif op == "flip":
        buf = bytearray(content or b"\x00")
        for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=4)):
            buf[pos] ^= draw(st.integers(1, 255))
        content = bytes(buf)
    elif op == "odd_pickle":
        info = next((i for i, _ in members if i.filename.endswith("data.pkl")), info)
        index = [i.filename for i, _ in members].index(info.filename)
        content = draw(st.sampled_from(_ODD_PICKLES))
    rebuilt = [(i.filename, c) for i, c in members]
    if op == "drop":
        del rebuilt[index]
    elif op == "extra":
        prefix = info.filename.split("/")[0]
        rebuilt.append((f"{prefix}/{draw(st.sampled_from(['data/99', 'data.pkl', 'junk']))}",
                        draw(st.binary(max_size=32))))
    else:
        rebuilt[index] = (info.filename, content)
    return _rebuild_zip(rebuilt)


@st.composite
def flipped(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with a few bytes changed anywhere."""
    buf = bytearray(raw)
    for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=6)):
        buf[pos] = draw(st.integers(0, 255))
    return bytes(buf)


@contextlib.contextmanager
def fuse_input_replaced(world: World, name: str, content: bytes) -> Iterator[Path]:
    """The fuse folder with ``name`` (deep.pt or shallow.safetensors) holding ``content`` for a while."""
    path = world.fuse_dir / name
    path.write_bytes(content)
    try:
        yield world.fuse_dir / "map.json"
    finally:
        path.write_bytes(world.originals[name])


def run_on_checkpoint(world: World, content: bytes, name: str, command: str, *, must_fail: bool) -> None:
    """Run ``command`` (inspect, align or fuse) on a checkpoint holding ``content`` and check the outcome."""
    if command == "fuse":
        slot = "shallow.safetensors" if name.endswith(".safetensors") else "deep.pt"
        if content == world.originals[slot]:
            return
        out = world.fresh("fused.safetensors")
        with fuse_input_replaced(world, slot, content) as map_path:
            assert_rejected(invoke("fuse", "--map", map_path, "-o", out), out)  # unreadable or changed since align
        return
    path = world.root / name
    path.write_bytes(content)
    if command == "inspect":
        res, out = invoke("inspect", path, "--json"), None
    else:
        out = world.fresh("map.json")
        res = invoke("align", path, world.shallow, "-o", out, "--data", "digits", "--samples", 20)
    if must_fail:
        assert_rejected(res, out)
    else:
        assert_handled(res, out)


COMMANDS = st.sampled_from(["inspect", "align", "fuse"])


@fuzz(150)
@given(data=st.data(), command=COMMANDS)
def test_safetensors_header_fuzz(world: World, data: st.DataObject, command: str) -> None:
    source = data.draw(st.sampled_from([world.shallow, world.specs["vgg"][0], world.specs["resnet"][0]]),
                       label="source")
    content = data.draw(fuzzed_safetensors(source.read_bytes()), label="file")
    run_on_checkpoint(world, content, "x.safetensors", command if source == world.shallow else "inspect",
                      must_fail=False)


@fuzz(80)
@given(data=st.data(), command=COMMANDS)
def test_torch_zip_member_fuzz(world: World, data: st.DataObject, command: str) -> None:
    content = data.draw(fuzzed_torch_zip(world.deep_pt.read_bytes()), label="file")
    run_on_checkpoint(world, content, "x.pt", command, must_fail=False)


@fuzz(80)
@given(data=st.data(), command=COMMANDS, name=st.sampled_from(["x.safetensors", "x.pt", "x.bin", "x.weights"]))
def test_flipped_bytes(world: World, data: st.DataObject, command: str, name: str) -> None:
    source = data.draw(st.sampled_from([world.shallow, world.deep_pt, world.legacy_pt]), label="source")
    content = data.draw(flipped(source.read_bytes()), label="file")
    run_on_checkpoint(world, content, name, command, must_fail=False)


@fuzz(80)
@given(content=st.binary(max_size=600), name=st.sampled_from(CHECKPOINT_NAMES), command=COMMANDS)
@example(content=b"\x80\x02" + b"(" * 5000 + b".", name="x.pt", command="inspect")
@example(content=b"PK\x03\x04" + bytes(60), name="x.bin", command="inspect")
def test_arbitrary_bytes_as_checkpoint(world: World, content: bytes, name: str, command: str) -> None:
    run_on_checkpoint(world, content, name, command, must_fail=True)


@fuzz(60)
@given(data=st.data(), command=COMMANDS)
def test_truncated_checkpoints(world: World, data: st.DataObject, command: str) -> None:
    source = data.draw(st.sampled_from([world.shallow, world.deep_pt, world.legacy_pt, world.specs["vgg"][0]]),
                       label="source")
    raw = source.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    name = "x.safetensors" if source.suffix == ".safetensors" else "x.pt"
    run_on_checkpoint(world, raw[:cut], name, command if source != world.specs["vgg"][0] else "inspect",
                      must_fail=True)


SHARD_NAMES = ["missing.safetensors", "", ".", "..", "/", "../deep.safetensors", "../shallow.safetensors",
               "../map.json", "../deep.pt", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]


@fuzz(80)
@given(data=st.data())
@example(data=None)
def test_sharded_index_fuzz(world: World, data: st.DataObject | None) -> None:
    """A ``.safetensors.index.json`` whose JSON, weight map or shard names are damaged."""
    if data is None:
        text = '{"weight_map": {"a": ' + HUGE_INT + "}}"
    elif data.draw(st.booleans(), label="targeted"):
        doc = _copy(world.index)
        key = data.draw(st.sampled_from(sorted(doc["weight_map"])), label="key")
        doc["weight_map"][key] = data.draw(st.one_of(st.sampled_from(SHARD_NAMES), json_values), label="shard")
        text = to_json(doc)
    else:
        text = to_json(data.draw(mutated(world.index), label="index"))
    index = world.root / "sharded" / "model.safetensors.index.json"
    index.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_handled(invoke("inspect", index, "--json"))


@pytest.mark.parametrize("command", ["align", "finetune"])
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seeds_torch_cannot_take_are_usage_errors(world: World, command: str, seed: int) -> None:
    """--seed beyond torch's 64 bits once ended in an internal error ("Overflow when unpacking long long")."""
    out = world.fresh("seeded.json" if command == "align" else "seeded.safetensors")
    args = [world.deep, world.shallow] if command == "align" else [world.shallow]
    res = invoke(command, *args, "-o", out, "--data", "digits", f"--seed={seed}")
    assert res.code == 2 and "--seed" in res.stderr, str(res)
    assert "Traceback" not in res.stdout + res.stderr and not out.exists()
