#!/usr/bin/env python3
"""How much of the ensemble a one-shot fusion keeps, across mixing weights, on the MNIST MLP pairs
of benchmarks/mnist_search.py: the ceiling the search works under.

For each seed pair and each architecture (A's, add; B's, merge), at the target's weight
w = 0, 0.1, ..., 1 (the other model 1 - w), on the search's start mapping with the regress
correction (as ``fuse`` defaults), this records the validation and test accuracy of

- the fused network, without and with the head refit to the parents' equal-weight ensemble;
- the weighted ensemble (w times the target parent's softmax plus 1 - w times the other's): what
  the fusion at weight w aims at;
- the straight line between the parents' accuracies at w: what a fusion that kept no ensemble gain
  would give.

Nothing is chosen here: every weight is reported on both splits. Needs the parents of
``mnist_mlp.py`` (trained there, or reused from ``benchmarks/_work/mnist``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mnist_weight_curve.py

Writes benchmarks/results/mnist_weight_curve.json and .md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnist_search import (BUILD, HOLDOUT, SAMPLES, accuracy, ensemble_accuracy, fusion_layouts,  # noqa: E402
                          load_pair, pair_run_setup, write_results)

from clafuse.search.builders import Alternatives, PlanBuilder  # noqa: E402
from clafuse.search.split import split_dataset  # noqa: E402

WEIGHTS = [round(0.1 * i, 1) for i in range(11)]


def run_pair(index: int, train, val, test) -> dict[str, Any]:
    a, b = load_pair(2 * index, train, val)
    modules = {"A": a.module(), "B": b.module()}
    splits = {"val": val, "test": test}
    parents = {name: {s: accuracy(m, ds) for s, ds in splits.items()} for name, m in modules.items()}
    x = split_dataset(train, BUILD, HOLDOUT, seed=0).x_build
    out: dict[str, Any] = {"pair": index, "parents": parents}
    for layout in fusion_layouts(a, b, x):
        other = "B" if layout.arch == "A" else "A"
        target_module, other_module = modules[layout.arch], modules[other]
        builder = PlanBuilder(layout.target, [Alternatives(layout.source, layout.alts, layout.deeper)], x,
                              parents=[target_module, other_module])
        rows = []
        for w in WEIGHTS:
            row: dict[str, Any] = {"weight": w}
            for refit in (False, True):
                fused = builder(layout.start.with_(weights=(w, round(1 - w, 1)), refit=refit, samples=SAMPLES))
                row["fused_refit" if refit else "fused"] = {s: accuracy(fused, ds) for s, ds in splits.items()}
            row["ensemble"] = {s: ensemble_accuracy([target_module, other_module], ds, [w, 1 - w])
                               for s, ds in splits.items()}
            row["line"] = {s: w * parents[layout.arch][s] + (1 - w) * parents[other][s] for s in splits}
            rows.append(row)
            print(f"  pair {index} arch {layout.arch} w {w}: fused val {100 * row['fused']['val']:.2f}, "
                  f"ensemble val {100 * row['ensemble']['val']:.2f}", flush=True)
        out[f"in_{layout.arch}"] = {"mapping": layout.alts[0][0], "inserted": layout.start.inserted, "rows": rows}
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["MNIST MLP pairs of mnist_search.py: one-shot fusion at each mixing weight (w: the target "
             "architecture's parent; the other gets 1 - w), on the search's start mapping with the regress "
             f"correction, built from {SAMPLES} training samples. Accuracy in % on val / test; nothing is "
             "selected. 'ensemble' is the w-weighted average of the parents' softmax outputs; 'line' the "
             "straight line between the parents' accuracies.", "",
             "Best over weights, validation (the fused network without / with the head refit, and the "
             "weighted ensemble), against the better parent on validation:", "",
             "| pair | arch | better parent | fused | fused + head refit | weighted ensemble |",
             "|---|---|---:|---:|---:|---:|"]
    for p in doc["pairs"]:
        best = max(v["val"] for v in p["parents"].values())
        for arch in ("A", "B"):
            rows = p[f"in_{arch}"]["rows"]
            cells = []
            for key in ("fused", "fused_refit", "ensemble"):
                top = max(rows, key=lambda r: r[key]["val"])
                cells.append(f"{100 * top[key]['val']:.2f} (w {top['weight']:g}, {100 * (top[key]['val'] - best):+.2f})")
            lines.append(f"| {p['pair']} | {arch} | {100 * best:.2f} | {' | '.join(cells)} |")
    for p in doc["pairs"]:
        par = p["parents"]
        for arch in ("A", "B"):
            lines += ["", f"**pair {p['pair']}, in {arch}'s architecture** (parents A {100 * par['A']['val']:.2f} / "
                      f"{100 * par['A']['test']:.2f}, B {100 * par['B']['val']:.2f} / {100 * par['B']['test']:.2f}; "
                      f"mapping {p[f'in_{arch}']['mapping']}, inserted {p[f'in_{arch}']['inserted']})", "",
                      "| w | fused | fused + head refit | weighted ensemble | line | fused - line (val) |",
                      "|---:|---|---|---|---|---:|"]
            for r in p[f"in_{arch}"]["rows"]:
                cells = [f"{100 * r[k]['val']:.2f} / {100 * r[k]['test']:.2f}"
                         for k in ("fused", "fused_refit", "ensemble", "line")]
                lines.append(f"| {r['weight']:g} | {' | '.join(cells)} | "
                             f"{100 * (r['fused']['val'] - r['line']['val']):+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    opts, train, val, test = pair_run_setup(__doc__.splitlines()[0], argv)
    doc = {"benchmark": "mnist_weight_curve", "weights": WEIGHTS,
           "pairs": [run_pair(p, train, val, test) for p in range(opts.pairs)]}
    write_results("mnist_weight_curve", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
