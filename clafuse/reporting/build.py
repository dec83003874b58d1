"""``clafuse report``: gather what a map (and optionally a fused checkpoint) says into one document,
then write it as a self-contained HTML page and, on request, the figures as PNG files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from clafuse import api
from clafuse.align.mapfile import MapFile, map_digest, read_map
from clafuse import progress
from clafuse.api.common import load_data
from clafuse.data import calibration_inputs
from clafuse.data.normalize import Normalization
from clafuse.errors import ClafuseError, SpecError
from clafuse.options import MIN_REG, Solver, check_choice, check_integer, check_number
from clafuse.io.atomic import atomic_output, write_text_atomic
from clafuse.io.checkpoint import load_checkpoint, read_metadata
from clafuse.io.keys import KeyMap
from clafuse.reporting import figures
from clafuse.reporting.content import AlignmentSection, FusedSection, Report, ReportFigure
from clafuse.reporting.html import render_page
from clafuse.reporting.mapping import PairView, balance_changes, letter, mapping_words, pair_views
from clafuse.reporting.stats import fused_similarity, load_map_models, transport_statistics

DEFAULT_REPORT_SAMPLES = 1000


def build_report(map_path: str | os.PathLike, out: str | os.PathLike, *, fused: str | os.PathLike | None = None,
                 data: str | None = None, samples: int | None = None, solver: str | None = None,
                 reg: float | None = None, png_dir: str | os.PathLike | None = None,
                 normalize: str | None = None) -> dict[str, Any]:
    """Write the HTML report of ``map_path`` to ``out`` (and its figures as PNGs into ``png_dir``).

    Transport statistics need activations: the map's calibration data (as align drew it) or
    ``data``. With ``fused`` (a checkpoint written by ``fuse`` from this map) the page adds each
    fused layer's similarity to the parents and, with labelled ``data`` (test split by default),
    an accuracy table. ``solver``/``reg`` default to the fused checkpoint's settings, else emd.
    ``normalize`` (``--normalize`` text) standardises the inputs; by default they are standardised
    as the map's calibration data was. Returns the report's numbers as plain data.
    """
    _check_destinations(out, png_dir)
    Normalization.parse(normalize)
    if samples is not None:
        check_integer("--samples", samples, at_least=2)
    report = collect(map_path, fused=fused, data=data, samples=samples, solver=solver, reg=reg, normalize=normalize)
    with progress.step(f"writing {out}"):
        write_text_atomic(out, render_page(report))
    written = []
    if png_dir is not None:
        Path(png_dir).mkdir(exist_ok=True)
        for figure in report.figures():
            target = Path(png_dir) / f"{figure.name}.png"
            with atomic_output(target) as tmp:
                Path(tmp).write_bytes(figure.png)
            written.append(str(target))
    return {"output": str(out), "pngs": written, **report.summary()}


def _check_destinations(out: str | os.PathLike, png_dir: str | os.PathLike | None) -> None:
    if not Path(out).parent.is_dir():
        raise ClafuseError(f"cannot write {out}: directory {Path(out).parent} does not exist")
    if png_dir is not None:
        png = Path(png_dir)
        if png.exists() and not png.is_dir():
            raise ClafuseError(f"--png-dir {png_dir} exists and is not a directory")
        if not png.parent.is_dir():
            raise ClafuseError(f"cannot create --png-dir {png_dir}: directory {png.parent} does not exist")


def collect(map_path: str | os.PathLike, *, fused: str | os.PathLike | None = None, data: str | None = None,
            samples: int | None = None, solver: str | None = None, reg: float | None = None,
            normalize: str | None = None) -> Report:
    """Compute everything the report shows (see :func:`build_report`)."""
    doc = read_map(map_path)
    base = Path(map_path).parent
    metadata = read_metadata(fused) if fused is not None else {}
    settings = json.loads(metadata.get("settings", "{}") or "{}")
    solver = solver or settings.get("solver", "emd")
    reg = reg if reg is not None else float(settings.get("reg", 0.05))
    check_choice("--solver", solver, Solver)
    check_number("--reg", reg, above=MIN_REG)
    notes: list[str] = []
    norm = Normalization.parse(normalize)
    if norm is None and doc.data is not None:
        norm = Normalization.from_list(doc.data.normalize)
    with progress.step(f"reading {len(doc.models)} checkpoints"):
        models = load_map_models(doc, base)
    fused_state = target = None
    if fused is not None:
        target, fused_state = _fused_target(doc, models, load_checkpoint(fused), metadata, fused)
        if metadata.get("map_sha256") not in (None, map_digest(map_path)):
            notes.append(f"{fused} was fused from a different map file than {map_path}")
    target = doc.anchor if target is None else target
    views = pair_views(doc, target)

    x, calibration = _inputs(doc, base, data, samples, norm)
    outputs = None
    if x is None:
        notes.append("no calibration data (the map was aligned without data and no --data was given): "
                     "transport statistics and layer similarities need activations")
    else:
        for m in models:
            api.check_fits(m, x, f"data {calibration}")
        with progress.step(f"recording activations of {len(models)} models"):
            outputs = [m.layer_outputs(x) for m in models]
    with progress.step("transport statistics"):
        stats = transport_statistics(views, outputs, target, solver, reg) if outputs is not None else None
    sections = []
    for k, view in enumerate(views):
        stem = f"align-{view.shallow_letter}-into-{view.deep_letter}"
        sections.append(AlignmentSection(
            view=view,
            words={g.name: mapping_words(view, g) for g in view.groups},
            changes=balance_changes(view),
            heatmaps=[ReportFigure(f"{stem}-{_slug(g.name)}",
                                   f"group {g.name}: layer costs, {view.shallow_letter} into {view.deep_letter}",
                                   figures.cost_heatmap(view, g)) for g in view.groups],
            transport=None if stats is None else stats[k]))
    report = Report(map_path=str(map_path), doc=doc, target=target, calibration=calibration,
                    alignments=sections, notes=notes)
    if fused is not None:
        report.fused = _fused_section(doc, models, views, outputs, x, fused, fused_state, target, data, norm)
    return report


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "group"


def _inputs(doc: MapFile, base: Path, data: str | None, samples: int | None,
            norm: Normalization | None) -> tuple[torch.Tensor | None, str | None]:
    """The map's calibration inputs (the same draw as align's), else ``samples`` from ``data``."""
    if doc.data is not None:
        source = doc.data.source
        if not Path(source).is_absolute() and (base / source).exists():
            source = str(base / source)
        n = samples or doc.data.samples
        return calibration_inputs(load_data(source, doc.data.split, norm), n, doc.data.seed), \
            f"{doc.data.source}:{doc.data.split} ({n} samples, seed {doc.data.seed})"
    if data is None:
        return None, None
    ds = load_data(data, "test", norm)
    n = min(samples or DEFAULT_REPORT_SAMPLES, len(ds))
    return calibration_inputs(ds, n, 0), f"{data} ({n} samples)"


def _fused_target(doc: MapFile, models: list[api.LoadedModel], state: dict[str, torch.Tensor],
                  metadata: dict[str, str], path: str | os.PathLike) -> tuple[int, dict[str, torch.Tensor]]:
    """The map model whose architecture the fused checkpoint has (the one its metadata names, else
    the first, anchor first, whose spec fits its tensors) and the tensors under that model's names:
    a checkpoint written with ``--keep-wrapper`` has the input's own names, which the model's key
    handling turns back."""
    named = [i for i, e in enumerate(doc.models) if e.path == metadata.get("target")]
    order = named or [doc.anchor, *(i for i in range(len(models)) if i != doc.anchor)]
    for i in order:
        candidates = [state]
        if not models[i].keys.is_identity:
            try:
                candidates.append(dict(models[i].keys.apply(state, str(path)).view(state)))
            except ClafuseError:
                pass
        for candidate in candidates:
            try:
                models[i].family.check(models[i].spec, candidate)
                return i, candidate
            except SpecError:
                continue
    raise ClafuseError(f"{path} has the architecture of none of the map's models: pass the checkpoint that "
                       f"'clafuse fuse' wrote from this map")


def _fused_section(doc: MapFile, models: list[api.LoadedModel], views: list[PairView],
                   outputs: list[list[torch.Tensor]] | None, x: torch.Tensor | None, path: str | os.PathLike,
                   state: dict[str, torch.Tensor], target: int, data: str | None,
                   norm: Normalization | None) -> FusedSection:
    fused_model = api.LoadedModel(Path(path), state, models[target].family, models[target].spec)
    similarity = chart = None
    if outputs is not None:
        names = [layer.name for g in models[target].groups for layer in g.layers]
        similarity = fused_similarity(views, outputs, fused_model.layer_outputs(x), target, names)
        chart = ReportFigure("fused-similarity", "linear CKA of each fused layer with each parent",
                             figures.similarity_chart(similarity, [letter(i) for i in range(len(models))]))
    accuracy = _accuracy(doc, models, path, target, data, norm) if data is not None else None
    return FusedSection(path=str(path), similarity=similarity, chart=chart, accuracy=accuracy, data=data)


def _accuracy(doc: MapFile, models: list[api.LoadedModel], fused: str | os.PathLike, target: int,
              data: str, normalize: Normalization | None) -> list[dict[str, Any]]:
    """Accuracy and loss of every parent, their prediction ensemble and the fused network on ``data``,
    evaluated with the specs the map recorded."""
    with tempfile.TemporaryDirectory(prefix="clafuse-report-") as tmp:
        specs = []
        for i, entry in enumerate(doc.models):
            spec = Path(tmp) / f"{i}.json"
            spec.write_text(json.dumps(entry.spec))
            specs.append(spec)
        parents = api.evaluate_checkpoints([m.path for m in models], data, archs=specs,
                                           keys=[m.keys for m in models], normalize=normalize,
                                           ensemble_of=list(range(len(models))))
        fused_doc = api.evaluate_checkpoints([fused], data, archs=[specs[target]],
                                             keys=KeyMap(ignore=models[target].keys.ignore), normalize=normalize)
    rows = [{"model": letter(i), "path": doc.models[i].path, "accuracy": r["accuracy"], "loss": r["loss"]}
            for i, r in enumerate(parents["models"])]
    if "ensemble" in parents:
        rows.append({"model": "ensemble", "path": "prediction average of the parents",
                     "accuracy": parents["ensemble"]["accuracy"], "loss": parents["ensemble"]["loss"]})
    rows.append({"model": "fused", "path": str(fused), "accuracy": fused_doc["models"][0]["accuracy"],
                 "loss": fused_doc["models"][0]["loss"]})
    return rows
