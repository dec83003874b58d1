"""The cross-layer alignment DP against brute force over every strictly increasing map."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clafuse.align.dp import solve_alignment
from clafuse.errors import ClafuseError

PINS = [(False, False), (True, False), (False, True), (True, True)]


def brute_force(cost: np.ndarray, pin_first: bool, pin_last: bool) -> tuple[list[tuple[int, ...]], float]:
    """All optimal maps (there may be ties) and the optimal cost, by enumeration."""
    n, m = cost.shape
    best, argbest = np.inf, []
    for phi in itertools.combinations(range(m), n):
        if pin_first and phi[0] != 0:
            continue
        if pin_last and phi[-1] != m - 1:
            continue
        total = float(cost[np.arange(n), phi].sum())
        if total < best - 1e-12:
            best, argbest = total, [phi]
        elif abs(total - best) <= 1e-12:
            argbest.append(phi)
    return argbest, best


def assert_valid_map(phi: list[int], n: int, m: int, pin_first: bool, pin_last: bool) -> None:
    assert isinstance(phi, list) and len(phi) == n
    assert all(isinstance(j, int) for j in phi)
    assert all(0 <= j < m for j in phi)
    assert all(a < b for a, b in zip(phi, phi[1:])), f"{phi} is not strictly increasing"
    if pin_first:
        assert phi[0] == 0
    if pin_last:
        assert phi[-1] == m - 1


def _shapes() -> list[tuple[int, int]]:
    return [(n, m) for n in range(1, 6) for m in range(n, 9)]


@pytest.mark.parametrize("pin_first,pin_last", PINS)
def test_matches_brute_force_on_random_costs(pin_first: bool, pin_last: bool) -> None:
    rng = np.random.default_rng(1234 + 2 * pin_first + pin_last)
    checked = 0
    for n, m in _shapes():
        if n == 1 and m > 1 and pin_first and pin_last:
            continue  # infeasible, tested below
        for trial in range(6):
            # Mix of continuous costs (unique optimum), negative costs and small integers (ties).
            if trial % 3 == 0:
                cost = rng.random((n, m))
            elif trial % 3 == 1:
                cost = rng.normal(size=(n, m)) * 10
            else:
                cost = rng.integers(0, 3, size=(n, m)).astype(float)
            phi, total = solve_alignment(cost, pin_first=pin_first, pin_last=pin_last)
            optimal, best = brute_force(cost, pin_first, pin_last)
            assert_valid_map(phi, n, m, pin_first, pin_last)
            assert total == pytest.approx(best, abs=1e-9), (cost, phi)
            # The returned cost is the cost of the returned map, and the map is one of the optima.
            assert total == pytest.approx(float(cost[np.arange(n), phi].sum()), abs=1e-9)
            assert tuple(phi) in optimal
            if trial % 3 == 0:
                assert len(optimal) == 1 and tuple(phi) == optimal[0]
            checked += 1
    assert checked >= 130


def test_equal_depths_give_the_identity_map() -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 6):
        cost = rng.random((n, n)) * 100
        for pin_first, pin_last in PINS:
            phi, total = solve_alignment(cost, pin_first=pin_first, pin_last=pin_last)
            assert phi == list(range(n))
            assert total == pytest.approx(float(np.trace(cost)))


def test_pins_override_cheaper_choices() -> None:
    # Row 0 prefers column 2 and row 1 prefers column 1 by far; pins force the ends.
    cost = np.array([[9.0, 9.0, 0.0, 9.0], [9.0, 0.0, 9.0, 9.0]])
    phi, total = solve_alignment(cost, pin_first=False, pin_last=False)
    assert phi in ([0, 1], [2, 3]) and total == pytest.approx(9.0)
    phi, total = solve_alignment(cost, pin_first=True, pin_last=False)
    assert phi == [0, 1] and total == pytest.approx(9.0)
    phi, total = solve_alignment(cost, pin_first=False, pin_last=True)
    assert phi == [2, 3] and total == pytest.approx(9.0)
    phi, total = solve_alignment(cost, pin_first=True, pin_last=True)
    assert phi == [0, 3] and total == pytest.approx(18.0)


def test_single_layer_with_one_pin() -> None:
    cost = np.array([[5.0, 1.0, 3.0, 0.5, 2.0]])
    assert solve_alignment(cost, pin_first=False, pin_last=False) == ([3], 0.5)
    assert solve_alignment(cost, pin_first=True, pin_last=False) == ([0], 5.0)
    assert solve_alignment(cost, pin_first=False, pin_last=True) == ([4], 2.0)
    # One column: both pins hold trivially.
    assert solve_alignment(np.array([[7.0]]), pin_first=True, pin_last=True) == ([0], 7.0)


def test_accepts_lists_and_integer_costs() -> None:
    phi, total = solve_alignment([[1, 0, 1], [1, 1, 0]], pin_first=False, pin_last=False)
    assert phi == [1, 2] and total == 0.0
    assert isinstance(total, float)


@pytest.mark.parametrize("shape", [(3, 2), (5, 4), (2, 1)])
def test_more_shallow_than_deep_layers_is_an_error(shape: tuple[int, int]) -> None:
    with pytest.raises(ClafuseError, match="cannot align"):
        solve_alignment(np.zeros(shape), pin_first=False, pin_last=False)


def test_empty_cost_is_an_error() -> None:
    with pytest.raises(ClafuseError):
        solve_alignment(np.zeros((0, 3)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_costs_are_an_error(bad: float) -> None:
    cost = np.ones((2, 4))
    cost[1, 2] = bad
    with pytest.raises(ClafuseError, match="non-finite"):
        solve_alignment(cost, pin_first=False, pin_last=False)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_non_matrix_cost_is_an_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ClafuseError, match="2-D"):
        solve_alignment(np.zeros(shape))


@pytest.mark.parametrize("m", [2, 3, 8])
def test_single_layer_pinned_to_both_ends_is_impossible(m: int) -> None:
    with pytest.raises(ClafuseError, match="pinned"):
        solve_alignment(np.zeros((1, m)), pin_first=True, pin_last=True)
