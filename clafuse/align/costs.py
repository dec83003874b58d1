"""Costs between every layer of the shallow net and every layer of the deep net.

Activation-based metrics compare the layers' responses to the same calibration inputs, so they
work across widths; ``neuron`` compares widths and relative depths and needs no data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from clafuse.options import Metric, choices

METRICS = choices(Metric)


def _features(z: torch.Tensor) -> torch.Tensor:
    """(N, width) float64 view of a layer's activations; conv maps are averaged over space."""
    if z.dim() > 2:
        z = z.flatten(2).mean(-1)
    return z.double()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two activation matrices over the same N samples (any widths), in [0, 1]."""
    x = _features(x)
    y = _features(y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def _neuron_distribution(z: torch.Tensor) -> torch.Tensor:
    """Each neuron as a point: its activation vector over the samples, scaled to unit RMS."""
    z = _features(z).T
    return z / z.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)


def _euclidean(shallow: list[torch.Tensor], deep: list[torch.Tensor]) -> np.ndarray:
    """Distance between the centroids of the two layers' neuron distributions."""
    cs = [_neuron_distribution(z).mean(0) for z in shallow]
    cd = [_neuron_distribution(z).mean(0) for z in deep]
    return np.array([[float(torch.linalg.vector_norm(a - b)) / len(a) ** 0.5 for b in cd] for a in cs])


def _wd(shallow: list[torch.Tensor], deep: list[torch.Tensor]) -> np.ndarray:
    """Exact optimal-transport distance between the two layers' neuron distributions."""
    from clafuse.fusion.transport import ot_distance

    ps = [_neuron_distribution(z) for z in shallow]
    pd = [_neuron_distribution(z) for z in deep]
    return np.array([[ot_distance(a, b) for b in pd] for a in ps])


def _cka(shallow: list[torch.Tensor], deep: list[torch.Tensor]) -> np.ndarray:
    return np.array([[1.0 - linear_cka(a, b) for b in deep] for a in shallow])


ACTIVATION_METRICS: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], np.ndarray]] = {
    "cka": _cka,
    "euclidean": _euclidean,
    "wd": _wd,
}


def activation_cost(shallow: list[torch.Tensor], deep: list[torch.Tensor], metric: str) -> np.ndarray:
    """(n, m) cost between the shallow net's n layers and the deep net's m layers from activations."""
    return ACTIVATION_METRICS[metric](shallow, deep)


def neuron_cost(shallow_widths: list[int], deep_widths: list[int]) -> np.ndarray:
    """Data-free cost: the squared difference of the layers' widths, plus half the squared
    difference of their relative depths in the group (0 for its first layer, 1 for its last).
    Widths decide wherever they differ (a width difference costs at least 1, depth at most 0.5);
    between layers of equal width (a VGG chunk) the layers map in proportion to their depth
    rather than by an arbitrary tie."""
    s = np.asarray(shallow_widths, dtype=np.float64)[:, None]
    d = np.asarray(deep_widths, dtype=np.float64)[None, :]

    def depth(n: int) -> np.ndarray:
        return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)

    return (s - d) ** 2 + 0.5 * (depth(len(shallow_widths))[:, None] - depth(len(deep_widths))[None, :]) ** 2
