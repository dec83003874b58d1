"""Human-readable rendering of command results as rich tables (the ``--json`` path skips this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
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
    act = doc.get("activation")
    if act:
        text = ("assumes ReLU (the state dict cannot tell; pass --arch with a spec naming another: "
                "relu, gelu, tanh, sigmoid or identity)" if act["assumed"] else f"{act['name']} (from the spec)")
        console.print(f"activation: {text}", markup=False, soft_wrap=True)
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

        used = doc["mapping"] if isinstance(doc["mapping"], dict) else \
            {name: doc["mapping"] for name in doc["mixing_order"][1:]}
        notes = target_layer_notes(read_map(map_path), order.index(doc["mixing_order"][0]), used,
                                   doc.get("carried"))
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
    if "search" in doc:
        render_search(doc["search"], doc["mixing_order"], console)
    files = doc.get("files", [doc["output"]])
    written = files[0] if len(files) == 1 else f"{len(files) - 1} shards and {files[-1]}"
    console.print(f"written to {written} in {doc['seconds']:.2f} s")


def _candidate_cells(record: dict[str, Any]) -> list[str]:
    return [",".join(f"{w:g}" for w in record["weights"]), ",".join(str(r) for r in record["mappings"]),
            record["inserted"], record["correction"], "yes" if record["refit"] else "no", str(record["samples"])]


def _short(cells: list[str]) -> list[str]:
    """Table cells with the policy words shortened, so that the table fits 80 columns."""
    return [cells[0], cells[1], {"average": "avg"}.get(cells[2], cells[2]),
            {"regress": "regr", "repair": "rep"}.get(cells[3], cells[3]), cells[4], cells[5]]


def _score_cells(record: dict[str, Any]) -> list[str]:
    """KL to the ensemble, top-1 agreement with it and, with labels, accuracy; or for encoders the
    cosine agreement with the ensemble's mean embedding."""
    if "cosine" in record:
        return [f"{record['cosine']:.4f}"]
    cells = [f"{record['kl']:.3g}" if "kl" in record else "-",
             f"{100 * record['agreement']:.1f}%" if "agreement" in record else "-"]
    if "accuracy" in record:
        cells.append(f"{100 * record['accuracy']:.2f}%")
    return cells


def _score_words(score: dict[str, Any]) -> str:
    cells = _score_cells(score)
    if "cosine" in score:
        return f"cosine {cells[0]}"
    at = f" at T {score['temperature']:.3g}" if "temperature" in score else ""
    return f"KL {cells[0]}{at}, agreement {cells[1]}" + (f", accuracy {cells[2]}" if len(cells) > 2 else "")


def render_search(search: dict[str, Any], order: list[str], console: Console) -> None:
    """The candidates a search tried (the chosen one starred), the references and the command that
    repeats the choice."""
    labelled = "accuracy" in search["table"][0]
    scores = ("cosine",) if search["scoring"] == "cosine" else ("KL", "agree", *(("acc",) if labelled else ()))
    table = Table("#", f"w {','.join(order)}", "map", "ins", "corr", "refit", "n", *scores, box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"search: {len(search['table'])} candidates, {search['stopped']}, scored by "
                        f"{search['scoring']} on {search['holdout_samples']} "
                        + (f"samples of {search['score_data']}" if search.get("score_data") else "held-out samples"),
                  caption="* = chosen; w: weights; map: rank of each model's mapping among the alignment's best; "
                          "ins: inserted; corr: correction"
                          + ("; KL: to the ensemble at the temperature of the fused logits that minimises it"
                             if search["scoring"] != "cosine" else ""))
    chosen = search["chosen"]
    for r in search["table"]:
        mark = "*" if (r["weights"] == chosen["weights"] and r["mappings"] == chosen["mappings"]
                       and r["inserted"] == chosen["inserted"] and r["correction"] == chosen["correction"]
                       and r["refit"] == chosen["refit_head"]
                       and r["samples"] == search.get("scored_samples", chosen["samples"])) else ""
        table.add_row(f"{mark}{r['index']}", *_short(_candidate_cells(r)), *_score_cells(r))
    console.print(table)
    for name, score in search["references"].items():
        if name.startswith("parent "):
            name = f"model {order[int(name.split()[1])]}"
        console.print(f"{name}: {_score_words(score)}", markup=False)
    alone = [order[i] for i, w in enumerate(chosen["weights"]) if w > 0]
    if len(alone) == 1:
        console.print(f"all weight on model {alone[0]}: no mix scored better than that model alone, so the output is "
                      f"model {alone[0]} with the correction" + (" and the head refit" if chosen["refit_head"] else "")
                      + ", not a fusion of the models", markup=False)
    if search.get("scored_samples", chosen["samples"]) != chosen["samples"]:
        console.print(f"chosen on {search['scored_samples']} build samples, then rebuilt from {chosen['samples']} "
                      "(the usual calibration count: the held-out samples given back)", markup=False)
    console.print(f"search took {search['seconds']:.2f} s; to repeat this fusion without search:", markup=False)
    console.print(search["command"], markup=False, soft_wrap=True)


def search_progress(record: dict[str, Any]) -> None:
    """One line on stderr per candidate scored (``fuse --search``'s progress)."""
    import sys

    cells = _candidate_cells(record)
    from clafuse.progress import PREFIX

    sys.stderr.write(f"{PREFIX}candidate {record['index']} ({record['stage']}): weights {cells[0]}, mapping {cells[1]}, "
                     f"{cells[2]}, {cells[3]}, refit {cells[4]}, {cells[5]} samples: {_score_words(record)} "
                     f"({record['seconds']:.2f} s)\n")
    sys.stderr.flush()


def render_eval(doc: dict[str, Any]) -> None:
    from clafuse.api.common import model_letter

    if doc.get("kind") == "text":
        table = Table("", "model", "cosine to first", "similarity Spearman to first",
                      title=f"{doc['data']} ({doc['num_samples']} sentences)")
        for k, row in enumerate(doc["models"]):
            rho = row["similarity_spearman_to_first"]
            table.add_row(model_letter(k), row["path"], f"{row['cosine_to_first']:.4f}",
                          "-" if rho is None else f"{rho:.4f}")
        _console().print(table)
        return
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
