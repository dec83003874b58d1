"""Many-model fusion, lazily read inputs, streamed and sharded outputs, and --dtype.

Exact properties: an anchor fused with permuted copies of itself comes back; one-hot mixing
weights give back the chosen model's function in the target's architecture (MLP and ResNet);
the lazy, layer-by-layer path gives the same bytes as the eager one; a sharded output holds
exactly the unsharded tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clafuse import api
from clafuse.arch.registry import detect
from clafuse.data import load_source
from clafuse.errors import ClafuseError
from clafuse.fusion.engines import ENGINES, Member, Source
from clafuse.fusion.otfusion import FusionSettings
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint, read_metadata, save_checkpoint
from clafuse.io.lazy import LazyStateDict
from clafuse.io.writer import parse_size, write_safetensors
from tests.test_resnet import FUSE_EXACT, PAIRS, permuted_copy, random_state, reference_forward

INPUTS, CLASSES, WIDTH = 64, 10, 24


def mlp_state(hidden: int, seed: int, width: int = WIDTH, prefix: str = "fc") -> dict[str, torch.Tensor]:
    """An MLP on digits with ``hidden`` hidden layers of ``width`` units, with biases."""
    gen = torch.Generator().manual_seed(seed)
    widths = [INPUTS, *[width] * hidden, CLASSES]
    state = {}
    for k, (i, o) in enumerate(zip(widths, widths[1:])):
        state[f"{prefix}{k}.weight"] = torch.randn(o, i, generator=gen) * (2 / i) ** 0.5
        state[f"{prefix}{k}.bias"] = torch.randn(o, generator=gen) * 0.1
    return state


def permuted_mlp(state: dict[str, torch.Tensor], seed: int, prefix: str = "fc") -> dict[str, torch.Tensor]:
    """The same function with every hidden layer's units reordered."""
    gen = torch.Generator().manual_seed(seed)
    out, prev, k = dict(state), None, 0
    while f"{prefix}{k + 1}.weight" in state:
        perm = torch.randperm(state[f"{prefix}{k}.weight"].shape[0], generator=gen)
        w = out[f"{prefix}{k}.weight"]
        out[f"{prefix}{k}.weight"] = (w if prev is None else w[:, prev])[perm].contiguous()
        out[f"{prefix}{k}.bias"] = out[f"{prefix}{k}.bias"][perm].contiguous()
        prev, k = perm, k + 1
    out[f"{prefix}{k}.weight"] = out[f"{prefix}{k}.weight"][:, prev].contiguous()
    return out


def logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    state = load_checkpoint(path)
    family, spec = detect(state)
    return family.forward(spec, {k: v.float() for k, v in state.items()}, x)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_source("digits:test").x


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Four MLPs of depths 3, 4, 5, 5 (2-4 hidden layers of equal width), aligned by weights."""
    root = tmp_path_factory.mktemp("four")
    paths = [root / f"{name}.safetensors" for name in "ABCD"]
    for i, (path, hidden) in enumerate(zip(paths, [2, 3, 4, 4])):
        save_checkpoint(path, mlp_state(hidden, seed=i))
    api.align(paths, root / "map.json", metric="neuron")
    return root, paths


# --- more than two models -----------------------------------------------------------------------


@pytest.mark.parametrize("signal", ["weights", "activations"])
def test_anchor_with_two_permuted_copies_comes_back(tmp_path: Path, digits: torch.Tensor, signal: str) -> None:
    base = mlp_state(3, seed=7)
    paths = [tmp_path / f"{n}.safetensors" for n in "ABC"]
    for path, state in zip(paths, [base, permuted_mlp(base, 1), permuted_mlp(base, 2)]):
        save_checkpoint(path, state)
    assert not torch.equal(load_checkpoint(paths[1])["fc0.weight"], base["fc0.weight"])
    doc = api.align(paths, tmp_path / "map.json", data="digits", samples=200)
    assert doc.anchor == 0 and [m.role for m in doc.models] == ["anchor", "member", "member"]
    assert [(a.deep, a.shallow) for a in doc.alignments] == [(0, 1), (0, 2)]
    report = api.fuse(tmp_path / "map.json", tmp_path / "F.safetensors", signal=signal, correction="none")
    assert report["mixing_order"] == ["A", "B", "C"] and report["balance"] == {"B": "add", "C": "add"}
    fused = load_checkpoint(tmp_path / "F.safetensors")
    assert fused.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(fused[key], base[key], rtol=1e-5, atol=1e-5)


def test_four_models_align_to_the_first_deepest(four: tuple[Path, list[Path]]) -> None:
    root, paths = four
    doc = api.align(paths, None, metric="neuron")
    assert doc.anchor == 2
    assert [(a.deep, a.shallow) for a in doc.alignments] == [(2, 0), (2, 1), (2, 3)]
    assert [len(a.groups[0].mapping) for a in doc.alignments] == [2, 3, 4]
    for a in doc.alignments:
        mapping = a.groups[0].mapping
        assert mapping[0] == 0 and mapping[-1] == 3  # pinned ends
    assert json.loads((root / "map.json").read_text())["anchor"] == 2


@pytest.mark.parametrize("chosen", range(4))
def test_one_hot_weights_give_back_each_models_function(four: tuple[Path, list[Path]], digits: torch.Tensor,
                                                        chosen: int) -> None:
    """In the anchor's (C's) architecture: identity layers make A and B exact, D maps one to one."""
    root, paths = four
    weights = ",".join("1" if i == chosen else "0" for i in range(4))
    out = root / f"onehot{chosen}.safetensors"
    report = api.fuse(root / "map.json", out, weights=weights, signal="weights")
    assert report["target"] == str(paths[2])
    assert sorted(load_checkpoint(out)) == sorted(load_checkpoint(paths[2]))
    torch.testing.assert_close(logits(out, digits), logits(paths[chosen], digits), rtol=1e-4, atol=1e-4)


def test_equal_weights_mix_every_model(four: tuple[Path, list[Path]], digits: torch.Tensor) -> None:
    root, paths = four
    report = api.fuse(root / "map.json", root / "mixed.safetensors", signal="weights")
    assert report["weights"] == [0.25] * 4 and report["mixing_order"] == ["C", "A", "B", "D"]
    assert report["balance"] == {"A": "add", "B": "add", "D": "add"}
    # Every layer averages all four models (MLPs: inserted identities are averaged too).
    assert report["mixing"] == [[0.25] * 4] * 5
    mixed = logits(root / "mixed.safetensors", digits)
    for path in paths:
        assert not torch.allclose(mixed, logits(path, digits), atol=1e-3)


def test_fusing_into_a_model_the_map_does_not_center_on_is_refused(four: tuple[Path, list[Path]]) -> None:
    root, _ = four
    with pytest.raises(ClafuseError, match="--anchor B"):
        api.fuse(root / "map.json", root / "never.safetensors", target="B")
    with pytest.raises(ClafuseError, match="two-model map"):
        api.fuse(root / "map.json", root / "never.safetensors", balance="merge")
    with pytest.raises(ClafuseError, match="4 non-negative numbers"):
        api.fuse(root / "map.json", root / "never.safetensors", weights="1,1")
    with pytest.raises(ClafuseError, match="names no model"):
        api.align([root / "A.safetensors", root / "B.safetensors"], None, metric="neuron", anchor="Q")
    assert not (root / "never.safetensors").exists()


def test_anchor_on_the_shallowest_folds_the_deeper_models(four: tuple[Path, list[Path]], digits: torch.Tensor) -> None:
    root, paths = four
    doc = api.align(paths, root / "shallow-map.json", data="digits", samples=300, anchor="A")
    assert doc.anchor == 0 and all(a.shallow == 0 for a in doc.alignments)
    out = root / "intoA.safetensors"
    report = api.fuse(root / "shallow-map.json", out, weights="1,0,0,0", correction="none")
    assert report["balance"] == {"B": "merge", "C": "merge", "D": "merge"}
    assert sorted(load_checkpoint(out)) == sorted(load_checkpoint(paths[0]))
    torch.testing.assert_close(logits(out, digits), logits(paths[0], digits), rtol=1e-4, atol=1e-4)
    api.fuse(root / "shallow-map.json", root / "intoA-mixed.safetensors")
    assert sorted(load_checkpoint(root / "intoA-mixed.safetensors")) == sorted(load_checkpoint(paths[0]))


def test_resnets_many_to_one(tmp_path: Path) -> None:
    """Deep anchor + a shallow ResNet + its channel-permuted copy; all weight on the two shallow
    ones gives the shallow function in the deep architecture (identity blocks where unmatched)."""
    deep_spec, shallow_spec = PAIRS["basic"]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    np.savez(tmp_path / "x.npz", x=x.numpy())
    deep, shallow = random_state(deep_spec, 1), random_state(shallow_spec, 2)
    paths = [tmp_path / f"{n}.safetensors" for n in ("deep", "shallow", "copy")]
    for path, state in zip(paths, [deep, shallow, permuted_copy(shallow, 3)]):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    api.align(paths, tmp_path / "map.json", data=str(tmp_path / "x.npz"), samples=32)
    for signal in ("activations", "weights"):
        out = tmp_path / f"F-{signal}.safetensors"
        report = api.fuse(tmp_path / "map.json", out, weights="0,0.5,0.5", signal=signal, **FUSE_EXACT)
        fused = load_checkpoint(out)
        assert sorted(fused) == sorted(deep) and report["mixing_order"] == ["A", "B", "C"]
        expected = reference_forward(shallow, x)
        assert (reference_forward(fused, x) - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
    report = api.fuse(tmp_path / "map.json", tmp_path / "mixed.safetensors")
    assert sorted(load_checkpoint(tmp_path / "mixed.safetensors")) == sorted(deep)
    assert all(len(row) == 3 and abs(sum(row) - 1) < 1e-5 for row in report["mixing"])


# --- lazy inputs, streamed and sharded outputs ---------------------------------------------------


def test_safetensors_inputs_open_lazily(tmp_path: Path) -> None:
    state = mlp_state(2, seed=3)
    save_checkpoint(tmp_path / "m.safetensors", state)
    lazy = open_checkpoint(tmp_path / "m.safetensors")
    assert isinstance(lazy, LazyStateDict) and set(lazy) == set(state)
    skeleton = lazy.skeleton()
    assert all(v.is_meta and v.shape == state[k].shape for k, v in skeleton.items())
    for key in state:
        assert torch.equal(lazy[key], state[key])
    torch.save(state, tmp_path / "m.pt")
    assert isinstance(open_checkpoint(tmp_path / "m.pt"), dict)


def test_lazy_streaming_fusion_equals_the_eager_one(tmp_path: Path) -> None:
    states = [mlp_state(4, seed=0, width=40), mlp_state(2, seed=1, width=40), mlp_state(4, seed=2, width=40)]
    for i, state in enumerate(states):
        save_checkpoint(tmp_path / f"{i}.safetensors", state)
    sharded = save_checkpoint(tmp_path / "s1.safetensors", states[1], max_shard_size=8000)
    assert sharded[-1].name == "s1.safetensors.index.json" and len(sharded) > 2
    paths = [tmp_path / "0.safetensors", sharded[-1], tmp_path / "2.safetensors"]
    doc = api.align(paths, tmp_path / "map.json", metric="neuron")
    api.fuse(tmp_path / "map.json", tmp_path / "lazy.safetensors", signal="weights")
    family, spec = detect(states[0])
    members = [Member(*detect(s), s) for s in states]
    sources = [Source(members[a.shallow if a.deep == 0 else a.deep], [g.mapping for g in a.groups], a.deep != 0)
               for a in doc.alignments]
    eager = ENGINES["chain"](members[0], sources, [1 / 3] * 3, None,
                             FusionSettings(signal="weights", correction="none"))
    lazy = load_checkpoint(tmp_path / "lazy.safetensors")
    assert lazy.keys() == eager.state_dict.keys()
    for key in lazy:
        assert torch.equal(lazy[key], eager.state_dict[key]), key


def test_sharded_output_holds_the_same_tensors(tmp_path: Path, digits: torch.Tensor) -> None:
    for i, hidden in enumerate([3, 2]):
        save_checkpoint(tmp_path / f"{i}.safetensors", mlp_state(hidden, seed=i, width=48))
    api.align([tmp_path / "0.safetensors", tmp_path / "1.safetensors"], tmp_path / "map.json", metric="neuron")
    whole = api.fuse(tmp_path / "map.json", tmp_path / "whole.safetensors", signal="weights")
    assert whole["files"] == [str(tmp_path / "whole.safetensors")]
    report = api.fuse(tmp_path / "map.json", tmp_path / "part.safetensors", signal="weights", max_shard_size="10KB")
    files = [Path(f) for f in report["files"]]
    assert files[-1] == tmp_path / "part.safetensors.index.json" and not (tmp_path / "part.safetensors").exists()
    assert [f.name for f in files[:-1]] == [f"part-{i:05d}-of-{len(files) - 1:05d}.safetensors"
                                            for i in range(1, len(files))]
    for shard in files[:-1]:  # at most the limit of data, unless one tensor alone exceeds it
        tensors = load_file(shard)
        size = sum(v.numel() * v.element_size() for v in tensors.values())
        assert size <= 10_000 or len(tensors) == 1, shard
    index = json.loads(files[-1].read_text())
    expected = load_checkpoint(tmp_path / "whole.safetensors")
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    got = load_checkpoint(files[-1])
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert json.loads(read_metadata(files[-1])["settings"])["balance"] == "add"
    torch.testing.assert_close(logits(files[-1], digits), logits(tmp_path / "whole.safetensors", digits))
    # Sharding again with fewer, larger shards replaces the index; no stale index remains.
    again = api.fuse(tmp_path / "map.json", tmp_path / "part.safetensors", signal="weights", max_shard_size="1MB")
    assert again["files"] == [str(tmp_path / "part.safetensors")]


@pytest.mark.parametrize("text,expected", [("1000", 1000), ("500MB", 500_000_000), ("2GiB", 2 * 2**30),
                                           ("1.5 kb", 1500), (None, None), (4096, 4096)])
def test_shard_sizes_parse(text: str | int | None, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-5MB", "0", "12 parsecs", "MB", "1e3"])
def test_bad_shard_sizes_are_refused(text: str) -> None:
    with pytest.raises(ClafuseError, match="max-shard-size"):
        parse_size(text)


def test_streamed_writer_round_trips_every_dtype(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen), "f64": torch.randn(4, dtype=torch.float64, generator=gen),
        "f16": torch.randn(7, generator=gen).half(), "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "i64": torch.arange(5), "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "view": torch.randn(6, 6, generator=gen)[:, 1],  # non-contiguous
    }
    write_safetensors(tmp_path / "t.safetensors", tensors, {"note": "hi"})
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    assert read_metadata(tmp_path / "t.safetensors") == {"note": "hi"}
    header_len = int.from_bytes((tmp_path / "t.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "t.safetensors").read_bytes()[8:8 + header_len])
    for key, value in tensors.items():  # each tensor's data starts aligned to its element size
        assert header[key]["data_offsets"][0] % value.element_size() == 0, key


def test_dtype_option_sets_the_output_dtype(tmp_path: Path) -> None:
    for i, hidden in enumerate([3, 2]):
        save_checkpoint(tmp_path / f"{i}.safetensors", mlp_state(hidden, seed=i))
    api.align([tmp_path / "0.safetensors", tmp_path / "1.safetensors"], tmp_path / "map.json", metric="neuron")
    api.fuse(tmp_path / "map.json", tmp_path / "bf16.safetensors", signal="weights", dtype="bf16")
    api.fuse(tmp_path / "map.json", tmp_path / "fp32.safetensors", signal="weights")
    low, full = load_checkpoint(tmp_path / "bf16.safetensors"), load_checkpoint(tmp_path / "fp32.safetensors")
    assert {v.dtype for v in low.values()} == {torch.bfloat16}
    for key in full:
        torch.testing.assert_close(low[key].float(), full[key], rtol=1e-2, atol=1e-2)
    with pytest.raises(ClafuseError, match="--dtype"):
        api.fuse(tmp_path / "map.json", tmp_path / "x.safetensors", dtype="int8")
    big = mlp_state(2, seed=5)
    big["fc0.weight"][0, 0] = 1e6  # beyond float16's range
    save_checkpoint(tmp_path / "big.safetensors", big)
    api.align([tmp_path / "big.safetensors", tmp_path / "1.safetensors"], tmp_path / "big.json", metric="neuron")
    with pytest.raises(ClafuseError, match="overflow"):
        api.fuse(tmp_path / "big.json", tmp_path / "half.safetensors", signal="weights", dtype="fp16",
                 weights="1,0")
    assert not (tmp_path / "half.safetensors").exists() and not (tmp_path / "x.safetensors").exists()
