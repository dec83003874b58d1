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
from clafuse.arch.network import Block as Unit
from clafuse.arch.network import NORM_LEAVES, Network, Param, Site, Space, Tap, identity_weight, run
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
    """BasicBlock or Bottleneck with torchvision's parameter names."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        if self.kind == "bottleneck":
            h = self.bn3(self.conv3(F.relu(h)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(h + shortcut)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        if self.spec.stem == "imagenet":
            h = F.max_pool2d(h, 3, 2, 1)
        for s, j, name in self.spec.blocks():
            h = getattr(self, f"layer{s + 1}")[j](h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ResNetFamily(Family):
    name = "resnet"
    spec_model = ResNetSpec
    description = "torchvision-layout ResNet (BasicBlock or Bottleneck, ImageNet or small-image stem)"

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

    def describe(self, spec: ResNetSpec) -> Network:
        """Spaces: the stem's channels, one residual stream per stage (every block output and the
        downsample write into it; a stem without a downsample after it writes straight into the
        first stream), each block's inner channels; blocks: the stem, the residual blocks (one
        alignment group per stage) and the classifier."""
        spaces = {"input": Space("input", spec.in_channels, fixed=True),
                  "stem": Space("stem", spec.stem_width, (("conv1.weight",),),
                                same_as=None if spec.has_downsample(0, 0) else "stream0")}
        for s in range(len(spec.layers)):
            last = f"layer{s + 1}.{spec.layers[s] - 1}.bn{3 if spec.block == 'bottleneck' else 2}"
            signature = ((f"layer{s + 1}.0.downsample.0.weight",), (f"{last}.weight", f"{last}.bias"))
            spaces[f"stream{s}"] = Space(f"stream{s}", spec.stage_width(s), signature)
        spaces["logits"] = Space("logits", spec.num_classes, fixed=True)
        kernel, stride = (7, 2) if spec.stem == "imagenet" else (3, 1)
        stem = Unit("stem", {"conv1.weight": Param("conv1.weight", ("stem", "input", None, None),
                                                   (spec.stem_width, spec.in_channels, kernel, kernel)),
                             **_norm_params("bn1", "stem", spec.stem_width)},
                    _stem_forward(stride, kernel // 2, spec.stem == "imagenet"), output="stem",
                    sites={"stem": Site("stem", "conv1.weight", norm="bn1")})
        blocks = [stem]
        for s, j, name in spec.blocks():
            in_space = ("stem" if s == 0 else f"stream{s - 1}") if j == 0 else f"stream{s}"
            in_width = (spec.stem_width if s == 0 else spec.stage_width(s - 1)) if j == 0 else spec.stage_width(s)
            shortcut = "stored" if spec.has_downsample(s, j) else ("implied" if j == 0 else None)
            blocks.append(residual_block(spec.block, name, s, in_space, in_width, spec.widths[s],
                                         (1 if s == 0 else 2) if j == 0 else 1, shortcut))
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


# --- the description's blocks -------------------------------------------------------------------


def _norm_params(prefix: str, space: str, width: int, block: str = "", implied: bool = False) -> dict[str, Param]:
    """A BatchNorm's four tensors, by local name; keys under ``block``'s prefix."""
    key = f"{block}.{prefix}" if block else prefix
    return {f"{prefix}.{leaf}": Param(f"{key}.{leaf}", (space,), (width,),
                                      "norm" if leaf in ("weight", "bias") else "stat", implied=implied)
            for leaf in NORM_LEAVES}


def _stem_forward(stride: int, padding: int, maxpool: bool):
    def forward(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        z = tap.site("stem", tap.norm("bn1", F.conv2d(x, t["conv1.weight"], stride=stride, padding=padding), 1e-5))
        h = F.relu(z)
        if maxpool:
            h = F.max_pool2d(h, 3, 2, 1)
        return tap.space("stem", h)

    return forward


def _head_forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
    h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    return tap.site("out", F.linear(h, t["fc.weight"], t["fc.bias"]), h)


def residual_block(kind: str, name: str, stage: int, in_space: str, in_width: int, planes: int, stride: int,
                   shortcut: str | None) -> Unit:
    """A BasicBlock or Bottleneck writing into stream ``stage``. ``shortcut``: ``stored`` (a
    downsample conv and BN in the checkpoint), ``implied`` (a plain shortcut, described as an
    identity 1x1 conv and BN that are not stored, so that it can stand against a downsample) or
    None."""
    out_width = planes * EXPANSION[kind]
    stream = f"stream{stage}"
    n = 3 if kind == "bottleneck" else 2
    kernels = [1, 3, 1] if kind == "bottleneck" else [3, 3]
    mids = [f"{name}:mid{c + 1}" for c in range(n - 1)]
    spaces = {f"mid{c + 1}": Space(mids[c], planes, ((f"{name}.conv{c + 1}.weight",),), owner=name,
                                   local=f"mid{c + 1}") for c in range(n - 1)}
    params: dict[str, Param] = {}
    sites: dict[str, Site] = {}
    inputs = [in_space, *mids]
    outputs = [*mids, stream]
    widths_in = [in_width] + [planes] * (n - 1)
    for c in range(n):
        k = kernels[c]
        width = out_width if c == n - 1 else planes
        params[f"conv{c + 1}.weight"] = Param(f"{name}.conv{c + 1}.weight", (outputs[c], inputs[c], None, None),
                                              (width, widths_in[c], k, k))
        params.update(_norm_params(f"bn{c + 1}", outputs[c], width, name))
        sites[f"mid{c + 1}" if c < n - 1 else "out"] = Site(outputs[c], f"conv{c + 1}.weight", norm=f"bn{c + 1}")
    values: dict[str, torch.Tensor] = {}
    if shortcut is not None:
        implied = shortcut == "implied"
        params["downsample.0.weight"] = Param(f"{name}.downsample.0.weight", (stream, in_space, None, None),
                                              (out_width, in_width, 1, 1), implied=implied)
        params.update(_norm_params("downsample.1", stream, out_width, name, implied))
        if implied:
            values = {f"{name}.downsample.0.weight": identity_weight(out_width, (out_width, out_width, 1, 1)),
                      **_identity_norm(f"{name}.downsample.1", out_width)}
        else:
            sites["down"] = Site(stream, "downsample.0.weight", norm="downsample.1")
    attrs = {"kind": kind, "stage": stage, "planes": planes, "in_space": in_space}
    return Unit(name, params, _block_forward(kind, stride, n, mids, stream, shortcut == "stored"), spaces, sites,
                 group=stage, output=stream, identity=identity_block if shortcut is None else None, drop=shortcut != "stored",
                 values=values, attrs=attrs)


def _identity_norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.ones(width), f"{prefix}.bias": torch.zeros(width),
            f"{prefix}.running_mean": torch.zeros(width), f"{prefix}.running_var": torch.full((width,), 1.0 - 1e-5)}


def identity_block(template: Unit, width: int, in_space: str) -> Unit | None:
    """A residual block on ``width`` channels whose branch outputs zero (last BatchNorm's scale and
    shift zero): exactly the identity. Its other tensors are placeholders (zero convs, neutral
    BatchNorms; the convs' zeros take no memory) that take no part in mixing."""
    a = template.attrs
    name = f"{template.name}+identity"
    block = residual_block(a["kind"], name, a["stage"], in_space, width, width // EXPANSION[a["kind"]], 1, None)
    neutral = {"weight": torch.ones, "bias": torch.zeros, "running_mean": torch.zeros,
               "running_var": lambda shape: torch.full(shape, 1.0 - 1e-5)}
    values = {p.key: torch.zeros(1).expand(p.shape) if p.kind == "weight" else neutral[p.key.rsplit(".", 1)[1]](p.shape)
              for p in block.params.values()}
    last = f"bn{3 if a['kind'] == 'bottleneck' else 2}"
    values[f"{name}.{last}.weight"] = torch.zeros(width)
    stream = f"stream{a['stage']}"

    def forward(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        tap.site("out", torch.zeros(1, width, 1, 1))  # what the zeroed branch outputs, without computing it
        return tap.space(stream, F.relu(x))

    return block.with_(inserted=True, exact=frozenset({f"{last}.weight", f"{last}.bias"}), values=values,
                       forward=forward)


def _block_forward(kind: str, stride: int, n: int, mids: list[str], stream: str, downsample: bool):
    pads = [0, 1, 0] if kind == "bottleneck" else [1, 1]
    strides = [1, stride, 1] if kind == "bottleneck" else [stride, 1]

    def forward(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        h = x
        for c in range(n):
            z = F.conv2d(h, t[f"conv{c + 1}.weight"], stride=strides[c], padding=pads[c])
            z = tap.site(f"mid{c + 1}" if c < n - 1 else "out", tap.norm(f"bn{c + 1}", z, 1e-5))
            if c < n - 1:
                h = tap.space(mids[c], F.relu(z))
        shortcut = x
        if downsample:
            d = F.conv2d(x, t["downsample.0.weight"], stride=stride)
            shortcut = tap.site("down", tap.norm("downsample.1", d, 1e-5))
        return tap.space(stream, F.relu(z + shortcut))

    return forward
