"""Order-preserving unbalanced assignment of the shallow net's layers to the deep net's layers.

A plain function in the style of POT's solvers: a cost matrix in, the optimal map out.
"""

from __future__ import annotations

import numpy as np

from clafuse.errors import ClafuseError


def solve_alignment(cost: np.ndarray, pin_first: bool = True, pin_last: bool = True) -> tuple[list[int], float]:
    """Strictly increasing map phi from rows (shallow layers, n) to columns (deep layers, m >= n)
    minimising sum_i cost[i, phi(i)], by dynamic programming in O(n*m).

    ``pin_first`` forces phi(0) = 0 and ``pin_last`` forces phi(n-1) = m-1 (the paper's setting).
    Returns (phi as 0-based column indices, total cost).
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ClafuseError(f"cost matrix must be 2-D, got shape {cost.shape}")
    n, m = cost.shape
    if n == 0 or n > m:
        raise ClafuseError(f"cannot align {n} layers into {m}: need 1 <= n <= m")
    if not np.all(np.isfinite(cost)):
        raise ClafuseError("cost matrix has non-finite entries")
    if n == 1 and pin_first and pin_last and m > 1:
        raise ClafuseError("a single layer cannot be pinned to both the first and the last deep layer")
    allowed = np.ones((n, m), dtype=bool)
    if pin_first:
        allowed[0, 1:] = False
    if pin_last:
        allowed[n - 1, : m - 1] = False
    c = np.where(allowed, cost, np.inf)
    # F[i, j]: best cost of mapping the first i rows into the first j columns.
    F = np.full((n + 1, m + 1), np.inf)
    F[0, :] = 0.0
    take = np.zeros((n + 1, m + 1), dtype=bool)
    for i in range(1, n + 1):
        for j in range(i, m + 1):
            skip = F[i, j - 1]
            use = F[i - 1, j - 1] + c[i - 1, j - 1]
            if use <= skip:
                F[i, j], take[i, j] = use, True
            else:
                F[i, j] = skip
    if not np.isfinite(F[n, m]):
        raise ClafuseError("no order-preserving alignment satisfies the pins")
    phi = [0] * n
    i, j = n, m
    while i > 0:
        if take[i, j]:
            phi[i - 1] = j - 1
            i -= 1
        j -= 1
    return phi, float(F[n, m])


def k_best_alignments(cost: np.ndarray, k: int, pin_first: bool = True,
                      pin_last: bool = True) -> list[tuple[list[int], float]]:
    """The ``k`` cheapest strictly increasing maps (fewer if fewer exist), cheapest first, with the
    same pins as :func:`solve_alignment`; the first one costs what its optimum costs.

    The DP of :func:`solve_alignment` keeps, per cell, the ``k`` best partial maps instead of one:
    a cell's list is the merge of "skip column j" and "map row i to column j" lists, truncated to
    ``k``, which is exact because the k best of a union come from the k best of each part.
    O(n*m*k*n) time. Ties are ordered by the map itself (lexicographically), so the order is
    deterministic.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ClafuseError(f"k must be a positive integer, got {k!r}")
    solve_alignment(cost, pin_first, pin_last)  # the same validation and feasibility errors
    c = np.asarray(cost, dtype=np.float64)
    n, m = c.shape
    allowed = np.ones((n, m), dtype=bool)
    if pin_first:
        allowed[0, 1:] = False
    if pin_last:
        allowed[n - 1, : m - 1] = False
    # best[i][j]: the k best (cost, map) of the first i rows into the first j columns, sorted.
    empty: list[tuple[float, tuple[int, ...]]] = []
    best = [[[(0.0, ())] if i == 0 else empty for _ in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(i, m + 1):
            skip = best[i][j - 1]
            use = [(total + c[i - 1, j - 1], phi + (j - 1,)) for total, phi in best[i - 1][j - 1]] \
                if allowed[i - 1, j - 1] else []
            best[i][j] = sorted(skip + use)[:k]
    return [(list(phi), float(total)) for total, phi in best[n][m]]


def k_best_combined(per_group: list[list[tuple[list[int], float]]], k: int) -> list[tuple[list[list[int]], float]]:
    """The ``k`` cheapest combinations of one map per group (costs add), cheapest first, from each
    group's k best maps (:func:`k_best_alignments`). Exact for the same reason: the k best sums
    only use each group's k best."""
    combined: list[tuple[float, list[list[int]]]] = [(0.0, [])]
    for options in per_group:
        merged = [(total + cost, maps + [phi]) for total, maps in combined for phi, cost in options]
        combined = sorted(merged, key=lambda t: (t[0], t[1]))[:k]
    return [(maps, float(total)) for total, maps in combined]
