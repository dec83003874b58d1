"""Residual networks in torchvision's key layout (BasicBlock and Bottleneck, any stage sizes).

Keys: ``conv1``, ``bn1`` (the stem), ``layerK.J.conv1/bn1/conv2/bn2[/conv3/bn3]``,
``layerK.J.downsample.0/1`` and ``fc``. The stem is the ImageNet one (7x7 stride 2, then a 3x3
max-pool) or the small-image one (3x3 stride 1, no max-pool), told apart by ``conv1``'s kernel.
Blocks are the unit of alignment, one group per stage; each stage's first block carries the
stride (and the downsample), so it is always matched to the other net's first block.
"""

from __future__ import annotations

import re
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, PositiveInt, model_validator
from torch import nn

from clafuse.arch.base import Family, Group, LayerInfo, check_shapes
from clafuse.arch.network import Block as Unit
from clafuse.arch.network import Network, Param, Site, Space, Tap, run
from clafuse.arch.resnet_blocks import EXPANSION, _head_forward, residual_block, stem_unit
from clafuse.errors import SpecError
BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ResNetSpec(BaseModel):
    """A torchvision-style ResNet."""

    family: Literal["resnet"] = "resnet"
    block: Literal["basic", "bottleneck"]
    layers: list[int] = Field(min_length=1, description="blocks per stage")
    widths: list[int] = Field(min_length=1, description="planes per stage (block output = planes x expansion)")
    stem_width: int = Field(gt=0)
    stem: Literal["imagenet", "small", "deep"] = "imagenet"
    deep_stem: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="timm's deep stem: the widths of conv1.0 and conv1.3 (resnet*d: 32, 32)")
    downsample: Literal["conv", "avg"] = Field(
        "conv", description="conv: torchvision's strided 1x1 conv; avg: timm's 2x2 average pool, then a 1x1 conv")
    in_channels: int = Field(3, gt=0)
    num_classes: int = Field(gt=0)

    @model_validator(mode="after")
    def _shape(self) -> "ResNetSpec":
        if len(self.layers) != len(self.widths):
            raise ValueError(f"{len(self.layers)} stages in 'layers' but {len(self.widths)} in 'widths'")
        if any(n < 1 for n in self.layers) or any(w < 1 for w in self.widths):
            raise ValueError("every stage needs at least one block and a positive width")
        if (self.stem == "deep") != (self.deep_stem is not None):
            raise ValueError("give deep_stem (the two inner widths) exactly when stem is 'deep'")
        return self

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    def stage_width(self, s: int) -> int:
        return self.widths[s] * self.expansion

    def has_downsample(self, s: int, j: int) -> bool:
        if j > 0:
            return False
        inplanes = self.stem_width if s == 0 else self.stage_width(s - 1)
        return s > 0 or inplanes != self.stage_width(s)

    def blocks(self) -> list[tuple[int, int, str]]:
        return [(s, j, f"layer{s + 1}.{j}") for s, n in enumerate(self.layers) for j in range(n)]


class Block(nn.Module):
    """BasicBlock or Bottleneck with torchvision's parameter names (``avg_down``: timm's
    downsample, an average pool where the block strides, then a 1x1 conv and BN)."""

    def __init__(self, kind: str, inplanes: int, planes: int, stride: int, downsample: bool,
                 avg_down: bool = False) -> None:
        super().__init__()
        self.kind = kind
        out = planes * EXPANSION[kind]
        if kind == "basic":
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(out)
        if downsample and avg_down:
            pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1
                    else nn.Identity())
            self.downsample = nn.Sequential(pool, nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
        elif downsample:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.kind == "bottleneck":
            h = self.bn3(self.conv3(F.relu(h)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(h + shortcut)


class ResNet(nn.Module):
    """A plain-torch ResNet whose ``state_dict()`` keys are torchvision's (timm's for the deep
    stem and the avg-pool downsample)."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.stem == "deep":
            a, b = spec.deep_stem
            self.conv1 = nn.Sequential(nn.Conv2d(spec.in_channels, a, 3, 2, 1, bias=False), nn.BatchNorm2d(a),
                                       nn.ReLU(inplace=True), nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b),
                                       nn.ReLU(inplace=True), nn.Conv2d(b, spec.stem_width, 3, 1, 1, bias=False))
        elif spec.stem == "imagenet":
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        inplanes = spec.stem_width
        for s, (count, planes) in enumerate(zip(spec.layers, spec.widths)):
            blocks = [Block(spec.block, inplanes if j == 0 else spec.stage_width(s), planes,
                            (1 if s == 0 else 2) if j == 0 else 1, spec.has_downsample(s, j),
                            spec.downsample == "avg")
                      for j in range(count)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            inplanes = spec.stage_width(s)
        self.fc = nn.Linear(inplanes, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if self.spec.stem != "small":
            h = F.max_pool2d(h, 3, 2, 1)
        for s, j, name in self.spec.blocks():
            h = getattr(self, f"layer{s + 1}")[j](h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ResNetFamily(Family):
    name = "resnet"
    spec_model = ResNetSpec
    description = ("torchvision-layout ResNet (BasicBlock or Bottleneck, ImageNet or small-image stem), and timm's "
                   "resnet*d (deep stem, avg-pool downsample)")

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> ResNetSpec | None:
        deep = "conv1.0.weight" in state_dict and "conv1.weight" not in state_dict
        if (not deep and "conv1.weight" not in state_dict) or "fc.weight" not in state_dict or \
                "layer1.0.conv1.weight" not in state_dict:
            return None
        stages: dict[int, set[int]] = {}
        for key in state_dict:
            m = re.match(r"layer(\d+)\.(\d+)\.", key)
            if m:
                stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        order = sorted(stages)
        if order != list(range(1, len(order) + 1)) or any(sorted(b) != list(range(len(b))) for b in stages.values()):
            raise SpecError(f"ResNet stages/blocks are not numbered consecutively: {sorted(stages.items())}")
        block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
        conv1 = state_dict["conv1.6.weight" if deep else "conv1.weight"]
        if conv1.dim() != 4 or deep and ("conv1.3.weight" not in state_dict or state_dict["conv1.0.weight"].dim() != 4):
            return None
        kernel = int(conv1.shape[-1])
        if not deep and kernel not in (3, 7):
            raise SpecError(f"conv1 has a {kernel}x{kernel} kernel; clafuse knows the 7x7 ImageNet and 3x3 "
                            f"small-image stems: pass --arch with a resnet spec")
        spec = ResNetSpec(
            block=block,
            layers=[len(stages[s]) for s in order],
            widths=[int(state_dict[f"layer{s}.0.conv1.weight"].shape[0]) for s in order],
            stem_width=int(conv1.shape[0]),
            stem="deep" if deep else "imagenet" if kernel == 7 else "small",
            deep_stem=(int(state_dict["conv1.0.weight"].shape[0]), int(state_dict["conv1.3.weight"].shape[0]))
            if deep else None,
            downsample="avg" if any(k.endswith(".downsample.2.running_mean") for k in state_dict) else "conv",
            in_channels=int(state_dict["conv1.0.weight" if deep else "conv1.weight"].shape[1]),
            num_classes=int(state_dict["fc.weight"].shape[0]),
        )
        self.check(spec, state_dict)
        return spec

    def check(self, spec: ResNetSpec, state_dict: Mapping[str, torch.Tensor]) -> None:
        context = f" (resnet {spec.block} {spec.layers}, widths {spec.widths})"
        # Counted first, so that a spec with absurdly many blocks is refused before a module is built.
        blocks = {m.group(0) for m in map(re.compile(r"layer\d+\.\d+\.").match, state_dict) if m}
        if sum(spec.layers) != len(blocks):
            detail = ""
            if sum(spec.layers) <= 10_000:  # name the first block only one side has
                expected = [f"{name}." for _, _, name in spec.blocks()]
                missing = [b for b in expected if b not in blocks]
                extra = sorted(blocks - set(expected))
                detail = (f": the checkpoint lacks {missing[0][:-1]!r}" if missing
                          else f": the spec does not describe {extra[0][:-1]!r}" if extra else "")
            raise SpecError(f"the spec has {sum(spec.layers)} blocks, the checkpoint {len(blocks)}{detail}{context}")
        try:
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in self.build(spec).state_dict().items()}
        except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise SpecError(f"the spec's sizes are out of range ({reason}){context}") from None
        check_shapes(expected, state_dict, context)

    def build(self, spec: ResNetSpec) -> nn.Module:
        return ResNet(spec)

    def traits(self, spec: ResNetSpec) -> dict[str, object]:
        return {"blocks": spec.block, "stem": spec.stem, "downsample": spec.downsample,
                "input channels": spec.in_channels, "classes": spec.num_classes}

    def groups(self, spec: ResNetSpec) -> list[Group]:
        module_params = {name: sum(p.numel() for p in mod.parameters())
                         for name, mod in self._block_modules(spec)}
        return [
            Group(f"layer{s + 1}", tuple(LayerInfo(f"layer{s + 1}.{j}", spec.stage_width(s),
                                                   module_params[f"layer{s + 1}.{j}"], "block")
                                         for j in range(n)), pin_first=True)
            for s, n in enumerate(spec.layers)
        ]

    def _block_modules(self, spec: ResNetSpec) -> list[tuple[str, nn.Module]]:
        with torch.device("meta"):
            model = ResNet(spec)
        return [(name, getattr(model, f"layer{s + 1}")[j]) for s, j, name in spec.blocks()]

    def describe(self, spec: ResNetSpec) -> Network:
        """Spaces: the stem's channels, one residual stream per stage (every block output and the
        downsample write into it; a stem without a downsample after it writes straight into the
        first stream), each block's inner channels; blocks: the stem, the residual blocks (one
        alignment group per stage) and the classifier."""
        stem_conv = "conv1.6.weight" if spec.stem == "deep" else "conv1.weight"
        spaces = {"input": Space("input", spec.in_channels, fixed=True),
                  "stem": Space("stem", spec.stem_width, ((stem_conv,),),
                                same_as=None if spec.has_downsample(0, 0) else "stream0")}
        if spec.deep_stem is not None:
            spaces.update({f"stem.{i}": Space(f"stem.{i}", width, ((f"conv1.{3 * i}.weight",),))
                           for i, width in enumerate(spec.deep_stem)})
        down = "downsample.1" if spec.downsample == "avg" else "downsample.0"
        for s in range(len(spec.layers)):
            last = f"layer{s + 1}.{spec.layers[s] - 1}.bn{3 if spec.block == 'bottleneck' else 2}"
            signature = ((f"layer{s + 1}.0.{down}.weight",), (f"{last}.weight", f"{last}.bias"))
            spaces[f"stream{s}"] = Space(f"stream{s}", spec.stage_width(s), signature)
        spaces["logits"] = Space("logits", spec.num_classes, fixed=True)
        blocks = [stem_unit(spec.stem, spec.in_channels, spec.stem_width, spec.deep_stem)]
        for s, j, name in spec.blocks():
            in_space = ("stem" if s == 0 else f"stream{s - 1}") if j == 0 else f"stream{s}"
            in_width = (spec.stem_width if s == 0 else spec.stage_width(s - 1)) if j == 0 else spec.stage_width(s)
            shortcut = "stored" if spec.has_downsample(s, j) else ("implied" if j == 0 else None)
            blocks.append(residual_block(spec.block, name, s, in_space, in_width, spec.widths[s],
                                         (1 if s == 0 else 2) if j == 0 else 1, shortcut, spec.downsample == "avg"))
        head = Unit("head", {"fc.weight": Param("fc.weight", ("logits", f"stream{len(spec.layers) - 1}"),
                                                (spec.num_classes, spec.stage_width(-1))),
                             "fc.bias": Param("fc.bias", ("logits",), (spec.num_classes,), "bias")},
                    _head_forward, output="logits", sites={"out": Site("logits", "fc.weight", "fc.bias")})
        return Network(spaces, blocks + [head])

    @torch.no_grad()
    def layer_outputs(self, spec: ResNetSpec, state_dict: Mapping[str, torch.Tensor],
                      x: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
        """Block outputs averaged over space (the layer costs compare channel means anyway), in
        batches so that memory holds one batch's feature maps."""
        net = self.describe(spec)
        tensors = {b.name: {k: net.param_value(b, k, state_dict).float() for k in b.params} for b in net.blocks}
        parts: list[list[torch.Tensor]] = []
        for start in range(0, len(x), batch_size):
            tap = _BlockOutputs()
            run(net, state_dict, x[start:start + batch_size], tap, tensors=lambda b: tensors[b.name])
            parts.append(tap.outputs)
        return [torch.cat(column) for column in zip(*parts)]

    def forward(self, spec: ResNetSpec, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return run(self.describe(spec), state_dict, x)


class _BlockOutputs(Tap):
    """Collects each residual block's output, averaged over space."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def space(self, name: str, h: torch.Tensor) -> torch.Tensor:
        if self.block.alignable and name == self.block.output:
            self.outputs.append(h.mean((2, 3)))
        return h
