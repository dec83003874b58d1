"""The library entry points behind each CLI command: inspect, align, fuse, evaluate, finetune.

Each function takes paths and options and returns plain data (dicts / pydantic models), so it can
be used from Python as well as from the shell.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from pydantic import BaseModel

import clafuse
from clafuse.align.costs import METRICS, activation_cost, neuron_cost
from clafuse.align.dp import solve_alignment
from clafuse.align.mapfile import (
    Alignment,
    DataEntry,
    GroupAlignment,
    GroupEntry,
    LayerEntry,
    MapFile,
    ModelEntry,
    Settings,
    dump_map,
    map_digest,
    read_map,
)
from clafuse.arch.base import Family, Group
from clafuse.arch.registry import parse_spec, resolve
from clafuse.data import calibration_inputs, has_val_split, load_source
from clafuse.errors import ClafuseError, DataError, MapError
from clafuse.fusion.engines import ENGINES, Member, Source
from clafuse.fusion.otfusion import FusionSettings
from clafuse.io.atomic import sha256_file, write_text_atomic
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint, output_format, save_checkpoint
from clafuse.io.lazy import LazyStateDict

DEFAULT_SAMPLES = 2000
log = logging.getLogger("clafuse")


@dataclass
class LoadedModel:
    """A checkpoint with its family and spec."""

    path: Path
    state_dict: Mapping[str, torch.Tensor]
    family: Family
    spec: BaseModel

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @cached_property
    def groups(self) -> list[Group]:
        return self.family.groups(self.spec)

    @property
    def depth(self) -> int:
        return sum(len(g.layers) for g in self.groups)

    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.family.layer_outputs(self.spec, self.state_dict, x)

    def module(self) -> torch.nn.Module:
        """The plain-torch model with the checkpoint loaded strictly."""
        return self.family.instantiate(self.spec, {k: v.clone() for k, v in self.state_dict.items()})


def load_model(path: str | os.PathLike, arch: str | os.PathLike | None = None,
               allow_nonfinite: bool = True, lazy: bool = False) -> LoadedModel:
    """Read a checkpoint and find its architecture (from ``arch`` if given, else detected).
    With ``lazy``, a safetensors checkpoint is only opened: tensors are read when used."""
    state_dict = open_checkpoint(path) if lazy else load_checkpoint(path)
    family, spec = resolve(state_dict.skeleton() if isinstance(state_dict, LazyStateDict) else state_dict, arch)
    if not allow_nonfinite:
        bad = nonfinite_keys(state_dict)
        if bad:
            raise ClafuseError(f"{path}: {bad[0]} has NaN or Inf values"
                               + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    return LoadedModel(Path(path), state_dict, family, spec)


def nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or Inf: exactly those whose float64 sum is not
    finite (it cannot overflow), which is cheaper than an element-wise test."""
    return [k for k, v in state_dict.items()
            if v.is_floating_point() and not bool(torch.isfinite(v.sum(dtype=torch.float64)))]


def inspect_checkpoint(path: str | os.PathLike, arch: str | os.PathLike | None = None) -> dict[str, Any]:
    """Family, depth, alignable layers, parameter counts and dtypes of a checkpoint."""
    model = load_model(path, arch)
    dtypes: dict[str, int] = {}
    for v in model.state_dict.values():
        name = str(v.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + v.numel()
    return {
        "path": str(path),
        "sha256": model.sha256,
        "family": model.family.name,
        "depth": model.depth,
        "groups": [{"name": g.name, "layers": [{"name": l.name, "width": l.width, "params": l.params, "kind": l.kind}
                                               for l in g.layers]} for g in model.groups],
        "total_params": sum(v.numel() for v in model.state_dict.values() if v.is_floating_point()),
        "tensors": len(model.state_dict),
        "dtypes": dtypes,
        "nonfinite": nonfinite_keys(model.state_dict),
        "spec": model.spec.model_dump(mode="json"),
    }


def check_fits(model: LoadedModel, x: torch.Tensor, what: str) -> None:
    """Raise DataError unless ``model`` accepts inputs shaped like ``x``."""
    try:
        with torch.no_grad():
            model.family.forward(model.spec, model.state_dict, x[:2])
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{what}: inputs of shape {tuple(x.shape[1:])} per sample do not fit {model.path} "
                        f"({reason})") from None


def _rel(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:
        return str(path.resolve())


def _calibration(source: str, samples: int, seed: int, base: Path | None = None) -> torch.Tensor:
    """``samples`` calibration inputs from ``source``'s train split; a relative file path is taken
    relative to ``base`` (the map's folder) when given."""
    if base is not None and _is_path(source) and not Path(source).is_absolute():
        source = str(base / source)
    return calibration_inputs(load_source(source), samples, seed)


def _is_path(source: str) -> bool:
    return source.endswith(".npz") or os.sep in source or Path(source).exists()


def model_letter(index: int) -> str:
    """Models are named A, B, C, ... in align order (AA, AB, ... past Z)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _model_index(choice: str | int, paths: Sequence[str | os.PathLike], depths: Sequence[int], what: str) -> int:
    """A model chosen by letter (A, B, ...), 0-based index, path as given, or ``deep``/``shallow``."""
    if isinstance(choice, int) or (isinstance(choice, str) and choice.isdigit()):
        index = int(choice)
        if 0 <= index < len(paths):
            return index
    else:
        if choice == "deep":
            return max(range(len(depths)), key=lambda i: (depths[i], -i))
        if choice == "shallow":
            return min(range(len(depths)), key=lambda i: (depths[i], i))
        letters = [model_letter(i) for i in range(len(paths))]
        if choice.upper() in letters:
            return letters.index(choice.upper())
        matches = [i for i, p in enumerate(paths) if str(p) == choice]
        if len(matches) == 1:
            return matches[0]
    names = ", ".join(model_letter(i) for i in range(len(paths)))
    raise ClafuseError(f"{what} {choice!r} names no model: use deep, shallow, a letter ({names}) or an index")


def _check_pair(models: Sequence[LoadedModel], deep: int, shallow: int) -> None:
    """The shallower model must fit into the deeper one group by group."""
    gd_all, gs_all = models[deep].groups, models[shallow].groups
    if len(gd_all) != len(gs_all):
        raise ClafuseError(f"{models[shallow].path} has {len(gs_all)} alignment groups "
                           f"({', '.join(g.name for g in gs_all)}) but {models[deep].path} has {len(gd_all)}")
    for gd, gs in zip(gd_all, gs_all):
        if len(gs.layers) > len(gd.layers):
            raise ClafuseError(f"group {gd.name!r}: {models[shallow].path} has more layers ({len(gs.layers)}) than "
                               f"{models[deep].path} ({len(gd.layers)}), although it is not deeper overall")
        if not gs.layers:
            raise ClafuseError(f"group {gd.name!r} of {models[shallow].path} has no hidden layer to align")


def _align_pair(models: Sequence[LoadedModel], deep: int, shallow: int, metric: str,
                acts: Sequence[list[torch.Tensor]] | None, pin_first: bool, pin_last: bool) -> Alignment:
    """Layer costs and the optimal order-preserving mapping of ``shallow``'s layers into ``deep``'s."""
    groups = []
    offset_d = offset_s = 0
    for gd, gs in zip(models[deep].groups, models[shallow].groups):
        nd, ns = len(gd.layers), len(gs.layers)
        if metric == "neuron":
            cost = neuron_cost([l.width for l in gs.layers], [l.width for l in gd.layers])
        else:
            cost = activation_cost(acts[shallow][offset_s:offset_s + ns], acts[deep][offset_d:offset_d + nd], metric)
        # A forced first pin (a stage's strided block) wins; otherwise one shallow layer cannot be
        # pinned to both ends and keeps the last pin.
        if gd.pin_first:
            first, last = True, pin_last and ns > 1
        else:
            first, last = pin_first and not (ns == 1 and pin_last and nd > 1), pin_last
        mapping, total = solve_alignment(cost, pin_first=first, pin_last=last)
        groups.append(GroupAlignment(name=gd.name, cost=[[round(float(c), 10) for c in row] for row in cost],
                                     mapping=mapping, total_cost=round(total, 10)))
        offset_d += nd
        offset_s += ns
    return Alignment(shallow=shallow, deep=deep, groups=groups)


def align(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
          archs: Sequence[str | os.PathLike | None] | None = None, data: str | None = None,
          samples: int = DEFAULT_SAMPLES, metric: str = "cka", seed: int = 0,
          pin_first: bool = True, pin_last: bool = True, anchor: str | int | None = None) -> MapFile:
    """Align the layers of every checkpoint to an anchor's and write the map to ``out``.

    The anchor is the deepest model unless ``anchor`` names another (letter, index, path, deep or
    shallow); it is the architecture ``fuse`` targets by default. For each other model, per
    alignment group, the layer cost matrix between it and the anchor (shallower x deeper) is
    computed (``metric``) and the optimal order-preserving mapping solved by DP.
    """
    if len(paths) < 2:
        raise ClafuseError(f"align needs at least two checkpoints, got {len(paths)}")
    if metric not in METRICS:
        raise ClafuseError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    archs = list(archs) if archs else [None] * len(paths)
    models = [load_model(p, a, lazy=True) for p, a in zip(paths, archs)]
    for m in models[1:]:
        if m.family.name != models[0].family.name:
            raise ClafuseError(f"cannot align a {models[0].family.name} with a {m.family.name} ({m.path})")
    depths = [m.depth for m in models]
    center = _model_index("deep" if anchor is None else anchor, paths, depths, "--anchor")
    pairs = []
    for i in range(len(models)):
        if i == center:
            continue
        deep, shallow = (center, i) if depths[center] >= depths[i] else (i, center)
        _check_pair(models, deep, shallow)
        pairs.append((deep, shallow))
    base = Path(out).parent if out else Path.cwd()
    data_entry = None
    acts = None
    if metric != "neuron":
        if data is None:
            raise ClafuseError(f"metric {metric!r} needs calibration data: pass --data (or use --metric neuron)")
        x = _calibration(data, samples, seed)
        is_file = _is_path(data)
        data_entry = DataEntry(source=_rel(Path(data), base) if is_file else data, split="train", samples=samples,
                               seed=seed, sha256=sha256_file(data) if Path(data).is_file() else None)
        for m in models:
            check_fits(m, x, f"data {data}")
        acts = [m.layer_outputs(x) for m in models]
    alignments = [_align_pair(models, deep, shallow, metric, acts, pin_first, pin_last) for deep, shallow in pairs]
    if len(models) == 2:
        roles = ["deep" if i == pairs[0][0] else "shallow" for i in range(2)]
    else:
        roles = ["anchor" if i == center else "member" for i in range(len(models))]
    entries = [
        ModelEntry(path=_rel(m.path, base), sha256=m.sha256, family=m.family.name,
                   spec=m.spec.model_dump(mode="json"),
                   groups=[GroupEntry(name=g.name, layers=[LayerEntry(name=l.name, width=l.width) for l in g.layers])
                           for g in m.groups],
                   role=role)
        for m, role in zip(models, roles)
    ]
    doc = MapFile(tool=f"clafuse {clafuse.__version__}", models=entries, anchor=center,
                  settings=Settings(metric=metric, pin_first=pin_first, pin_last=pin_last),
                  data=data_entry, alignments=alignments)
    if out is not None:
        write_text_atomic(out, dump_map(doc))
    return doc


def _map_model(entry: ModelEntry, base: Path) -> LoadedModel:
    path = base / entry.path
    if not path.exists():
        raise MapError(f"{path}: checkpoint named in the map does not exist")
    family, spec = parse_spec(entry.spec, f"map entry {entry.path}")
    state_dict = open_checkpoint(path)
    family.check(spec, state_dict.skeleton() if isinstance(state_dict, LazyStateDict) else state_dict)
    model = LoadedModel(path, state_dict, family, spec)
    if model.sha256 != entry.sha256:
        raise MapError(f"{path} changed since align (sha256 {model.sha256[:12]}…, the map has {entry.sha256[:12]}…); "
                       f"run align again")
    return model


def resolve_target(doc: MapFile, target: str | int | None, balance: str | None) -> int:
    """The index of the model whose architecture the fused checkpoint takes.

    By default the map's anchor; ``target`` names another (deep, shallow, a letter or an index),
    which needs an alignment between it and every other model, i.e. a two-model map or the anchor.
    ``balance`` (two-model maps) says the same by method: ``add`` = the deeper, ``merge`` = the
    shallower; given together they must agree.
    """
    depths = [sum(len(g.layers) for g in m.groups) for m in doc.models]
    if target is not None:
        chosen = _model_index(target, [m.path for m in doc.models], depths, "--target")
        if len(doc.models) == 2 and target in ("deep", "shallow"):
            pair = doc.alignments[0]
            chosen = pair.deep if target == "deep" else pair.shallow
    elif balance is not None:
        if balance not in ("add", "merge"):
            raise ClafuseError(f"unknown balance {balance!r}; choose from add, merge")
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
    """Mixing weights, one per model in align order; equal weights when not given."""
    if text is None:
        return [1.0 / count] * count
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise ClafuseError(f"--weights must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count or any(v < 0 or v != v for v in values) or sum(values) <= 0:
        raise ClafuseError(f"--weights must be {count} non-negative numbers with a positive sum, got {text!r}")
    return values


def fuse(map_path: str | os.PathLike, out: str | os.PathLike, *, balance: str | None = None,
         target: str | int | None = None, weights: str | Sequence[float] | None = None, data: str | None = None,
         samples: int | None = None, signal: str | None = None, allow_nonfinite: bool = False,
         dtype: str | None = None, max_shard_size: str | int | None = None, **options: Any) -> dict[str, Any]:
    """Balance and fuse all models of a map into one checkpoint written to ``out``.

    The output takes the target's architecture (:func:`resolve_target`: the anchor by default),
    e.g. to fuse a deep teacher into a shallow student's. Each other model is balanced to it (add:
    identities into a shallower model; merge: a deeper model's unmatched layers folded),
    transported into its neuron order and averaged with ``weights`` (one per model, align order).
    Activations drive the transport when calibration data is at hand (the map's, or ``data``), else
    weights; ``options`` are further :class:`~clafuse.fusion.otfusion.FusionSettings` fields.
    ``dtype`` overrides the target's floating-point dtype; above ``max_shard_size`` the output is
    written as shards with an index.
    """
    started = time.perf_counter()
    check_output(out, dtype, max_shard_size)
    doc = read_map(map_path)
    base = Path(map_path).parent
    models = [_map_model(entry, base) for entry in doc.models]
    if not allow_nonfinite:
        for m in models:
            bad = nonfinite_keys(m.state_dict)
            if bad:
                raise ClafuseError(f"{m.path}: {bad[0]} has NaN or Inf values; pass --allow-nonfinite to fuse anyway")
    alpha = parse_weights(weights, len(models))
    chosen = resolve_target(doc, target, balance)
    sources, methods = [], {}
    for i, m in enumerate(models):
        if i == chosen:
            continue
        pair = next(a for a in doc.alignments if {a.deep, a.shallow} == {i, chosen})
        sources.append((i, Source(Member(m.family, m.spec, m.state_dict), [g.mapping for g in pair.groups],
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
        x = _calibration(source, n, seed, base=None if data is not None else base)
        for m in models:
            check_fits(m, x, f"data {source}")
    if signal is None:
        signal = "activations" if x is not None else "weights"
    if signal == "activations" and x is None:
        raise ClafuseError("the activation signal needs calibration data: pass --data, or --signal weights")
    without_data = x is None and options.get("correction", "regress") != "none"
    if without_data:
        options["correction"] = "none"
    try:
        settings = FusionSettings(signal=signal, **options)
    except TypeError as exc:
        raise ClafuseError(f"unknown fusion option: {exc}") from None

    target_model = models[chosen]
    engine = ENGINES[target_model.family.engine]
    order = [chosen, *(i for i, _ in sources)]
    result = engine(Member(target_model.family, target_model.spec, target_model.state_dict),
                    [source for _, source in sources], [alpha[i] for i in order], x, settings)
    if without_data:
        log.warning("no calibration data: fused without correction or BatchNorm reset (pass --data to enable them)")
    state = cast_state(result.state_dict, dtype)
    metadata = {
        "clafuse_version": clafuse.__version__,
        "map_sha256": map_digest(map_path),
        "inputs": json.dumps([{"path": e.path, "sha256": e.sha256} for e in doc.models]),
        "target": doc.models[chosen].path,
        "settings": json.dumps({"balance": balance if len(models) == 2 else methods, "weights": alpha,
                                "dtype": dtype, **settings.__dict__}),
    }
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
        "calibration_samples": int(x.shape[0]) if x is not None else 0,
        "mapping": sources[0][1].mappings if len(models) == 2 else {model_letter(i): s.mappings for i, s in sources},
        "layers": [{"name": l.name, "width": l.width} for g in target_model.groups for l in g.layers],
        "mixing": [[round(float(v), 6) for v in row] for row in result.mixing],
        "mixing_order": [model_letter(i) for i in order],
        "seconds": round(time.perf_counter() - started, 3),
    }


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_output(out: str | os.PathLike, dtype: str | None = None, max_shard_size: str | int | None = None) -> None:
    """Refuse an unusable output name, dtype or shard size before any work is done."""
    output_format(out, max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise ClafuseError(f"--dtype must be one of fp32, fp16, bf16; got {dtype!r}")
    if not Path(out).parent.is_dir():
        raise ClafuseError(f"cannot write {out}: directory {Path(out).parent} does not exist")


def cast_state(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors in ``dtype`` (fp32, fp16, bf16); unchanged for None."""
    if dtype is None:
        return state
    if dtype not in DTYPES:
        raise ClafuseError(f"--dtype must be one of fp32, fp16, bf16; got {dtype!r}")
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


def evaluate_checkpoints(paths: Sequence[str | os.PathLike], data: str,
                         archs: Sequence[str | os.PathLike | None] | None = None) -> dict[str, Any]:
    """Accuracy and loss of each checkpoint on ``data`` (test split by default), and of their
    prediction ensemble when there are several."""
    from clafuse.training import evaluate, evaluate_ensemble

    archs = list(archs) if archs else [None] * len(paths)
    models = [load_model(p, a) for p, a in zip(paths, archs)]
    ds = load_source(data, split="test")
    if ds.y is None:
        raise DataError(f"data {data}: evaluation needs labels (array 'y')")
    modules = []
    for m in models:
        check_fits(m, ds.x, f"data {data}")
        modules.append(m.module())
    rows = [{"path": str(m.path), **evaluate(mod, ds)} for m, mod in zip(models, modules)]
    doc: dict[str, Any] = {"data": data, "num_samples": len(ds), "models": rows}
    if len(modules) > 1:
        doc["ensemble"] = evaluate_ensemble(modules, ds)
    return doc


def train_state_path(out: str | os.PathLike) -> Path:
    """Where ``finetune_checkpoint`` keeps the training state of a run writing ``out``: ``OUT.state.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".state.pt")


def finetune_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, data: str, val: str | None = None,
                        epochs: int = 1, lr: float = 0.01, momentum: float = 0.9, batch_size: int = 64,
                        schedule: str = "cosine", weight_decay: float = 0.0, seed: int = 0,
                        arch: str | os.PathLike | None = None, progress: bool = False,
                        optimizer: str = "sgd", nesterov: bool = False, warmup_steps: int = 0,
                        label_smoothing: float = 0.0, augment: str = "none",
                        teacher: str | os.PathLike | None = None, teacher_arch: str | os.PathLike | None = None,
                        kd_alpha: float = 0.5, kd_temperature: float = 4.0,
                        metrics_out: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
                        resume: bool = False, precision: str = "fp32") -> dict[str, Any]:
    """Finetune a checkpoint and write the epoch with the best validation accuracy (never selected on
    test data) to ``out``, in the input's key names and dtypes.

    With ``teacher`` the student is distilled from that checkpoint (same classes, same inputs).
    The training state is saved to :func:`train_state_path` after every epoch and removed once
    ``out`` is written; ``resume`` continues an interrupted run from it (same settings required).
    ``metrics_out`` gets one JSON line per epoch as training goes; ``plot`` a PNG of the curves.
    ``precision`` ``bf16``/``fp16`` runs the forward passes under autocast (fp16 needs CUDA).

    Training runs on CUDA when available (``cuda:LOCAL_RANK``), else on the CPU. Started by torchrun
    with several processes, the run is data parallel (see :func:`clafuse.training.finetune`):
    ``batch_size`` is the global batch, every rank reads the inputs itself, and rank 0 alone writes
    ``out``, the metrics, the plot and the training state (and reads it to resume); every rank
    returns the same report.
    """
    from clafuse import distributed as ddp
    from clafuse.training import FinetuneConfig, check_precision, finetune, load_train_state, save_train_state

    with ddp.same_on_every_rank():
        launch = ddp.launch_from_env()
        device = ddp.default_device(launch)
        config = FinetuneConfig(epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size, schedule=schedule,
                                weight_decay=weight_decay, seed=seed, optimizer=optimizer, nesterov=nesterov,
                                warmup_steps=warmup_steps, label_smoothing=label_smoothing, augment=augment,
                                kd_alpha=kd_alpha, kd_temperature=kd_temperature, precision=precision)
        check_precision(precision, device)
    with ddp.process_group(launch):
        main = ddp.rank() == 0
        state_file = train_state_path(out)
        resume_from = None
        with ddp.agree():
            model = load_model(path, arch)
            train = load_source(data, split="train")
            if val is None and not has_val_split(data):
                raise DataError("a .npz training file has no validation split: pass --val")
            val_ds = load_source(val if val is not None else data, split="val")
            for ds, name in ((train, data), (val_ds, val or data)):
                if ds.y is None:
                    raise DataError(f"data {name}: finetuning needs labels (array 'y')")
                check_fits(model, ds.x, f"data {name}")
            teacher_model = teacher_module = None
            if teacher is not None:
                teacher_model = load_model(teacher, teacher_arch)
                check_fits(teacher_model, train.x, f"teacher {teacher} on data {data}")
                with torch.no_grad():
                    probe = train.x[:2]
                    student_classes = model.family.forward(model.spec, model.state_dict, probe).shape[-1]
                    teacher_classes = teacher_model.family.forward(teacher_model.spec, teacher_model.state_dict,
                                                                   probe).shape[-1]
                if student_classes != teacher_classes:
                    raise DataError(f"teacher {teacher} has {teacher_classes} classes but the student {path} has "
                                    f"{student_classes}")
                teacher_module = teacher_model.module().to(device)
            if main:
                identity = {"input_sha256": model.sha256,
                            "teacher_sha256": teacher_model.sha256 if teacher_model is not None else None}
                if resume:
                    resume_from = load_train_state(state_file)
                    if resume_from.get("identity") != identity:
                        raise ClafuseError(f"{state_file} was saved for a different checkpoint or teacher; "
                                           "run without --resume to start afresh")
        if resume:
            resume_from = ddp.broadcast_object(resume_from)

        def on_state(state: dict) -> None:
            save_train_state(state_file, {**state, "identity": identity})

        metrics_fh = None

        def on_epoch(record: dict) -> None:
            if metrics_fh is not None:
                metrics_fh.write(json.dumps(record) + "\n")
                metrics_fh.flush()

        try:
            with ddp.agree():
                if main and metrics_out is not None:
                    try:
                        metrics_fh = open(metrics_out, "w", encoding="utf-8")
                    except OSError as exc:
                        raise ClafuseError(f"cannot write {metrics_out}: {exc.strerror or exc}") from None
            if metrics_fh is not None and resume_from is not None:
                for record in resume_from["history"]:
                    on_epoch(record)
            module = model.module().to(device)
            result = finetune(module, train, val_ds, config, on_epoch=on_epoch if main else None,
                              progress=progress and main, teacher=teacher_module,
                              on_state=on_state if main else None, resume_from=resume_from)
        finally:
            if metrics_fh is not None:
                metrics_fh.close()
        with ddp.agree():
            if main:
                state = {k: v.to(model.state_dict[k].dtype) for k, v in result.best_state.items()}
                metadata = {"clafuse_version": clafuse.__version__, "finetuned_from": model.sha256,
                            "best_epoch": str(result.best_epoch), "history": json.dumps(result.history)}
                if teacher_model is not None:
                    metadata["distilled_from"] = teacher_model.sha256
                save_checkpoint(out, state, metadata)
                if plot is not None:
                    from clafuse.plots import plot_history

                    plot_history(result.history, plot)
                state_file.unlink(missing_ok=True)
    return {"input": str(path), "output": str(out), "best_epoch": result.best_epoch, "history": result.history}
