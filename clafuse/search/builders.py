"""Builders that turn a search candidate into a fused torch module.

:func:`engine_builder` calls a family's fusion engine for each candidate, so it serves every
family; :class:`ChainFusionBuilder` serves chain families (MLPs, VGG-style CNNs) faster by
balancing and aligning each source once per mapping and calibration size and reusing those
transport plans for every weighting, ``inserted`` policy and correction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from clafuse.arch.base import Chain
from clafuse.fusion.balance import insert_identities, merge_layers, relu_gates
from clafuse.fusion.engines import Engine, Member, Source, global_mapping
from clafuse.fusion.otfusion import (
    AlignedChain,
    FusionSettings,
    align_chain,
    average_layers,
    correct,
    layer_weights,
    reset_batchnorm,
)
from clafuse.search.space import Candidate


@dataclass
class Alternatives:
    """A source network with the mappings the search may use for it (each a per-group list, the
    map's own first) and whether it is the deeper of the pair."""

    member: Member
    mappings: list[list[list[int]]]
    deeper: bool


def _settings(base: FusionSettings, c: Candidate) -> FusionSettings:
    return replace(base, inserted=c.inserted, correction=c.correction)


def engine_builder(engine: Engine, target: Member, sources: Sequence[Alternatives], x_build: torch.Tensor,
                   settings: FusionSettings = FusionSettings()):
    """A builder that runs ``engine`` (e.g. ``ENGINES[family.engine]``) for each candidate."""

    def build(c: Candidate) -> nn.Module:
        chosen = [Source(s.member, s.mappings[rank], s.deeper) for s, rank in zip(sources, c.mappings)]
        outcome = engine(target, chosen, list(c.weights), x_build[:c.samples], _settings(settings, c))
        return target.family.instantiate(target.spec, outcome.state_dict)

    return build


class ChainFusionBuilder:
    """Fuses chain-family candidates like the ``chain`` engine does, keeping each source's
    balanced and aligned chain per (mapping, calibration size) for the next candidates."""

    def __init__(self, target: Member, sources: Sequence[Alternatives], x_build: torch.Tensor,
                 settings: FusionSettings = FusionSettings()) -> None:
        self.target = target
        self.sources = list(sources)
        self.x_build = x_build
        self.settings = settings
        self.target_chain = target.family.to_chain(target.spec, target.state_dict)
        self._aligned: dict[tuple[int, int, int], AlignedChain] = {}
        self._target_pre: dict[int, list[torch.Tensor]] = {}

    def aligned(self, index: int, rank: int, samples: int) -> AlignedChain:
        """Source ``index`` balanced with its ``rank``-th mapping and aligned to the target on the
        first ``samples`` build inputs."""
        key = (index, rank, samples)
        if key not in self._aligned:
            source = self.sources[index]
            x = self.x_build[:samples]
            chain = source.member.family.to_chain(source.member.spec, source.member.state_dict)
            if source.deeper:
                mapping = global_mapping(source.mappings[rank], source.member.group_sizes())
                balanced = merge_layers(chain, mapping, relu_gates(chain, x))
            else:
                mapping = global_mapping(source.mappings[rank], self.target.group_sizes())
                balanced = insert_identities(chain, mapping, self.target_chain)
            self._aligned[key] = align_chain(balanced, self.target_chain, x, self.settings)
        return self._aligned[key]

    def fuse(self, c: Candidate) -> Chain:
        """The fused chain for ``c`` (what ``fuse_chains`` returns for the same settings)."""
        x = self.x_build[:c.samples]
        aligned = [self.aligned(i, rank, c.samples) for i, rank in enumerate(c.mappings)]
        models = [self.target_chain, *(a.chain for a in aligned)]
        mixing, layers = [], []
        for k in range(len(self.target_chain.layers)):
            at_k = [m.layers[k] for m in models]
            betas = layer_weights(at_k, list(c.weights), c.inserted)
            mixing.append(betas)
            layers.append(average_layers(at_k, betas))
        fused = Chain(layers[:-1], layers[-1], self.target_chain.flatten_input)
        if self.settings.bn_reset and any(layer.bn is not None for layer in fused.layers):
            fused = reset_batchnorm(fused, x)
        if c.correction != "none":
            pre = self._pre(c.samples)
            targets = [sum(b * z.double() for b, z in zip(mixing[k], [pre[k], *(a.pre[k] for a in aligned)]))
                       for k in range(len(layers))]
            fused = correct(fused, targets, x, c.correction, self.settings.ridge)
        return fused

    def _pre(self, samples: int) -> list[torch.Tensor]:
        if samples not in self._target_pre:
            pre, _, logits = self.target_chain.forward_record(self.x_build[:samples])
            self._target_pre[samples] = [*pre, logits]
        return self._target_pre[samples]

    def __call__(self, c: Candidate) -> nn.Module:
        fused = self.fuse(c)
        state = self.target.family.from_chain(self.target.spec, fused, self.target.state_dict)
        return self.target.family.instantiate(self.target.spec, state)
