"""Fusion of checkpoints of one family: describe, balance, record, transport and mix, correct.

Fusion is many-to-one: every source network is balanced to the target's depth (identity blocks
inserted where it is shallower; its unmatched blocks dropped or folded where it is deeper),
transported into the target's units and mixed with the mixing weights, then corrected on
calibration data. Everything works on the families' descriptions (:meth:`Family.describe`), so one
engine serves every family; ``ENGINES`` keeps the names families and callers used to pick one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from pydantic import BaseModel

from clafuse.arch.base import Family
from clafuse.arch.network import Network
from clafuse.fusion.balance import (fit_inserted, gates_of, insert_blocks, merge_blocks, needs_fitting, needs_folding,
                                    pair_optional)
from clafuse.fusion.corrections import record
from clafuse.fusion.engine import Model, fuse_models, mixing_rows
from clafuse.fusion.otfusion import FusionSettings
from clafuse.errors import ClafuseError
from clafuse.io.lazy import LazyStateDict


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
    one (its unmatched blocks are dropped or folded), else identities are inserted into it."""

    member: Member
    mappings: list[list[int]]
    deeper: bool


@dataclass
class FusionOutcome:
    """The fused weights in the target's key names and dtypes, the mixing weights (target's
    first, then one per source) each of the target's reported blocks got, and per inserted
    near-identity block (name) its relative error on the calibration data."""

    state_dict: dict[str, torch.Tensor]
    mixing: list[list[float]]
    approximate: dict[str, float] = field(default_factory=dict)


def global_mapping(mappings: list[list[int]], deep_sizes: list[int]) -> list[int]:
    """Per-group mappings as one mapping over all of the deep network's alignable layers."""
    out: list[int] = []
    offset = 0
    for mapping, size in zip(mappings, deep_sizes):
        out += [offset + j for j in mapping]
        offset += size
    return out


def float_state(state: Mapping[str, torch.Tensor], dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """All of ``state`` read, floating-point tensors as float32 (their dtypes noted in ``dtypes``)."""
    out = {}
    for k, v in state.items():
        if dtypes is not None:
            dtypes[k] = v.dtype
        out[k] = v.float() if v.is_floating_point() else v
    return out


def balanced_model(target: Network, source: Source, x: torch.Tensor | None) -> Model:
    """The source described and balanced to pair block for block with ``target``; read in full
    (float32) when there is calibration data, else left as it is (read tensor by tensor)."""
    m = source.member
    net = m.family.describe(m.spec)
    state = float_state(m.state_dict) if x is not None else m.state_dict
    context = None
    if source.deeper:
        context = net
        gates = None
        if x is not None and needs_folding(net, source.mappings):
            gates = gates_of(net, record(net, state, x, spaces=False, sites=True)[1])
        net = merge_blocks(net, state, source.mappings, gates)
    else:
        net = insert_blocks(net, source.mappings, target, state)
        if needs_fitting(net):
            if x is None:
                raise ClafuseError("this architecture has no exact identity block to insert (post-LN): add needs "
                                   "calibration data (--data) to fit near-identity blocks; or fuse into the "
                                   "shallower layout (--target shallow)")
            net = fit_inserted(net, state, x)
    net = pair_optional(net, target)
    return Model(net, state, consumable=x is not None, context=context)


def fuse_members(target: Member, sources: list[Source], weights: list[float], x: torch.Tensor | None,
                 settings: FusionSettings) -> FusionOutcome:
    """Fuse ``sources`` into the target's architecture; ``weights``: the target's first.

    With calibration inputs ``x``: activations drive the transport (``signal="activations"``),
    BatchNorm statistics are recomputed (``bn_reset``) and the ``correction`` runs; without, the
    fusion streams block by block through lazily opened checkpoints.
    """
    net = target.family.describe(target.spec)
    dtypes: dict[str, torch.dtype] = {}
    anchor = Model(net, float_state(target.state_dict, dtypes) if x is not None else target.state_dict,
                   mutable=isinstance(target.state_dict, LazyStateDict))
    models = [balanced_model(net, source, x) for source in sources]
    mixed = fuse_models(anchor, models, weights, x, settings)
    state = mixed.state
    dtypes = {**mixed.dtypes, **dtypes}
    out = {key: state[key].to(dtypes[key]) if key in state else target.state_dict[key] for key in target.state_dict}
    approximate = {b.name: float(b.attrs["identity_error"]) for model in models for b in model.net.blocks
                   if b.inserted and "identity_error" in b.attrs}
    return FusionOutcome(out, mixing_rows(net, mixed.betas), approximate)


Engine = Callable[[Member, list[Source], list[float], "torch.Tensor | None", FusionSettings], FusionOutcome]
ENGINES: dict[str, Engine] = {"network": fuse_members, "chain": fuse_members, "resnet": fuse_members}
