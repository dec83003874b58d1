"""``fuse``: balance and fuse the models of a map into the target's architecture."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

import clafuse
from clafuse import progress
from clafuse.align.mapfile import MapFile, ModelEntry, check_data_digest, map_digest, read_map
from clafuse.api.common import DEFAULT_SAMPLES, log, model_calibration, model_index, model_letter, resolved_source
from clafuse.api.models import LoadedModel, check_fits, map_model, nonfinite_keys, refuse_nonfinite, spec_metadata
from clafuse.api.searching import (SearchRequest, pair_of, parse_mappings, parse_reference, refit_outcome,
                                   repeat_command, run_search, search_report)
from clafuse.data.normalize import Normalization
from clafuse.errors import ClafuseError
from clafuse.fusion.balance import carried_positions
from clafuse.fusion.engines import ENGINES, Member, Source
from clafuse.fusion.otfusion import FusionSettings
from clafuse.io.checkpoint import output_format, save_checkpoint
from clafuse.io.hf_folder import refuse_non_model, write_hf_folder
from clafuse.io.keys import KeyMap
from clafuse.io.outputs import checkpoint_output, plan_outputs
from clafuse.io.wrapper import check_keep_wrapper, dropped_entries, in_input_form, save_in_input_form
from clafuse.options import Balance, OutputDtype, Scoring, Signal, check_choice, check_integer, mixing_weights
from clafuse.search.run import search_requested
from clafuse.search.space import parse_budget
from clafuse.search.split import refuse_test_split


def _map_model(entry: ModelEntry, base: Path) -> LoadedModel:
    return map_model(entry, base, lazy=True)


def resolve_target(doc: MapFile, target: str | int | None, balance: Balance | None) -> int:
    """The index of the model whose architecture the fused checkpoint takes.

    By default the map's anchor; ``target`` names another (deep, shallow, a letter or an index),
    which needs an alignment between it and every other model, i.e. a two-model map or the anchor.
    ``balance`` (two-model maps) says the same by method: ``add`` = the deeper, ``merge`` = the
    shallower; given together they must agree.
    """
    depths = [sum(len(g.layers) for g in m.groups) for m in doc.models]
    if target is not None:
        chosen = model_index(target, [m.path for m in doc.models], depths, "--target")
        if len(doc.models) == 2 and target in ("deep", "shallow"):
            pair = doc.alignments[0]
            chosen = pair.deep if target == "deep" else pair.shallow
    elif balance is not None:
        check_choice("--balance", balance, Balance)
        if len(doc.models) != 2:
            raise ClafuseError("--balance chooses between the two models of a two-model map; with more models "
                               "use --target (each model is balanced to the target as its depth needs)")
        pair = doc.alignments[0]
        chosen = pair.deep if balance == "add" else pair.shallow
    else:
        chosen = doc.anchor
    linked = {i for a in doc.alignments for i in (a.deep, a.shallow) if chosen in (a.deep, a.shallow)} - {chosen}
    missing = [model_letter(i) for i in range(len(doc.models)) if i != chosen and i not in linked]
    if missing:
        raise ClafuseError(f"the map does not align model {', '.join(missing)} to {model_letter(chosen)}: run align "
                           f"again with --anchor {model_letter(chosen)} to fuse into that model's architecture")
    if balance is not None and len(doc.models) == 2:
        pair = doc.alignments[0]
        wanted = "add" if chosen == pair.deep else "merge"
        if balance != wanted:
            raise ClafuseError(f"--target {target} needs --balance {wanted} (the "
                               f"{'deeper' if wanted == 'add' else 'shallower'} architecture), not --balance {balance}")
    return chosen


def parse_weights(text: str | Sequence[float] | None, count: int) -> list[float]:
    """Mixing weights as given, one per model in align order (equal weights when not given); finite,
    non-negative and not all zero (:func:`~clafuse.options.mixing_weights` scales them for fusing)."""
    if text is None:
        return [1.0 / count] * count
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (ValueError, TypeError):
        raise ClafuseError(f"--weights must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise ClafuseError(f"--weights must be {count} non-negative numbers with a positive sum, got {text!r}")
    mixing_weights(values)
    return values


def _fusion_settings(signal: str, options: dict[str, Any]) -> FusionSettings:
    try:
        return FusionSettings(signal=signal, **options)
    except TypeError as exc:
        raise ClafuseError(f"unknown fusion option: {exc}") from None


def fuse(map_path: str | os.PathLike, out: str | os.PathLike, *, balance: Balance | None = None,
         target: str | int | None = None, weights: str | Sequence[float] | None = None, data: str | None = None,
         samples: int | None = None, signal: Signal | None = None, allow_nonfinite: bool = False,
         dtype: str | None = None, max_shard_size: str | int | None = None, keep_wrapper: bool = False,
         normalize: str | None = None, mapping: Sequence[str] | None = None, refit_head: bool = False,
         search: bool = False, budget: str | int | None = None, scoring: Scoring | None = None,
         reference: str | Sequence[str] | None = None, score_data: str | None = None,
         on_candidate: Callable[[dict[str, Any]], None] | None = None, rebuild: bool = True,
         **options: Any) -> dict[str, Any]:
    """Balance and fuse all models of a map into one checkpoint written to ``out``.

    The output takes the target's architecture (:func:`resolve_target`: the anchor by default),
    e.g. to fuse a deep teacher into a shallow student's. Each other model is balanced to it (add:
    identities into a shallower model; merge: a deeper model's unmatched layers folded),
    transported into its neuron order and averaged with ``weights`` (one per model, align order).
    Activations drive the transport when calibration data is at hand (the map's, or ``data``), else
    weights; ``options`` are further :class:`~clafuse.fusion.otfusion.FusionSettings` fields.
    ``dtype`` overrides the target's floating-point dtype; above ``max_shard_size`` the output is
    written as shards with an index. ``keep_wrapper`` writes the result in the target input's own
    form (:mod:`clafuse.io.wrapper`): its tensor names and prefix, and its wrapper for torch files
    (e.g. a Lightning ``.ckpt``), without optimizer state. ``normalize`` (``--normalize`` text)
    standardises the calibration inputs; by default the map's data is standardised as align did.

    ``mapping`` (``LETTER=i,j/k,l`` per model) replaces the map's layer mapping of that model;
    ``refit_head`` refits the fused head to the parents' equal-weight ensemble on the calibration
    data (the last Linear alone, fitted to the ensemble's soft predictions; label-free). ``search`` chooses the weights, mappings
    (the alignment's best few), ``inserted`` policy, correction and head refit by what each
    candidate does on held-out calibration samples (``scoring``: ``kl`` to the ensemble, ``accuracy``
    with labels, or for encoders ``cosine`` to its mean embedding) within ``budget`` (candidates,
    or a time like ``30s``), calling ``on_candidate`` with each candidate's record; the report and
    metadata hold the table and the command that repeats the choice. Explicit ``weights`` and
    ``search`` are refused together. ``score_data`` (a labelled validation split, say) is what the
    search scores on instead of held-out calibration samples. Built from fewer ``samples`` than
    the map's count (to leave held-out samples in a small source), the chosen settings are rebuilt
    from the map's count, as plain ``fuse`` draws it, unless ``rebuild`` is False: the held-out
    samples have done their job once the choice is made. ``reference`` (model letters, e.g.
    ``B``) makes the search and the head refit compare with those models' ensemble instead of all
    models' (a teacher fused into a student).
    """
    started = time.perf_counter()
    check_output(out, dtype, max_shard_size)
    if balance is not None:
        check_choice("--balance", balance, Balance)
    if signal is not None:
        check_choice("--signal", signal, Signal)
    if samples is not None:
        check_integer("--samples", samples, at_least=2)
    _fusion_settings(signal or "activations", options)  # refuse bad options before any work
    norm = Normalization.parse(normalize)
    searching = search_requested(search, weights)
    for flag, value in (("--budget", budget), ("--scoring", scoring), ("--score-data", score_data)):
        if not searching and value is not None:
            raise ClafuseError(f"{flag} sets up a search: add --search")
    if searching:
        parse_budget(budget)
        if scoring is not None:
            check_choice("--scoring", scoring, Scoring)
    doc = read_map(map_path)
    alpha = parse_weights(weights, len(doc.models))
    ref = parse_reference(reference, len(doc.models))
    ref_letters = [model_letter(i) for i, w in enumerate(ref) if w] if ref is not None else None
    if not rebuild and not searching:
        raise ClafuseError("--no-rebuild is about what --search writes: add --search")
    if ref is not None and not (searching or refit_head):
        raise ClafuseError("--reference sets what --search or --refit-head compares with: add one of them")
    base = Path(map_path).parent
    calibration_file = data if data is not None else (str(base / doc.data.source) if doc.data is not None else None)
    folder_out = is_folder_output(out)
    plan_outputs([map_path, *(base / entry.path for entry in doc.models), calibration_file, score_data],
                 [checkpoint_output("-o", out, folder=folder_out)])
    if folder_out:
        refuse_non_model(Path(out))
    if data is None:  # the map's own calibration data will be used: refuse it if it changed since align
        check_data_digest(doc, base)
    with progress.step(f"reading {len(doc.models)} checkpoints"):
        models = [_map_model(entry, base) for entry in doc.models]
    if not allow_nonfinite:
        for m in models:
            bad = nonfinite_keys(m.state_dict)
            if bad:
                raise ClafuseError(f"{m.path}: {bad[0]} has NaN or Inf values; pass --allow-nonfinite to fuse anyway")
    chosen = resolve_target(doc, target, balance)
    if refit_head and models[chosen].family.token_limits(models[chosen].spec) is not None:
        raise ClafuseError("--refit-head refits an image or array classifier's last layer; text encoders have none "
                           "it can refit")
    container = None
    if keep_wrapper:
        if max_shard_size is not None:
            raise ClafuseError("--keep-wrapper writes one file in the input's form: leave out --max-shard-size")
        container = check_keep_wrapper(models[chosen].path, out)
    overrides = parse_mappings(mapping, doc, chosen)
    sources, methods, map_maps = [], {}, []
    for i, m in enumerate(models):
        if i == chosen:
            continue
        pair = pair_of(doc, i, chosen)
        map_maps.append([list(g.mapping) for g in pair.groups])
        sources.append((i, Source(Member(m.family, m.spec, m.state_dict), overrides.get(i, map_maps[-1]),
                                  deeper=pair.deep == i)))
        methods[model_letter(i)] = "merge" if pair.deep == i else "add"
    if len(models) == 2:
        balance = next(iter(methods.values()))

    # Calibration data serves the activation signal, the corrections, BN reset and merge's ReLU
    # gates, so it is used whenever there is some, whatever the signal.
    x = None
    if data is not None or doc.data is not None:
        source = data if data is not None else doc.data.source
        n = samples or (doc.data.samples if doc.data else DEFAULT_SAMPLES)
        seed = doc.data.seed if doc.data else 0
        if norm is None and data is None and doc.data is not None:
            norm = Normalization.from_list(doc.data.normalize)
        if searching:
            refuse_test_split(source)
        x = model_calibration(models, source, n, seed, base=None if data is not None else base, normalize=norm)
        for m in models:
            check_fits(m, x, f"data {source}")
    if x is None and (searching or refit_head):
        raise ClafuseError(f"{'--search' if searching else '--refit-head'} needs calibration data: the map has "
                           "none, pass --data")
    if signal is None:
        signal = "activations" if x is not None else "weights"
    if signal == "activations" and x is None:
        raise ClafuseError("the activation signal needs calibration data: pass --data, or --signal weights")
    without_data = x is None and options.get("correction") != "none"
    if without_data:
        options["correction"] = "none"
    settings = _fusion_settings(signal, options)

    target_model = models[chosen]
    if settings.correction is None:
        settings = replace(settings, correction=target_model.family.describe(target_model.spec).correction)
    folder_config = None
    if folder_out:
        base_config = target_model.folder.config if target_model.folder is not None else None
        folder_config = target_model.family.config(target_model.spec, base_config)
        if target_model.folder is None or folder_config is None:
            raise ClafuseError(f"cannot write a model folder {out}: the target {target_model.path} is not a Hugging Face "
                               "model folder; name a .safetensors or .pt file")
    engine = ENGINES[target_model.family.engine]
    mixing = mixing_weights(alpha)
    order = [chosen, *(i for i, _ in sources)]
    found = None
    if searching:
        with progress.step(f"searching the fusion of {len(models)} models into {target_model.path.name}"):
            found = run_search(doc, models, chosen, sources,
                               resolved_source(source, None if data is not None else base), n, seed, settings,
                               refit_head, SearchRequest(budget, scoring, ref, score_data, on_candidate, norm,
                                                         frozenset(overrides), rebuild))
        best = found.result.chosen
        alpha = [0.0] * len(models)
        for position, index in enumerate(order):
            alpha[index] = best.weights[position]
        settings = replace(settings, inserted=best.inserted, correction=best.correction)
        sources = [(i, replace(s, mappings=m)) for (i, s), m in zip(sources, found.mappings)]
        fused_state, mixing_rows, approximate = found.state, found.mixing, {}
        refit_head = best.refit
    else:
        with progress.step(f"fusing {len(models)} models into {target_model.path.name}"):
            result = engine(Member(target_model.family, target_model.spec, target_model.state_dict),
                            [source for _, source in sources], [mixing[i] for i in order], x, settings)
        fused_state, mixing_rows, approximate = result.state_dict, result.mixing, result.approximate
        if refit_head:
            parents = [models[i].module() for i in order]
            fused_state = refit_outcome(target_model, result, parents, x,
                                        [ref[i] for i in order] if ref is not None else None)
    if without_data:
        log.warning("no calibration data: fused without correction or BatchNorm reset (pass --data to enable them)")
    for name, error in approximate.items():
        log.warning("inserted %s is only a near-identity (post-LN layers have none exact): fitted on the calibration "
                    "data, relative error %.3f", name, error)
    state = cast_state(fused_state, dtype)
    if not allow_nonfinite:
        refuse_nonfinite(state, "the fused weights")
    metadata = {
        "clafuse_version": clafuse.__version__,
        "map_sha256": map_digest(map_path),
        "inputs": json.dumps([{"path": e.path, "sha256": e.sha256} for e in doc.models]),
        "target": doc.models[chosen].path,
        **spec_metadata(target_model.spec),
        "settings": json.dumps({"balance": balance if len(models) == 2 else methods, "weights": alpha,
                                "dtype": dtype, "refit_head": refit_head, **settings.__dict__,
                                **({"reference": ref_letters} if ref_letters else {}),
                                **({"mapping": {model_letter(i): s.mappings for i, s in sources}} if mapping else {})}),
    }
    searched = None
    if found is not None:
        extra = _repeat_options(data, dtype, max_shard_size, allow_nonfinite, signal, settings, normalize, keep_wrapper)
        if ref_letters and best.refit:
            extra += ["--reference", ",".join(ref_letters)]
        command = repeat_command(found.result, str(map_path), str(out), model_letter(chosen), order,
                                 [s.mappings for _, s in sources], map_maps, extra)
        searched = search_report(found, command)
        metadata["search"] = json.dumps({k: v for k, v in searched.items() if k != "table"})
    with progress.step(f"writing {out}"):
        if folder_config is not None:
            shards = [write_hf_folder(out, state, folder_config, source=target_model.folder,
                                      max_shard_size=max_shard_size)]
        elif container is not None:
            plan = target_model.plan or KeyMap().apply(target_model.state_dict)
            shards = save_in_input_form(out, container, in_input_form(container, plan, state), metadata)
        else:
            shards = save_checkpoint(out, state, metadata, max_shard_size=max_shard_size)
    return {
        "output": str(out),
        "files": [str(f) for f in shards],
        "target": str(target_model.path),
        "family": target_model.family.name,
        "balance": balance if len(models) == 2 else methods,
        "weights": alpha,
        "signal": signal,
        "correction": settings.correction,
        "calibration_samples": best.samples if found is not None else int(x.shape[0]) if x is not None else 0,
        "mapping": sources[0][1].mappings if len(models) == 2 else {model_letter(i): s.mappings for i, s in sources},
        "layers": [{"name": l.name, "width": l.width} for g in target_model.groups for l in g.layers],
        "mixing": [[round(float(v), 6) for v in row] for row in mixing_rows],
        "mixing_order": [model_letter(i) for i in order],
        "refit_head": refit_head,
        "reference": ref_letters,
        **({"search": searched} if searched is not None else {}),
        "approximate_identities": {name: round(error, 6) for name, error in approximate.items()},
        "carried": _carried_layers(target_model, sources),
        "seconds": round(time.perf_counter() - started, 3),
        **({"kept_wrapper": {"names": "input", "wrapper": container.wrapper_key,
                             "dropped": dropped_entries(container)}} if container is not None else {}),
    }


def _carried_layers(target: LoadedModel, sources: list[tuple[int, Source]]) -> dict[str, list[str]]:
    """Per shallower model (letter), the target's layers that carry its logits after balancing."""
    net = target.family.describe(target.spec)
    out = {}
    for i, source in sources:
        if not source.deeper:
            shallow = source.member.family.describe(source.member.spec)
            positions = carried_positions(shallow, source.mappings, net)
            if positions:
                out[model_letter(i)] = [net.blocks[j].name for j in positions]
    return out


def _repeat_options(data: str | None, dtype: str | None, max_shard_size: str | int | None, allow_nonfinite: bool,
                    signal: str, settings: FusionSettings, normalize: str | None, keep_wrapper: bool) -> list[str]:
    """The options besides the searched ones that the repeating command needs, as given."""
    defaults = FusionSettings()
    out: list[str] = []
    for flag, value in (("--data", data), ("--dtype", dtype), ("--max-shard-size", max_shard_size),
                        ("--normalize", normalize)):
        if value is not None:
            out += [flag, str(value)]
    if signal != "activations":
        out += ["--signal", signal]
    for name in ("solver", "reg", "ground"):
        if getattr(settings, name) != getattr(defaults, name):
            out += [f"--{name}", str(getattr(settings, name))]
    if not settings.bn_reset:
        out.append("--no-bn-reset")
    if allow_nonfinite:
        out.append("--allow-nonfinite")
    if keep_wrapper:
        out.append("--keep-wrapper")
    return out


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_output(out: str | os.PathLike, dtype: str | None = None, max_shard_size: str | int | None = None) -> None:
    """Refuse an unusable output name, dtype or shard size before any work is done."""
    if not is_folder_output(out):
        output_format(out, max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        check_choice("--dtype", dtype, OutputDtype)
    if not Path(out).parent.is_dir():
        raise ClafuseError(f"cannot write {out}: directory {Path(out).parent} does not exist")


def is_folder_output(out: str | os.PathLike) -> bool:
    """Whether ``out`` names a model folder (a name ending in a slash, one without an extension,
    or an existing folder not named like a checkpoint file) rather than a checkpoint file."""
    text = str(out)
    if text.endswith(("/", os.sep)) or Path(out).suffix == "":
        return True
    if Path(out).suffix.lower() in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        return False
    try:
        return Path(out).is_dir()
    except OSError:  # a name the file system refuses (too long, ...): not a folder; the output checks say why
        return False


def cast_state(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors in ``dtype`` (fp32, fp16, bf16); unchanged for None."""
    if dtype is None:
        return state
    if dtype not in DTYPES:
        check_choice("--dtype", dtype, OutputDtype)
    wanted = DTYPES[dtype]
    out = {}
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != wanted:
            converted = value.to(wanted)
            if not bool(torch.isfinite(converted.sum(dtype=torch.float64))) and \
                    bool(torch.isfinite(value.sum(dtype=torch.float64))):
                raise ClafuseError(f"{key} does not fit in {dtype}: its values overflow to Inf")
            value = converted
        out[key] = value
    return out
