"""Choosing fuse's defaults on the validation split (MNIST MLP pairs of benchmarks/mnist_mlp.py).

Fuses every seed pair in-process with one setting changed at a time from the defaults and reports
mnist:val accuracy (never test), so that the defaults are chosen on validation data.

    .venv/bin/python benchmarks/mnist_select.py

Writes benchmarks/results/mnist_select.json and benchmarks/results/mnist_select.md.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from clafuse import api
from clafuse.align.costs import activation_cost
from clafuse.align.dp import solve_alignment
from clafuse.data import calibration_inputs, load_source
from clafuse.fusion.balance import insert_identities, merge_layers, relu_gates
from clafuse.fusion.otfusion import FusionSettings, fuse_chains

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "mnist"

VARIANTS: list[tuple[str, dict]] = [
    ("defaults (add, 2000 samples, emd, correlation, regress, inserted average)", {}),
    ("merge", {"balance": "merge"}),
    ("inserted keep", {"inserted": "keep"}),
    ("500 samples", {"samples": 500}),
    ("5000 samples", {"samples": 5000}),
    ("sinkhorn (reg 0.05)", {"solver": "sinkhorn"}),
    ("euclidean ground cost", {"ground": "euclidean"}),
    ("weights signal", {"signal": "weights"}),
    ("ridge 1e-2", {"ridge": 1e-2}),
    ("ridge 1e-4", {"ridge": 1e-4}),
    ("correction repair", {"correction": "repair"}),
    ("correction repair, inserted keep", {"correction": "repair", "inserted": "keep"}),
    ("correction none", {"correction": "none"}),
    ("correction none, inserted keep", {"correction": "none", "inserted": "keep"}),
]


def main() -> None:
    torch.set_num_threads(2)
    pairs = list(zip(sorted(WORK.glob("A_seed*.safetensors")), sorted(WORK.glob("B_seed*.safetensors"))))
    if not pairs:
        raise SystemExit("no parents in benchmarks/_work/mnist: run benchmarks/mnist_mlp.py first")
    train, val = load_source("mnist"), load_source("mnist:val")
    chains = [(api.load_model(a), api.load_model(b)) for a, b in pairs]
    rows = []
    for label, change in VARIANTS:
        change = dict(change)
        balance = change.pop("balance", "add")
        samples = change.pop("samples", api.DEFAULT_SAMPLES)
        x = calibration_inputs(train, samples, 0)
        accs, started = [], time.perf_counter()
        for deep_model, shallow_model in chains:
            deep, shallow = deep_model.family.to_chain(deep_model.spec, deep_model.state_dict), \
                shallow_model.family.to_chain(shallow_model.spec, shallow_model.state_dict)
            phi, _ = solve_alignment(activation_cost(shallow.forward_record(x)[1], deep.forward_record(x)[1], "cka"))
            if balance == "add":
                fused = fuse_chains(deep, [insert_identities(shallow, phi, deep)], [0.5, 0.5], x,
                                    FusionSettings(**change)).chain
            else:
                fused = fuse_chains(shallow, [merge_layers(deep, phi, relu_gates(deep, x))], [0.5, 0.5], x,
                                    FusionSettings(**change)).chain
            with torch.no_grad():
                accs.append(float((fused(val.x).argmax(1) == val.y).float().mean()))
        rows.append({"setting": label, "val_accuracy": accs, "mean": statistics.mean(accs),
                     "seconds_per_pair": (time.perf_counter() - started) / len(chains)})
        print(f"{label}: {100 * statistics.mean(accs):.2f}%", flush=True)
    (ROOT / "results" / "mnist_select.json").write_text(json.dumps({"pairs": len(pairs), "rows": rows}, indent=2) + "\n")
    lines = [f"Validation accuracy (mnist:val) of one-shot fusion at weights 0.5,0.5, mean over {len(pairs)} pairs; "
             "one setting changed at a time from the defaults.", "", "| setting | val accuracy | per pair |",
             "|---|---:|---|"]
    lines += [f"| {r['setting']} | {100 * r['mean']:.2f}% | {', '.join(f'{100 * a:.2f}' for a in r['val_accuracy'])} |"
              for r in rows]
    (ROOT / "results" / "mnist_select.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
