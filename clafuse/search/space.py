"""The settings a fusion search varies, its budget, and the order it tries them in.

A :class:`Candidate` is one complete choice of fusion settings. The search starts from the
settings ``fuse`` would use without search and changes one thing at a time, cheapest first: the
head refit (no new fusion), the mixing weights (the transport plans are reused), the other
mappings among the alignment's k best, the ``inserted`` policy, the correction, and last the
calibration size (a new alignment on more samples).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clafuse.errors import ClafuseError

DIMENSIONS = ("refit", "weights", "mappings", "inserted", "correction", "samples")


@dataclass(frozen=True)
class Candidate:
    """One fusion setting. ``mappings[i]`` is the rank of source i's mapping among the alignment's
    k best (0: the optimum the map holds); ``weights`` one per model, the target's first; ``refit``
    adds :func:`clafuse.search.refit.refit_head` after the fusion; ``samples`` is the size of the
    calibration build part."""

    weights: tuple[float, ...]
    mappings: tuple[int, ...]
    inserted: str
    correction: str
    refit: bool
    samples: int

    def with_(self, **changes: object) -> "Candidate":
        return replace(self, **changes)

    def fusion_key(self) -> "Candidate":
        """The candidate without the refit: what the fusion itself depends on."""
        return replace(self, refit=False)


class Budget(BaseModel):
    """How much search: a number of candidates, a time in seconds, or both (whichever ends first)."""

    model_config = ConfigDict(frozen=True)
    candidates: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)


DEFAULT_BUDGET = Budget(candidates=8)


def parse_budget(text: str | int | None) -> Budget:
    """``40`` (candidates) or ``30s`` / ``2m`` (time); None gives :data:`DEFAULT_BUDGET`."""
    if text is None:
        return DEFAULT_BUDGET
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min)?\s*", str(text))
    if not match or float(match.group(1)) <= 0 or (match.group(2) is None and "." in match.group(1)):
        raise ClafuseError(f"--budget must be a number of candidates (40) or a time (30s, 2m), got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    if unit is None:
        return Budget(candidates=int(value))
    return Budget(seconds=value * (60 if unit in ("m", "min") else 1))


class SearchOptions(BaseModel):
    """What the search may vary and how it scores. A dimension with a single choice is fixed."""

    model_config = ConfigDict(frozen=True)
    budget: Budget = DEFAULT_BUDGET
    scoring: Literal["kl", "accuracy", "cosine"] = "kl"
    mappings: int = Field(default=3, ge=1, description="k: how many of the alignment's best mappings to try")
    inserted: tuple[Literal["average", "keep"], ...] = ("average", "keep")
    corrections: tuple[Literal["regress", "repair", "none"], ...] = ("regress", "repair", "none")
    refit: tuple[bool, ...] = (False, True)
    samples: tuple[int, ...] = ()
    weight_step: float = Field(default=0.2, gt=0, lt=1)
    min_weight_step: float = Field(default=0.05, gt=0, lt=1)
    reference_weights: tuple[float, ...] | None = None
    rebuild: int | None = Field(default=None, ge=2, description="build the chosen settings once more from this "
                                "many samples (the build part's first), e.g. the usual calibration count")

    @field_validator("samples")
    @classmethod
    def _samples(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 2 for n in value):
            raise ValueError("calibration sizes must be at least 2")
        return value


def weight_moves(weights: tuple[float, ...], step: float) -> list[tuple[float, ...]]:
    """Neighbours of ``weights`` on the simplex: ``step`` of weight moved from one model to
    another (as far as the giver has it), rounded to 4 decimals."""
    out = []
    for i in range(len(weights)):
        for j in range(len(weights)):
            if i == j or weights[i] <= 0:
                continue
            moved = min(step, weights[i])
            w = list(weights)
            w[i] -= moved
            w[j] += moved
            out.append(tuple(round(v, 4) for v in w))
    return out


def single_changes(incumbent: Candidate, dimension: str, options: SearchOptions, mapping_counts: list[int],
                   start: Candidate) -> Iterator[Candidate]:
    """Candidates that differ from ``incumbent`` in ``dimension`` only (weights excepted: they are
    searched by :func:`weight_moves`)."""
    if dimension == "refit":
        yield from (incumbent.with_(refit=r) for r in options.refit)
    elif dimension == "mappings":
        for i, count in enumerate(mapping_counts):
            for rank in range(min(count, options.mappings)):
                mappings = list(incumbent.mappings)
                mappings[i] = rank
                yield incumbent.with_(mappings=tuple(mappings))
    elif dimension == "inserted":
        yield from (incumbent.with_(inserted=v) for v in options.inserted)
    elif dimension == "correction":
        yield from (incumbent.with_(correction=v) for v in options.corrections)
    elif dimension == "samples":
        yield from (incumbent.with_(samples=n) for n in sorted({start.samples, *options.samples}))
