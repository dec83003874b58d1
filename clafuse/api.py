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
from typing import Any, Sequence

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
from clafuse.data import calibration_inputs, load_source
from clafuse.errors import ClafuseError, DataError, MapError
from clafuse.fusion.engines import ENGINES, Member
from clafuse.fusion.otfusion import FusionSettings
from clafuse.io.atomic import sha256_file, write_text_atomic
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint

DEFAULT_SAMPLES = 2000
log = logging.getLogger("clafuse")


@dataclass
class LoadedModel:
    """A checkpoint with its family and spec."""

    path: Path
    state_dict: dict[str, torch.Tensor]
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
               allow_nonfinite: bool = True) -> LoadedModel:
    """Read a checkpoint and find its architecture (from ``arch`` if given, else detected)."""
    state_dict = load_checkpoint(path)
    family, spec = resolve(state_dict, arch)
    if not allow_nonfinite:
        bad = nonfinite_keys(state_dict)
        if bad:
            raise ClafuseError(f"{path}: {bad[0]} has NaN or Inf values"
                               + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    return LoadedModel(Path(path), state_dict, family, spec)


def nonfinite_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
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


def align(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
          archs: Sequence[str | os.PathLike | None] | None = None, data: str | None = None,
          samples: int = DEFAULT_SAMPLES, metric: str = "cka", seed: int = 0,
          pin_first: bool = True, pin_last: bool = True) -> MapFile:
    """Align the layers of two checkpoints (in either order) and write the map to ``out``.

    The deeper model is found automatically; per alignment group, the shallow x deep cost matrix
    is computed (``metric``) and the optimal order-preserving mapping solved by DP.
    """
    if len(paths) != 2:
        raise ClafuseError(f"align takes exactly two checkpoints, got {len(paths)}")
    if metric not in METRICS:
        raise ClafuseError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    archs = list(archs) if archs else [None] * len(paths)
    models = [load_model(p, a) for p, a in zip(paths, archs)]
    if models[0].family.name != models[1].family.name:
        raise ClafuseError(f"cannot align a {models[0].family.name} with a {models[1].family.name}")
    g0, g1 = models[0].groups, models[1].groups
    if len(g0) != len(g1):
        raise ClafuseError(f"{paths[0]} has {len(g0)} alignment groups ({', '.join(g.name for g in g0)}) "
                           f"but {paths[1]} has {len(g1)}")
    deep = 0 if models[0].depth >= models[1].depth else 1
    shallow = 1 - deep
    for gd, gs in zip(models[deep].groups, models[shallow].groups):
        if len(gs.layers) > len(gd.layers):
            raise ClafuseError(f"group {gd.name!r}: {paths[shallow]} has more layers ({len(gs.layers)}) than "
                               f"{paths[deep]} ({len(gd.layers)}), although it is shallower overall")
        if not gs.layers:
            raise ClafuseError(f"group {gd.name!r} of {paths[shallow]} has no hidden layer to align")
    base = Path(out).parent if out else Path.cwd()
    data_entry = None
    if metric != "neuron":
        if data is None:
            raise ClafuseError(f"metric {metric!r} needs calibration data: pass --data (or use --metric neuron)")
        x = _calibration(data, samples, seed)
        is_file = _is_path(data)
        data_entry = DataEntry(source=_rel(Path(data), base) if is_file else data, split="train", samples=samples,
                               seed=seed, sha256=sha256_file(data) if is_file else None)
        for m in models:
            check_fits(m, x, f"data {data}")
        acts = [m.layer_outputs(x) for m in models]
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
    entries = [
        ModelEntry(path=_rel(m.path, base), sha256=m.sha256, family=m.family.name,
                   spec=m.spec.model_dump(mode="json"),
                   groups=[GroupEntry(name=g.name, layers=[LayerEntry(name=l.name, width=l.width) for l in g.layers])
                           for g in m.groups],
                   role="deep" if i == deep else "shallow")
        for i, m in enumerate(models)
    ]
    doc = MapFile(tool=f"clafuse {clafuse.__version__}", models=entries, anchor=deep,
                  settings=Settings(metric=metric, pin_first=pin_first, pin_last=pin_last),
                  data=data_entry, alignments=[Alignment(shallow=shallow, deep=deep, groups=groups)])
    if out is not None:
        write_text_atomic(out, dump_map(doc))
    return doc


def _map_model(entry: ModelEntry, base: Path) -> LoadedModel:
    path = base / entry.path
    if not path.exists():
        raise MapError(f"{path}: checkpoint named in the map does not exist")
    family, spec = parse_spec(entry.spec, f"map entry {entry.path}")
    state_dict = load_checkpoint(path)
    family.check(spec, state_dict)
    model = LoadedModel(path, state_dict, family, spec)
    if model.sha256 != entry.sha256:
        raise MapError(f"{path} changed since align (sha256 {model.sha256[:12]}…, the map has {entry.sha256[:12]}…); "
                       f"run align again")
    return model


def resolve_balance(balance: str | None, target: str | None, alignment: Alignment) -> str:
    """The balancing method from ``--balance`` and/or ``--target`` (they must agree)."""
    if target is None:
        return balance or "add"
    names = {"deep": alignment.deep, "shallow": alignment.shallow, "A": 0, "B": 1}
    if target not in names:
        raise ClafuseError(f"--target must be one of deep, shallow, A, B; got {target!r}")
    wanted = "add" if names[target] == alignment.deep else "merge"
    if balance is not None and balance != wanted:
        raise ClafuseError(f"--target {target} needs --balance {wanted} (the {'deeper' if wanted == 'add' else 'shallower'} "
                           f"architecture), not --balance {balance}")
    return wanted


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
         target: str | None = None, weights: str | Sequence[float] | None = None, data: str | None = None,
         samples: int | None = None, signal: str | None = None, allow_nonfinite: bool = False,
         **options: Any) -> dict[str, Any]:
    """Balance and fuse the models of a map into one checkpoint written to ``out``.

    ``add`` gives the deep model's architecture, ``merge`` the shallow one's; ``target`` says the
    same by the output architecture (``deep``, ``shallow``, or ``A``/``B`` by align order), e.g. to
    fuse a deep teacher into a shallow student's architecture. Activations drive
    the transport when calibration data is at hand (the map's, or ``data``), else weights;
    ``options`` are further :class:`~clafuse.fusion.otfusion.FusionSettings` fields.
    """
    started = time.perf_counter()
    doc = read_map(map_path)
    base = Path(map_path).parent
    models = [_map_model(entry, base) for entry in doc.models]
    if not allow_nonfinite:
        for m in models:
            bad = nonfinite_keys(m.state_dict)
            if bad:
                raise ClafuseError(f"{m.path}: {bad[0]} has NaN or Inf values; pass --allow-nonfinite to fuse anyway")
    alpha = parse_weights(weights, len(models))
    alignment = doc.alignments[0]
    deep, shallow = models[alignment.deep], models[alignment.shallow]
    balance = resolve_balance(balance, target, alignment)

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
    if x is None and options.get("correction", "regress") != "none":
        log.warning("no calibration data: fusing without correction or BatchNorm reset (pass --data to enable them)")
        options["correction"] = "none"
    try:
        settings = FusionSettings(signal=signal, **options)
    except TypeError as exc:
        raise ClafuseError(f"unknown fusion option: {exc}") from None

    engine = ENGINES[deep.family.engine]
    result = engine(Member(deep.family, deep.spec, deep.state_dict),
                    Member(shallow.family, shallow.spec, shallow.state_dict),
                    [g.mapping for g in alignment.groups], balance,
                    (alpha[alignment.deep], alpha[alignment.shallow]), x, settings)
    target = deep if result.target == "deep" else shallow
    state = result.state_dict
    metadata = {
        "clafuse_version": clafuse.__version__,
        "map_sha256": map_digest(map_path),
        "inputs": json.dumps([{"path": e.path, "sha256": e.sha256} for e in doc.models]),
        "target": doc.models[models.index(target)].path,
        "settings": json.dumps({"balance": balance, "weights": alpha, **settings.__dict__}),
    }
    save_checkpoint(out, state, metadata)
    return {
        "output": str(out),
        "target": str(target.path),
        "family": target.family.name,
        "balance": balance,
        "weights": alpha,
        "signal": signal,
        "correction": settings.correction,
        "calibration_samples": int(x.shape[0]) if x is not None else 0,
        "mapping": [g.mapping for g in alignment.groups],
        "layers": [{"name": l.name, "width": l.width} for g in target.groups for l in g.layers],
        "mixing": result.mixing,
        "seconds": round(time.perf_counter() - started, 3),
    }


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
                        resume: bool = False) -> dict[str, Any]:
    """Finetune a checkpoint and write the epoch with the best validation accuracy (never selected on
    test data) to ``out``, in the input's key names and dtypes.

    With ``teacher`` the student is distilled from that checkpoint (same classes, same inputs).
    The training state is saved to :func:`train_state_path` after every epoch and removed once
    ``out`` is written; ``resume`` continues an interrupted run from it (same settings required).
    ``metrics_out`` gets one JSON line per epoch as training goes; ``plot`` a PNG of the curves.
    """
    from clafuse.training import FinetuneConfig, finetune, load_train_state, save_train_state

    model = load_model(path, arch)
    train = load_source(data, split="train")
    if val is None and _is_path(data):
        raise DataError("a .npz training file has no validation split: pass --val")
    val_ds = load_source(val if val is not None else data, split="val")
    for ds, name in ((train, data), (val_ds, val or data)):
        if ds.y is None:
            raise DataError(f"data {name}: finetuning needs labels (array 'y')")
        check_fits(model, ds.x, f"data {name}")
    config = FinetuneConfig(epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size, schedule=schedule,
                            weight_decay=weight_decay, seed=seed, optimizer=optimizer, nesterov=nesterov,
                            warmup_steps=warmup_steps, label_smoothing=label_smoothing, augment=augment,
                            kd_alpha=kd_alpha, kd_temperature=kd_temperature)
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
        teacher_module = teacher_model.module()

    state_file = train_state_path(out)
    identity = {"input_sha256": model.sha256,
                "teacher_sha256": teacher_model.sha256 if teacher_model is not None else None}
    resume_from = None
    if resume:
        resume_from = load_train_state(state_file)
        if resume_from.get("identity") != identity:
            raise ClafuseError(f"{state_file} was saved for a different checkpoint or teacher; "
                               "run without --resume to start afresh")

    def on_state(state: dict) -> None:
        save_train_state(state_file, {**state, "identity": identity})

    metrics_fh = None
    if metrics_out is not None:
        try:
            metrics_fh = open(metrics_out, "w", encoding="utf-8")
        except OSError as exc:
            raise ClafuseError(f"cannot write {metrics_out}: {exc.strerror or exc}") from None

    def on_epoch(record: dict) -> None:
        if metrics_fh is not None:
            metrics_fh.write(json.dumps(record) + "\n")
            metrics_fh.flush()

    try:
        if metrics_fh is not None and resume_from is not None:
            for record in resume_from["history"]:
                on_epoch(record)
        module = model.module()
        result = finetune(module, train, val_ds, config, on_epoch=on_epoch, progress=progress,
                          teacher=teacher_module, on_state=on_state, resume_from=resume_from)
    finally:
        if metrics_fh is not None:
            metrics_fh.close()
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
