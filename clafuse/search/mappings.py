"""Alternative layer mappings for a search, from the cost matrices a map file already holds.

``align`` stores each group's shallow x deep cost matrix, so the k best mappings need no new
activations: the DP is run again keeping its k best (:func:`clafuse.align.dp.k_best_alignments`)
with the pins the alignment used, and the groups' lists combined into the k cheapest whole-network
mappings. The map's own mapping comes first, so rank 0 is what ``fuse`` uses without search, except
where a mapping lets the deeper model's last layers carry the shallower one's logits: the search
starts from that one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from clafuse.align.dp import k_best_alignments, k_best_combined
from clafuse.align.mapfile import Alignment


def group_pins(pin_first: bool, pin_last: bool, forced_first: bool | None, shallow: int,
               deep: int) -> tuple[bool, bool]:
    """The pins one group's DP runs with: a forced first pin (a stage's strided block) wins;
    otherwise a single shallow layer cannot be pinned to both ends and keeps the last pin."""
    if forced_first:
        return True, pin_last and shallow > 1
    return pin_first and not (shallow == 1 and pin_last and deep > 1), pin_last


RELEASED = 64
"""How many of the cheapest mappings without the last pin are looked through for one that keeps
the shallower model whole (the DP is cheap; the check is on descriptions)."""


def mapping_alternatives(alignment: Alignment, k: int, pin_first: bool, pin_last: bool,
                         forced_first: Sequence[bool | None],
                         carried: Callable[[list[list[int]]], bool] | None = None) -> list[list[list[int]]]:
    """Up to ``k`` whole-network mappings (each a per-group list) for one aligned pair, cheapest
    first after the map's own. ``forced_first``: per group, the deeper model's
    :attr:`~clafuse.arch.base.Group.pin_first`. ``carried`` (for a shallower source) says whether a
    mapping keeps all of the shallower model, its logits carried by the deeper model's last layers;
    the cheapest such mapping, found with the last pin released, goes first (:func:`with_carried`)."""
    def k_best(last_pin: bool, count: int) -> list[list[list[int]]]:
        per_group = []
        for group, forced in zip(alignment.groups, forced_first):
            cost = np.asarray(group.cost, dtype=np.float64)
            first, last = group_pins(pin_first, last_pin, forced, cost.shape[0], cost.shape[1])
            per_group.append(k_best_alignments(cost, count, first, last))
        return [maps for maps, _ in k_best_combined(per_group, count)]

    own = [list(g.mapping) for g in alignment.groups]
    maps = [own, *(m for m in k_best(pin_last, k) if m != own)][:k]
    if carried is None:
        return maps
    return with_carried(maps, k_best(False, RELEASED), carried)[:k]


def with_carried(maps: list[list[list[int]]], released: Sequence[list[list[int]]],
                 carried: Callable[[list[list[int]]], bool]) -> list[list[list[int]]]:
    """``maps`` with the first of ``released`` (mappings found without the last pin, cheapest
    first) that ``carried`` accepts put in front, where the search starts. Balancing then makes
    the deeper model's narrower last layers carry the shallower model's logits exactly, where the
    pinned mapping moves its last hidden layer into those narrower units with loss (measured on
    the MNIST pairs in the deeper architecture: 2 of 3 above the better parent against 0 of 3)."""
    found = next((m for m in released if carried(m)), None)
    if found is None:
        return maps
    return [found, *(m for m in maps if m != found)]
