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
from pydantic import BaseModel, Field, model_validator
from torch import nn

from clafuse.arch.base import Family, Group, LayerInfo, check_shapes
from clafuse.errors import SpecError

EXPANSION = {"basic": 1, "bottleneck": 4}
BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class ResNetSpec(BaseModel):
    """A torchvision-style ResNet."""

    family: Literal["resnet"] = "resnet"
    block: Literal["basic", "bottleneck"]
    layers: list[int] = Field(min_length=1, description="blocks per stage")
    widths: list[int] = Field(min_length=1, description="planes per stage (block output = planes x expansion)")
    stem_width: int = Field(gt=0)
    stem: Literal["imagenet", "small"] = "imagenet"
    in_channels: int = Field(3, gt=0)
    num_classes: int = Field(gt=0)

    @model_validator(mode="after")
    def _shape(self) -> "ResNetSpec":
        if len(self.layers) != len(self.widths):
            raise ValueError(f"{len(self.layers)} stages in 'layers' but {len(self.widths)} in 'widths'")
        if any(n < 1 for n in self.layers) or any(w < 1 for w in self.widths):
            raise ValueError("every stage needs at least one block and a positive width")
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
    """BasicBlock or Bottleneck with torchvision's parameter names; can record its activations."""

    def __init__(self, kind: str, inplanes: int, planes: int, stride: int, downsample: bool) -> None:
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
        self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                           if downsample else None)

    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None, name: str = "") -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if record is not None:
            record[f"{name}.mid1"] = h
        h = self.bn2(self.conv2(h))
        if self.kind == "bottleneck":
            h = F.relu(h)
            if record is not None:
                record[f"{name}.mid2"] = h
            h = self.bn3(self.conv3(h))
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(h + shortcut)
        if record is not None:
            record[f"{name}.out"] = out
        return out


class ResNet(nn.Module):
    """A plain-torch ResNet whose ``state_dict()`` keys are torchvision's."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.stem == "imagenet":
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        inplanes = spec.stem_width
        for s, (count, planes) in enumerate(zip(spec.layers, spec.widths)):
            blocks = [Block(spec.block, inplanes if j == 0 else spec.stage_width(s), planes,
                            (1 if s == 0 else 2) if j == 0 else 1, spec.has_downsample(s, j))
                      for j in range(count)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            inplanes = spec.stage_width(s)
        self.fc = nn.Linear(inplanes, spec.num_classes)

    def forward(self, x: torch.Tensor, record: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if self.spec.stem == "imagenet":
            h = F.max_pool2d(h, 3, 2, 1)
        if record is not None:
            record["stem"] = h
        for s, j, name in self.spec.blocks():
            h = getattr(self, f"layer{s + 1}")[j](h, record, name)
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        if record is not None:
            record["pooled"] = h
        return self.fc(h)


class ResNetFamily(Family):
    name = "resnet"
    spec_model = ResNetSpec
    description = "torchvision-layout ResNet (BasicBlock or Bottleneck, ImageNet or small-image stem)"
    engine = "resnet"

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> ResNetSpec | None:
        if "conv1.weight" not in state_dict or "fc.weight" not in state_dict or "layer1.0.conv1.weight" not in state_dict:
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
        conv1 = state_dict["conv1.weight"]
        if conv1.dim() != 4:
            return None
        kernel = int(conv1.shape[-1])
        if kernel not in (3, 7):
            raise SpecError(f"conv1 has a {kernel}x{kernel} kernel; clafuse knows the 7x7 ImageNet and 3x3 "
                            f"small-image stems: pass --arch with a resnet spec")
        spec = ResNetSpec(
            block=block,
            layers=[len(stages[s]) for s in order],
            widths=[int(state_dict[f"layer{s}.0.conv1.weight"].shape[0]) for s in order],
            stem_width=int(conv1.shape[0]),
            stem="imagenet" if kernel == 7 else "small",
            in_channels=int(conv1.shape[1]),
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

    @torch.no_grad()
    def record(self, spec: ResNetSpec, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor,
               batch_size: int = 256, pooled: bool = False, max_positions: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Activations of the stem, every block (inner layers and output) and the pooled
        features, and the logits, on ``x`` (eval mode). Memory is bounded batch by batch: with
        ``pooled`` feature maps are averaged over space (when only channel means matter); with
        ``max_positions`` larger maps keep that many evenly spaced positions, (N, C, positions),
        the same ones for every map of the same size. Activations are stored in ``dtype``."""
        model = self.instantiate(spec, state_dict)
        parts: list[dict[str, torch.Tensor]] = []
        logits = []
        for start in range(0, len(x), batch_size):
            rec: dict[str, torch.Tensor] = {}
            logits.append(model(x[start:start + batch_size].float(), rec))
            parts.append({k: _reduce_map(v, pooled, max_positions).to(dtype) for k, v in rec.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, torch.cat(logits)

    def layer_outputs(self, spec: ResNetSpec, state_dict: Mapping[str, torch.Tensor],
                      x: torch.Tensor) -> list[torch.Tensor]:
        """Block outputs averaged over space: the layer costs compare channel means anyway."""
        rec, _ = self.record(spec, state_dict, x, pooled=True)
        return [rec[f"{name}.out"] for _, _, name in spec.blocks()]

    def forward(self, spec: ResNetSpec, state_dict: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.record(spec, state_dict, x)[1]


def _reduce_map(v: torch.Tensor, pooled: bool, max_positions: int | None) -> torch.Tensor:
    if v.dim() != 4:
        return v
    if pooled:
        return v.mean((2, 3))
    positions = v.shape[2] * v.shape[3]
    if max_positions is None or positions <= max_positions:
        return v
    keep = torch.linspace(0, positions - 1, max_positions).round().long()
    return v.flatten(2)[:, :, keep].contiguous()
