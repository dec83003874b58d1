"""The description's blocks of a ResNet (:mod:`clafuse.arch.resnet`): the stem, residual blocks
(torchvision's and timm's avg-pool downsample), their exact identities, and the head."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from clafuse.arch.network import Block as Unit
from clafuse.arch.layers import identity_weight
from clafuse.arch.network import NORM_LEAVES, Param, Site, Space, Tap

EXPANSION = {"basic": 1, "bottleneck": 4}
DOWNSAMPLE_KEYS = {False: ("downsample.0", "downsample.1"), True: ("downsample.1", "downsample.2")}
"""Per downsample kind (avg-pool or not), the local names of its conv and BatchNorm."""




def _norm_params(prefix: str, space: str, width: int, block: str = "", implied: bool = False) -> dict[str, Param]:
    """A BatchNorm's four tensors, by local name; keys under ``block``'s prefix."""
    key = f"{block}.{prefix}" if block else prefix
    return {f"{prefix}.{leaf}": Param(f"{key}.{leaf}", (space,), (width,),
                                      "norm" if leaf in ("weight", "bias") else "stat", implied=implied)
            for leaf in NORM_LEAVES}


def stem_unit(kind: str, in_channels: int, width: int, deep: tuple[int, int] | None) -> Unit:
    """The stem as a fixed block writing into space ``stem``: one conv (7x7 stride 2 then a 3x3
    max-pool, or 3x3 stride 1) and ``bn1``; or timm's deep stem, ``conv1.0`` (3x3 stride 2),
    ``conv1.1`` BN, ReLU, ``conv1.3``, ``conv1.4`` BN, ReLU, ``conv1.6`` into ``bn1``, then the
    max-pool, its inner channels in the spaces ``stem.0`` and ``stem.1``."""
    if kind != "deep":
        k = 7 if kind == "imagenet" else 3
        convs = [("conv1.weight", "bn1", "stem", "input", (width, in_channels, k, k), 2 if kind == "imagenet" else 1)]
    else:
        a, b = deep
        convs = [("conv1.0.weight", "conv1.1", "stem.0", "input", (a, in_channels, 3, 3), 2),
                 ("conv1.3.weight", "conv1.4", "stem.1", "stem.0", (b, a, 3, 3), 1),
                 ("conv1.6.weight", "bn1", "stem", "stem.1", (width, b, 3, 3), 1)]
    params: dict[str, Param] = {}
    sites: dict[str, Site] = {}
    for weight, norm, out, inp, shape, _ in convs:
        params[weight] = Param(weight, (out, inp, None, None), shape)
        params.update(_norm_params(norm, out, shape[0]))
        sites[out] = Site(out, weight, norm=norm)

    def forward(t: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> torch.Tensor:
        h = x
        for weight, norm, out, _, shape, stride in convs:
            z = F.conv2d(h, t[weight], stride=stride, padding=shape[-1] // 2)
            h = F.relu(tap.site(out, tap.norm(norm, z, 1e-5)))
            if out != "stem":  # an inner channel space of the deep stem; ``stem`` is seen after the max-pool
                h = tap.space(out, h)
        if kind != "small":
            h = F.max_pool2d(h, 3, 2, 1)
        return tap.space("stem", h)

    return Unit("stem", params, forward, output="stem", sites=sites)


def _head_forward(t: Mapping[str, torch.Tensor], h: torch.Tensor, tap: Tap) -> torch.Tensor:
    h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
    return tap.site("out", F.linear(h, t["fc.weight"], t["fc.bias"]), h)


def residual_block(kind: str, name: str, stage: int, in_space: str, in_width: int, planes: int, stride: int,
                   shortcut: str | None, avg_down: bool = False) -> Unit:
    """A BasicBlock or Bottleneck writing into stream ``stage``. ``shortcut``: ``stored`` (a
    downsample conv and BN in the checkpoint), ``implied`` (a plain shortcut, described as an
    identity 1x1 conv and BN that are not stored, so that it can stand against a downsample) or
    None. ``avg_down``: timm's downsample, a 2x2 average pool (where the block strides) then a
    stride-1 conv, at ``downsample.1`` and ``downsample.2``."""
    conv_local, norm_local = DOWNSAMPLE_KEYS[avg_down]
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
        params[f"{conv_local}.weight"] = Param(f"{name}.{conv_local}.weight", (stream, in_space, None, None),
                                               (out_width, in_width, 1, 1), implied=implied)
        params.update(_norm_params(norm_local, stream, out_width, name, implied))
        if implied:
            values = {f"{name}.{conv_local}.weight": identity_weight(out_width, (out_width, out_width, 1, 1)),
                      **_identity_norm(f"{name}.{norm_local}", out_width)}
        else:
            sites["down"] = Site(stream, f"{conv_local}.weight", norm=norm_local)
    attrs = {"kind": kind, "stage": stage, "planes": planes, "in_space": in_space, "avg_down": avg_down}
    forward = _block_forward(kind, stride, n, mids, stream, shortcut == "stored", avg_down)
    return Unit(name, params, forward, spaces, sites,
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
    block = residual_block(a["kind"], name, a["stage"], in_space, width, width // EXPANSION[a["kind"]], 1, None,
                           a["avg_down"])
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


def _block_forward(kind: str, stride: int, n: int, mids: list[str], stream: str, downsample: bool, avg_down: bool):
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
        if downsample and avg_down:
            pooled = F.avg_pool2d(x, 2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else x
            shortcut = tap.site("down", tap.norm("downsample.2", F.conv2d(pooled, t["downsample.1.weight"]), 1e-5))
        elif downsample:
            d = F.conv2d(x, t["downsample.0.weight"], stride=stride)
            shortcut = tap.site("down", tap.norm("downsample.1", d, 1e-5))
        return tap.space(stream, F.relu(z + shortcut))

    return forward
