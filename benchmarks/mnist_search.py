#!/usr/bin/env python3
"""Fusion search on the MNIST MLP pairs of benchmarks/mnist_mlp.py: one-shot accuracy of the
setting the search picks against the default fusion, the better parent and the ensemble.

For each seed pair (parents trained, or reused, by ``mnist_mlp.parent``), in A's architecture
(add) and in B's (merge):

- default: ``fuse``'s settings (CKA mapping, weights 0.5/0.5, regress, 2,000 samples);
- search, label-free: :func:`clafuse.search.run.search_fusion` from the default, scored by
  KL(ensemble || fused) on 2,000 held-out train samples disjoint from the build samples, with
  the head refit among the candidates (the last Linear alone fitted to the ensemble's soft
  predictions, a convex problem solved by L-BFGS; the body is not trained);
- search, labels: the same scored by accuracy on mnist:val.

In A's architecture the searches start, as ``fuse --search`` does, from the mapping that keeps B
whole (B's layers at A's first three, A's narrower last two carrying B's logits); CKA's pinned
mapping puts B's 100-unit layer at A's 25-unit one. Its equal-weight fusion is a row of its own.

Candidates are built by :class:`clafuse.search.builders.PlanBuilder` on the one engine (each
checkpoint read once, recordings and transport plans reused between candidates).

Nothing is selected on test data; each chosen model's test accuracy is measured once. Times:
alignment (CKA on 2,000 samples + k-best DP), one default fusion, and the search (in-process,
torch threads as given, the machine shared).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mnist_search.py

Writes benchmarks/results/mnist_search.json and benchmarks/results/mnist_search.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mnist_mlp  # noqa: E402  (parents: same recipe, same checkpoints)

from clafuse import api  # noqa: E402
from clafuse.align.costs import activation_cost  # noqa: E402
from clafuse.align.dp import k_best_alignments  # noqa: E402
from clafuse.data import load_source  # noqa: E402
from clafuse.fusion.engine import default_inserted  # noqa: E402
from clafuse.fusion.engines import Member  # noqa: E402
from clafuse.fusion.otfusion import FusionSettings  # noqa: E402
from clafuse.fusion.balance import carried_intact  # noqa: E402
from clafuse.search.builders import Alternatives, PlanBuilder  # noqa: E402
from clafuse.search.mappings import with_carried  # noqa: E402
from clafuse.search.refit import ensemble_teacher, refit_head  # noqa: E402
from clafuse.search.run import search_fusion  # noqa: E402
from clafuse.search.space import Candidate, SearchOptions, parse_budget  # noqa: E402
from clafuse.search.split import SearchData, split_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = api.DEFAULT_SAMPLES
HOLDOUT = 2000
K = 3
BUILD = 5000
# (key, label, scoring, budget, extra calibration sizes); None: the library's default budget.
SEARCHES = [("search_kl", "search, label-free (KL to ensemble, held-out train)", "kl", None, ()),
            ("search_val", "search, accuracy on mnist:val", "accuracy", None, ())]



def accuracy(module: torch.nn.Module, ds) -> float:
    with torch.no_grad():
        return float((module(ds.x).argmax(1) == ds.y).double().mean())


def ensemble_accuracy(modules, ds, weights: list[float] | None = None) -> float:
    """Accuracy of the (``weights``-weighted, default equal) average of the modules' softmax outputs."""
    with torch.no_grad():
        p = sum(w * torch.softmax(m(ds.x).double(), 1) for w, m in zip(weights or [1.0] * len(modules), modules))
    return float((p.argmax(1) == ds.y).double().mean())


def load_pair(seed: int, train, val) -> tuple[api.LoadedModel, api.LoadedModel]:
    """The pair's parents A (seed) and B (seed + 1) of ``mnist_mlp.parent``, trained or reused."""
    pa, _ = mnist_mlp.parent("A", mnist_mlp.DEEP, seed, train, val)
    pb, _ = mnist_mlp.parent("B", mnist_mlp.SHALLOW, seed + 1, train, val)
    return api.load_model(pa), api.load_model(pb)


@dataclass
class Layout:
    """One architecture to fuse a pair into: ``arch`` A (add) or B (merge), its target and source
    members, the alignment's K best mappings (``maps``), those the search tries (``alts``: in A's
    architecture, as ``fuse --search`` does, the mapping that keeps B whole comes first, A's
    narrower last two layers carrying B's logits) and the default start candidate."""

    arch: str
    target: Member
    source: Member
    deeper: bool
    maps: list[list[list[int]]]
    alts: list[list[list[int]]]
    start: Candidate


def fusion_layouts(a: api.LoadedModel, b: api.LoadedModel, x: torch.Tensor) -> tuple[Layout, Layout]:
    """The pair's two layouts (A's, B's), aligned by CKA on ``x[:SAMPLES]`` with the K-best DP."""
    cost = activation_cost(b.layer_outputs(x[:SAMPLES]), a.layer_outputs(x[:SAMPLES]), "cka")
    maps = [[phi] for phi, _ in k_best_alignments(cost, K, pin_first=True, pin_last=True)]
    released = [[phi] for phi, _ in k_best_alignments(cost, K, pin_first=True, pin_last=False)]
    shallow_net, deep_net = b.family.describe(b.spec), a.family.describe(a.spec)
    carried = with_carried(maps, released, lambda m: carried_intact(shallow_net, m, deep_net))[:K]
    member_a, member_b = Member(a.family, a.spec, a.state_dict), Member(b.family, b.spec, b.state_dict)
    out = []
    for arch, target, source, deeper, alts in (("A", member_a, member_b, False, carried),
                                               ("B", member_b, member_a, True, maps)):
        inserted = default_inserted(target.family.describe(target.spec))
        start = Candidate(weights=(0.5, 0.5), mappings=(0,), inserted=inserted, correction="regress",
                          refit=False, samples=SAMPLES)
        out.append(Layout(arch, target, source, deeper, maps, alts, start))
    return out[0], out[1]


def run_pair(index: int, seed: int, train, val, test) -> dict[str, Any]:
    a, b = load_pair(seed, train, val)
    ma, mb = a.module(), b.module()
    out: dict[str, Any] = {"pair": index, "seeds": [seed, seed + 1],
                           "A": {"val": accuracy(ma, val), "test": accuracy(ma, test)},
                           "B": {"val": accuracy(mb, val), "test": accuracy(mb, test)},
                           "ensemble": {"val": ensemble_accuracy([ma, mb], val),
                                        "test": ensemble_accuracy([ma, mb], test)}}
    unlabelled = split_dataset(train, BUILD, HOLDOUT, seed=0)
    labelled = SearchData(unlabelled.x_build, val.x, val.y)
    x = unlabelled.x_build
    # The parents' own heads refit to the ensemble (the head alone, on the 2,000 build samples):
    # does the label-free teacher make a parent better?
    teacher = ensemble_teacher([ma, mb], x[:SAMPLES])
    for name, m in (("A", ma), ("B", mb)):
        refit = refit_head(m, x[:SAMPLES], teacher)
        out[f"{name}_refit"] = {"val": accuracy(refit, val), "test": accuracy(refit, test)}
    t0, c0 = time.perf_counter(), time.process_time()
    layouts = fusion_layouts(a, b, x)
    out["align_seconds"] = round(time.perf_counter() - t0, 3)
    out["align_cpu_seconds"] = round(time.process_time() - c0, 3)
    out["mappings"] = [m[0] for m in layouts[1].maps]
    settings = FusionSettings()
    for layout, parents in zip(layouts, ([ma, mb], [mb, ma])):
        arch, target, source, deeper, alts = layout.arch, layout.target, layout.source, layout.deeper, layout.alts
        start = layout.start
        rows: dict[str, Any] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        default = PlanBuilder(target, [Alternatives(source, layout.maps, deeper)], x, settings)(start)
        rows["fuse_seconds"] = round(time.perf_counter() - t0, 3)
        rows["fuse_cpu_seconds"] = round(time.process_time() - c0, 3)
        rows["default"] = {"val": accuracy(default, val), "test": accuracy(default, test)}
        if arch == "A":
            rows["carried_default"] = {k: accuracy(PlanBuilder(target, [Alternatives(source, alts, deeper)],
                                                               x, settings)(start), ds) for k, ds in (("val", val),
                                                                                                     ("test", test))}
        for key, _, scoring, budget, samples in SEARCHES:
            data = labelled if scoring == "accuracy" else unlabelled
            builder = PlanBuilder(target, [Alternatives(source, alts, deeper)], x, settings)
            options = SearchOptions(budget=parse_budget(budget), scoring=scoring, samples=samples)
            c0 = time.process_time()
            result = search_fusion(builder, parents, data, start, mapping_counts=[len(alts)], options=options)
            cpu = round(time.process_time() - c0, 3)
            chosen = result.chosen
            rows[key] = {"val": accuracy(result.module, val), "test": accuracy(result.module, test),
                         "seconds": result.seconds, "cpu_seconds": cpu, "candidates": len(result.table), "stopped": result.stopped,
                         "chosen": {"weights": list(chosen.weights), "mapping": alts[chosen.mappings[0]][0],
                                    "inserted": chosen.inserted, "correction": chosen.correction,
                                    "refit": chosen.refit, "samples": chosen.samples},
                         "weight_from_vertex": round(min(chosen.weights), 4),
                         "score": result.score, "table": result.table}
            print(f"  pair {index} arch {arch} {key}: test {100 * rows[key]['test']:.2f}% "
                  f"(default {100 * rows['default']['test']:.2f}%), {result.seconds:.1f} s, "
                  f"{len(result.table)} candidates, chosen {rows[key]['chosen']}", flush=True)
        out[f"in_{arch}"] = rows
    return out


def mean(pairs, *path) -> tuple[float, float, float]:
    values = _values(pairs, *path)
    return statistics.fmean(values), min(values), max(values)


def markdown(doc: dict[str, Any]) -> str:
    pairs = doc["pairs"]
    n = len(pairs)

    def row(label: str, *path) -> str:
        m, lo, hi = mean(pairs, *path, "test")
        per = ", ".join(f"{100 * p_v:.2f}" for p_v in _values(pairs, *path, "test"))
        return f"| {label} | {100 * m:.2f}% | {100 * lo:.2f}–{100 * hi:.2f}% | {per} |"

    lines = [f"MNIST MLPs A = 784-400-200-100-50-25-10, B = 784-400-200-100-10 (no biases; parents of "
             f"benchmarks/mnist_mlp.py), {n} seed pairs. One-shot fusion (no training), test accuracy "
             f"on the 10,000 test images, measured once per chosen model. Search budget: {doc['budget']}.", "",
             "| model | test (mean) | min–max | per pair |", "|---|---:|---:|---|",
             row("parent A", "A"), row("parent B", "B"), row("ensemble A+B", "ensemble"),
             row("parent A, head refit to the ensemble", "A_refit"),
             row("parent B, head refit to the ensemble", "B_refit")]
    better = [max(p["A"]["test"], p["B"]["test"]) for p in pairs]
    lines.append(f"| better parent | {100 * statistics.fmean(better):.2f}% | "
                 f"{100 * min(better):.2f}–{100 * max(better):.2f}% | {', '.join(f'{100 * v:.2f}' for v in better)} |")
    for arch, balance in (("A", "add"), ("B", "merge")):
        lines.append(row(f"fused in {arch}'s architecture ({balance}): default", f"in_{arch}", "default"))
        lines += [row(f"fused in {arch}'s: {label}", f"in_{arch}", key) for key, label, *_ in SEARCHES]
        if arch == "A" and "carried_default" in pairs[0]["in_A"]:
            lines.append(row("fused in A's: equal weights from the search's start mapping (B kept whole, A's last "
                             "two layers carrying B's logits)", "in_A", "carried_default"))
    lines += ["", "Against the default fusion and the better parent (test, points):", "",
              "| fused | pairs above the better parent | mean gain over default | mean gap to the better parent |",
              "|---|---:|---:|---:|"]
    for arch in ("A", "B"):
        carried = ("carried_default",) if arch == "A" and "carried_default" in pairs[0]["in_A"] else ()
        for key in ("default", *(k for k, *_ in SEARCHES), *carried):
            got = [p[f"in_{arch}"][key]["test"] for p in pairs]
            default = [p[f"in_{arch}"]["default"]["test"] for p in pairs]
            above = sum(g > b for g, b in zip(got, better))
            gain = statistics.fmean(100 * (g - d) for g, d in zip(got, default))
            gap = statistics.fmean(100 * (g - b) for g, b in zip(got, better))
            lines.append(f"| in {arch}'s architecture, {key} | {above} / {n} | {gain:+.2f} | {gap:+.2f} |")
    lines += ["", "Chosen settings (weights: target's first; distance from a single parent = the smaller weight):",
              "", "| pair | arch | search | weights | from 0/1 | mapping | inserted | correction | head refit | "
              "built from | candidates | search time |", "|---|---|---|---|---:|---|---|---|---|---:|---:|---:|"]
    for p in pairs:
        for arch in ("A", "B"):
            for key, *_ in SEARCHES:
                r = p[f"in_{arch}"][key]
                c = r["chosen"]
                lines.append(f"| {p['pair']} | {arch} | {key} | {', '.join(f'{w:g}' for w in c['weights'])} | "
                             f"{r['weight_from_vertex']:g} | {c['mapping']} | {c['inserted']} | {c['correction']} | "
                             f"{'yes' if c['refit'] else 'no'} | {c.get('samples', SAMPLES)} | {r['candidates']} ({r['stopped']}) | "
                             f"{r['seconds']:.1f} s |")
    def med(key: str, searches=("search_kl", "search_val")) -> str:
        if key.startswith("align"):
            values = [p[key] for p in pairs]
        elif searches is None:
            values = [p[f"in_{a}"][key] for p in pairs for a in ("A", "B")]
        else:
            values = [p[f"in_{a}"][k][key] for p in pairs for a in ("A", "B") for k in searches]
        return f"{statistics.median(values):.2f} s"

    def med_sum(kind: str = "") -> str:
        values = [p[f"align_{kind}seconds"] + p[f"in_{a}"][f"fuse_{kind}seconds"] for p in pairs for a in ("A", "B")]
        return f"{statistics.median(values):.2f} s"

    lines += ["", f"Time, median, in-process with {doc['threads']} torch threads on a {doc['cpus']}-core machine "
              f"shared with other jobs (load average {doc['load_avg'][0]:.1f} at the end): wall clock, and CPU "
              "time of the process (all threads; on 2 idle cores the wall time is at least half of it).", "",
              "| step | wall | CPU |", "|---|---:|---:|",
              f"| align (CKA on {SAMPLES} samples + {K}-best DP) | {med('align_seconds')} | {med('align_cpu_seconds')} |",
              f"| align + one default fusion | {med_sum()} | {med_sum('cpu_')} |",
              f"| one default fusion | {med('fuse_seconds', None)} | {med('fuse_cpu_seconds', None)} |",
              f"| search, default budget (incl. the default fusion) | {med('seconds')} | {med('cpu_seconds')} |",
              "",
              "The head refit fits the last Linear alone (soft-target logistic regression onto the parents' "
              "ensemble predictions on the 2,000 build samples, convex, solved by L-BFGS; the body is not "
              "trained)."]
    return "\n".join(lines) + "\n"


def _values(pairs, *path):
    out = []
    for p in pairs:
        v = p
        for key in path:
            v = v[key]
        out.append(v)
    return out


def write_results(name: str, doc: dict[str, Any], md: str) -> None:
    """``doc`` to ``results/NAME.json`` and ``md`` to ``results/NAME.md`` (and the terminal)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


def pair_run_setup(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, Any, Any, Any]:
    """The options of a benchmark over the MNIST pairs (``--pairs``, ``--threads``, applied) and
    the train, val and test splits."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    return opts, load_source("mnist:train"), load_source("mnist:val"), load_source("mnist:test")


def main(argv: list[str] | None = None) -> int:
    opts, train, val, test = pair_run_setup(__doc__.splitlines()[0], argv)
    pairs = [run_pair(p, 2 * p, train, val, test) for p in range(opts.pairs)]
    doc = {"benchmark": "mnist_search", "budget": f"default {parse_budget(None)!r}", "threads": opts.threads,
           "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "pairs": pairs}
    write_results("mnist_search", doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
