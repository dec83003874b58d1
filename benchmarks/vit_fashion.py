"""Issue 10 benchmark: a ViT pair of different depth on Fashion-MNIST, fused with ``add`` and
into the shallower layout.

Trains two timm-layout ViTs (clafuse's ``vit`` family; width 64, 4 heads, patch 7, MLP 128) of
depth 6 (A, seed 1) and 3 (B, seed 2) with AdamW (linear warm-up, cosine decay), keeping the best
validation epoch. Then reports the parents, their ensemble, fused with ``--balance add`` (A's
6-block layout, identity blocks inserted into B) and with ``--target shallow`` (B's 3-block
layout, A's unmatched blocks dropped), each at the default settings (equal weights) and with the
label-free ``--search`` (``add`` also with ``--inserted average``), and one more epoch at a
finetuning rate for each parent and, of each kind, for the best fused model on validation and the
equal-weight default. Exactness checks: fused with weights 1,0 / 0,1 and no
correction must reproduce the parent whose weight is 1 wherever that parent keeps all its blocks.
``align`` and ``fuse`` run through the real CLI (start-up included) under /usr/bin/time for wall
time and peak memory. Selection is on the validation split; test accuracy is only reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vit_fashion.py [--subset 50000] [--epochs 10]

Writes benchmarks/results/vit_fashion.json and benchmarks/results/vit_fashion.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_cnn import subset, timed  # noqa: E402  (the same training subset and CLI timing)

from clafuse.arch.vit_model import ViTSpec, build_vit, detect_vit
from clafuse.data import load_source
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint
from clafuse.training import FinetuneConfig, evaluate, evaluate_ensemble, finetune

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "vit_fashion"
RESULTS = ROOT / "results"
HEADS = 4
DEPTHS = {"A": (6, 1), "B": (3, 2)}


def spec(depth: int) -> ViTSpec:
    return ViTSpec(depth=depth, dim=64, heads=HEADS, mlp_hidden=128, patch=7, in_chans=1, grid=4, classes=10)


def new_vit(depth: int, seed: int) -> torch.nn.Module:
    """A fresh ViT with timm's initialisation of the class token and position embeddings."""
    torch.manual_seed(seed)
    model = build_vit(spec(depth))
    torch.nn.init.trunc_normal_(model.pos_embed, std=0.02)
    torch.nn.init.trunc_normal_(model.cls_token, std=0.02)
    return model


def load_vit(path: Path) -> torch.nn.Module:
    """A checkpoint of this benchmark as a module (the head count does not show in the shapes)."""
    state = load_checkpoint(path)
    model = build_vit(detect_vit(state, heads=HEADS))
    model.load_state_dict(state, strict=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=50000, help="training samples used (of 50k)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000, help="calibration samples for align/fuse")
    parser.add_argument("--out", default="vit_fashion", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = WORK / f"{args.subset}-{args.epochs}"
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    train = subset(load_source("fashion-mnist"), args.subset)
    val, test = load_source("fashion-mnist:val"), load_source("fashion-mnist:test")
    steps = -(-len(train) // 128)
    config = FinetuneConfig(epochs=args.epochs, optimizer="adamw", lr=2e-3, weight_decay=0.05, batch_size=128,
                            warmup_steps=steps, schedule="cosine")
    # "+ 1 epoch": the same recipe for every row, at a finetuning rate (peak 2e-4, short warm-up, cosine).
    one_epoch = FinetuneConfig(epochs=1, optimizer="adamw", lr=2e-4, weight_decay=0.05, batch_size=128,
                               warmup_steps=steps // 10, schedule="cosine", seed=7)
    report: dict = {"subset": len(train), "epochs": args.epochs, "samples": args.samples, "threads": 1,
                    "parents": {}, "rows": {}, "checks": {}, "timing": {}, "mappings": {}}
    paths: dict[str, Path] = {}
    arch: dict[str, Path] = {}
    for name, (depth, seed) in DEPTHS.items():
        paths[name] = work / f"{name}.safetensors"
        arch[name] = work / f"{name}.spec.json"
        arch[name].write_text(spec(depth).model_dump_json() + "\n")
        if not paths[name].exists():
            model = new_vit(depth, seed)
            t0 = time.perf_counter()
            result = finetune(model, train, val, FinetuneConfig(**{**config.__dict__, "seed": seed}))
            model.load_state_dict(result.best_state)
            save_checkpoint(paths[name], model.state_dict())
            meta = {"depth": depth, "seed": seed, "train_seconds": time.perf_counter() - t0,
                    "best_epoch": max(result.history, key=lambda e: e["val_accuracy"])["epoch"],
                    "history": result.history}
            (work / f"{name}.train.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(f"{name}: depth {depth} trained in {meta['train_seconds']:.0f} s", flush=True)
        report["parents"][name] = json.loads((work / f"{name}.train.json").read_text())

    rows = report["rows"]

    def score(label: str, model: torch.nn.Module) -> dict:
        rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
        print(f"{label}: val {100 * rows[label]['val']:.2f} test {100 * rows[label]['test']:.2f}", flush=True)
        return rows[label]

    parents = {n: load_vit(p) for n, p in paths.items()}
    for n, m in parents.items():
        score(f"parent {n} (depth {DEPTHS[n][0]})", m)
    rows["ensemble A+B"] = {"val": evaluate_ensemble(list(parents.values()), val)["accuracy"],
                            "test": evaluate_ensemble(list(parents.values()), test)["accuracy"]}

    map_path = work / "map.json"
    align_s, align_mb, align_out = timed(["align", str(paths["A"]), str(paths["B"]), "-o", str(map_path),
                                          "--arch", str(arch["A"]), "--arch", str(arch["B"]), "--data",
                                          "fashion-mnist", "--samples", str(args.samples), "--json"])
    report["timing"]["align"] = {"seconds": align_s, "peak_mb": align_mb}
    report["align"] = json.loads(align_out)
    kinds = {"add": ["--balance", "add"], "shallow": ["--target", "shallow"]}
    candidates: dict[str, dict[str, Path]] = {kind: {} for kind in kinds}
    for kind, layout in kinds.items():
        variants = {"default": [], "search": ["--search"]}
        if kind == "add":  # the default for ViTs is inserted=keep (A's unmatched blocks taken unchanged)
            variants["default, inserted average"] = ["--inserted", "average"]
        for variant, extra in variants.items():
            out = work / f"fused-{kind}-{variant.replace(', ', '-').replace(' ', '-')}.safetensors"
            secs, mb, stdout = timed(["fuse", "--map", str(map_path), "-o", str(out), "--json", *layout, *extra])
            report["timing"][f"fuse {kind} {variant}"] = {"seconds": secs, "peak_mb": mb}
            doc = json.loads(stdout)
            entry = {"mapping": doc["mapping"], "mixing_order": doc["mixing_order"]}
            if "search" in doc:
                entry.update({k: doc["search"][k] for k in ("chosen", "score", "references", "seconds", "command",
                                                            "holdout_samples", "table")})
            report["mappings"][f"{kind} {variant}"] = entry
            score(f"fused {kind} ({' '.join(layout)}), {variant}", load_vit(out))
            candidates[kind][f"fused {kind} ({' '.join(layout)}), {variant}"] = out
        for weights in ("1,0", "0,1"):
            out = work / f"check-{kind}-{weights.replace(',', '')}.safetensors"
            timed(["fuse", "--map", str(map_path), "-o", str(out), "--json", "--weights", weights,
                   "--correction", "none", *layout])
            fused = load_vit(out)
            label = f"{kind}, weights {weights}, correction none"
            reference = parents["A" if weights == "1,0" else "B"]
            with torch.no_grad():
                x = val.x[:500]
                diff = (fused(x) - reference(x)).abs().max().item()
            entry = score(label, fused)
            report["checks"][label] = {**entry, "max_logit_diff_vs_parent_500_val": diff,
                                       "parent": "A" if weights == "1,0" else "B"}
            del rows[label]

    for kind, options in candidates.items():
        # the best on validation of each kind, and the equal-weight default (a real mix of both parents)
        best = max(options, key=lambda label: rows[label]["val"])
        default = next(label for label in options if label.endswith("), default"))
        for label in dict.fromkeys([best, default]):
            model = load_vit(options[label])
            model.load_state_dict(finetune(model, train, val, one_epoch).best_state)
            score(f"{label}{' (best on val)' if label == best else ''} + 1 epoch", model)
    for n, p in paths.items():
        model = load_vit(p)
        model.load_state_dict(finetune(model, train, val, one_epoch).best_state)
        score(f"parent {n} (depth {DEPTHS[n][0]}) + 1 epoch", model)
    report["load"] = os.getloadavg()
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    a, b = report["parents"]["A"], report["parents"]["B"]
    lines = [f"Fashion-MNIST, ViT width 64, 4 heads, patch 7, MLP 128 (timm layout); A: depth {a['depth']}, "
             f"B: depth {b['depth']}; trained {report['epochs']} epochs (AdamW 2e-3, wd 0.05, one warm-up epoch, "
             f"cosine; best validation epoch: A {a['best_epoch']}, B {b['best_epoch']}) on {report['subset']} "
             f"training samples, 1 thread: A {a['train_seconds']:.0f} s, B {b['train_seconds']:.0f} s. "
             f"Calibration {report['samples']} samples. \"+ 1 epoch\": AdamW peak 2e-4, cosine, same for every "
             "row. Accuracy in %.", "", "| model | val | test |", "|---|---|---|"]
    lines += [f"| {k} | {100 * v['val']:.2f} | {100 * v['test']:.2f} |" for k, v in report["rows"].items()]
    searched = next(v for v in report["mappings"].values() if "chosen" in v)
    lines += ["", "Mappings (B's blocks 0, 1, 2 to A's blocks) and the label-free search's choices (weights per "
              f"parent; {len(searched['table'])} candidates each, scored by KL to the parents' ensemble on "
              f"{searched['holdout_samples']} held-out training images):", ""]
    for k, v in report["mappings"].items():
        chosen = v.get("chosen")
        weights = ", ".join(f"{m} {w:g}" for m, w in sorted(zip(v["mixing_order"], chosen["weights"]))) if chosen else ""
        lines.append(f"- {k}: {json.dumps(v['mapping'])}" + (
            f"; search chose weights {weights}, inserted {chosen['inserted']}, correction "
            f"{chosen['correction']}, head refit {chosen['refit_head']}" if chosen else ""))
    lines += ["", "Exactness checks (correction none; max |logit difference| to the parent on 500 val images):", "",
              "| fused | parent | val | test | max diff |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['parent']} | {100 * v['val']:.2f} | {100 * v['test']:.2f} | "
              f"{v['max_logit_diff_vs_parent_500_val']:.2e} |" for k, v in report["checks"].items()]
    lines += ["", "Time and peak memory (CLI, start-up included, 1 thread via OMP_NUM_THREADS):", ""]
    lines += [f"- {k}: {v['seconds']:.1f} s, {v['peak_mb']:.0f} MB" for k, v in report["timing"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
