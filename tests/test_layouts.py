"""Layouts people have besides torchvision's, each against golden keys and a plain-torch reference
written with the real library's module structure (timm and torchvision do not import here):
timm's resnet*d (deep stem, avg-pool downsample), timm's vgg*_bn (conv-MLP head), VGGs of nested
Sequentials and MLPs with BatchNorm1d. Each is detected, computes like its reference, and fuses
exactly through the one engine (a permuted copy comes back); align, fuse and eval run on them end
to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clafuse.arch.registry import detect
from clafuse.arch.network import run
from tests.cli_runner import invoke
from tests.helpers import save_safetensors
from tests.layout_helpers import fuse_pair, permuted

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import make_layout_keys as golden_keys  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "golden" / "layout_keys.json").read_text())
TOL = {"rtol": 1e-4, "atol": 1e-5}


# --- plain-torch references with the libraries' module structure --------------------------------


def _bn2d(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class TimmBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), _bn2d(planes)
        self.drop_block, self.act1, self.aa = nn.Identity(), nn.ReLU(inplace=True), nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), _bn2d(planes)
        self.act2, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))))
        return self.act2(h + (x if self.downsample is None else self.downsample(x)))


class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1, self.act1 = nn.Conv2d(inplanes, planes, 1, bias=False), _bn2d(planes), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), _bn2d(planes)
        self.drop_block, self.act2, self.aa = nn.Identity(), nn.ReLU(), nn.Identity()
        self.conv3, self.bn3, self.act3 = nn.Conv2d(planes, out, 1, bias=False), _bn2d(out), nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(h)))))
        h = self.bn3(self.conv3(h))
        return self.act3(h + (x if self.downsample is None else self.downsample(x)))


class TimmResNetD(nn.Module):
    """timm's ResNet with ``stem_type='deep'`` and ``avg_down=True`` (resnet18d, resnet50d, ...)."""

    def __init__(self, block: type, layers: list[int], widths: list[int], stem: int = 32, in_chans: int = 3,
                 num_classes: int = 1000) -> None:
        super().__init__()
        inplanes = widths[0]
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, stem, 3, 2, 1, bias=False), _bn2d(stem), nn.ReLU(),
                                   nn.Conv2d(stem, stem, 3, 1, 1, bias=False), _bn2d(stem), nn.ReLU(),
                                   nn.Conv2d(stem, inplanes, 3, 1, 1, bias=False))
        self.bn1, self.act1, self.maxpool = _bn2d(inplanes), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        for i, (planes, count) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(count):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 \
                        else nn.Identity()
                    down = nn.Sequential(pool, nn.Conv2d(inplanes, planes * block.expansion, 1, bias=False),
                                         _bn2d(planes * block.expansion))
                blocks.append(block(inplanes, planes, stride, down))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.global_pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(inplanes, num_classes)
        self.n_stages = len(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            h = getattr(self, f"layer{i + 1}")(h)
        return self.fc(self.global_pool(h).flatten(1))


def _features(cfg: list, in_chans: int, nested: bool) -> tuple[nn.Sequential, int]:
    layers, chunk, prev = [], [], in_chans
    for v in cfg:
        if v == "M":
            if nested:
                layers.append(nn.Sequential(*chunk, nn.MaxPool2d(2, 2)))
                chunk = []
            else:
                layers.append(nn.MaxPool2d(2, 2))
            continue
        (chunk if nested else layers).extend([nn.Conv2d(prev, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()])
        prev = v
    return nn.Sequential(*layers), prev


class ConvMlp(nn.Module):
    def __init__(self, in_features: int, out_features: int, kernel: int) -> None:
        super().__init__()
        self.input_size = kernel
        self.fc1, self.act1, self.drop = nn.Conv2d(in_features, out_features, kernel), nn.ReLU(), nn.Dropout(0.0)
        self.fc2, self.act2 = nn.Conv2d(out_features, out_features, 1), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.input_size or x.shape[-1] < self.input_size:
            x = F.adaptive_avg_pool2d(x, (max(self.input_size, x.shape[-2]), max(self.input_size, x.shape[-1])))
        return self.act2(self.fc2(self.drop(self.act1(self.fc1(x)))))


class ClassifierHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.global_pool, self.drop, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.0), nn.Linear(in_features,
                                                                                                   num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.global_pool(x).flatten(1)))


class TimmVGG(nn.Module):
    """timm's VGG with BatchNorm (vgg11_bn, ...): features, pre_logits (ConvMlp), head."""

    def __init__(self, cfg: list, hidden: int = 4096, kernel: int = 7, in_chans: int = 3, num_classes: int = 1000):
        super().__init__()
        self.features, last = _features(cfg, in_chans, nested=False)
        self.pre_logits, self.head = ConvMlp(last, hidden, kernel), ClassifierHead(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(self.features(x)))


class NestedVGG(nn.Module):
    """One Sequential per chunk, torchvision's avgpool and classifier."""

    def __init__(self, cfg: list, hidden: int = 4096, pool: int = 7, in_chans: int = 3, num_classes: int = 1000):
        super().__init__()
        self.features, last = _features(cfg, in_chans, nested=True)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(nn.Linear(last * pool * pool, hidden), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def mlp_bn(widths: list[int], inputs: int = 784, classes: int = 10, act: type = nn.ReLU) -> nn.Sequential:
    layers, prev = [], inputs
    for w in widths:
        layers += [nn.Linear(prev, w), nn.BatchNorm1d(w), act()]
        prev = w
    return nn.Sequential(nn.Flatten(), *layers, nn.Linear(prev, classes))


class MLPBN(nn.Module):
    """``nn.Sequential(Linear, BatchNorm1d, ReLU, ..., Linear)`` keeping its keys at the top level."""

    def __init__(self, widths: list[int], inputs: int = 784, classes: int = 10) -> None:
        super().__init__()
        seq = mlp_bn(widths, inputs, classes)
        for i, module in enumerate(list(seq)[1:]):
            self.add_module(str(i), module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for module in self.children():
            h = module(h)
        return h


VGG11 = golden_keys.VGG11
REAL = {  # golden name -> (reference at real size, family, spec fields)
    "timm_resnet18d": (lambda: TimmResNetD(TimmBasic, [2, 2, 2, 2], [64, 128, 256, 512]), "resnet",
                       {"stem": "deep", "deep_stem": (32, 32), "downsample": "avg", "block": "basic"}),
    "timm_resnet50d": (lambda: TimmResNetD(TimmBottleneck, [3, 4, 6, 3], [64, 128, 256, 512]), "resnet",
                       {"stem": "deep", "downsample": "avg", "block": "bottleneck", "layers": [3, 4, 6, 3]}),
    "timm_vgg11_bn": (lambda: TimmVGG(VGG11), "vgg", {"batch_norm": True, "avgpool": None}),
    "nested_vgg11_bn": (lambda: NestedVGG(VGG11), "vgg", {"batch_norm": True, "avgpool": (7, 7)}),
    "mlp_bn": (lambda: MLPBN([256, 128]), "mlp", {"activation": "relu"}),
}
SMALL = {  # small variants of the same layouts, for numbers: (reference, input shape)
    "timm_resnet18d": (lambda: TimmResNetD(TimmBasic, [1, 2], [8, 16], stem=6, in_chans=1, num_classes=10), (1, 8, 8)),
    "timm_resnet50d": (lambda: TimmResNetD(TimmBottleneck, [2, 1], [4, 8], stem=6, in_chans=1, num_classes=10),
                       (1, 8, 8)),
    "timm_vgg11_bn": (lambda: TimmVGG([8, "M", 12, 12, "M"], hidden=16, in_chans=1, num_classes=10), (1, 8, 8)),
    "nested_vgg11_bn": (lambda: NestedVGG([8, "M", 12, 12, "M"], hidden=16, pool=2, in_chans=1, num_classes=10),
                        (1, 8, 8)),
    "mlp_bn": (lambda: MLPBN([24, 16], inputs=64), (1, 8, 8)),
}


def meta_state(keys: list) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
            for k, s in keys}


def shapes(module_or_state) -> list[tuple[str, tuple[int, ...]]]:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return [(k, tuple(v.shape)) for k, v in state.items()]


def trained_like(module: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """``module`` with random weights and BatchNorm statistics of its own activations (one pass in
    train mode), in eval mode."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=(1.5 / m.weight[0].numel()) ** 0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.1)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.momentum = None
    module.train()
    with torch.no_grad():
        module(torch.randn(64, *shape))
    return module.eval()


# --- golden keys ----------------------------------------------------------------------------------


def test_golden_generator_is_the_stored_data() -> None:
    doc = {"timm_resnet18d": golden_keys.timm_resnet_d("basic", [2, 2, 2, 2]),
           "timm_resnet50d": golden_keys.timm_resnet_d("bottleneck", [3, 4, 6, 3]),
           "timm_vgg11_bn": golden_keys.timm_vgg_bn(), "nested_vgg11_bn": golden_keys.nested_vgg_bn(),
           "mlp_bn": golden_keys.mlp_bn()}
    assert json.loads(json.dumps(doc)) == GOLDEN


def test_golden_facts() -> None:
    """Facts about the real models, independent of the generator: parameter counts."""
    def count(name: str) -> int:
        return sum(torch.Size(s).numel() for k, s in GOLDEN[name] if "running" not in k and "num_batches" not in k)
    assert round(count("timm_resnet18d") / 1e6, 1) == 11.7  # timm's model cards: 11.7M for resnet18d
    assert round(count("timm_resnet50d") / 1e6, 1) == 25.6  # and 25.6M for resnet50d
    # timm's head holds the same numbers as torchvision's classifier (a 7x7 conv for Linear(25088,
    # 4096)): torchvision documents 132,868,840 parameters for vgg11_bn.
    assert count("timm_vgg11_bn") == 132_868_840
    assert GOLDEN["timm_resnet50d"][-2] == ["fc.weight", [1000, 2048]]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_layout_detected_and_described(name: str) -> None:
    make, family_name, fields = REAL[name]
    with torch.device("meta"):
        reference = make()
    assert shapes(reference) == [(k, tuple(s)) for k, s in GOLDEN[name]]  # the reference has the real keys
    state = meta_state(GOLDEN[name])
    family, spec = detect(state)
    assert family.name == family_name
    for field, value in fields.items():
        got = getattr(spec, field)
        assert (tuple(got) if isinstance(value, tuple) else got) == value, field
    family.check(spec, state)
    with torch.device("meta"):
        built = family.build(spec)
    assert dict(shapes(built)) == dict(shapes(state))
    net = family.describe(spec)
    assert set(net.stored_keys()) == {k for k, _ in GOLDEN[name] if not k.endswith("num_batches_tracked")}


# --- numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL))
def test_layout_computes_like_the_reference_and_fuses_back_exactly(name: str) -> None:
    make, shape = SMALL[name]
    reference = trained_like(make(), shape, 0)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    family, spec = detect(state)
    assert family.name == REAL[name][1]
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(family.forward(spec, state, x), expected, **TOL)
        torch.testing.assert_close(family.instantiate(spec, state)(x), expected, **TOL)
    net = family.describe(spec)
    copy = permuted(net, state, 2)
    assert any(not torch.equal(copy[k], state[k]) for k in state)
    reference.load_state_dict(copy)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), expected, **TOL)  # the description's spaces are right
    assert len(family.layer_outputs(spec, state, x)) == sum(len(g.layers) for g in family.groups(spec))
    for signal_x in (x, None):
        fused = fuse_pair(family, spec, state, copy, signal_x)
        assert fused.keys() == state.keys()
        for key in state:
            torch.testing.assert_close(fused[key].float(), state[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(run(net, state, x), expected, **TOL)


DEPTHS = {  # deep and shallow variants (the extra layers as wide as their inputs) on digits (1 x 8 x 8)
    "timm_resnet18d": (lambda: TimmResNetD(TimmBasic, [2, 2], [8, 16], stem=6, in_chans=1, num_classes=10),
                       lambda: TimmResNetD(TimmBasic, [1, 1], [8, 16], stem=6, in_chans=1, num_classes=10)),
    "timm_vgg11_bn": (lambda: TimmVGG([8, 8, "M", 12, "M"], hidden=16, in_chans=1, num_classes=10),
                      lambda: TimmVGG([8, "M", 12, "M"], hidden=16, in_chans=1, num_classes=10)),
    "nested_vgg11_bn": (lambda: NestedVGG([8, 8, "M", 12, "M"], hidden=16, pool=2, in_chans=1, num_classes=10),
                        lambda: NestedVGG([8, "M", 12, "M"], hidden=16, pool=2, in_chans=1, num_classes=10)),
    "mlp_bn": (lambda: MLPBN([24, 24, 16], inputs=64), lambda: MLPBN([24, 16], inputs=64)),
}


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_layouts_align_fuse_and_evaluate_end_to_end(name: str, tmp_path: Path) -> None:
    deep = save_safetensors(tmp_path / "deep.safetensors", trained_like(DEPTHS[name][0](), (1, 8, 8), 3))
    shallow_module = trained_like(DEPTHS[name][1](), (1, 8, 8), 4)
    shallow = save_safetensors(tmp_path / "shallow.safetensors", shallow_module)
    res = invoke("align", deep, shallow, "--data", "digits", "--samples", 200, "-o", tmp_path / "map.json")
    assert res.code == 0, res
    out = tmp_path / "fused.safetensors"
    # All weight on the shallower model, whose missing layers become exact identities: its function
    # (without the corrections, which refit it on the digits).
    res = invoke("fuse", "--map", tmp_path / "map.json", "--weights", "0,1", "--correction", "none", "--no-bn-reset",
                 "-o", out)
    assert res.code == 0, res
    from safetensors.torch import load_file

    fused = load_file(out)
    deep_module = DEPTHS[name][0]()
    deep_module.load_state_dict(fused)
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(deep_module.eval()(x), shallow_module(x), rtol=1e-4, atol=1e-4)
    res = invoke("eval", deep, out, "--data", "digits", "--json")
    assert res.code == 0, res
    assert len(json.loads(res.stdout)["models"]) == 2
