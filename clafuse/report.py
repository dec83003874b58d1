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
    keys = doc.get("keys") or {}
    if keys.get("strip_prefix") or keys.get("rename") or keys.get("ignore") or doc.get("ignored_keys"):
        from clafuse.io.keys import KeyMap

        ignored = doc.get("ignored_keys") or []
        left_out = f"; left out {len(ignored)} tensor{'s' if len(ignored) > 1 else ''}: {', '.join(ignored[:8])}" + (" ..." if len(ignored) > 8 else "") \
            if ignored else ""
        console.print(f"keys: {KeyMap.model_validate(keys).describe()}{left_out}", markup=False, soft_wrap=True)
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
    files = doc.get("files", [doc["output"]])
    written = files[0] if len(files) == 1 else f"{len(files) - 1} shards and {files[-1]}"
    console.print(f"written to {written} in {doc['seconds']:.2f} s")


def render_eval(doc: dict[str, Any]) -> None:
    from clafuse.api.common import model_letter

    table = Table("", "model", "accuracy", "loss", title=f"{doc['data']} ({doc['num_samples']} samples)")
    for k, row in enumerate(doc["models"]):
        table.add_row(model_letter(k), row["path"], f"{100 * row['accuracy']:.2f}%", f"{row['loss']:.4f}")
    if "ensemble" in doc:
        members = doc.get("ensemble_of")
        label = f"ensemble of {', '.join(members)}" if members else "ensemble"
        table.add_row("", label, f"{100 * doc['ensemble']['accuracy']:.2f}%", f"{doc['ensemble']['loss']:.4f}")
    _console().print(table)


def render_finetune(doc: dict[str, Any]) -> None:
    table = Table("epoch", "lr", "train loss", "train acc", "val loss", "val acc", "s")
    for h in doc["history"]:
        mark = " *" if h["epoch"] == doc["best_epoch"] else ""
        table.add_row(f"{h['epoch']}{mark}", f"{h['lr']:.4g}", f"{h['train_loss']:.4f}",
                      f"{100 * h['train_accuracy']:.2f}%",
                      "-" if h.get("val_loss") is None else f"{h['val_loss']:.4f}",
                      "-" if h.get("val_accuracy") is None else f"{100 * h['val_accuracy']:.2f}%",
                      f"{h['seconds']:.1f}")
    console = _console()
    console.print(table)
    console.print(f"best epoch {doc['best_epoch']} (by validation accuracy) written to {doc['output']}")
