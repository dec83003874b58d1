"""Fusion settings, and layer-wise OT fusion (OTFusion) of layer chains of equal depth.

:func:`fuse_chains` and :func:`correct` take :class:`~clafuse.arch.base.Chain` objects (as the
chain families' ``to_chain`` makes them) and run the one engine on their description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from clafuse.arch.base import Chain, chain_of, describe_chain
from clafuse.errors import ClafuseError
from clafuse.fusion.corrections import correct as correct_network
from clafuse.fusion.engine import Model, fuse_models, mixing_rows
from clafuse.options import (MIN_REG, Correction, Ground, Inserted, Signal, Solver, check_choice, check_number,
                             choices)

SIGNALS = choices(Signal)
GROUNDS = choices(Ground)
INSERTED_MODES = choices(Inserted)
CORRECTIONS = choices(Correction)


@dataclass(frozen=True)
class FusionSettings:
    """How neurons are matched and layers combined.

    ``ground`` is the neuron-to-neuron cost for the activation signal: ``correlation`` compares
    z-scored post-ReLU activations, ``euclidean`` raw ones. ``inserted="keep"`` takes a layer that
    only some models really have from those models (averaging a real layer with an inserted
    identity would halve it); ``average`` averages over all models with the given weights; None
    lets the engine choose (``keep`` for BatchNorm networks and residual blocks, ``average`` for
    MLPs).
    ``correction`` (needs calibration inputs) undoes what averaging does to the activations:
    ``regress`` refits each fused layer by ridge least squares so that, fed the fused network's
    own activations, it reproduces the weighted average of the parents' aligned pre-activations
    (layers with BatchNorm fall back to ``repair``; a post-LN transformer's writers are refit
    through their LayerNorm, whose outputs are then repaired); ``repair`` only restores each
    neuron's mean and std; None lets the architecture's description choose. ``bn_reset`` recomputes BatchNorm running statistics of the fused network on the
    calibration inputs (the averaged parents' statistics do not describe the fused network).
    ``reg`` (Sinkhorn, relative to the largest cost) must exceed ``MIN_REG``; ``ridge`` (``regress``'s
    ridge term, relative to the mean input energy; None: the architecture's description chooses)
    is positive.
    Bad values raise ClafuseError.
    """

    solver: Solver = "emd"
    reg: float = 0.05
    signal: Signal = "activations"
    ground: Ground = "correlation"
    inserted: Inserted | None = None
    correction: Correction | None = None
    ridge: float | None = None
    bn_reset: bool = True

    def __post_init__(self) -> None:
        check_choice("--solver", self.solver, Solver)
        check_number("--reg", self.reg, above=MIN_REG)
        check_choice("--signal", self.signal, Signal)
        check_choice("--ground", self.ground, Ground)
        if self.inserted is not None:
            check_choice("--inserted", self.inserted, Inserted)
        if self.correction is not None:
            check_choice("--correction", self.correction, Correction)
        if self.ridge is not None:
            check_number("ridge", self.ridge, above=0.0)
        if not isinstance(self.bn_reset, bool):
            raise ClafuseError(f"bn_reset must be True or False, got {self.bn_reset!r}")


@dataclass
class FusionResult:
    chain: Chain
    plans: list[list[np.ndarray]]
    mixing: list[list[float]]


def _loaded(chain: Chain, load: Callable[[Any], Any]) -> Chain:
    layers = [layer.with_(weight=load(layer.weight), bias=load(layer.bias),
                          bn=load(layer.bn) if layer.bn is not None else None) for layer in chain.layers]
    return Chain(layers[:-1], layers[-1], chain.flatten_input)


def fuse_chains(anchor: Chain, sources: list[Chain], weights: list[float], x: torch.Tensor | None,
                settings: FusionSettings = FusionSettings(), load: Callable[[Any], Any] | None = None,
                keep_plans: bool = True) -> FusionResult:
    """Fuse ``sources`` into ``anchor``'s architecture. ``weights`` has one entry per model, the
    anchor's first; all chains must already have the anchor's depth (layers marked ``inserted``
    are identities from balancing). ``load`` turns shape-only stand-ins into real tensors."""
    if len(weights) != len(sources) + 1:
        raise ValueError("one mixing weight per model is needed")
    if any(len(source.hidden) != len(anchor.hidden) for source in sources):
        raise ValueError("chains must have equal depth; balance them first")
    if load is not None:
        anchor, sources = _loaded(anchor, load), [_loaded(source, load) for source in sources]
    net, state = describe_chain(anchor)
    models = [Model(*describe_chain(source)) for source in sources]
    mixed = fuse_models(Model(net, state), models, weights, x, settings)
    hidden = [b.spaces["out"].name for b in net.blocks if b.alignable]
    plans = [[p.plan(name) for name in hidden] for p in mixed.pairings] if keep_plans else [[] for _ in sources]
    return FusionResult(chain_of(net, mixed.state, anchor.flatten_input), plans, mixing_rows(net, mixed.betas))


@torch.no_grad()
def correct(fused: Chain, targets: list[torch.Tensor], x: torch.Tensor, method: str, ridge: float = 1e-3) -> Chain:
    """Correct every layer of ``fused`` in order, each seeing the corrected earlier ones, towards
    ``targets`` (per layer, incl. the last one: the mixed pre-activations of the parents)."""
    net, state = describe_chain(fused)
    layers = [i for i, b in enumerate(net.blocks) if "op" in b.attrs]
    by_site = {(b, "out"): target for b, target in zip(layers, targets)}
    state = correct_network(net, {k: v.float() for k, v in state.items()}, x, by_site, method, ridge)
    return chain_of(net, state, fused.flatten_input)
