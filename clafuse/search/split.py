"""Calibration data split into a part the fusion is built from and a held-out part it is scored on.

Both parts come from one seeded permutation of the calibration source: the build part is its
first ``build`` indices, exactly the samples :func:`clafuse.data.calibration_inputs` draws with the
same seed (so a fusion found by search is repeated by ``fuse --samples N`` without search), and the
held-out part its last ``holdout`` indices, disjoint from every build size up to ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clafuse.data import Dataset
from clafuse.errors import DataError


DEFAULT_HOLDOUT = 2000


def holdout_size(total: int, build: int, wanted: int = DEFAULT_HOLDOUT) -> int:
    """How many samples to hold out: ``wanted``, or what the source has left after the build part."""
    left = total - build
    if left < 2:
        raise DataError(f"the search needs held-out samples beyond the {build} it builds from, and the data has "
                        f"only {total}: pass fewer --samples")
    return min(wanted, left)


@dataclass(frozen=True)
class CalibrationSplit:
    """Indices into the calibration source: ``build[:n]`` builds a fusion of ``n`` samples,
    ``holdout`` scores it (disjoint from the build part up to the size asked for; beyond it, the
    rows a rebuild of the chosen fusion may also use)."""

    build: torch.Tensor
    holdout: torch.Tensor


def calibration_split(total: int, build: int, holdout: int, seed: int, rebuild: int = 0) -> CalibrationSplit:
    """Disjoint build and held-out indices among ``total`` samples, the same for the same seed;
    with ``rebuild``, the build part runs on to that many samples (the first ``rebuild`` of the
    permutation, what ``fuse --samples rebuild`` draws), which may reach into the held-out part."""
    if build < 2 or holdout < 2:
        raise DataError(f"the calibration split needs at least 2 build and 2 held-out samples, got {build} "
                        f"and {holdout}")
    if build + holdout > total:
        raise DataError(f"{build} build + {holdout} held-out samples need {build + holdout} calibration samples, "
                        f"the data has {total}")
    if rebuild > total:
        raise DataError(f"a rebuild from {rebuild} samples needs that many calibration samples, the data has {total}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    return CalibrationSplit(build=perm[:max(build, rebuild)].clone(), holdout=perm[total - holdout:].clone())


@dataclass
class SearchData:
    """The inputs a search works on: the build part (ordered, ``x_build[:n]`` for ``n`` samples),
    the held-out inputs and, when the source has them, the held-out labels."""

    x_build: torch.Tensor
    x_holdout: torch.Tensor
    y_holdout: torch.Tensor | None = None
    batch: int = 256
    """Samples per forward pass when candidates are scored (fewer for sequence models)."""


def refuse_test_split(name: str) -> None:
    """Refuse a source named as a test split: held-out scoring selects settings, and test data
    must never select anything."""
    if str(name).rsplit(":", 1)[-1] == "test":
        raise DataError(f"{name}: the search never scores on a test split; use the train or val split")


def rebuild_size(total: int, build: int, usual: int) -> int | None:
    """How many samples the chosen fusion is rebuilt from: the ``usual`` count (what ``fuse``
    draws without ``--samples``), at most ``total``, when the search built from fewer (None
    otherwise). The held-out samples are then given back to the calibration they were taken from."""
    size = min(total, usual)
    return size if size > build else None


def split_dataset(ds: Dataset, build: int, holdout: int, seed: int, rebuild: int = 0) -> SearchData:
    """:func:`calibration_split` applied to ``ds``; a test split is refused."""
    refuse_test_split(ds.name)
    split = calibration_split(len(ds), build, holdout, seed, rebuild)
    return SearchData(x_build=ds.x[split.build], x_holdout=ds.x[split.holdout],
                      y_holdout=ds.y[split.holdout] if ds.y is not None else None)
