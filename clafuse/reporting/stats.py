"""Numbers behind a report: how each matched layer pair's neurons transport onto each other, and
how similar a fused network's layers are to each parent's.

The neuron transport is recomputed here the way ``fuse`` matches neurons from activations: a
correlation distance between the neurons' responses to the same inputs (conv channels by their
per-sample means) and the plan of :func:`clafuse.fusion.transport.transport_plan`. Layer
similarity is linear CKA (:func:`clafuse.align.costs.linear_cka`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clafuse import api
from clafuse.align.costs import linear_cka
from clafuse.align.mapfile import MapFile
from clafuse.api.models import map_model
from clafuse.fusion.transport import transport_plan
from clafuse.reporting.mapping import PairView, letter


@dataclass(frozen=True)
class PlanStats:
    """One matched layer pair's neuron transport from ``source`` (a model's layer) onto ``target``.

    ``sharpness`` is the share of each source neuron's mass that goes to its main partner, summed
    over the plan: 1 for a permutation (or any plan that sends each neuron wholly to one neuron),
    down to 1/n_target for a uniform smear. ``matched_cost`` is the plan's mean cost <T, C>;
    ``mean_cost`` that of pairing neurons at random, so their ratio says how much better than
    chance the matching is (0 = perfect, 1 = no better than random).
    """

    group: str
    source: str
    target: str
    n_source: int
    n_target: int
    sharpness: float
    nonzeros: int
    matched_cost: float
    mean_cost: float

    @property
    def cost_ratio(self) -> float:
        return self.matched_cost / self.mean_cost if self.mean_cost > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost_ratio": round(self.cost_ratio, 6)}


def plan_summary(cost: np.ndarray, plan: np.ndarray) -> dict[str, float]:
    """Sharpness, non-zero count, matched and mean cost of ``plan`` on ``cost`` (see :class:`PlanStats`)."""
    plan = np.asarray(plan, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    mass = float(plan.sum())
    return {
        "sharpness": float(plan.max(axis=1).sum() / mass) if mass > 0 else 0.0,
        "nonzeros": int(np.count_nonzero(plan > 1e-12 * max(mass, 1e-300))),
        "matched_cost": float((plan * cost).sum() / mass) if mass > 0 else 0.0,
        "mean_cost": float(cost.mean()) if cost.size else 0.0,
    }


def neuron_correlation_cost(h_source: torch.Tensor, h_target: torch.Tensor) -> np.ndarray:
    """(n_source, n_target) Euclidean distances between the neurons' z-scored responses over the
    samples (conv channels by their per-sample means): sqrt(2 - 2 corr), from 0 (perfectly
    correlated) to 2 (anti-correlated); uncorrelated neurons are sqrt(2) apart."""

    def standardised(h: torch.Tensor) -> torch.Tensor:
        f = (h.flatten(2).mean(-1) if h.dim() > 2 else h).double().T
        f = f - f.mean(1, keepdim=True)
        std = f.pow(2).mean(1, keepdim=True).sqrt()
        return torch.where(std > 1e-12, f / std.clamp_min(1e-12), torch.zeros_like(f))

    a, b = standardised(h_source), standardised(h_target)
    return (torch.cdist(a, b) / a.shape[1] ** 0.5).numpy()


def load_map_models(doc: MapFile, base: Path) -> list[api.LoadedModel]:
    """The map's checkpoints with the key handling and specs the map recorded, refusing any that
    changed since align."""
    return [map_model(entry, base, lazy=False) for entry in doc.models]


def _flat_offsets(view: PairView) -> tuple[list[int], list[int]]:
    deep, shallow, d, s = [], [], 0, 0
    for g in view.groups:
        deep.append(d)
        shallow.append(s)
        d += len(g.deep_layers)
        s += len(g.shallow_layers)
    return deep, shallow


def transport_statistics(views: list[PairView], outputs: list[list[torch.Tensor]], target: int,
                         solver: str = "emd", reg: float = 0.05) -> list[list[PlanStats]]:
    """Per alignment, per matched layer pair: the transport from the non-target model's layer onto
    the target's (the shallower onto the deeper when the target is in neither). ``outputs`` holds
    every model's alignable-layer activations on the same inputs, in group order."""
    result = []
    for view in views:
        deep_off, shallow_off = _flat_offsets(view)
        onto_shallow = view.shallow == target
        rows = []
        for g, do, so in zip(view.groups, deep_off, shallow_off):
            for i, j in enumerate(g.mapping):
                h_deep, h_shallow = outputs[view.deep][do + j], outputs[view.shallow][so + i]
                deep_name = f"{view.deep_letter}.{g.deep_layers[j]}"
                shallow_name = f"{view.shallow_letter}.{g.shallow_layers[i]}"
                (src, h_src), (tgt, h_tgt) = ((deep_name, h_deep), (shallow_name, h_shallow)) if onto_shallow \
                    else ((shallow_name, h_shallow), (deep_name, h_deep))
                cost = neuron_correlation_cost(h_src, h_tgt)
                plan = transport_plan(cost, solver=solver, reg=reg)
                rows.append(PlanStats(group=g.name, source=src, target=tgt, n_source=cost.shape[0],
                                      n_target=cost.shape[1], **plan_summary(cost, plan)))
        result.append(rows)
    return result


def _counterparts(view: PairView, target: int) -> list[tuple[int, str]]:
    """Per hidden layer of ``target`` (flat order): the flat index of the other model's layer that
    computes the same point of the network, and how it got there (``B.fc2``, or ``identity
    (B.fc1)`` where an identity passes on the previous real layer; index -1 before any)."""
    deep_off, shallow_off = _flat_offsets(view)
    out: list[tuple[int, str]] = []
    if target == view.shallow:
        for g, do in zip(view.groups, deep_off):
            out += [(do + j, f"{view.deep_letter}.{g.deep_layers[j]}") for j in g.mapping]
        return out
    last = (-1, "input")
    for g, so in zip(view.groups, shallow_off):
        by_deep = {j: i for i, j in enumerate(g.mapping)}
        for j in range(len(g.deep_layers)):
            if j in by_deep:
                last = (so + by_deep[j], f"{view.shallow_letter}.{g.shallow_layers[by_deep[j]]}")
                out.append(last)
            else:
                out.append((last[0], f"identity (passes on {last[1]})"))
    return out


def fused_similarity(views: list[PairView], outputs: list[list[torch.Tensor]], fused: list[torch.Tensor],
                     target: int, layer_names: list[str]) -> list[dict[str, Any]]:
    """Per hidden layer of the fused network (the target's architecture): linear CKA between its
    activations and each parent's at the same point of the network (the target's own layer; the
    matched layer of another model, or the real layer an inserted identity passes on)."""
    rows = [{"layer": name, "similarity": {letter(target): round(linear_cka(h, outputs[target][k]), 6)},
             "counterpart": {letter(target): f"{letter(target)}.{name}"}}
            for k, (name, h) in enumerate(zip(layer_names, fused))]
    for view in views:
        other = view.shallow if view.deep == target else view.deep if view.shallow == target else None
        if other is None:
            continue
        for row, h, (index, how) in zip(rows, fused, _counterparts(view, target)):
            row["similarity"][letter(other)] = round(linear_cka(h, outputs[other][index]), 6) if index >= 0 else None
            row["counterpart"][letter(other)] = how
    return rows
