"""The ResNet family and its fusion engine: torchvision's exact key layout, detection, exact
identity insertion, recovery of a channel-permuted copy, torchvision resnet18 + resnet34 pairs,
merge balancing, and bad input through the real command line.

Networks are small (16x16 inputs, widths 4-16) with random weights and randomised BatchNorm
statistics and affine parameters, so BN is never the identity. Logits are computed by
``reference_forward``, a functional transcription of torchvision's ``ResNet.forward`` written
here (not clafuse's module), so "same function" is checked against an independent forward.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clafuse import api
from clafuse.api import alignment
from clafuse.arch.registry import detect
from clafuse.arch.resnet import ResNetFamily, ResNetSpec
from clafuse.errors import ClafuseError
from clafuse.io.checkpoint import load_checkpoint
from tests.helpers import save_safetensors

GOLDEN = json.loads((Path(__file__).parent / "golden" / "resnet_keys.json").read_text())
FAMILY = ResNetFamily()
FULL = [64, 128, 256, 512]
HALF = [32, 64, 128, 256]
TORCHVISION = {
    "resnet18": ResNetSpec(block="basic", layers=[2, 2, 2, 2], widths=FULL, stem_width=64, num_classes=1000),
    "resnet34": ResNetSpec(block="basic", layers=[3, 4, 6, 3], widths=FULL, stem_width=64, num_classes=1000),
    "resnet50": ResNetSpec(block="bottleneck", layers=[3, 4, 6, 3], widths=FULL, stem_width=64, num_classes=1000),
}
# Well-known facts about torchvision's models, independent of the golden generator.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}
TORCHVISION_TENSORS = {"resnet18": 122, "resnet34": 218, "resnet50": 320}
N_INPUTS = 48
ATOL = 1e-4


# --- helpers ------------------------------------------------------------------------------------


def meta_state(spec: ResNetSpec) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return FAMILY.build(spec).state_dict()


def random_state(spec: ResNetSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of ``spec``'s shapes; BatchNorm statistics and affine parameters randomised."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, v in meta_state(spec).items():
        shape = tuple(v.shape)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_mean"):
            out[key] = 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            out[key] = 0.5 + 1.5 * torch.rand(shape, generator=g)
        elif key == "fc.weight":
            out[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif key == "fc.bias":
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:  # convolutions (He init)
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith("weight"):  # BatchNorm scale
            out[key] = 0.5 + torch.rand(shape, generator=g)
        else:  # BatchNorm shift
            out[key] = 0.2 * torch.randn(shape, generator=g)
    return out


@torch.no_grad()
def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward in eval mode (v1.5: a bottleneck's stride is on conv2), written
    over the state dict; a 3x3 stem means stride 1 and no max-pool (clafuse's small-image stem)."""

    def bn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], False, 0.0, 1e-5)

    imagenet = sd["conv1.weight"].shape[-1] == 7
    h = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2 if imagenet else 1, padding=3 if imagenet else 1), "bn1"))
    if imagenet:
        h = F.max_pool2d(h, 3, 2, 1)
    s = 1
    while f"layer{s}.0.conv1.weight" in sd:
        j = 0
        while f"layer{s}.{j}.conv1.weight" in sd:
            p, stride = f"layer{s}.{j}", 2 if s > 1 and j == 0 else 1
            if f"{p}.conv3.weight" in sd:
                o = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                o = F.relu(bn(F.conv2d(o, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                o = bn(F.conv2d(o, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                o = F.relu(bn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                o = bn(F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                h = bn(F.conv2d(h, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            h = F.relu(o + h)
            j += 1
        s += 1
    return F.linear(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1), sd["fc.weight"], sd["fc.bias"])


def permuted_copy(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same function with every channel permuted: one permutation per residual stream, applied
    to all its writers (stem or downsample, every block's last conv, their BNs) and readers (next
    convs' inputs, fc columns), and one per inner layer of every block."""
    rng = np.random.default_rng(seed)
    out = dict(sd)

    def perm(n: int) -> torch.Tensor:
        return torch.from_numpy(rng.permutation(n))

    def conv(key: str, p_out: torch.Tensor, p_in: torch.Tensor | None) -> None:
        w = out[key][p_out]
        out[key] = w if p_in is None else w[:, p_in]

    def bn(prefix: str, p: torch.Tensor) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{leaf}"] = out[f"{prefix}.{leaf}"][p]

    stream = perm(sd["conv1.weight"].shape[0])
    conv("conv1.weight", stream, None)
    bn("bn1", stream)
    s = 1
    while f"layer{s}.0.conv1.weight" in sd:
        prev = stream
        if f"layer{s}.0.downsample.0.weight" in sd:
            stream = perm(sd[f"layer{s}.0.downsample.0.weight"].shape[0])
            conv(f"layer{s}.0.downsample.0.weight", stream, prev)
            bn(f"layer{s}.0.downsample.1", stream)
        j = 0
        while f"layer{s}.{j}.conv1.weight" in sd:
            p = f"layer{s}.{j}"
            convs = [c for c in ("conv1", "conv2", "conv3") if f"{p}.{c}.weight" in sd]
            p_in = prev if j == 0 else stream
            for c, name in enumerate(convs):
                p_out = stream if c == len(convs) - 1 else perm(sd[f"{p}.{name}.weight"].shape[0])
                conv(f"{p}.{name}.weight", p_out, p_in)
                bn(f"{p}.bn{c + 1}", p_out)
                p_in = p_out
            j += 1
        s += 1
    out["fc.weight"] = out["fc.weight"][:, stream]
    return {k: v.contiguous() for k, v in out.items()}


def shapes(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes in state-dict order (a safetensors file comes back sorted by key)."""
    return [(k, tuple(v.shape)) for k, v in sd.items()]


def shape_map(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def golden(name: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(s)) for k, s in GOLDEN[name]]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    path = tmp_path_factory.mktemp("data") / "x.npz"
    x = np.random.default_rng(0).standard_normal((N_INPUTS, 3, 16, 16)).astype(np.float32)
    np.savez(path, x=x)
    return path, torch.from_numpy(x)


# --- torchvision layout and detection -----------------------------------------------------------


def test_golden_data_matches_torchvision_facts() -> None:
    for name, keys in GOLDEN.items():
        assert len(keys) == TORCHVISION_TENSORS[name]
        params = sum(math.prod(s) for k, s in keys if not k.endswith(("running_mean", "running_var",
                                                                       "num_batches_tracked")))
        assert params == TORCHVISION_PARAMS[name]
    names18 = [k for k, _ in GOLDEN["resnet18"]]
    names50 = [k for k, _ in GOLDEN["resnet50"]]
    assert "layer1.0.downsample.0.weight" not in names18 and "layer2.0.downsample.0.weight" in names18
    assert "layer1.0.downsample.0.weight" in names50


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_build_has_torchvision_keys_and_shapes(name: str) -> None:
    assert shapes(meta_state(TORCHVISION[name])) == golden(name)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_detect_recovers_torchvision_spec(name: str) -> None:
    with torch.device("meta"):
        sd = {k: torch.empty(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
              for k, s in golden(name)}
    assert FAMILY.detect(sd) == TORCHVISION[name]
    family, spec = detect(sd)
    assert family.name == "resnet" and spec == TORCHVISION[name]


@pytest.mark.parametrize("spec", [
    ResNetSpec(block="basic", layers=[2, 1], widths=[8, 16], stem_width=8, stem="small", num_classes=5),
    ResNetSpec(block="bottleneck", layers=[1, 2], widths=[4, 8], stem_width=8, num_classes=5),
], ids=["basic-small-stem", "bottleneck-imagenet-stem"])
def test_clafuse_forward_matches_reference(spec: ResNetSpec, inputs: tuple[Path, torch.Tensor]) -> None:
    sd = random_state(spec, 3)
    x = inputs[1]
    assert torch.allclose(FAMILY.forward(spec, sd, x), reference_forward(sd, x), atol=1e-5)


# --- fusion through the API ---------------------------------------------------------------------

PAIRS = {
    # (deep, shallow): same widths; the bottleneck pair has a downsample in layer1.0 (stem 8 != 4 * 4)
    "basic": (ResNetSpec(block="basic", layers=[3, 2, 3], widths=[8, 12, 16], stem_width=8, stem="small",
                         num_classes=7),
              ResNetSpec(block="basic", layers=[1, 2, 2], widths=[8, 12, 16], stem_width=8, stem="small",
                         num_classes=7)),
    "bottleneck": (ResNetSpec(block="bottleneck", layers=[3, 2], widths=[4, 8], stem_width=8, num_classes=7),
                   ResNetSpec(block="bottleneck", layers=[1, 1], widths=[4, 8], stem_width=8, num_classes=7)),
}
FUSE_EXACT = dict(correction="none", bn_reset=False)


def fused_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    return reference_forward(load_checkpoint(path), x)


@pytest.mark.parametrize("signal", ["activations", "weights"])
@pytest.mark.parametrize("block", sorted(PAIRS))
def test_identity_insertion_is_exact(block: str, signal: str, tmp_path: Path,
                                     inputs: tuple[Path, torch.Tensor]) -> None:
    npz, x = inputs
    deep_spec, shallow_spec = PAIRS[block]
    a, b = random_state(deep_spec, 1), random_state(shallow_spec, 2)
    pa, pb = save_safetensors(tmp_path / "A.safetensors", a), save_safetensors(tmp_path / "B.safetensors", b)
    doc = api.align([pa, pb], tmp_path / "map.json", data=str(npz), samples=N_INPUTS)
    assert doc.alignments[0].deep == 0
    for weights, parent in (("0,1", b), ("1,0", a)):
        out = tmp_path / f"F{weights.replace(',', '')}.safetensors"
        report = api.fuse(tmp_path / "map.json", out, weights=weights, signal=signal, **FUSE_EXACT)
        assert report["target"] == str(pa)
        fused = load_checkpoint(out)
        assert shape_map(fused) == shape_map(a)
        expected = reference_forward(parent, x)
        got = reference_forward(fused, x)
        assert (got - expected).abs().max() <= ATOL * max(1.0, expected.abs().max().item()), weights


@pytest.mark.parametrize("signal", ["activations", "weights"])
@pytest.mark.parametrize("block", sorted(PAIRS))
def test_permuted_copy_fuses_back_to_itself(block: str, signal: str, tmp_path: Path,
                                            inputs: tuple[Path, torch.Tensor]) -> None:
    npz, x = inputs
    spec = PAIRS[block][0]
    a = random_state(spec, 4)
    a_perm = permuted_copy(a, 5)
    expected = reference_forward(a, x)
    assert torch.allclose(reference_forward(a_perm, x), expected, atol=1e-5)  # the permutation is a symmetry
    assert not torch.equal(a_perm["layer1.0.conv1.weight"], a["layer1.0.conv1.weight"])
    pa, pp = save_safetensors(tmp_path / "A.safetensors", a), save_safetensors(tmp_path / "P.safetensors", a_perm)
    api.align([pa, pp], tmp_path / "map.json", data=str(npz), samples=N_INPUTS)
    api.fuse(tmp_path / "map.json", tmp_path / "F.safetensors", weights="0.5,0.5", signal=signal, **FUSE_EXACT)
    fused = load_checkpoint(tmp_path / "F.safetensors")
    assert (reference_forward(fused, x) - expected).abs().max() <= ATOL
    for key in ("conv1.weight", "layer1.0.bn1.running_var", "fc.weight"):  # back in A's channel order
        assert torch.allclose(fused[key], a[key], atol=1e-6), key


def test_torchvision_resnet18_and_resnet34_fuse_without_data(tmp_path: Path) -> None:
    """Weight signal, no data: full-width 18 + 34, half-width 18 + 34, full 18 + half 34; the fused
    checkpoint has resnet34's exact key names (and, at full width, shapes) and loads strictly."""
    half34 = TORCHVISION["resnet34"].model_copy(update={"widths": HALF, "stem_width": 32})
    half18 = TORCHVISION["resnet18"].model_copy(update={"widths": HALF, "stem_width": 32})
    cases = {"full": (TORCHVISION["resnet18"], TORCHVISION["resnet34"]), "half": (half18, half34),
             "mix": (TORCHVISION["resnet18"], half34)}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for seed, (case, (s18, s34)) in enumerate(cases.items()):
        p18 = save_safetensors(tmp_path / f"{case}18.safetensors", random_state(s18, 10 + seed))
        p34 = save_safetensors(tmp_path / f"{case}34.safetensors", random_state(s34, 20 + seed))
        api.align([p18, p34], tmp_path / f"{case}.json", metric="neuron")
        out = tmp_path / f"{case}F.safetensors"
        report = api.fuse(tmp_path / f"{case}.json", out, signal="weights")
        assert report["target"] == str(p34) and report["calibration_samples"] == 0
        fused = load_checkpoint(out)
        assert sorted(fused) == sorted(k for k, _ in GOLDEN["resnet34"]), case
        assert shape_map(fused) == shape_map(meta_state(s34)), case
        if case == "full":
            assert shape_map(fused) == dict(golden("resnet34"))
        module = FAMILY.build(s34)
        module.load_state_dict(fused, strict=True)
        assert detect(fused)[1] == s34
        assert all(bool(torch.isfinite(v).all()) for v in fused.values() if v.is_floating_point()), case
        assert torch.isfinite(module.eval()(x)).all(), case


def test_merge_gives_shallow_architecture_and_pins_stage_starts(tmp_path: Path, inputs: tuple[Path, torch.Tensor],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    npz, x = inputs
    deep_spec, shallow_spec = PAIRS["basic"]
    a, b = random_state(deep_spec, 6), random_state(shallow_spec, 7)
    pa, pb = save_safetensors(tmp_path / "A.safetensors", a), save_safetensors(tmp_path / "B.safetensors", b)

    # A layer cost that prefers every shallow block one position later than the pin allows.
    def shifted(shallow: list, deep: list, metric: str) -> np.ndarray:
        return np.array([[0.0 if j == i + 1 else 1.0 for j in range(len(deep))] for i in range(len(shallow))])

    monkeypatch.setattr(alignment, "activation_cost", shifted)
    # Every stage's first block must be matched: --no-pin-first is refused rather than ignored.
    with pytest.raises(ClafuseError, match="--no-pin-first cannot apply to a resnet"):
        api.align([pa, pb], None, data=str(npz), samples=N_INPUTS, pin_first=False)
    api.align([pa, pb], tmp_path / "map.json", data=str(npz), samples=N_INPUTS, pin_last=False)
    groups = json.loads((tmp_path / "map.json").read_text())["alignments"][0]["groups"]
    assert [g["name"] for g in groups] == ["layer1", "layer2", "layer3"]
    assert all(g["mapping"][0] == 0 for g in groups), groups
    assert groups[2]["mapping"] == [0, 2]  # where not pinned, the cost is followed

    report = api.fuse(tmp_path / "map.json", tmp_path / "M.safetensors", balance="merge", weights="0.5,0.5")
    assert report["target"] == str(pb)
    merged = load_checkpoint(tmp_path / "M.safetensors")
    assert shape_map(merged) == shape_map(b)
    FAMILY.build(shallow_spec).load_state_dict(merged, strict=True)
    assert torch.isfinite(reference_forward(merged, x)).all()
    # weight 1 on the shallow net gives it back exactly
    api.fuse(tmp_path / "map.json", tmp_path / "M01.safetensors", balance="merge", weights="0,1", **FUSE_EXACT)
    assert torch.allclose(fused_logits(tmp_path / "M01.safetensors", x), reference_forward(b, x), atol=1e-5)


def test_default_add_fusion_is_finite_and_keeps_deep_architecture(tmp_path: Path,
                                                                   inputs: tuple[Path, torch.Tensor]) -> None:
    """Default settings (activations, BN reset, fc refit) at 0.5/0.5 on the bottleneck pair."""
    npz, x = inputs
    deep_spec, shallow_spec = PAIRS["bottleneck"]
    pa = save_safetensors(tmp_path / "A.safetensors", random_state(deep_spec, 8))
    pb = save_safetensors(tmp_path / "B.safetensors", random_state(shallow_spec, 9))
    api.align([pb, pa], tmp_path / "map.json", data=str(npz), samples=N_INPUTS)
    report = api.fuse(tmp_path / "map.json", tmp_path / "F.safetensors")
    assert report["target"] == str(pa) and report["signal"] == "activations"
    assert report["mixing"][1] == [1.0, 0.0]  # an inserted block keeps the deep net's block
    fused = load_checkpoint(tmp_path / "F.safetensors")
    assert shape_map(fused) == shape_map(meta_state(deep_spec))
    assert torch.isfinite(reference_forward(fused, x)).all()


def test_downsample_against_identity_shortcut(tmp_path: Path, inputs: tuple[Path, torch.Tensor]) -> None:
    """The deep net's layer1.0 has a downsample (stem 8 -> 12 channels), the shallow net's has an
    identity shortcut (stem 12): its shortcut is fused as a 1x1 identity conv with a neutral BN."""
    npz, x = inputs
    deep = ResNetSpec(block="basic", layers=[2, 2], widths=[12, 16], stem_width=8, stem="small", num_classes=5)
    shallow = ResNetSpec(block="basic", layers=[1, 1], widths=[12, 16], stem_width=12, stem="small", num_classes=5)
    a = random_state(deep, 11)
    pa = save_safetensors(tmp_path / "A.safetensors", a)
    pb = save_safetensors(tmp_path / "B.safetensors", random_state(shallow, 12))
    api.align([pa, pb], tmp_path / "map.json", data=str(npz), samples=N_INPUTS)
    for signal in ("activations", "weights"):
        api.fuse(tmp_path / "map.json", tmp_path / "F.safetensors", signal=signal, weights="0.5,0.5")
        fused = load_checkpoint(tmp_path / "F.safetensors")
        assert shape_map(fused) == shape_map(a)
        assert torch.isfinite(reference_forward(fused, x)).all(), signal
    api.fuse(tmp_path / "map.json", tmp_path / "F10.safetensors", weights="1,0", **FUSE_EXACT)
    assert torch.allclose(fused_logits(tmp_path / "F10.safetensors", x), reference_forward(a, x), atol=1e-5)


# --- bad input through the real CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_failures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    d = tmp_path_factory.mktemp("cli")
    three = ResNetSpec(block="basic", layers=[1, 1, 1], widths=[4, 8, 8], stem_width=4, stem="small", num_classes=3)
    four = ResNetSpec(block="basic", layers=[1, 1, 1, 2], widths=[4, 8, 8, 8], stem_width=4, stem="small",
                      num_classes=3)
    save_safetensors(d / "three.safetensors", random_state(three, 0))
    save_safetensors(d / "four.safetensors", random_state(four, 1))
    np.savez(d / "gray.npz", x=np.zeros((8, 1, 16, 16), np.float32))
    wrong = four.model_dump(mode="json") | {"layers": [1, 1, 1, 3]}
    (d / "wrong.json").write_text(json.dumps(wrong))
    (d / "right.json").write_text(json.dumps(three.model_dump(mode="json")))
    commands = {
        "stages": ["align", "three.safetensors", "four.safetensors", "-o", "m.json", "--metric", "neuron"],
        "channels": ["align", "four.safetensors", "four.safetensors", "-o", "m.json", "--data", "gray.npz",
                     "--samples", "8"],
        "arch": ["align", "four.safetensors", "three.safetensors", "-o", "m.json", "--metric", "neuron",
                 "--arch", "wrong.json", "--arch", "right.json"],
    }

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clafuse", *args], cwd=d, capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(len(commands)) as pool:
        return dict(zip(commands, pool.map(run, commands.values())))


@pytest.mark.parametrize("case, words", [
    ("stages", ["3 alignment groups", "4"]),
    ("channels", ["gray.npz", "(1, 16, 16)"]),
    ("arch", ["layer4.2", "[1, 1, 1, 3]"]),  # names the missing block and the spec's stages
])
def test_cli_bad_input_exits_2_with_one_line(cli_failures: dict, case: str, words: list[str]) -> None:
    proc = cli_failures[case]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clafuse: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    for word in words:
        assert word in lines[0], lines[0]
