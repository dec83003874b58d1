"""Human-readable rendering of command results as rich tables (the ``--json`` path skips this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    return Console()


def render_inspect(doc: dict[str, Any]) -> None:
    console = _console()
    console.print(f"[bold]{doc['path']}[/]  family [cyan]{doc['family']}[/]  depth {doc['depth']} hidden layers  "
                  f"{doc['total_params']:,} parameters  dtypes {', '.join(doc['dtypes'])}")
    table = Table("group", "#", "layer", "width", "params")
    for group in doc["groups"]:
        for i, layer in enumerate(group["layers"]):
            table.add_row(group["name"] if i == 0 else "", str(i), layer["name"], str(layer["width"]),
                          f"{layer['params']:,}")
    console.print(table)
    if doc["nonfinite"]:
        console.print(f"[red]non-finite values in: {', '.join(doc['nonfinite'])}[/]")


def render_map(doc: dict[str, Any], out: Path) -> None:
    """Per alignment and group: the cost table with the chosen cells starred (readable without
    colour), the mapping in words and the layers that balancing inserts or drops."""
    from clafuse.align.mapfile import MapFile
    from clafuse.reporting.mapping import mapping_words, balance_changes, pair_views

    console = _console()
    models = doc["models"]
    for view in pair_views(MapFile.model_validate(doc)):
        deep, shallow = models[view.deep], models[view.shallow]
        console.print(f"{view.shallow_letter} = {shallow['path']} (shallow) into {view.deep_letter} = "
                      f"{deep['path']} (deep), metric {doc['settings']['metric']}", markup=False, soft_wrap=True)
        for g, gd, gs in zip(view.groups, deep["groups"], shallow["groups"]):
            table = Table(title=f"group {g.name}: total cost {g.total_cost:.4f}", caption="* = chosen")
            table.add_column(f"{view.shallow_letter} \\ {view.deep_letter}")
            for layer in gd["layers"]:
                table.add_column(f"{layer['name']} ({layer['width']})", justify="right")
            for i, (row, layer) in enumerate(zip(g.cost, gs["layers"])):
                cells = [f"[bold green]*{c:.3f}[/]" if j == g.mapping[i] else f" {c:.3f}" for j, c in enumerate(row)]
                table.add_row(f"{layer['name']} ({layer['width']})", *cells)
            console.print(table)
            console.print(f"mapping: {mapping_words(view, g)}", markup=False, soft_wrap=True)
        for sentence in balance_changes(view):
            console.print(sentence, markup=False, soft_wrap=True)
    console.print(f"map written to {out}", markup=False, soft_wrap=True)


def render_fuse(doc: dict[str, Any], map_path: Path | None = None) -> None:
    """The fused layers with each model's mixing weight in align order (as the weights in the
    header line); with the map, what each other model contributes per layer (its matched layer,
    an inserted identity, folded layers)."""
    console = _console()
    balance = doc["balance"] if isinstance(doc["balance"], str) else \
        ", ".join(f"{name} {method}" for name, method in doc["balance"].items())
    order = sorted(doc["mixing_order"], key=lambda name: (len(name), name))
    weights = ", ".join(f"{name} {w:g}" for name, w in zip(order, doc["weights"]))
    console.print(f"fused into the architecture of [cyan]{doc['target']}[/] ({doc['family']}, balance {balance}, "
                  f"signal {doc['signal']}, weights {weights})")
    notes = None
    if map_path is not None:
        from clafuse.align.mapfile import read_map
        from clafuse.reporting.mapping import target_layer_notes

        notes = target_layer_notes(read_map(map_path), order.index(doc["mixing_order"][0]))
    table = Table("layer", "width", *(f"mixing {name}" for name in order),
                  *(("from the other models",) if notes is not None else ()))
    for k, (layer, mix) in enumerate(zip(doc["layers"], doc["mixing"])):
        by_name = dict(zip(doc["mixing_order"], mix))
        table.add_row(layer["name"], str(layer["width"]), *(f"{by_name[name]:.2f}" for name in order),
                      *((notes[k],) if notes is not None else ()))
    console.print(table)
    for name, error in doc.get("approximate_identities", {}).items():
        console.print(f"approximate: inserted {name} is a near-identity fitted on the calibration data "
                      f"(relative error {error:.3f}); post-LN layers have no exact identity")
    files = doc.get("files", [doc["output"]])
    written = files[0] if len(files) == 1 else f"{len(files) - 1} shards and {files[-1]}"
    console.print(f"written to {written} in {doc['seconds']:.2f} s")


def render_eval(doc: dict[str, Any]) -> None:
    if doc.get("kind") == "text":
        table = Table("model", "cosine to first", "similarity Spearman to first",
                      title=f"{doc['data']} ({doc['num_samples']} sentences)")
        for row in doc["models"]:
            rho = row["similarity_spearman_to_first"]
            table.add_row(row["path"], f"{row['cosine_to_first']:.4f}", "-" if rho is None else f"{rho:.4f}")
        _console().print(table)
        return
    table = Table("model", "accuracy", "loss", title=f"{doc['data']} ({doc['num_samples']} samples)")
    for row in doc["models"]:
        table.add_row(row["path"], f"{100 * row['accuracy']:.2f}%", f"{row['loss']:.4f}")
    if "ensemble" in doc:
        table.add_row("ensemble", f"{100 * doc['ensemble']['accuracy']:.2f}%", f"{doc['ensemble']['loss']:.4f}")
    _console().print(table)


def render_finetune(doc: dict[str, Any]) -> None:
    metric = doc.get("metric", "accuracy")
    short = "acc" if metric == "accuracy" else metric

    def fmt(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"

    table = Table("epoch", "lr", "train loss", f"train {short}", "val loss", f"val {short}", "s")
    for h in doc["history"]:
        mark = " *" if h["epoch"] == doc["best_epoch"] else ""
        table.add_row(f"{h['epoch']}{mark}", f"{h['lr']:.4g}", f"{h['train_loss']:.4f}", fmt(h[f"train_{metric}"]),
                      "-" if h.get("val_loss") is None else f"{h['val_loss']:.4f}", fmt(h.get(f"val_{metric}")),
                      f"{h['seconds']:.1f}")
    console = _console()
    console.print(table)
    console.print(f"best epoch {doc['best_epoch']} (by validation {metric}) written to {doc['output']}")


def render_text_eval(doc: dict[str, Any]) -> None:
    """Table of :func:`clafuse.api.encoders.evaluate_encoders`'s measures."""

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    title = (f"{doc['data']} ({doc['num_sentences']} sentences, retrieval among {doc['retrieval_pairs']})"
             + (f", teacher {doc['teacher']}" if doc.get("teacher") else ""))
    table = Table("model", "layers", "cosine", "spearman", "recall@1", "recall@5", "mrr", title=title)
    rows = [(r["path"], str(r["layers"]), r) for r in doc["models"]]
    if doc.get("teacher_metrics"):
        rows.append(("teacher", "", doc["teacher_metrics"]))
    for name, layers, r in rows:
        table.add_row(name, layers, num(r.get("cosine")), num(r.get("spearman")), num(r["recall@1"]),
                      num(r["recall@5"]), num(r["mrr"]))
    _console().print(table)
