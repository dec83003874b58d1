"""The VGG family: torchvision's key layout, detection, the chain view, exact identity insertion,
fusion of permuted copies and of different depths, through the library and the command line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tests.cli_runner import invoke
from clafuse import api
from clafuse.arch.registry import FAMILIES, detect, parse_spec
from clafuse.arch.network import Tap, run
from clafuse.arch.vgg import VGGFamily, VGGLinear, VGGSpec
from clafuse.errors import ClafuseError, SpecError
from clafuse.fusion.balance import insert_blocks, insert_identities
from clafuse.fusion.engines import global_mapping
from clafuse.fusion.otfusion import FusionSettings, correct, fuse_chains
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint

FAMILY: VGGFamily = FAMILIES["vgg"]
TOL = {"rtol": 1e-4, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("module_cache")


# --- torchvision's vgg11_bn, written out by hand -------------------------------------------------
# cfg "A" = [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'] with BatchNorm: each conv
# takes features.i (Conv2d, bias=True), i+1 (BatchNorm2d), i+2 (ReLU); each 'M' one index. Classifier:
# Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, 1000).

VGG11_BN_KEYS = [
    ("features.0.weight", (64, 3, 3, 3)),
    ("features.0.bias", (64,)),
    ("features.1.weight", (64,)),
    ("features.1.bias", (64,)),
    ("features.1.running_mean", (64,)),
    ("features.1.running_var", (64,)),
    ("features.1.num_batches_tracked", ()),
    ("features.4.weight", (128, 64, 3, 3)),
    ("features.4.bias", (128,)),
    ("features.5.weight", (128,)),
    ("features.5.bias", (128,)),
    ("features.5.running_mean", (128,)),
    ("features.5.running_var", (128,)),
    ("features.5.num_batches_tracked", ()),
    ("features.8.weight", (256, 128, 3, 3)),
    ("features.8.bias", (256,)),
    ("features.9.weight", (256,)),
    ("features.9.bias", (256,)),
    ("features.9.running_mean", (256,)),
    ("features.9.running_var", (256,)),
    ("features.9.num_batches_tracked", ()),
    ("features.11.weight", (256, 256, 3, 3)),
    ("features.11.bias", (256,)),
    ("features.12.weight", (256,)),
    ("features.12.bias", (256,)),
    ("features.12.running_mean", (256,)),
    ("features.12.running_var", (256,)),
    ("features.12.num_batches_tracked", ()),
    ("features.15.weight", (512, 256, 3, 3)),
    ("features.15.bias", (512,)),
    ("features.16.weight", (512,)),
    ("features.16.bias", (512,)),
    ("features.16.running_mean", (512,)),
    ("features.16.running_var", (512,)),
    ("features.16.num_batches_tracked", ()),
    ("features.18.weight", (512, 512, 3, 3)),
    ("features.18.bias", (512,)),
    ("features.19.weight", (512,)),
    ("features.19.bias", (512,)),
    ("features.19.running_mean", (512,)),
    ("features.19.running_var", (512,)),
    ("features.19.num_batches_tracked", ()),
    ("features.22.weight", (512, 512, 3, 3)),
    ("features.22.bias", (512,)),
    ("features.23.weight", (512,)),
    ("features.23.bias", (512,)),
    ("features.23.running_mean", (512,)),
    ("features.23.running_var", (512,)),
    ("features.23.num_batches_tracked", ()),
    ("features.25.weight", (512, 512, 3, 3)),
    ("features.25.bias", (512,)),
    ("features.26.weight", (512,)),
    ("features.26.bias", (512,)),
    ("features.26.running_mean", (512,)),
    ("features.26.running_var", (512,)),
    ("features.26.num_batches_tracked", ()),
    ("classifier.0.weight", (4096, 25088)),
    ("classifier.0.bias", (4096,)),
    ("classifier.3.weight", (4096, 4096)),
    ("classifier.3.bias", (4096,)),
    ("classifier.6.weight", (1000, 4096)),
    ("classifier.6.bias", (1000,)),
]
VGG11_BN_PARAMS = 132_868_840  # torchvision's documented parameter count of vgg11_bn


def vgg11_bn_spec() -> VGGSpec:
    return VGGSpec(in_channels=3, config=[64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
                   batch_norm=True, classifier=[VGGLinear(index=0, in_features=25088, out_features=4096),
                                                VGGLinear(index=3, in_features=4096, out_features=4096),
                                                VGGLinear(index=6, in_features=4096, out_features=1000)])


def test_vgg11_bn_has_torchvisions_exact_keys_and_shapes() -> None:
    spec = vgg11_bn_spec()
    with torch.device("meta"):
        module = FAMILY.build(spec)
    state = module.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == VGG11_BN_KEYS
    assert sum(p.numel() for p in module.parameters()) == VGG11_BN_PARAMS
    assert [type(m).__name__ for m in module.features] == (
        ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + (["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"]) * 3)
    assert [type(m).__name__ for m in module.classifier] == ["Linear", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert isinstance(module.avgpool, nn.AdaptiveAvgPool2d) and tuple(module.avgpool.output_size) == (7, 7)
    family, detected = detect(state)
    assert family.name == "vgg"
    assert detected == spec
    FAMILY.check(spec, state)
    assert [g.name for g in FAMILY.groups(spec)] == [f"features.chunk{i}" for i in range(5)] + ["classifier"]
    assert [[l.name for l in g.layers] for g in FAMILY.groups(spec)][2] == ["features.8", "features.11"]
    # Through the JSON form a map file stores.
    assert parse_spec(detected.model_dump(mode="json"))[1] == spec


# --- small VGGs ---------------------------------------------------------------------------------


def small_spec(config: list, hidden: list[int], *, bn: bool = True, bias: bool = True, size: int = 16,
               in_channels: int = 1, classes: int = 5, avgpool: tuple[int, int] | None = None) -> VGGSpec:
    convs = [v for v in config if v != "M"]
    side = size // 2 ** config.count("M")
    flat = convs[-1] * (avgpool[0] * avgpool[1] if avgpool else side * side)
    widths = [flat, *hidden, classes]
    classifier = [VGGLinear(index=3 * i, in_features=a, out_features=b) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
    return VGGSpec(in_channels=in_channels, config=config, batch_norm=bn, conv_bias=bias, avgpool=avgpool,
                   input_size=None if avgpool else (in_channels, size, size), classifier=classifier)


def random_state(spec: VGGSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights scaled to keep activations O(1), and random BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, v in FAMILY.build(spec).state_dict().items():
        shape = tuple(v.shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(int(torch.randint(1, 1000, (), generator=gen)))
        elif key.endswith("running_var") or (key.endswith("weight") and len(shape) == 1):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 1:
            state[key] = torch.randn(shape, generator=gen) * 0.1
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return state


def module_of(spec: VGGSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    module = FAMILY.build(spec)
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.mark.parametrize("bn,bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("avgpool", [None, (7, 7)])
def test_small_vgg_detects_back_and_its_chain_computes_the_module(bn: bool, bias: bool, avgpool) -> None:
    size = 28 if avgpool else 16  # 28 -> 7x7 after two pools: avgpool (7, 7) is the identity there
    spec = small_spec([4, "M", 6, 6, "M"], [12], bn=bn, bias=bias, size=size, avgpool=avgpool)
    state = random_state(spec, 0)
    family, detected = detect(state)
    assert family.name == "vgg" and detected == spec
    x = torch.randn(3, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(FAMILY.to_chain(spec, state)(x), module_of(spec, state)(x), **TOL)
    # The chain's state dict round-trips exactly.
    back = FAMILY.from_chain(spec, FAMILY.to_chain(spec, state), state)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("out,size", [((2, 2), 8), ((3, 1), 20)])
def test_adaptive_avgpool_that_is_not_the_identity_is_in_the_chain(out: tuple[int, int], size: int) -> None:
    # 8x8 input, three pools -> 1x1 map replicated to 2x2; 20x20 -> 2x2 map averaged to 3x1.
    spec = small_spec([4, "M", 6, "M", 6, "M"], [8], size=size, avgpool=out)
    state = random_state(spec, 1)
    x = torch.randn(4, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(FAMILY.to_chain(spec, state)(x), module_of(spec, state)(x), **TOL)


def test_batchnorm_without_num_batches_tracked_and_half_precision() -> None:
    spec = small_spec([4, "M", 6, "M"], [8])
    state = {k: v.half() if v.is_floating_point() else v for k, v in random_state(spec, 0).items()
             if not k.endswith("num_batches_tracked")}
    found = detect(state)[1]
    assert not found.bn_num_batches_tracked
    FAMILY.check(found, state)
    FAMILY.build(found).load_state_dict(state, strict=True)
    back = FAMILY.from_chain(found, FAMILY.to_chain(found, state), state)
    assert sorted(back) == sorted(state) and all(back[k].dtype == torch.float16 for k in back)


def test_a_single_linear_classifier_has_no_classifier_group() -> None:
    spec = small_spec([4, "M", 6, "M"], [])
    state = random_state(spec, 2)
    assert detect(state)[1] == spec
    assert [g.name for g in FAMILY.groups(spec)] == ["features.chunk0", "features.chunk1"]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(FAMILY.to_chain(spec, state)(x), module_of(spec, state)(x), **TOL)


def test_an_mlp_is_not_taken_for_a_vgg_nor_a_vgg_for_an_mlp() -> None:
    mlp = {"features.0.weight": torch.zeros(8, 4), "features.0.bias": torch.zeros(8),
           "classifier.0.weight": torch.zeros(3, 8), "classifier.0.bias": torch.zeros(3)}
    assert detect(mlp)[0].name == "mlp"
    assert FAMILY.detect(mlp) is None
    assert FAMILIES["mlp"].detect(random_state(small_spec([4, "M"], [6]), 0)) is None
    assert FAMILY.detect({"fc.weight": torch.zeros(2, 2)}) is None


def test_custom_indices_and_no_trailing_pool_from_a_spec() -> None:
    """A layout other than make_layers' (extra modules between convs, no final max-pool)."""
    spec = VGGSpec(in_channels=2, config=[4, "M", 6], batch_norm=False, conv_indices=[0, 5], avgpool=None,
                   input_size=(2, 8, 8), classifier=[VGGLinear(index=1, in_features=6 * 16, out_features=3)])
    module = FAMILY.build(spec)
    assert list(module.state_dict()) == ["features.0.weight", "features.0.bias", "features.5.weight",
                                         "features.5.bias", "classifier.1.weight", "classifier.1.bias"]
    state = random_state(spec, 3)
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(FAMILY.to_chain(spec, state)(x), module_of(spec, state)(x), **TOL)


BAD_SPECS = {
    "starts with a pool": ({"config": ["M", 4]}, "start with a conv"),
    "two pools": ({"config": [4, "M", "M", 8]}, "two max-pools"),
    "flat size": ({"classifier": [{"index": 0, "in_features": 99, "out_features": 3}]}, "takes 99 features"),
    "indices too close": ({"conv_indices": [0, 2]}, "needs 4 indices"),
    "no room for relu": ({"classifier": [{"index": 0, "in_features": 64, "out_features": 5},
                                         {"index": 1, "in_features": 5, "out_features": 3}]}, "no room"),
    "even kernel": ({"kernel_size": 2}, "odd"),
    "channels": ({"input_size": [3, 8, 8]}, "in_channels"),
}


@pytest.mark.parametrize("name", list(BAD_SPECS))
def test_bad_specs_are_refused_with_a_reason(name: str) -> None:
    good = {"family": "vgg", "in_channels": 1, "config": [4, "M", 4, "M"], "batch_norm": True, "avgpool": None,
            "input_size": [1, 8, 8], "classifier": [{"index": 0, "in_features": 16, "out_features": 3}]}
    parse_spec(good)
    change, message = BAD_SPECS[name]
    with pytest.raises(SpecError, match=message):
        parse_spec({**good, **change})


def test_detection_explains_what_does_not_fit() -> None:
    state = random_state(small_spec([4, "M", 6, "M"], [8]), 0)
    no_bn = {k: v for k, v in state.items() if not k.startswith("features.5.")}
    with pytest.raises(SpecError, match="do not follow each conv"):
        detect(no_bn)
    renamed = {k.replace("features.4.", "features.6.").replace("features.5.", "features.7."): v for k, v in state.items()}
    with pytest.raises(SpecError, match="at most one max-pool"):
        detect(renamed)


# --- identity insertion -------------------------------------------------------------------------

DEEP = [4, 4, "M", 6, 6, 6, "M"]
SHALLOW = [4, "M", 6, "M"]


def increasing_maps(n: int, m: int) -> list[list[int]]:
    return [list(c) for c in itertools.combinations(range(m), n)]


@pytest.mark.parametrize("bn", [False, True])
def test_identity_insertion_is_exact_per_chunk(bn: bool) -> None:
    deep_spec = small_spec(DEEP, [10, 10], bn=bn)
    shallow_spec = small_spec(SHALLOW, [10], bn=bn)
    deep = FAMILY.to_chain(deep_spec, random_state(deep_spec, 4))
    shallow = FAMILY.to_chain(shallow_spec, random_state(shallow_spec, 5))
    sizes = [len(g.layers) for g in FAMILY.groups(deep_spec)]
    assert sizes == [2, 3, 2]
    gen = torch.Generator().manual_seed(0)
    x_pos = torch.rand(6, 1, 16, 16, generator=gen)
    x_any = torch.randn(6, 1, 16, 16, generator=gen)
    want_pos, want_any = shallow(x_pos), shallow(x_any)
    tried = 0
    for m0, m1 in itertools.product(increasing_maps(1, 2), increasing_maps(1, 3)):
        mapping = global_mapping([m0, m1, [0]], sizes)
        balanced = insert_identities(shallow, mapping, deep)
        assert len(balanced.hidden) == len(deep.hidden)
        assert [l.pool_after for l in balanced.hidden] == [l.pool_after for l in deep.hidden]
        assert [l.inserted for l in balanced.hidden] == [j not in mapping for j in range(len(deep.hidden))]
        assert all((l.bn is not None) == bn for l in balanced.hidden[:5])  # the convs
        # Identities before the first real conv see raw inputs: exact for non-negative ones.
        torch.testing.assert_close(balanced(x_pos), want_pos, **TOL)
        if m0 == [0]:
            torch.testing.assert_close(balanced(x_any), want_any, **TOL)
        tried += 1
    assert tried == 6


def test_identity_insertion_refuses_mappings_across_a_pool_or_the_flatten() -> None:
    deep_spec = small_spec(DEEP, [10, 10])
    shallow_spec = small_spec(SHALLOW, [10])
    deep = FAMILY.to_chain(deep_spec, random_state(deep_spec, 4))
    shallow = FAMILY.to_chain(shallow_spec, random_state(shallow_spec, 5))
    with pytest.raises(ClafuseError, match="within their chunk"):
        insert_identities(shallow, [0, 1, 5], deep)  # shallow chunk-1 conv mapped into deep chunk 0
    with pytest.raises(ClafuseError, match="first fully-connected layers"):
        insert_identities(shallow, [0, 4, 6], deep)  # the flattening layer mapped past deep's


# --- fusion -------------------------------------------------------------------------------------


def permuted_copy(spec: VGGSpec, state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same function with every conv's channels and every hidden unit permuted."""
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in state.items()}
    prev = None
    for idx, width in zip(spec.conv_indices, spec.convs):
        perm = torch.randperm(width, generator=gen)
        w = out[f"features.{idx}.weight"]
        if prev is not None:
            w = w[:, prev]
        out[f"features.{idx}.weight"] = w[perm]
        for key in [f"features.{idx}.bias"] + [f"features.{idx + 1}.{leaf}" for leaf in
                                                 ("weight", "bias", "running_mean", "running_var")]:
            if key in out:
                out[key] = out[key][perm]
        prev = perm
    first = spec.classifier[0]
    w = out[f"classifier.{first.index}.weight"]
    channels = spec.convs[-1]
    out[f"classifier.{first.index}.weight"] = w.view(w.shape[0], channels, -1)[:, prev].reshape(w.shape)
    prev = None
    for layer in spec.classifier:
        w = out[f"classifier.{layer.index}.weight"]
        if prev is not None:
            w = w[:, prev]
        if layer is not spec.classifier[-1]:
            perm = torch.randperm(layer.out_features, generator=gen)
            w = w[perm]
            if layer.bias:
                out[f"classifier.{layer.index}.bias"] = out[f"classifier.{layer.index}.bias"][perm]
            prev = perm
        out[f"classifier.{layer.index}.weight"] = w
    return out


@pytest.mark.parametrize("bn,avgpool,signal,correction", [
    (True, None, "activations", "none"),
    (True, None, "weights", "none"),
    (False, None, "activations", "regress"),
    (True, (2, 2), "activations", "repair"),
    (True, (2, 2), "activations", "regress"),
])
def test_fusing_a_permuted_copy_gives_back_the_function(bn: bool, avgpool, signal: str, correction: str) -> None:
    size = 8 if avgpool else 16  # 8x8 input, three pools: a 1x1 map replicated to 2x2
    spec = small_spec([4, "M", 6, 6, "M", 8, "M"], [12, 10], bn=bn, size=size, avgpool=avgpool)
    state = random_state(spec, 6)
    copy = permuted_copy(spec, state, 7)
    x = torch.randn(64, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module_of(spec, state)(x)
        torch.testing.assert_close(module_of(spec, copy)(x), want, **TOL)
    assert not torch.equal(copy["features.0.weight"], state["features.0.weight"])
    settings = FusionSettings(signal=signal, correction=correction, bn_reset=False)
    result = fuse_chains(FAMILY.to_chain(spec, state), [FAMILY.to_chain(spec, copy)], [0.5, 0.5], x, settings)
    fused = FAMILY.from_chain(spec, result.chain, state)
    with torch.no_grad():
        torch.testing.assert_close(module_of(spec, fused)(x), want, **TOL)
    for k in state:
        if not k.endswith("num_batches_tracked") and (correction == "none" or k.startswith("features.") and not bn):
            torch.testing.assert_close(fused[k], state[k], **TOL)


def test_regress_falls_back_to_repair_on_conv_layers() -> None:
    spec = small_spec([4, "M", 6, "M"], [8], bn=True)
    chain = FAMILY.to_chain(spec, random_state(spec, 8))
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    pre, _, logits = chain.forward_record(x)
    targets = [1.5 * z + 0.3 for z in pre] + [logits]
    repaired = correct(chain, targets, x, "repair")
    regressed = correct(chain, targets, x, "regress")
    for k in range(2):  # the convs: repaired through their BatchNorm, the same under both methods
        assert torch.equal(regressed.hidden[k].weight, chain.hidden[k].weight)
        for leaf in ("weight", "bias"):
            torch.testing.assert_close(regressed.hidden[k].bn[leaf], repaired.hidden[k].bn[leaf])
            assert not torch.allclose(regressed.hidden[k].bn[leaf], chain.hidden[k].bn[leaf])
    new_pre, _, _ = regressed.forward_record(x)
    torch.testing.assert_close(new_pre[0].transpose(0, 1).flatten(1).std(1),
                               targets[0].transpose(0, 1).flatten(1).std(1), rtol=1e-3, atol=1e-4)


# --- through the library and the CLI on saved checkpoints ---------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A deep and a shallow VGG (BN, 1x16x16 inputs) saved as checkpoints, random calibration data."""
    root = tmp_path_factory.mktemp("vgg")
    deep_spec = small_spec(DEEP, [16, 16], bn=True)
    shallow_spec = small_spec(SHALLOW, [16], bn=True)
    deep, shallow = random_state(deep_spec, 10), random_state(shallow_spec, 11)
    save_checkpoint(root / "deep.safetensors", deep)
    save_checkpoint(root / "shallow.safetensors", shallow)
    gen = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=gen.standard_normal((64, 1, 16, 16)).astype(np.float32),
             y=gen.integers(0, 5, 64))
    np.savez(root / "rgb.npz", x=gen.standard_normal((8, 3, 16, 16)).astype(np.float32))
    # Without the last pin every shallow conv maps to the first of its chunk, so the identities
    # follow it and have the deep layers' widths: the balanced shallow net fits the deep architecture.
    doc = api.align([root / "shallow.safetensors", root / "deep.safetensors"], root / "map.json",
                    data=str(root / "calib.npz"), samples=64, pin_last=False)
    assert [g.mapping for g in doc.alignments[0].groups] == [[0], [0], [0]]
    return {"root": root, "deep_spec": deep_spec, "shallow_spec": shallow_spec, "deep": deep, "shallow": shallow,
            "x": torch.from_numpy(np.load(root / "calib.npz")["x"])}


def test_align_maps_within_chunks_and_pins_the_flattening_layer(pair) -> None:
    with pytest.warns(UserWarning, match="--no-pin-first does not apply to features.chunk0, classifier of a vgg"):
        doc = api.align([pair["root"] / "shallow.safetensors", pair["root"] / "deep.safetensors"], None,
                        data=str(pair["root"] / "calib.npz"), samples=64, pin_first=False, pin_last=True)
    groups = doc.alignments[0].groups
    assert [g.name for g in groups] == ["features.chunk0", "features.chunk1", "classifier"]
    # One shallow layer, pinned to the first despite pin_last: the first conv sees the raw inputs,
    # the first classifier layer flattens the feature maps.
    assert groups[0].mapping == [0] and groups[2].mapping == [0]
    assert groups[1].mapping == [2]  # pin_last in a free chunk
    assert doc.models[doc.anchor].role == "deep" and doc.anchor == 1


@pytest.mark.parametrize("weights", ["0,1", "1,0"])
def test_weights_on_one_parent_give_it_back(pair, weights: str, tmp_path: Path) -> None:
    out = tmp_path / "fused.safetensors"
    report = api.fuse(pair["root"] / "map.json", out, weights=weights, correction="none", bn_reset=False)
    assert report["family"] == "vgg" and report["target"].endswith("deep.safetensors")
    fused = load_checkpoint(out)
    deep = pair["deep"]
    assert {k: (v.shape, v.dtype) for k, v in fused.items()} == {k: (v.shape, v.dtype) for k, v in deep.items()}
    x = pair["x"]
    with torch.no_grad():
        got = module_of(pair["deep_spec"], fused)(x)
        if weights == "1,0":  # align order: shallow, deep
            want = module_of(pair["shallow_spec"], pair["shallow"])(x)
        else:
            want = module_of(pair["deep_spec"], deep)(x)
    torch.testing.assert_close(got, want, **TOL)
    if weights == "0,1":
        assert all(torch.equal(fused[k], deep[k]) for k in deep)


def test_default_fusion_loads_strictly_into_the_deep_architecture(pair, tmp_path: Path) -> None:
    out = tmp_path / "fused.pt"
    report = api.fuse(pair["root"] / "map.json", out)
    fused = load_checkpoint(out)
    assert sorted(fused) == sorted(pair["deep"])
    assert all(bool(torch.isfinite(v.float()).all()) for v in fused.values())
    module = module_of(pair["deep_spec"], fused)
    with torch.no_grad():
        assert module(pair["x"]).shape == (64, 5)
    assert detect(fused)[1] == pair["deep_spec"]
    # BN statistics were recomputed: they are those of the fused network on the calibration data.
    assert not torch.allclose(fused["features.1.running_mean"], pair["deep"]["features.1.running_mean"])
    assert len(report["mixing"]) == 8


def run_in_process(args: list[object], cwd: Path) -> tuple[int, str, str]:
    outcome = invoke(*args, cwd=cwd)
    return outcome.code, outcome.stdout, outcome.stderr


def test_cli_fuses_vggs_of_different_depth(pair) -> None:
    root = pair["root"]
    code, _, err = run_in_process(["align", "deep.safetensors", "shallow.safetensors", "-o", "cli-map.json",
                                   "--data", "calib.npz", "--samples", 64, "--json"], root)
    assert code == 0, err
    for flags, name in ((["--no-bn-reset", "--correction", "none", "--weights", "1,0"], "cli-exact.safetensors"),
                        (["--correction", "repair"], "cli-repair.safetensors")):
        code, stdout, err = run_in_process(["fuse", "--map", "cli-map.json", "-o", name, "--json", *flags], root)
        assert code == 0, err
        fused = load_checkpoint(root / name)
        assert {k: v.shape for k, v in fused.items()} == {k: v.shape for k, v in pair["deep"].items()}
        module_of(pair["deep_spec"], fused)  # strict load
    exact = load_checkpoint(root / "cli-exact.safetensors")
    assert all(torch.equal(exact[k], pair["deep"][k]) for k in exact)
    code, stdout, _ = run_in_process(["inspect", "deep.safetensors", "--json"], root)
    assert code == 0 and '"family": "vgg"' in stdout and '"kind": "conv"' in stdout
    (root / "deep.yaml").write_text(yaml.safe_dump(pair["deep_spec"].model_dump(mode="json")))
    code, stdout, err = run_in_process(["inspect", "deep.safetensors", "--arch", "deep.yaml", "--json"], root)
    assert code == 0 and json.loads(stdout)["depth"] == 7, err
    code, _, err = run_in_process(["inspect", "shallow.safetensors", "--arch", "deep.yaml"], root)
    assert code == 2 and "which the checkpoint lacks" in err, err


def test_cli_refuses_bad_vgg_inputs(pair) -> None:
    root = pair["root"]
    three = small_spec([4, "M", 6, "M", 6, "M"], [16], bn=True)
    save_checkpoint(root / "three.safetensors", random_state(three, 12))
    code, _, err = run_in_process(["align", "deep.safetensors", "three.safetensors", "-o", "bad.json",
                                   "--metric", "neuron"], root)
    assert code == 2 and "alignment groups" in err and "has 4" in err, err
    code, _, err = run_in_process(["align", "deep.safetensors", "shallow.safetensors", "-o", "bad.json",
                                   "--data", "rgb.npz", "--samples", 8], root)
    assert code == 2 and "(3, 16, 16)" in err and "channels" in err, err
    code, _, err = run_in_process(["fuse", "--map", "map.json", "-o", "bad.safetensors", "--balance", "merge"], root)
    assert code == 2 and "--balance add" in err, err
    assert not (root / "bad.safetensors").exists()


def test_merge_into_an_equally_deep_vgg_only_moves_width(tmp_path: Path) -> None:
    """Equal depth: --target shallow folds nothing, so BN convs are fine; all weight on one model
    gives its function in the other's (narrower or equal) architecture."""
    wide_spec, narrow_spec = small_spec([8, "M", 12, "M"], [24], bn=True), small_spec(SHALLOW, [16], bn=True)
    wide, narrow = random_state(wide_spec, 3), random_state(narrow_spec, 4)
    save_checkpoint(tmp_path / "a.safetensors", wide)
    save_checkpoint(tmp_path / "b.safetensors", narrow)
    x = np.random.default_rng(1).standard_normal((64, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    api.align([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "map.json",
              data=str(tmp_path / "x.npz"), samples=64)
    out = tmp_path / "into_b.safetensors"
    report = api.fuse(tmp_path / "map.json", out, target="B", weights="0,1", correction="none", bn_reset=False)
    assert report["balance"] == "merge"
    with torch.no_grad():
        torch.testing.assert_close(module_of(narrow_spec, load_checkpoint(out))(torch.from_numpy(x)),
                                   module_of(narrow_spec, narrow)(torch.from_numpy(x)), **TOL)


def test_merge_refuses_to_fold_conv_layers(pair, tmp_path: Path) -> None:
    with pytest.raises(ClafuseError, match="cannot fold hidden layer 1 of the deeper network"):
        api.fuse(pair["root"] / "map.json", tmp_path / "never.safetensors", target="shallow")
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("signal", ["activations", "weights"])
def test_three_vggs_fuse_back_to_the_anchor(tmp_path: Path, signal: str) -> None:
    """Many-to-one for the vgg family: an anchor fused with two channel-permuted copies of itself
    (BatchNorm included, one copy stored in float16) at equal weights gives back its function."""
    spec = small_spec(DEEP, [16, 16], bn=True)
    base = random_state(spec, 21)
    copies = [permuted_copy(spec, base, 22), permuted_copy(spec, base, 23)]
    copies[1] = {k: v.half() if v.is_floating_point() else v for k, v in copies[1].items()}
    paths = [tmp_path / f"{n}.safetensors" for n in "ABC"]
    for path, state in zip(paths, [base, *copies]):
        save_checkpoint(path, state)
    x = np.random.default_rng(2).standard_normal((64, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    doc = api.align(paths, tmp_path / "map.json", data=str(tmp_path / "x.npz"), samples=64)
    assert doc.anchor == 0 and len(doc.alignments) == 2
    out = tmp_path / "F.safetensors"
    api.fuse(tmp_path / "map.json", out, signal=signal, correction="none", bn_reset=False)
    with torch.no_grad():
        got = module_of(spec, load_checkpoint(out))(torch.from_numpy(x))
        want = module_of(spec, base)(torch.from_numpy(x))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # the float16 copy rounds


class _SpaceShapes(Tap):
    """The spatial size each space was last recorded with (what the activation signal compares)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def space(self, name: str, h: torch.Tensor) -> torch.Tensor:
        self.shapes[name] = tuple(h.shape[2:])
        return h


@pytest.mark.parametrize("m0", [[0], [1]])
def test_balanced_networks_record_each_space_where_the_target_does(m0: list[int]) -> None:
    """After identities are inserted before a max-pool, every space of the balanced network is
    recorded at the point where the target records its counterpart (before or after the pool):
    comparing a pooled map with an unpooled one loses the spatial detail of the activation cost
    (it cost the Fashion-MNIST VGG pair 2-6 points of uncorrected accuracy)."""
    deep_spec, shallow_spec = small_spec(DEEP, [10], size=8), small_spec(SHALLOW, [10], size=8)
    deep, shallow = FAMILY.describe(deep_spec), FAMILY.describe(shallow_spec)
    balanced = insert_blocks(shallow, [m0, [2], [0]], deep)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}
    for net, spec, seed in ((deep, deep_spec, 1), (balanced, shallow_spec, 2)):
        tap = _SpaceShapes()
        run(net, random_state(spec, seed), x, tap)
        seen[id(net)] = [tap.shapes[b.output] for b in net.blocks if b.output in tap.shapes]
    assert seen[id(deep)] == seen[id(balanced)]
    assert (4, 4) in seen[id(deep)] and (8, 8) in seen[id(deep)]  # both sides of the first pool
