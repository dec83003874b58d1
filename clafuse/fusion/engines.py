"""Fusion engines: how a pair of aligned networks of one family is balanced and fused.

A family names its engine (``Family.engine``); ``chain`` serves every family that can be written
as a :class:`~clafuse.arch.base.Chain` (MLPs, VGG-style CNNs). Families with other topologies
(residual networks) register their own engine here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from pydantic import BaseModel

from clafuse.arch.base import Family
from clafuse.errors import ClafuseError
from clafuse.fusion.balance import BALANCE_METHODS, insert_identities, merge_layers, relu_gates
from clafuse.fusion.otfusion import FusionSettings, fuse_chains


@dataclass
class Member:
    """One network taking part in a fusion: its family, spec and weights."""

    family: Family
    spec: BaseModel
    state_dict: Mapping[str, torch.Tensor]


@dataclass
class PairResult:
    """The fused weights, in the key names and dtypes of ``target`` ("deep" or "shallow"), and the
    mixing weights (target, other) each of the target's layers got."""

    target: str
    state_dict: dict[str, torch.Tensor]
    mixing: list[list[float]]


Engine = Callable[[Member, Member, list[list[int]], str, tuple[float, float], "torch.Tensor | None", FusionSettings],
                  PairResult]
ENGINES: dict[str, Engine] = {}


def register_engine(name: str) -> Callable[[Engine], Engine]:
    def add(engine: Engine) -> Engine:
        ENGINES[name] = engine
        return engine

    return add


def global_mapping(mappings: list[list[int]], deep_sizes: list[int]) -> list[int]:
    """Per-group mappings as one mapping over all of the deep network's alignable layers."""
    out: list[int] = []
    offset = 0
    for mapping, size in zip(mappings, deep_sizes):
        out += [offset + j for j in mapping]
        offset += size
    return out


@register_engine("chain")
def fuse_chain_pair(deep: Member, shallow: Member, mappings: list[list[int]], balance: str,
                    weights: tuple[float, float], x: torch.Tensor | None, settings: FusionSettings) -> PairResult:
    """``add``: identities into the shallow chain, fused into the deep architecture; ``merge``:
    the deep chain's unmatched layers folded away, fused into the shallow architecture.
    ``weights`` are (deep, shallow)."""
    if balance not in BALANCE_METHODS:
        raise ClafuseError(f"unknown balance {balance!r}; choose from {', '.join(BALANCE_METHODS)}")
    sizes = [len(g.layers) for g in deep.family.groups(deep.spec)]
    mapping = global_mapping(mappings, sizes)
    deep_chain = deep.family.to_chain(deep.spec, deep.state_dict)
    shallow_chain = shallow.family.to_chain(shallow.spec, shallow.state_dict)
    if balance == "add":
        source = insert_identities(shallow_chain, mapping, deep_chain)
        result = fuse_chains(deep_chain, [source], list(weights), x, settings)
        target, name = deep, "deep"
    else:
        if x is None:
            raise ClafuseError("merge balancing needs calibration data to approximate the folded ReLUs: pass --data")
        source = merge_layers(deep_chain, mapping, relu_gates(deep_chain, x))
        result = fuse_chains(shallow_chain, [source], [weights[1], weights[0]], x, settings)
        target, name = shallow, "shallow"
    state = target.family.from_chain(target.spec, result.chain, target.state_dict)
    return PairResult(name, state, result.mixing)


# Engines of other families register themselves on import.
from clafuse.fusion import resnet as _resnet  # noqa: E402,F401  (registers "resnet")
