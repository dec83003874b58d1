#!/usr/bin/env python3
"""Benchmark: fusing 2, 3 and 4 MNIST MLPs of different depth at once (many-to-one).

Four bias-free MLPs trained with the recipe of ``mnist_mlp.py`` (10 epochs, SGD lr 0.01, momentum
0.5, best epoch on ``mnist:val``; reused from ``benchmarks/_work/mnist/`` when already trained):

    P5a = 784-400-200-100-50-10   P3 = 784-400-200-10   P4 = 784-400-200-100-10   P5b = P5a, other seed

For the sets {P5a, P3}, {P5a, P3, P4} and {P5a, P3, P4, P5b}: ``clafuse.api.align`` (CKA on 2000
``mnist`` training images, anchor = the deepest, P5a), ``clafuse.api.fuse`` with equal weights
(defaults: activations, regress correction) into P5a's architecture, one epoch of
``finetune_checkpoint`` (defaults: SGD momentum 0.9, lr 0.01, cosine), and the test accuracy of
the fused model, the finetuned one, the best parent of the set and the set's prediction ensemble.

Writes ``benchmarks/results/mnist_many.json`` and ``.md``. About 10-20 minutes on two CPU cores
when the parents must be trained, a few minutes otherwise.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mnist_mlp  # noqa: E402  (the parents' recipe and cache)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work" / "mnist_many"
RESULTS = ROOT / "benchmarks" / "results"
PARENTS = {"P5a": ((784, 400, 200, 100, 50, 10), 21), "P3": ((784, 400, 200, 10), 20),
           "P4": ((784, 400, 200, 100, 10), 1), "P5b": ((784, 400, 200, 100, 50, 10), 22)}
SETS = [["P5a", "P3"], ["P5a", "P3", "P4"], ["P5a", "P3", "P4", "P5b"]]


def main() -> int:
    import torch

    from clafuse import api
    from clafuse.data import load_source
    from clafuse.threads import use_threads

    use_threads()  # half the usable cores, as the CLI: two threads on a shared 2-core machine ran many times slower
    train, val = load_source("mnist:train"), load_source("mnist:val")
    paths = {name: mnist_mlp.parent(name if name != "P4" else "B", widths, seed, train, val)[0]
             for name, (widths, seed) in PARENTS.items()}
    WORK.mkdir(parents=True, exist_ok=True)
    single = api.evaluate_checkpoints([paths[n] for n in PARENTS], "mnist:test")
    parent_acc = {n: row["accuracy"] for n, row in zip(PARENTS, single["models"])}
    rows: list[dict[str, Any]] = []
    for names in SETS:
        tag = "+".join(names)
        started = time.perf_counter()
        api.align([paths[n] for n in names], WORK / f"{tag}.json", data="mnist", samples=2000)
        align_s = time.perf_counter() - started
        fused = WORK / f"{tag}.fused.safetensors"
        started = time.perf_counter()
        report = api.fuse(WORK / f"{tag}.json", fused)
        fuse_s = time.perf_counter() - started
        tuned = WORK / f"{tag}.ft.safetensors"
        api.finetune_checkpoint(fused, tuned, data="mnist", epochs=1)
        ev = api.evaluate_checkpoints([fused, tuned, *(paths[n] for n in names)], "mnist:test")
        ens = api.evaluate_checkpoints([paths[n] for n in names], "mnist:test")["ensemble"]
        row = {"models": names, "count": len(names), "target": report["target"], "balance": report["balance"],
               "fused_one_shot": ev["models"][0]["accuracy"], "fused_plus_1_epoch": ev["models"][1]["accuracy"],
               "best_parent": max(parent_acc[n] for n in names), "ensemble": ens["accuracy"],
               "align_s": round(align_s, 1), "fuse_s": round(fuse_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"machine": f"{platform.machine()}, torch {torch.__version__}", "parents": parent_acc,
           "recipe": mnist_mlp.TRAIN, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mnist_many.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Fusing 2-4 MNIST MLPs of depths 5, 3, 4, 5 into the first (test accuracy, %)\n",
             "Parents: " + ", ".join(f"{n} {100 * a:.2f}" for n, a in parent_acc.items()) + "\n",
             "| models | fused one-shot | fused + 1 epoch | best parent | ensemble | align s | fuse s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {' + '.join(r['models'])} | {100 * r['fused_one_shot']:.2f} | "
                     f"{100 * r['fused_plus_1_epoch']:.2f} | {100 * r['best_parent']:.2f} | "
                     f"{100 * r['ensemble']:.2f} | {r['align_s']} | {r['fuse_s']} |")
    (RESULTS / "mnist_many.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
