"""``fuse --search``, and the fuse options that repeat a searched fusion (``--mapping``,
``--refit-head``).

The search reads each checkpoint once and fuses its candidates with
:class:`~clafuse.search.builders.PlanBuilder` on the build part of the calibration data (exactly
the samples ``fuse --samples N`` draws), scoring each on a held-out part of the same split. The
chosen fusion is written as ``fuse`` would write it with the printed command, bit for bit.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from clafuse.align.mapfile import Alignment, MapFile
from clafuse.api.common import DEFAULT_SAMPLES, load_data, model_calibration, model_letter, text_calibration
from clafuse.api.models import LoadedModel, check_fits
from clafuse.data.normalize import Normalization
from clafuse.errors import ClafuseError
from clafuse.fusion.balance import carried_intact, check_mapping
from clafuse.fusion.engine import default_inserted
from clafuse.fusion.engines import FusionOutcome, Member, Source
from clafuse.fusion.otfusion import FusionSettings
from clafuse.search.builders import Alternatives, PlanBuilder
from clafuse.search.mappings import mapping_alternatives
from clafuse.search.refit import ensemble_teacher, refit_head
from clafuse.search.run import SearchResult, fuse_command, mapping_text, search_fusion
from clafuse.search.space import Candidate, SearchOptions, parse_budget
from clafuse.options import Scoring, check_choice
from clafuse.search.split import (SearchData, calibration_split, holdout_size, rebuild_size, refuse_test_split,
                                  split_dataset)
from clafuse.textdata import pack_tokens


def pair_of(doc: MapFile, index: int, chosen: int) -> Alignment:
    """The map's alignment between model ``index`` and the target ``chosen``."""
    return next(a for a in doc.alignments if {a.deep, a.shallow} == {index, chosen})


def parse_mappings(texts: Sequence[str] | None, doc: MapFile, chosen: int) -> dict[int, list[list[int]]]:
    """``--mapping LETTER=i,j/k,l`` options as per-group mappings by model index. Like the map's,
    a mapping sends each layer of the shallower model of the pair (the model or the target) to a
    layer of the deeper one, groups separated by ``/``; it replaces the map's for that model."""
    out: dict[int, list[list[int]]] = {}
    letters = [model_letter(i) for i in range(len(doc.models))]
    for text in texts or ():
        letter, sep, body = str(text).partition("=")
        letter = letter.strip().upper()
        if not sep or letter not in letters:
            raise ClafuseError(f"--mapping must be LETTER=i,j,... with a model letter ({', '.join(letters)}), "
                               f"got {text!r}")
        index = letters.index(letter)
        if index == chosen:
            raise ClafuseError(f"--mapping {letter}: {letter} is the target; give the mapping of another model")
        if index in out:
            raise ClafuseError(f"--mapping {letter} is given twice")
        pair = pair_of(doc, index, chosen)
        try:
            groups = [[int(v) for v in part.split(",")] for part in body.split("/")]
        except ValueError:
            raise ClafuseError(f"--mapping {text!r}: layer indices must be integers, groups separated by /") from None
        if len(groups) != len(pair.groups):
            raise ClafuseError(f"--mapping {text!r}: the pair has {len(pair.groups)} alignment groups, the mapping "
                               f"{len(groups)}")
        for mapping, group in zip(groups, pair.groups):
            try:
                check_mapping(mapping, len(group.mapping), len(group.cost[0]))
            except ClafuseError as exc:
                raise ClafuseError(f"--mapping {text!r}: {exc}") from None
        out[index] = groups
    return out


def refit_outcome(target: LoadedModel, outcome: FusionOutcome, parents: Sequence[nn.Module],
                  x: torch.Tensor, reference: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The fused tensors with the head refit to the parents' ensemble (weighed by ``reference``,
    default equally) on ``x`` (``--refit-head``), in the fused tensors' dtypes: what a searched
    candidate with the refit gives."""
    module = target.family.instantiate(target.spec, outcome.state_dict)
    module = refit_head(module, x, ensemble_teacher(parents, x, reference))
    return refitted_state(module, outcome.state_dict)


def refitted_state(module: nn.Module, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module``'s tensors under ``like``'s keys and dtypes."""
    values = module.state_dict()
    return {k: values[k].to(v.dtype) for k, v in like.items()}


def member(m: LoadedModel) -> Member:
    return Member(m.family, m.spec, m.state_dict)


@dataclass
class SearchRequest:
    """What ``fuse --search`` was asked for."""

    budget: str | int | None = None
    scoring: str | None = None
    """``kl`` / ``accuracy`` for classifiers, ``cosine`` for encoders; None: the output's default."""
    reference: Sequence[float] | None = None
    """Per model in align order, its weight in the ensemble candidates are compared with (default: equal)."""
    score_data: str | None = None
    """A separate source to score on (e.g. a labelled validation split); default: held-out
    samples of the calibration source."""
    on_candidate: Callable[[dict[str, Any]], None] | None = None
    normalize: Normalization | None = None
    mapped: frozenset[int] = frozenset()
    """Models (align indices) whose mapping ``--mapping`` gave: the search starts from it."""
    rebuild: bool = True
    """When the search built from fewer calibration samples than ``fuse`` draws by default (the
    map's count), build the chosen settings once more from those: what is written."""


@dataclass
class Searched:
    """A search's result, the chosen fused tensors (target dtypes), per source the chosen mapping,
    and how many held-out samples scored the candidates."""

    result: SearchResult
    state: dict[str, torch.Tensor]
    mappings: list[list[list[int]]]
    mixing: list[list[float]]
    holdout: int
    scoring: str
    score_data: str | None = None


def parse_reference(text: str | Sequence[str] | None, count: int) -> list[float] | None:
    """``--reference A,C``: per model in align order, 1 if named, else 0 (None without one)."""
    if text is None:
        return None
    letters = [model_letter(i) for i in range(count)]
    named = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    bad = [t for t in named if t not in letters]
    if bad or not named:
        raise ClafuseError(f"--reference names models by their letters ({', '.join(letters)}), e.g. B or A,B; "
                           f"got {text!r}")
    return [1.0 if letter in named else 0.0 for letter in letters]


def search_scoring(model: LoadedModel, scoring: str | None) -> str:
    """The search's scoring for a target like ``model``: ``scoring`` when it fits the model's
    output, else a ClafuseError; by default ``cosine`` for encoders, ``kl`` for classifiers."""
    embeds = model.family.embeds(model.spec)
    if scoring is None:
        return "cosine" if embeds else "kl"
    check_choice("--scoring", scoring, Scoring)
    if embeds and scoring != "cosine":
        raise ClafuseError(f"--scoring {scoring} compares class predictions, and {model.path} outputs sentence "
                           "embeddings: use --scoring cosine (its default)")
    if not embeds and scoring == "cosine":
        raise ClafuseError(f"--scoring cosine compares embeddings, and {model.path} outputs class logits: use kl "
                           "or accuracy")
    return scoring


def text_split(models: Sequence[LoadedModel], source: str, samples: int, seed: int, batch: int,
               usual: int | None) -> tuple[SearchData, int | None]:
    """A text calibration source split as :func:`~clafuse.search.split.split_dataset` splits
    arrays: the build part exactly the sentences ``fuse --samples samples`` draws with ``seed``
    (each part packed to its own longest sentence), scored ``batch`` sentences at a time; and the
    size of the rebuild towards ``usual`` samples (:func:`~clafuse.search.split.rebuild_size`;
    None: no rebuild)."""
    sentences = text_calibration(models, source)
    final = rebuild_size(len(sentences), samples, usual) if usual is not None else None
    split = calibration_split(len(sentences), samples, holdout_size(len(sentences), samples), seed, final or 0)
    return SearchData(x_build=pack_tokens(sentences.subset(split.build)),
                      x_holdout=pack_tokens(sentences.subset(split.holdout)), batch=batch), final


def separate_scoring(models: Sequence[LoadedModel], source: str, samples: int, seed: int, score_source: str,
                     normalize: Normalization | None, batch: int) -> SearchData:
    """Build from exactly the calibration samples ``fuse --samples samples`` draws, score on all of
    ``score_source`` (labels and all, never a test split)."""
    refuse_test_split(score_source)
    if models[0].family.token_limits(models[0].spec) is not None:
        x_build = model_calibration(models, source, samples, seed)
        x_score = pack_tokens(text_calibration(models, score_source))
        return SearchData(x_build=x_build, x_holdout=x_score, batch=batch)
    x_build = model_calibration(models, source, samples, seed, normalize=normalize)
    scored = load_data(score_source, None, normalize)
    for model in models:
        check_fits(model, scored.x, f"--score-data {score_source}")
    return SearchData(x_build=x_build, x_holdout=scored.x, y_holdout=scored.y)


def run_search(doc: MapFile, models: list[LoadedModel], chosen: int, sources: list[tuple[int, Source]],
               data_source: str, samples: int, seed: int, settings: FusionSettings, refit: bool,
               request: SearchRequest) -> Searched:
    """Search the fusion of ``sources`` (align index, source) into model ``chosen`` on
    ``data_source``'s calibration split: the build part is what ``fuse --samples samples`` draws
    with ``seed``, the held-out part the end of the same permutation."""
    target_model = models[chosen]
    scoring = search_scoring(target_model, request.scoring)
    text = target_model.family.token_limits(target_model.spec) is not None
    order = [chosen, *(i for i, _ in sources)]
    reference = tuple(float(request.reference[i]) for i in order) if request.reference is not None else None
    target_net = target_model.family.describe(target_model.spec)
    batch = target_net.batch
    usual = (doc.data.samples if doc.data is not None else DEFAULT_SAMPLES) if request.rebuild else None
    final = None
    if request.score_data is not None:
        data = separate_scoring(models, data_source, samples, seed, request.score_data, request.normalize, batch)
    elif text:
        data, final = text_split(models, data_source, samples, seed, batch, usual)
    else:
        ds = load_data(data_source, None, request.normalize)
        final = rebuild_size(len(ds), samples, usual) if usual is not None else None
        data = split_dataset(ds, samples, holdout_size(len(ds), samples), seed, final or 0)
    options = SearchOptions(budget=parse_budget(request.budget), scoring=scoring,
                            refit=(False,) if text else (False, True), reference_weights=reference, rebuild=final)
    alternatives = []
    for index, source in sources:
        pair = pair_of(doc, index, chosen)
        own = Alignment(shallow=pair.shallow, deep=pair.deep,
                        groups=[g.model_copy(update={"mapping": m}) for g, m in zip(pair.groups, source.mappings)])
        forced = [g.pin_first for g in models[pair.deep].groups]
        carried = None
        if not source.deeper and index not in request.mapped:
            shallow = source.member.family.describe(source.member.spec)
            carried = partial(carried_intact, shallow, deep=target_net)
        maps = mapping_alternatives(own, options.mappings, doc.settings.pin_first, doc.settings.pin_last, forced,
                                    carried)
        alternatives.append(Alternatives(source.member, maps, source.deeper))
    target = member(models[chosen])
    builder = PlanBuilder(target, alternatives, data.x_build, settings, reference=reference)
    count = len(models)
    inserted = settings.inserted or default_inserted(builder.net)
    start = Candidate(weights=tuple([1.0 / count] * count), mappings=(0,) * len(sources), inserted=inserted,
                      correction=settings.correction, refit=refit, samples=samples)
    result = search_fusion(builder, builder.parents(), data, start,
                           mapping_counts=[len(a.mappings) for a in alternatives], options=options,
                           progress=request.on_candidate)
    outcome = builder.outcome(result.chosen)
    state = refitted_state(result.module, outcome.state_dict) if result.chosen.refit else outcome.state_dict
    chosen_maps = [alt.mappings[rank] for alt, rank in zip(alternatives, result.chosen.mappings)]
    return Searched(result, state, chosen_maps, outcome.mixing, len(data.x_holdout), scoring, request.score_data)


def search_report(searched: Searched, command: str) -> dict[str, Any]:
    """What ``--json`` and the metadata say about a search."""
    result = searched.result
    best = result.chosen
    return {"scoring": searched.scoring, "holdout_samples": searched.holdout, "score_data": searched.score_data,
            "scored_samples": result.best.samples,
            "chosen": {"weights": list(best.weights), "mappings": list(best.mappings), "inserted": best.inserted,
                       "correction": best.correction, "refit_head": best.refit, "samples": best.samples},
            "score": result.score, "references": result.references, "stopped": result.stopped,
            "seconds": result.seconds, "command": command, "table": result.table}


def repeat_command(result: SearchResult, map_path: str, out: str, target_letter: str,
                   order: Sequence[int], maps: Sequence[list[list[int]]], map_maps: Sequence[list[list[int]]],
                   extra: Sequence[str]) -> str:
    """The ``clafuse fuse`` command that repeats the chosen fusion without search: weights in
    align order, ``--mapping`` where the chosen mapping is not the map's, ``extra`` options as
    given."""
    texts = [mapping_text(model_letter(i), m) if m != own else None
             for i, m, own in zip(order[1:], maps, map_maps)]
    line = fuse_command(result.chosen, str(map_path), str(out), target=target_letter, mappings=texts,
                        align_order=list(order))
    return line + ("" if not extra else " " + shlex.join(extra))
