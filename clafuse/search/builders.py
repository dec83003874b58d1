"""Turning search candidates into fused networks on the one engine, reusing what candidates share.

:class:`PlanBuilder` reads each checkpoint once. Per calibration size it records the target once;
per (source, mapping, calibration size) it balances the source, records it and keeps its
transport plans and its tensors moved into the target's units. A candidate that differs only in
its weights, ``inserted`` policy, correction or head refit then costs a mix, a BatchNorm reset,
the correction and a forward pass: no checkpoint is read, no activation recorded and no plan
solved again. The result is bit for bit what :func:`clafuse.fusion.engines.fuse_members` gives
for the same settings (the test suite checks it), so ``fuse`` repeats a searched fusion exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from clafuse.arch.network import Param
from clafuse.fusion.corrections import record_model
from clafuse.fusion.engine import Model, Pairing, full_site_records, fuse_models, mixing_rows
from clafuse.fusion.engines import FusionOutcome, Member, Source, balanced_model, float_state
from clafuse.fusion.otfusion import FusionSettings
from clafuse.options import mixing_weights
from clafuse.search.refit import ensemble_teacher, refit_head
from clafuse.search.space import Candidate

CACHED_FUSIONS = 4


@dataclass
class Alternatives:
    """A source network with the mappings the search may use for it (each a per-group list, the
    map's own first) and whether it is the deeper of the pair."""

    member: Member
    mappings: list[list[list[int]]]
    deeper: bool


class KeptPairing(Pairing):
    """A pairing that keeps every source tensor it has moved, for the next fusion of the same pair
    (the moved tensors depend on the plans only, not on the mixing weights)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.kept: dict[tuple[int, str], torch.Tensor | None] = {}

    def moved(self, block: int, local: str, target_param: Param) -> torch.Tensor | None:
        key = (block, local)
        if key not in self.kept:
            self.kept[key] = super().moved(block, local, target_param)
        return self.kept[key]


def engine_weights(weights: Sequence[float]) -> list[float]:
    """The weights as ``fuse`` hands them to the engine (scaled by their maximum), so that a
    candidate and ``fuse --weights`` with the same numbers mix exactly alike."""
    return mixing_weights([float(w) for w in weights])


class PlanBuilder:
    """Fuses candidates into ``target``'s architecture from ``sources`` (in the order of the
    candidates' weights after the target's), on ``x_build[:samples]``. ``parents``: the models as
    torch modules, target first, the teacher of the head refit (default: instantiated here), weighed
    by ``reference`` (default: equally)."""

    def __init__(self, target: Member, sources: Sequence[Alternatives], x_build: torch.Tensor,
                 settings: FusionSettings = FusionSettings(), parents: Sequence[nn.Module] | None = None,
                 head: str | None = None, reference: Sequence[float] | None = None) -> None:
        self.reference = list(reference) if reference is not None else None
        self.dtypes: dict[str, torch.dtype] = {}
        self.target = replace(target, state_dict=float_state(target.state_dict, self.dtypes))
        self.sources = [replace(s, member=replace(s.member, state_dict=float_state(s.member.state_dict)))
                        for s in sources]
        self.x_build, self.settings, self.head = x_build, settings, head
        self.net = target.family.describe(target.spec)
        self.use_acts = settings.signal == "activations"
        self._parents = list(parents) if parents is not None else None
        self._anchors: dict[tuple[int, bool], Model] = {}
        self._pairs: dict[tuple[int, int, int, bool], tuple[Model, KeptPairing]] = {}
        self._teachers: dict[int, torch.Tensor] = {}
        self._fused: "OrderedDict[Candidate, FusionOutcome]" = OrderedDict()

    def _record(self, model: Model, samples: int, full: bool) -> Model:
        return record_model(model, self.x_build[:samples], self.use_acts, True, full_sites=full)

    def anchor(self, samples: int, full: bool = True) -> Model:
        """The target recorded on the first ``samples`` build inputs (plain linear sites in full
        with ``full``, as a regression needs, else as moments, as ``fuse`` records them for the
        other corrections, so that a candidate is the same fusion bit for bit)."""
        if (samples, full) not in self._anchors:
            self._anchors[(samples, full)] = self._record(Model(self.net, self.target.state_dict), samples, full)
        return self._anchors[(samples, full)]

    def pair(self, index: int, rank: int, samples: int, full: bool = True) -> tuple[Model, KeptPairing]:
        """Source ``index`` balanced with its ``rank``-th mapping, recorded (see :meth:`anchor`),
        and its pairing with the target (plans solved when first needed, then kept)."""
        key = (index, rank, samples, full)
        if key not in self._pairs:
            alt = self.sources[index]
            model = balanced_model(self.net, Source(alt.member, alt.mappings[rank], alt.deeper),
                                   self.x_build[:samples])
            model.consumable = False
            self._record(model, samples, full)
            s = self.settings
            self._pairs[key] = model, KeptPairing(self.anchor(samples, full), model, s.solver, s.reg, s.ground,
                                                  self.use_acts)
        return self._pairs[key]

    def outcome(self, c: Candidate) -> FusionOutcome:
        """The fused tensors for ``c`` without the head refit, in the target's keys and dtypes."""
        key = c.fusion_key()
        if key in self._fused:
            self._fused.move_to_end(key)
            return self._fused[key]
        settings = replace(self.settings, inserted=c.inserted, correction=c.correction)
        full = full_site_records(self.net, settings)
        pairs = [self.pair(i, rank, c.samples, full) for i, rank in enumerate(c.mappings)]
        mixed = fuse_models(self.anchor(c.samples, full), [m for m, _ in pairs], engine_weights(c.weights),
                            self.x_build[:c.samples], settings, pairings=[p for _, p in pairs])
        state = {k: (mixed.state[k] if k in mixed.state else v).to(self.dtypes[k])
                 for k, v in self.target.state_dict.items()}
        result = FusionOutcome(state, mixing_rows(self.net, mixed.betas))
        self._fused[key] = result
        if len(self._fused) > CACHED_FUSIONS:
            self._fused.popitem(last=False)
        return result

    def release(self) -> None:
        """Drop every recording, pairing and fusion kept for the next candidate (before a last,
        larger build: what the candidates shared is not needed by it, and its memory is)."""
        self._anchors.clear()
        self._pairs.clear()
        self._fused.clear()
        self._teachers.clear()

    def parents(self) -> list[nn.Module]:
        if self._parents is None:
            self._parents = [m.family.calibration_module(m.family.instantiate(m.spec, m.state_dict))
                             for m in (self.target, *(s.member for s in self.sources))]
        return self._parents

    def teacher(self, samples: int) -> torch.Tensor:
        """The parents' ensemble logits on the first ``samples`` build inputs (the refit's target)."""
        if samples not in self._teachers:
            self._teachers[samples] = ensemble_teacher(self.parents(), self.x_build[:samples], self.reference)
        return self._teachers[samples]

    def __call__(self, c: Candidate) -> nn.Module:
        family = self.target.family
        module = family.calibration_module(family.instantiate(self.target.spec, self.outcome(c).state_dict))
        if c.refit:
            module = refit_head(module, self.x_build[:c.samples], self.teacher(c.samples), self.head)
        return module
