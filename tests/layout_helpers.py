"""Helpers for the layout tests: state dicts from golden key lists, and a permuted copy of any
described network (every non-fixed space's units reordered), which computes the same function
when the description is right."""

from __future__ import annotations

from typing import Mapping

import torch

from clafuse.arch.base import Family
from clafuse.arch.network import Network
from clafuse.fusion.engines import Member, Source, fuse_members
from clafuse.fusion.otfusion import FusionSettings


def state_from_keys(keys: list[tuple[str, list[int]]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under ``keys``: BatchNorm variances positive, counters integer, weights
    scaled so that activations stay of order one."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in keys:
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = torch.tensor(7)
        elif leaf == "running_var":
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[key] = torch.randn(shape, generator=g) * (1.5 / fan_in) ** 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1 + (1.0 if leaf == "weight" else 0.0)
    return out


def permuted(net: Network, state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` with the units of every non-fixed space of ``net`` reordered consistently."""
    g = torch.Generator().manual_seed(seed)
    spaces = net.all_spaces()
    perms: dict[str, torch.Tensor] = {}
    for name, space in spaces.items():
        if not space.fixed and space.same_as is None:
            perms[name] = torch.randperm(space.size, generator=g)
    for name, space in spaces.items():
        if space.same_as is not None:
            perms[name] = perms[space.same_as]
    out = dict(state)
    for block in net.blocks:
        for param in block.params.values():
            if param.implied or param.key not in state:
                continue
            t = out[param.key]
            for axis, space in enumerate(param.axes):
                if space in perms:
                    size = spaces[space].size
                    if t.shape[axis] != size:  # a flattened feature map: channel-major blocks of positions
                        shape = t.shape
                        blocks = t.reshape(*shape[:axis], size, shape[axis] // size, *shape[axis + 1:])
                        t = blocks.index_select(axis, perms[space]).reshape(shape)
                    else:
                        t = t.index_select(axis, perms[space])
            out[param.key] = t
    return out


def fuse_pair(family: Family, spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
              x: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``b`` fused into ``a`` (same spec, 50/50, no corrections): with activations on ``x``, else weights."""
    n = sum(len(g.layers) for g in family.groups(spec))
    mappings = [list(range(len(g.layers))) for g in family.groups(spec)]
    assert n
    settings = FusionSettings(signal="activations" if x is not None else "weights", correction="none", bn_reset=False)
    out = fuse_members(Member(family, spec, a), [Source(Member(family, spec, b), mappings, False)], [0.5, 0.5], x,
                       settings)
    return out.state_dict
