"""Fusion engines: how aligned networks of one family are balanced and fused into a target.

Fusion is many-to-one: every source network is balanced to the target's depth (identity layers
inserted where it is shallower, its unmatched layers folded where it is deeper), transported into
the target's neuron order and averaged with the mixing weights. A family names its engine
(``Family.engine``); ``chain`` serves every family that can be written as a
:class:`~clafuse.arch.base.Chain` (MLPs, VGG-style CNNs). Families with other topologies (residual
networks) register their own engine here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from pydantic import BaseModel

from clafuse.arch.base import Chain, Family
from clafuse.errors import ClafuseError
from clafuse.fusion.balance import insert_identities, merge_layers, relu_gates
from clafuse.fusion.otfusion import FusionSettings, fuse_chains, materialized
from clafuse.io.lazy import LazyStateDict, materializer


@dataclass
class Member:
    """One network taking part in a fusion: its family, spec and weights."""

    family: Family
    spec: BaseModel
    state_dict: Mapping[str, torch.Tensor]

    def group_sizes(self) -> list[int]:
        return [len(g.layers) for g in self.family.groups(self.spec)]


@dataclass
class Source:
    """A network fused into the target. ``mappings`` are the alignment's per-group mappings from
    the shallower of the two networks into the deeper one; ``deeper`` says the source is the deeper
    one (its unmatched layers are folded away), else identities are inserted into it."""

    member: Member
    mappings: list[list[int]]
    deeper: bool


@dataclass
class FusionOutcome:
    """The fused weights in the target's key names and dtypes, and the mixing weights (target's
    first, then one per source) each of the target's layers got."""

    state_dict: dict[str, torch.Tensor]
    mixing: list[list[float]]


Engine = Callable[[Member, list[Source], list[float], "torch.Tensor | None", FusionSettings], FusionOutcome]
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
def fuse_chain_models(target: Member, sources: list[Source], weights: list[float], x: torch.Tensor | None,
                      settings: FusionSettings) -> FusionOutcome:
    """Balance each source chain to the target's depth (identities into a shallower source, a
    deeper one's unmatched layers folded with their ReLU gates on ``x``), then OT-fuse them all
    into the target's architecture. ``weights``: the target's first, then the sources'."""
    target_chain = _chain(target)
    balanced = []
    for source in sources:
        m = source.member
        chain = _chain(m)
        if source.deeper:
            if x is None:
                raise ClafuseError("folding a deeper network's unmatched layers needs calibration data to "
                                   "approximate their ReLUs: pass --data")
            chain = materialized(chain, materializer(m.state_dict))
            mapping = global_mapping(source.mappings, m.group_sizes())
            balanced.append(merge_layers(chain, mapping, relu_gates(chain, x)))
        else:
            mapping = global_mapping(source.mappings, target.group_sizes())
            balanced.append(insert_identities(chain, mapping, target_chain))
    load = materializer(target.state_dict, *(s.member.state_dict for s in sources))
    result = fuse_chains(target_chain, balanced, list(weights), x, settings, load=load, keep_plans=False)
    state = target.family.from_chain(target.spec, result.chain, target.state_dict)
    return FusionOutcome(state, result.mixing)


def _chain(member: Member) -> Chain:
    """The member's chain; for a lazily opened checkpoint, with shape-only stand-ins for its
    tensors (read layer by layer later)."""
    sd = member.state_dict
    return member.family.to_chain(member.spec, sd.skeleton() if isinstance(sd, LazyStateDict) else sd)


# Engines of other families register themselves on import.
from clafuse.fusion import resnet as _resnet  # noqa: E402,F401  (registers "resnet")
