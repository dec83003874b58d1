"""An alignment map in words: which layer maps to which, and which layers balancing inserts or drops.

Models are named by letter (A, B, ... in align order) and layers by their checkpoint names, so
``B.fc3 -> A.fc5; A.fc3-4 identity`` reads: B's layer fc3 is matched with A's fc5, and at A's fc3
and fc4 the shallower B gets identity layers. Seen from the fusion target (the map's anchor unless
told otherwise): a shallower model gets identities where the target has unmatched layers (add), a
deeper model's unmatched layers are folded into the next kept layer (merge).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from clafuse.align.mapfile import Alignment, MapFile
from clafuse.api import model_letter as letter

ARROW = "->"
Fate = Literal["identity", "folded", "unmatched"]
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


@dataclass(frozen=True)
class GroupView:
    """One alignment group: layer names of both models, the mapping and its costs."""

    name: str
    deep_layers: list[str]
    shallow_layers: list[str]
    mapping: list[int]
    cost: list[list[float]]
    total_cost: float

    def unmatched_runs(self) -> list[list[int]]:
        """Runs of consecutive deep-layer indices that no shallow layer maps to."""
        runs: list[list[int]] = []
        matched = set(self.mapping)
        for j in range(len(self.deep_layers)):
            if j in matched:
                continue
            if runs and runs[-1][-1] == j - 1:
                runs[-1].append(j)
            else:
                runs.append([j])
        return runs


@dataclass(frozen=True)
class PairView:
    """One alignment (shallow model into deep model) seen from the fusion target."""

    deep: int
    shallow: int
    fate: Fate
    groups: list[GroupView]

    @property
    def deep_letter(self) -> str:
        return letter(self.deep)

    @property
    def shallow_letter(self) -> str:
        return letter(self.shallow)

    @property
    def title(self) -> str:
        return f"{self.shallow_letter} into {self.deep_letter}"


def pair_views(doc: MapFile, target: int | None = None) -> list[PairView]:
    """Every alignment of ``doc`` seen from ``target`` (default: the map's anchor)."""
    target = doc.anchor if target is None else target
    return [_view(doc, a, target) for a in doc.alignments]


def _view(doc: MapFile, a: Alignment, target: int) -> PairView:
    fate: Fate = "identity" if target == a.deep else "folded" if target == a.shallow else "unmatched"
    groups = [
        GroupView(name=g.name, deep_layers=[l.name for l in gd.layers], shallow_layers=[l.name for l in gs.layers],
                  mapping=list(g.mapping), cost=g.cost, total_cost=g.total_cost)
        for g, gd, gs in zip(a.groups, doc.models[a.deep].groups, doc.models[a.shallow].groups)
    ]
    return PairView(deep=a.deep, shallow=a.shallow, fate=fate, groups=groups)


def layer_span(model: str, names: list[str]) -> str:
    """``A.fc3`` for one layer; ``A.fc3-4`` for names that count up by one under a common stem;
    otherwise the names listed (``A.features.3, A.features.7``), so a span never hides a layer."""
    if len(names) == 1:
        return f"{model}.{names[0]}"
    parts = [_NUMBERED.match(n) for n in names]
    if all(parts) and len({p.group(1) for p in parts}) == 1:
        numbers = [int(p.group(2)) for p in parts]
        if all(b == a + 1 for a, b in zip(numbers, numbers[1:])):
            return f"{model}.{names[0]}-{numbers[-1]}"
    return ", ".join(f"{model}.{n}" for n in names)


def group_phrases(view: PairView, group: GroupView) -> list[str]:
    """The group's mapping as phrases in the deep model's layer order: ``B.fc2 -> A.fc4`` per
    matched pair and ``A.fc2-3 identity`` (or ``folded``/``unmatched``) per run of unmatched layers."""
    d, s = view.deep_letter, view.shallow_letter
    by_deep = {j: i for i, j in enumerate(group.mapping)}
    runs = {run[0]: run for run in group.unmatched_runs()}
    phrases = []
    j = 0
    while j < len(group.deep_layers):
        if j in by_deep:
            phrases.append(f"{s}.{group.shallow_layers[by_deep[j]]} {ARROW} {d}.{group.deep_layers[j]}")
            j += 1
        else:
            run = runs[j]
            phrases.append(f"{layer_span(d, [group.deep_layers[k] for k in run])} {view.fate}")
            j = run[-1] + 1
    return phrases


def mapping_words(view: PairView, group: GroupView) -> str:
    """The group's mapping as one line, phrases separated by ``; ``."""
    return "; ".join(group_phrases(view, group))


def balance_changes(view: PairView) -> list[str]:
    """Sentences naming every layer that balancing inserts (identities into the shallower model)
    or drops (the deeper model's unmatched layers, folded into the next kept layer)."""
    d, s = view.deep_letter, view.shallow_letter
    flat = [(g.name, name) for g in view.groups for name in g.deep_layers]
    kept: set[int] = set()
    offset = 0
    for g in view.groups:
        kept |= {offset + j for j in g.mapping}
        offset += len(g.deep_layers)
    sentences = []
    offset = 0
    for g in view.groups:
        for run in g.unmatched_runs():
            span = layer_span(d, [g.deep_layers[k] for k in run])
            if view.fate == "identity":
                count = "an identity layer" if len(run) == 1 else f"{len(run)} identity layers"
                sentences.append(f"{count} inserted into {s} at {span} (group {g.name})")
            elif view.fate == "folded":
                after = next((k for k in range(offset + run[-1] + 1, len(flat)) if k in kept), None)
                into = f"{d}.{flat[after][1]}" if after is not None else "the classifier"
                sentences.append(f"{span} dropped from {d}: folded into {into} (group {g.name})")
            else:
                sentences.append(f"{span} unmatched by {s} (group {g.name})")
        offset += len(g.deep_layers)
    return sentences


def target_layer_notes(doc: MapFile, target: int, used: Mapping[str, list[list[int]]] | None = None,
                       carried: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """Per hidden layer of ``target`` (all groups, network order), what every other model puts
    there: ``B.fc2`` (its matched layer), ``identity in B`` (inserted), ``B's logits carried``
    (a layer balancing made carry them), with ``B.fc3 folded in`` for a deeper model's layers
    merged into it. ``used``: per model letter, the mapping the fusion used where it is not the
    map's (``--mapping``, a search); ``carried``: per letter, the target layers carrying logits."""
    sizes = [len(g.layers) for g in doc.models[target].groups]
    names = [layer.name for g in doc.models[target].groups for layer in g.layers]
    notes: list[list[str]] = [[] for _ in range(sum(sizes))]
    for view in pair_views(doc, target):
        if view.fate == "unmatched":
            continue
        other = view.shallow_letter if view.fate == "identity" else view.deep_letter
        mappings = (used or {}).get(other) or [g.mapping for g in view.groups]
        carriers = set((carried or {}).get(other, ()))
        offset = 0
        folded: list[str] = []
        for g, size, mapping in zip(view.groups, sizes, mappings):
            if view.fate == "identity":
                by_deep = {j: i for i, j in enumerate(mapping)}
                for j in range(size):
                    notes[offset + j].append(f"{other}.{g.shallow_layers[by_deep[j]]}" if j in by_deep
                                             else f"{other}'s logits carried" if names[offset + j] in carriers
                                             else f"identity in {other}")
            else:
                kept = set(mapping)
                position = 0
                for j, name in enumerate(g.deep_layers):
                    if j not in kept:
                        folded.append(f"{other}.{name}")
                        continue
                    note = f"{other}.{name}"
                    if folded:
                        note += f" ({', '.join(folded)} folded in)"
                        folded = []
                    notes[offset + position].append(note)
                    position += 1
            offset += size
    return ["; ".join(n) for n in notes]
