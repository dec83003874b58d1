"""Alternative layer mappings for a search, from the cost matrices a map file already holds.

``align`` stores each group's shallow x deep cost matrix, so the k best mappings need no new
activations: the DP is run again keeping its k best (:func:`clafuse.align.dp.k_best_alignments`)
with the pins the alignment used, and the groups' lists combined into the k cheapest whole-network
mappings. The map's own mapping comes first, so rank 0 is always what ``fuse`` uses without search.
"""

from __future__ import annotations

from typing import Sequence

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


def mapping_alternatives(alignment: Alignment, k: int, pin_first: bool, pin_last: bool,
                         forced_first: Sequence[bool | None]) -> list[list[list[int]]]:
    """Up to ``k`` whole-network mappings (each a per-group list) for one aligned pair, cheapest
    first after the map's own. ``forced_first``: per group, the deeper model's
    :attr:`~clafuse.arch.base.Group.pin_first`."""
    per_group = []
    for group, forced in zip(alignment.groups, forced_first):
        cost = np.asarray(group.cost, dtype=np.float64)
        first, last = group_pins(pin_first, pin_last, forced, cost.shape[0], cost.shape[1])
        per_group.append(k_best_alignments(cost, k, first, last))
    own = [list(g.mapping) for g in alignment.groups]
    others = [maps for maps, _ in k_best_combined(per_group, k) if maps != own]
    return [own, *others][:k]
