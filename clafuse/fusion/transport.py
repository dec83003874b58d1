"""Optimal-transport plans between two layers' neurons, as plain functions over POT's solvers."""

from __future__ import annotations

import logging
import sys
import warnings
from types import ModuleType

import numpy as np
import torch

SOLVERS = ("emd", "sinkhorn")
log = logging.getLogger("clafuse")
_ot: ModuleType | None = None


def _pot() -> ModuleType:
    """Import POT once. POT imports scikit-learn's clustering eagerly for solvers clafuse never
    uses, which costs about a second of start-up; it is kept out of that import."""
    global _ot
    if _ot is None:
        blocked = "sklearn.cluster" not in sys.modules
        if blocked:
            sys.modules["sklearn.cluster"] = None  # type: ignore[assignment]
        try:
            import ot
        finally:
            if blocked:
                del sys.modules["sklearn.cluster"]
        _ot = ot
    return _ot


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def transport_plan(cost: np.ndarray | torch.Tensor, solver: str = "emd", reg: float = 0.05) -> np.ndarray:
    """Plan T (n_src x n_tgt) minimising <T, cost> with uniform marginals on both sides.

    ``emd`` is exact (a permutation scaled by 1/n when the sizes are equal); ``sinkhorn`` is the
    entropic plan, with ``reg`` relative to the largest cost so that it means the same at any scale.
    """
    ot = _pot()
    m = cost.detach().double().cpu().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, np.float64)
    a, b = uniform(m.shape[0]), uniform(m.shape[1])
    if solver == "emd":
        return ot.emd(a, b, m, numItermax=10_000_000)
    if solver == "sinkhorn":
        scale = float(m.max()) if m.size and m.max() > 0 else 1.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = ot.sinkhorn(a, b, m / scale, reg, method="sinkhorn_log", numItermax=100_000, stopThr=1e-9)
        if any("converge" in str(w.message) for w in caught):
            log.warning("sinkhorn did not converge at reg %g; a larger --reg converges faster", reg)
        return plan
    raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")


def ot_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between the uniform point clouds ``x`` (n, d) and ``y`` (m, d)."""
    ot = _pot()
    m = torch.cdist(x.double(), y.double()).pow(2).numpy()
    return float(np.sqrt(max(ot.emd2(uniform(len(x)), uniform(len(y)), m, numItermax=10_000_000), 0.0)))
