"""The fusion search: build candidates, score them on held-out data, keep the best.

The search does not know how a fusion is built: it calls ``build(candidate)`` for a fused torch
module (any family; :class:`clafuse.search.builders.PlanBuilder` reuses recordings and plans).
It starts from the settings ``fuse`` uses without search, then changes one dimension at a time
from the best candidate so far (coordinate search, cheapest dimensions first, see
:mod:`clafuse.search.space`), in passes, until a pass improves nothing or the budget is spent.
The choice made, it may be rebuilt from more samples (the usual calibration count, held-out
samples given back) to give the final fusion.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from clafuse.errors import ClafuseError
from clafuse.search.refit import outputs
from clafuse.search.scoring import make_reference, score_outputs
from clafuse.search.space import DIMENSIONS, Candidate, SearchOptions, single_changes, weight_moves
from clafuse.search.split import SearchData

Builder = Callable[[Candidate], nn.Module]
MAX_PASSES = 3


def search_requested(search: bool, weights: Sequence[float] | str | None) -> bool:
    """Whether ``fuse`` must search: only with ``--search``, and never when the weights are given
    (explicit weights mean exactly the fusion asked for, as without search). Both together are
    refused rather than one silently ignored."""
    if search and weights is not None:
        raise ClafuseError("--weights fixes the fusion and --search chooses it: pass one of them")
    return search


@dataclass
class SearchResult:
    """The best-scoring candidate, its scores, every candidate tried (in order, as records), the
    parents' and ensemble's scores on the same held-out data, and why the search stopped;
    ``chosen`` is what the search gives (``best``, or it rebuilt from more samples) and ``module``
    that fusion."""

    best: Candidate
    score: dict[str, float]
    table: list[dict[str, Any]]
    references: dict[str, dict[str, float]]
    seconds: float
    stopped: str
    chosen: Candidate
    module: nn.Module = field(repr=False)


class _Stop(Exception):
    pass


def search_fusion(build: Builder, parents: Sequence[nn.Module], data: SearchData, start: Candidate, *,
                  mapping_counts: Sequence[int], options: SearchOptions = SearchOptions(),
                  progress: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Search fusion settings from ``start`` and return the best-scoring candidate.

    ``parents``: the models in the order of ``start.weights`` (target first); their weighted
    ensemble (``options.reference_weights``, equal by default) is the label-free reference.
    ``build(candidate)`` returns the fused module, head refit included (e.g.
    :class:`clafuse.search.builders.PlanBuilder`, which caches what candidates share).
    ``data.x_build[:n]`` must be the samples a build of ``n`` uses; candidates are scored on
    ``data.x_holdout`` only. ``mapping_counts[i]``: how many alternative mappings source i has.
    ``progress`` gets each candidate's record as it is scored. With ``options.rebuild`` the best
    candidate is built once more from that many build inputs and that fusion is returned, unscored
    (those inputs may include the held-out ones); a builder with a ``release()`` method (as
    PlanBuilder has) is asked first to drop what it kept for the candidates.
    """
    started = time.perf_counter()
    if len(parents) != len(start.weights):
        raise ClafuseError(f"{len(parents)} parents but {len(start.weights)} weights")
    if abs(sum(start.weights) - 1) > 1e-6 or min(start.weights) < 0:
        raise ClafuseError(f"the search starts from weights on the simplex (non-negative, sum 1), got "
                           f"{list(start.weights)}")
    largest = max((start.samples, *options.samples, options.rebuild or 0))
    if len(data.x_build) < largest:
        raise ClafuseError(f"a build of {largest} samples needs that many calibration samples, "
                           f"the build part has {len(data.x_build)}")
    ref_weights = options.reference_weights or (1.0,) * len(parents)
    held = [outputs(p, data.x_holdout, data.batch) for p in parents]
    reference = make_reference(held, ref_weights, options.scoring, data.y_holdout)
    references = {f"parent {i}": score_outputs(z, reference) for i, z in enumerate(held)}
    if options.scoring != "cosine":
        references["ensemble"] = score_outputs(torch.log(reference.target.clamp_min(1e-300)), reference)
    budget = options.budget
    tried: dict[Candidate, dict[str, Any]] = {}
    table: list[dict[str, Any]] = []
    state: dict[str, Any] = {"best": None, "module": None, "stage": "start"}

    def evaluate(c: Candidate) -> None:
        if c in tried:
            return
        if budget.candidates is not None and len(table) >= budget.candidates:
            raise _Stop("candidates")
        if budget.seconds is not None and table and time.perf_counter() - started >= budget.seconds:
            raise _Stop("time")
        t0 = time.perf_counter()
        module = build(c)
        score = score_outputs(outputs(module, data.x_holdout, data.batch), reference)
        record = {"index": len(table), "stage": state["stage"], **asdict(c), **score,
                  "seconds": round(time.perf_counter() - t0, 3)}
        record["weights"], record["mappings"] = list(c.weights), list(c.mappings)
        tried[c] = record
        table.append(record)
        if state["best"] is None or score["objective"] > tried[state["best"]]["objective"]:
            state["best"], state["module"] = c, module
        if progress is not None:
            progress(record)

    stopped = "converged"
    try:
        evaluate(start)
        step = options.weight_step
        for _ in range(MAX_PASSES):
            before = state["best"]
            for dimension in DIMENSIONS:
                state["stage"] = dimension
                if dimension == "weights":
                    while step >= options.min_weight_step - 1e-9:
                        incumbent = state["best"]
                        for w in weight_moves(incumbent.weights, step):
                            evaluate(incumbent.with_(weights=w))
                        if state["best"].weights == incumbent.weights:
                            step /= 2
                    step = options.min_weight_step * 2
                else:
                    for c in list(single_changes(state["best"], dimension, options, list(mapping_counts), start)):
                        evaluate(c)
            if state["best"] == before:
                break
    except _Stop as stop:
        stopped = f"budget ({stop.args[0]})"
    best, chosen, module = state["best"], state["best"], state["module"]
    if options.rebuild is not None and options.rebuild != best.samples:
        chosen, module, state["module"] = best.with_(samples=options.rebuild), None, None  # freed before the build
        release = getattr(build, "release", None)
        if release is not None:
            release()
        module = build(chosen)
    return SearchResult(best=best, score={k: v for k, v in tried[best].items() if k in _METRICS},
                        table=table, references=references, seconds=round(time.perf_counter() - started, 3),
                        stopped=stopped, chosen=chosen, module=module)


_METRICS = ("kl", "temperature", "kl_at_1", "agreement", "accuracy", "cosine", "objective")


def fuse_command(candidate: Candidate, map_path: str, out: str, *, target: str | None = None,
                 mappings: Sequence[str | None] = (), align_order: Sequence[int] | None = None) -> str:
    """The ``clafuse fuse`` command line that repeats ``candidate`` without search. ``mappings``:
    per source, ``LETTER=i,j,k`` (groups separated by ``/``) where the candidate's mapping is not
    the map's, else None. ``align_order[p]`` is the align index of the model whose weight is
    ``candidate.weights[p]`` (target first), so ``--weights`` comes out in align order."""
    weights = list(candidate.weights)
    if align_order is not None:
        weights = [0.0] * len(weights)
        for position, index in enumerate(align_order):
            weights[index] = candidate.weights[position]
    args = ["clafuse", "fuse", "--map", map_path, "-o", out]
    if target is not None:
        args += ["--target", target]
    args += ["--weights", ",".join(repr(float(w)) for w in weights), "--samples", str(candidate.samples),
             "--inserted", candidate.inserted, "--correction", candidate.correction]
    for text in mappings:
        if text is not None:
            args += ["--mapping", text]
    if candidate.refit:
        args.append("--refit-head")
    return shlex.join(args)


def mapping_text(letter: str, groups: Sequence[Sequence[int]]) -> str:
    """``LETTER=i,j/k,l``: a source's per-group mapping as ``--mapping`` takes it."""
    return f"{letter}=" + "/".join(",".join(str(j) for j in g) for g in groups)
