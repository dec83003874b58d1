"""The k best order-preserving maps against brute-force enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clafuse.align.dp import k_best_alignments, k_best_combined, solve_alignment
from clafuse.errors import ClafuseError

PINS = [(False, False), (True, False), (False, True), (True, True)]


def all_maps(cost: np.ndarray, pin_first: bool, pin_last: bool) -> list[tuple[float, tuple[int, ...]]]:
    n, m = cost.shape
    out = []
    for phi in itertools.combinations(range(m), n):
        if (pin_first and phi[0] != 0) or (pin_last and phi[-1] != m - 1):
            continue
        out.append((float(cost[np.arange(n), phi].sum()), phi))
    return sorted(out)


@pytest.mark.parametrize("pin_first,pin_last", PINS)
def test_k_best_equals_brute_force(pin_first: bool, pin_last: bool) -> None:
    rng = np.random.default_rng(7 + 2 * pin_first + pin_last)
    checked = 0
    for n in range(1, 5):
        for m in range(n, 8):
            if n == 1 and m > 1 and pin_first and pin_last:
                continue
            for trial in range(4):
                cost = rng.random((n, m)) if trial % 2 == 0 else rng.integers(0, 3, size=(n, m)).astype(float)
                expected = all_maps(cost, pin_first, pin_last)
                for k in (1, 3, 10, 100):
                    got = k_best_alignments(cost, k, pin_first, pin_last)
                    assert len(got) == min(k, len(expected))
                    # Costs equal the brute force's k smallest, in order, and each is its map's cost.
                    assert [c for _, c in got] == pytest.approx([c for c, _ in expected[:k]], abs=1e-9)
                    for phi, c in got:
                        assert c == pytest.approx(float(cost[np.arange(n), phi].sum()), abs=1e-9)
                        assert all(a < b for a, b in zip(phi, phi[1:]))
                        assert not pin_first or phi[0] == 0
                        assert not pin_last or phi[-1] == m - 1
                    assert len({tuple(phi) for phi, _ in got}) == len(got), "maps repeat"
                    if trial % 2 == 0:  # continuous costs: no ties, the very same maps
                        assert [tuple(phi) for phi, _ in got] == [phi for _, phi in expected[:k]]
                    assert got[0][1] == pytest.approx(solve_alignment(cost, pin_first, pin_last)[1], abs=1e-12)
                checked += 1
    assert checked >= 60


def test_k_best_combined_equals_brute_force_over_groups() -> None:
    rng = np.random.default_rng(3)
    costs = [rng.random((2, 4)), rng.random((1, 3)), rng.random((3, 5))]
    per_group = [k_best_alignments(c, 1000, pin_first=False, pin_last=False) for c in costs]
    everything = sorted(sum(c for _, c in combo) for combo in itertools.product(*per_group))
    for k in (1, 4, 25):
        got = k_best_combined([g[:k] for g in per_group], k)
        assert [c for _, c in got] == pytest.approx(everything[:k])
        for maps, total in got:
            assert total == pytest.approx(sum(float(c[np.arange(len(p)), p].sum()) for c, p in zip(costs, maps)))


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_k_must_be_a_positive_integer(k) -> None:
    with pytest.raises(ClafuseError, match="positive integer"):
        k_best_alignments(np.zeros((2, 3)), k)


def test_k_best_keeps_the_dp_errors() -> None:
    with pytest.raises(ClafuseError, match="pinned"):
        k_best_alignments(np.zeros((1, 3)), 2, pin_first=True, pin_last=True)
    with pytest.raises(ClafuseError, match="cannot align"):
        k_best_alignments(np.zeros((3, 2)), 2)
