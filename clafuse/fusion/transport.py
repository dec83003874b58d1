"""Optimal-transport plans between two layers' neurons, as plain functions over POT's solvers."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import torch

SOLVERS = ("emd", "sinkhorn")
log = logging.getLogger("clafuse")
_ot: ModuleType | None = None
_pot_lock = threading.Lock()


_OPTIONAL_FOR_POT = ("sklearn.cluster", "networkx")


class _DeferredModule(ModuleType):
    """Stands in for a module until one of its attributes is used, then loads the real one.

    Used for ``ot.datasets``: toy-data generators that import all of scipy.stats (half a second)
    and that clafuse never calls; anyone who does use them gets the real module transparently.
    """

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.__spec__ = importlib.util.spec_from_file_location(name, path)
        self.__file__ = path

    def __getattr__(self, attr: str) -> object:
        real = importlib.util.module_from_spec(self.__spec__)
        sys.modules[self.__name__] = real
        self.__spec__.loader.exec_module(real)
        parent, _, child = self.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, real)
        self.__dict__.update(real.__dict__)
        return getattr(real, attr)


def _defer(name: str) -> None:
    parent, _, child = name.rpartition(".")
    spec = importlib.util.find_spec(parent)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / f"{child}.py" if locations else None
    if name not in sys.modules and path is not None and path.is_file():
        sys.modules[name] = _DeferredModule(name, str(path))


def _pot() -> ModuleType:
    """Import POT once, keeping off the start-up path what clafuse never uses (about 0.7 s of
    every ``fuse``): scikit-learn's clustering and networkx, which POT imports only when installed
    and falls back cleanly without (low-rank and quantized Gromov solvers), and ``ot.datasets``,
    which is deferred until first use."""
    global _ot
    with _pot_lock:
        if _ot is not None:
            return _ot
        blocked = [name for name in _OPTIONAL_FOR_POT if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]
        try:
            _defer("ot.datasets")
            import ot
        finally:
            for name in blocked:
                del sys.modules[name]
        _ot = ot
        return _ot


def _linear_sum_assignment() -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """SciPy's assignment solver, loaded from its own extension module: importing
    ``scipy.optimize`` for it would pull in all of SciPy's optimizers (35 MB of memory in every
    ``fuse``). Falls back to the public import if the module is not where SciPy keeps it."""
    global _lsa
    if _lsa is None:
        try:
            base = Path(importlib.util.find_spec("scipy").submodule_search_locations[0]) / "optimize"
            path = next(base / f"_lsap{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                        if (base / f"_lsap{suffix}").is_file())
            spec = importlib.util.spec_from_file_location("scipy.optimize._lsap", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _lsa = module.linear_sum_assignment
        except (ImportError, StopIteration, AttributeError, OSError, TypeError):
            from scipy.optimize import linear_sum_assignment

            _lsa = linear_sum_assignment
    return _lsa


_lsa = None


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def transport_plan(cost: np.ndarray | torch.Tensor, solver: str = "emd", reg: float = 0.05,
                   sparse: bool = False) -> np.ndarray:
    """Plan T (n_src x n_tgt) minimising <T, cost> with uniform marginals on both sides.

    ``emd`` is exact (a permutation scaled by 1/n when the sizes are equal); ``sinkhorn`` is the
    entropic plan, with ``reg`` relative to the largest cost so that it means the same at any scale.
    With ``sparse``, an ``emd`` plan comes as a ``scipy.sparse.csr_array``: an exact plan has at most
    n_src + n_tgt - 1 non-zeros, so it costs a vector's memory instead of a matrix's.
    """
    m = cost.detach().double().cpu().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, np.float64)
    del cost
    n_src, n_tgt = m.shape
    if solver == "emd":
        if n_src == n_tgt and m.size:
            # Equal sizes and uniform marginals: some optimal plan is a permutation (Birkhoff), and
            # the assignment solver finds one several times faster than network simplex.
            rows, cols = _linear_sum_assignment()(m)
            del m
            if sparse:
                return sparse_plan(np.full(n_src, 1.0 / n_src), rows, cols, (n_src, n_tgt))
            plan = np.zeros((n_src, n_tgt))
            plan[rows, cols] = 1.0 / n_src
            return plan
        plan = _pot().emd(uniform(n_src), uniform(n_tgt), m, numItermax=10_000_000)
        if sparse:
            rows, cols = np.nonzero(plan)
            return sparse_plan(plan[rows, cols], rows, cols, plan.shape)
        return plan
    if solver == "sinkhorn":
        scale = float(m.max()) if m.size and m.max() > 0 else 1.0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = _pot().sinkhorn(uniform(n_src), uniform(n_tgt), m / scale, reg, method="sinkhorn_log",
                               numItermax=100_000, stopThr=1e-9)
        if any("converge" in str(w.message) for w in caught):
            log.warning("sinkhorn did not converge at reg %g; a larger --reg converges faster", reg)
        return plan
    raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")


def sparse_plan(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
    """A plan given by its non-zeros, as a ``scipy.sparse.csr_array``."""
    from scipy.sparse import csr_array

    return csr_array((values, (rows, cols)), shape=shape)


def ot_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact 2-Wasserstein distance between the uniform point clouds ``x`` (n, d) and ``y`` (m, d)."""
    ot = _pot()
    m = torch.cdist(x.double(), y.double()).pow(2).numpy()
    return float(np.sqrt(max(ot.emd2(uniform(len(x)), uniform(len(y)), m, numItermax=10_000_000), 0.0)))
