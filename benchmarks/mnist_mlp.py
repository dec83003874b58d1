#!/usr/bin/env python3
"""Benchmark: the CLAFusion MLP setting on full MNIST, through the real command line.

For each of ``--pairs`` seed pairs:

1. Trains (or reuses from ``benchmarks/_work/mnist/``) a deep MLP A = 784-400-200-100-50-25-10 and
   a shallow one B = 784-400-200-100-10, no biases, ReLU, default PyTorch init, with
   ``clafuse.training.finetune`` (SGD lr 0.01, momentum 0.5, batch 64, 10 epochs, constant rate;
   the epoch with the best ``mnist:val`` accuracy is kept). A uses seed ``2p + --seed``, B the next.
2. Runs ``clafuse align A B --data mnist`` once, then ``clafuse fuse --weights 0.5,0.5`` for:
   add/merge x activations/weights with the defaults (correction regress), add/merge with
   ``--correction none`` and ``--correction repair``, and a reference-like setting (add,
   ``--samples 200 --correction none --ground euclidean --inserted average``).
3. Finetunes the default add and merge fusions and both parents for one more epoch with
   ``clafuse finetune --epochs 1`` (its defaults: SGD momentum 0.9, lr 0.01, cosine).
4. Evaluates everything on ``mnist:test`` (and ``mnist:val``) with ``clafuse.api.evaluate_checkpoints``,
   including the prediction ensembles of the parents and of the finetuned parents.

Every command is timed (wall clock around the subprocess, start-up included) and its peak
resident memory read from ``/usr/bin/time -f '%e %M'``. Writes ``benchmarks/results/mnist_mlp.json``
(everything, per pair) and ``benchmarks/results/mnist_mlp.md`` (mean and min-max test accuracy per
row over the pairs, and the median time and memory of align and of the default fuse).

Run it with ``.venv/bin/python benchmarks/mnist_mlp.py``; about 10-25 minutes for 3 pairs on two
CPU cores (parents are reused on later runs, which then take a few minutes less).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work" / "mnist"
RESULTS = ROOT / "benchmarks" / "results"
DEEP = (784, 400, 200, 100, 50, 25, 10)
SHALLOW = (784, 400, 200, 100, 10)
TRAIN = {"epochs": 10, "lr": 0.01, "momentum": 0.5, "batch_size": 64, "schedule": "constant"}
WEIGHTS = "0.5,0.5"
TIME_BIN = shutil.which("time", path="/usr/bin:/bin")

# (key, label, fuse options). The first one is the default add setting, which is timed.
FUSIONS: list[tuple[str, str, list[str]]] = [
    ("add", "add, activations (default)", []),
    ("merge", "merge, activations", ["--balance", "merge"]),
    # The weights signal matches neurons by their weights; the correction still uses the map's
    # 2,000 calibration samples. With --correction none an MLP fusion uses no data at all.
    ("add_weights", "add, weights", ["--signal", "weights"]),
    ("merge_weights", "merge, weights", ["--balance", "merge", "--signal", "weights"]),
    ("add_weights_nodata", "add, weights, data-free (no correction)", ["--signal", "weights", "--correction", "none"]),
    ("add_none", "add, correction none", ["--correction", "none"]),
    ("merge_none", "merge, correction none", ["--balance", "merge", "--correction", "none"]),
    ("add_repair", "add, correction repair", ["--correction", "repair"]),
    ("merge_repair", "merge, correction repair", ["--balance", "merge", "--correction", "repair"]),
    ("reference", "reference-like: add, 200 samples, euclidean, no correction",
     ["--samples", "200", "--correction", "none", "--ground", "euclidean", "--inserted", "average"]),
]
FINETUNED = ["add", "merge"]


def log(message: str) -> None:
    print(message, flush=True)


def show(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


class CommandFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Parents


def build_mlp(widths: tuple[int, ...]):
    """Bias-free ``fc1..fcN`` with ReLU between them, PyTorch's default Linear init."""
    from torch import nn

    layers: "OrderedDict[str, nn.Module]" = OrderedDict(flatten=nn.Flatten())
    last = len(widths) - 1
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers[f"fc{i}"] = nn.Linear(n_in, n_out, bias=False)
        if i < last:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


def parent(name: str, widths: tuple[int, ...], seed: int, train, val) -> tuple[Path, dict[str, Any]]:
    """Train one parent, or reuse the checkpoint trained earlier with the same recipe."""
    import torch
    from safetensors.torch import save_file

    from clafuse.training import FinetuneConfig, finetune

    path = WORK / f"{name}_seed{seed}.safetensors"
    info_path = path.with_suffix(".json")
    recipe = {"widths": list(widths), "bias": False, "init": "pytorch default", "seed": seed, **TRAIN}
    if path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("recipe") == recipe:
            log(f"  {name} seed {seed}: reusing {show(path)}")
            return path, info
    log(f"  {name} seed {seed}: training {'-'.join(map(str, widths))} for {TRAIN['epochs']} epochs")
    torch.manual_seed(seed)
    model = build_mlp(widths)
    started = time.perf_counter()
    result = finetune(model, train, val, FinetuneConfig(seed=seed, **TRAIN))
    seconds = time.perf_counter() - started
    info = {"recipe": recipe, "best_epoch": result.best_epoch, "seconds": round(seconds, 1),
            "val_accuracy_per_epoch": [round(h["val_accuracy"], 4) for h in result.history]}
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in result.best_state.items()}, str(tmp))
    tmp.replace(path)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    log(f"    {seconds:.0f} s, best epoch {result.best_epoch}, val {info['val_accuracy_per_epoch']}")
    return path, info


# ---------------------------------------------------------------------------------------------
# The command line


def clafuse(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run ``python -m clafuse ARGS`` in ``cwd``; wall time (perf_counter around the subprocess,
    start-up included), peak RSS of the process (``/usr/bin/time %M``), load average before."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "clafuse", *args]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "time.txt"
        full = [TIME_BIN, "-o", str(stats), "-f", "%e %M", *cmd] if TIME_BIN else cmd
        started = time.perf_counter()
        proc = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak_kib = None
        if TIME_BIN and stats.exists():
            # GNU time prepends "Command exited with non-zero status N" on failure; take the last line.
            lines = stats.read_text().strip().splitlines()
            if lines:
                peak_kib = int(lines[-1].split()[1])
    if proc.returncode != 0:
        raise CommandFailed(f"clafuse {shlex.join(args)} (in {cwd}) exited with {proc.returncode}:\n"
                            f"{proc.stderr.strip()}")
    log(f"    $ clafuse {shlex.join(args)}  ({seconds:.1f} s"
        + (f", {peak_kib / 1024:.0f} MiB" if peak_kib else "") + ")")
    out: dict[str, Any] = {"command": "clafuse " + shlex.join(args), "seconds": round(seconds, 3),
                           "peak_rss_mib": round(peak_kib / 1024, 1) if peak_kib else None,
                           "load_avg_1m_before": round(load[0], 2)}
    if "--json" in args:
        out["json"] = json.loads(proc.stdout)
    return out


def accuracies(paths: list[Path]) -> dict[str, Any]:
    """Test and validation accuracy of each checkpoint, and of their ensemble when there are two."""
    from clafuse.api import evaluate_checkpoints

    out: dict[str, Any] = {}
    for split in ("test", "val"):
        doc = evaluate_checkpoints([str(p) for p in paths], f"mnist:{split}")
        out[split] = [m["accuracy"] for m in doc["models"]]
        if "ensemble" in doc:
            out[f"{split}_ensemble"] = doc["ensemble"]["accuracy"]
    return out


def run_pair(index: int, seed: int, train, val) -> dict[str, Any]:
    log(f"\n== pair {index}: A seed {seed}, B seed {seed + 1} ==")
    commit_start, code_start = git_commit(), code_digest()
    pa, info_a = parent("A", DEEP, seed, train, val)
    pb, info_b = parent("B", SHALLOW, seed + 1, train, val)
    work = WORK / f"pair{index}"
    work.mkdir(parents=True, exist_ok=True)
    rel_a, rel_b = os.path.relpath(pa, work), os.path.relpath(pb, work)
    commands: dict[str, Any] = {}
    models: dict[str, dict[str, Any]] = {}

    accs = accuracies([pa, pb])
    models["A"] = {"test": accs["test"][0], "val": accs["val"][0]}
    models["B"] = {"test": accs["test"][1], "val": accs["val"][1]}
    models["ensemble"] = {"test": accs["test_ensemble"], "val": accs["val_ensemble"]}

    commands["align"] = clafuse(["align", rel_a, rel_b, "-o", "map.json", "--data", "mnist", "--json"], work)
    mapping = json.loads((work / "map.json").read_text())["alignments"][0]["groups"][0]["mapping"]
    commands["align"].pop("json", None)

    fused_paths = {}
    for key, _, options in FUSIONS:
        out = work / f"fused_{key}.safetensors"
        res = clafuse(["fuse", "--map", "map.json", "-o", out.name, "--weights", WEIGHTS, *options, "--json"], work)
        doc = res.pop("json")
        res["mapping"], res["mixing"], res["seconds_inside"] = doc.get("mapping"), doc.get("mixing"), doc.get("seconds")
        commands[f"fuse_{key}"] = res
        fused_paths[key] = out
    accs = accuracies(list(fused_paths.values()))
    for i, key in enumerate(fused_paths):
        models[f"fused_{key}"] = {"test": accs["test"][i], "val": accs["val"][i]}

    tuned: dict[str, Path] = {}
    for key, src in [*((f"fused_{k}", fused_paths[k]) for k in FINETUNED), ("A", pa), ("B", pb)]:
        out = work / f"{key}_ft1.safetensors"
        rel_src = os.path.relpath(src, work)
        res = clafuse(["finetune", rel_src, "--data", "mnist", "--epochs", "1", "-o", out.name, "--json"], work)
        res.pop("json", None)
        commands[f"finetune_{key}"] = res
        tuned[key] = out
    keys = list(tuned)
    accs = accuracies([tuned[k] for k in keys])
    for i, key in enumerate(keys):
        models[f"{key}_ft1"] = {"test": accs["test"][i], "val": accs["val"][i]}
    accs = accuracies([tuned["A"], tuned["B"]])
    models["ensemble_ft1"] = {"test": accs["test_ensemble"], "val": accs["val_ensemble"]}

    for key, row in models.items():
        log(f"    {key:<22} test {100 * row['test']:.2f}%  val {100 * row['val']:.2f}%")
    code_end = git_commit(), code_digest()
    if code_end[1] != code_start:
        log(f"    warning: the clafuse sources changed during this pair ({code_start} -> {code_end[1]})")
    return {"pair": index, "seeds": {"A": seed, "B": seed + 1}, "commit": [commit_start, code_end[0]],
            "code_digest": [code_start, code_end[1]],
            "parents_training": {"A": info_a, "B": info_b},
            "layer_map": mapping, "accuracy": models, "commands": commands}


# ---------------------------------------------------------------------------------------------
# Summary


ROWS: list[tuple[str, str]] = [
    ("A", "parent A (784-400-200-100-50-25-10)"),
    ("B", "parent B (784-400-200-100-10)"),
    ("ensemble", "ensemble A+B (softmax average)"),
    *((f"fused_{key}", f"one-shot fused: {label}") for key, label, _ in FUSIONS),
    *((f"fused_{key}_ft1", f"fused ({key}, default) + 1 epoch") for key in FINETUNED),
    ("A_ft1", "parent A + 1 epoch"),
    ("B_ft1", "parent B + 1 epoch"),
    ("ensemble_ft1", "ensemble of the parents + 1 epoch"),
]


def summarise(pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = []
    for key, label in ROWS:
        test = [p["accuracy"][key]["test"] for p in pairs]
        val = [p["accuracy"][key]["val"] for p in pairs]
        rows.append({"key": key, "label": label, "test_mean": statistics.fmean(test), "test_min": min(test),
                     "test_max": max(test), "val_mean": statistics.fmean(val), "test": test, "val": val})
    timing = {}
    for key in ("align", "fuse_add"):
        runs = [p["commands"][key] for p in pairs]
        mem = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"] is not None]
        timing[key] = {"median_s": round(statistics.median(r["seconds"] for r in runs), 2),
                       "median_peak_rss_mib": round(statistics.median(mem), 1) if mem else None,
                       "load_avg_1m": [r["load_avg_1m_before"] for r in runs],
                       "command": runs[0]["command"]}
    return rows, timing


def markdown(doc: dict[str, Any]) -> str:
    n = len(doc["pairs"])
    lines = [
        f"MNIST MLPs, A = 784-400-200-100-50-25-10 and B = 784-400-200-100-10 (no biases), "
        f"{TRAIN['epochs']} epochs of SGD each; fused with `--weights {WEIGHTS}`; "
        f"test accuracy on the 10,000 MNIST test images, mean and min–max over {n} seed pairs.",
        "",
        "| model | test accuracy (mean) | min–max |",
        "|---|---:|---:|",
    ]
    for row in doc["rows"]:
        lines.append(f"| {row['label']} | {100 * row['test_mean']:.2f}% | "
                     f"{100 * row['test_min']:.2f}–{100 * row['test_max']:.2f}% |")
    lines += [
        "",
        "\"+ 1 epoch\": `clafuse finetune --epochs 1` (SGD, momentum 0.9, lr 0.01, cosine schedule); the "
        "parents get the same extra epoch for a fair comparison. One-shot rows use 2,000 calibration "
        "samples (the `align` default) unless stated.",
        "",
        f"Time and peak memory (median over {n} pairs; one process each, start-up included; "
        f"{doc['machine']['cpus']} CPUs, load average {doc['machine']['load_avg_1m_during_timing']}):",
        "",
        "| command | wall time | peak RSS |",
        "|---|---:|---:|",
    ]
    for key, label in (("align", "`clafuse align A B --data mnist` (2,000 samples, CKA)"),
                       ("fuse_add", "`clafuse fuse --weights 0.5,0.5` (add, defaults)")):
        t = doc["timing"][key]
        mem = f"{t['median_peak_rss_mib']:.0f} MiB" if t["median_peak_rss_mib"] is not None else "n/a"
        lines.append(f"| {label} | {t['median_s']:.1f} s | {mem} |")
    return "\n".join(lines) + "\n"


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD, with "+dirty" when the working tree's clafuse/ differs from it (the subprocesses run
    the working tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "clafuse"], cwd=ROOT, capture_output=True,
                               text=True, check=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def code_digest() -> str:
    """SHA-256 (first 12 hex digits) of the clafuse package's sources as the subprocesses see them."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "clafuse").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json"):
            h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="seed pairs (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; pair p uses seed+2p (A) and seed+2p+1 (B)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in this process (default: 2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="result folder (default: benchmarks/results)")
    opts = parser.parse_args(argv)
    if opts.pairs < 1:
        parser.error("--pairs must be at least 1")

    import torch

    from clafuse.data import load_source

    torch.set_num_threads(opts.threads)
    started = time.perf_counter()
    log(f"MNIST MLP benchmark: {opts.pairs} pairs, torch threads {opts.threads}, work dir {show(WORK)}"
        + ("" if TIME_BIN else "; /usr/bin/time not found, peak memory not measured"))
    train, val = load_source("mnist:train"), load_source("mnist:val")
    load_start = os.getloadavg()
    pairs = []
    try:
        for p in range(opts.pairs):
            pairs.append(run_pair(p, opts.seed + 2 * p, train, val))
    except CommandFailed as exc:
        print(f"mnist_mlp: stopped: {exc}", file=sys.stderr)
        return 1
    rows, timing = summarise(pairs)
    commits = sorted({c for p in pairs for c in p["commit"]}, key=str)
    digests = sorted({d for p in pairs for d in p["code_digest"]})
    if len(digests) > 1:
        log(f"warning: the clafuse sources changed during the run ({', '.join(digests)}); rerun it")
    timing_loads = [x for key in timing for x in timing[key]["load_avg_1m"]]
    doc = {
        "benchmark": "mnist_mlp",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commits[0] if len(commits) == 1 else commits,
        "code_digest": digests[0] if len(digests) == 1 else digests,
        "code_changed_during_run": len(digests) > 1,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": opts.threads, "load_avg_start": [round(x, 2) for x in load_start],
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                    "load_avg_1m_during_timing": f"{min(timing_loads):.1f}–{max(timing_loads):.1f}"},
        "versions": {name: pkg_version(name) for name in ("clafuse", "torch", "pot", "numpy")},
        "setting": {"deep": "-".join(map(str, DEEP)), "shallow": "-".join(map(str, SHALLOW)), "bias": False,
                    "init": "pytorch default", "parent_training": TRAIN, "weights": WEIGHTS,
                    "fusions": {key: {"label": label, "options": opts_} for key, label, opts_ in FUSIONS},
                    "finetune": "clafuse finetune --epochs 1 (defaults: SGD momentum 0.9, lr 0.01, cosine, batch 64)",
                    "test_data": "mnist:test", "val_data": "mnist:val",
                    "memory": "peak RSS of the clafuse process from /usr/bin/time %M" if TIME_BIN else None},
        "rows": rows,
        "timing": timing,
        "pairs": pairs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    write_atomic(opts.out / "mnist_mlp.json", json.dumps(doc, indent=2) + "\n")
    md = markdown(doc)
    write_atomic(opts.out / "mnist_mlp.md", md)
    log("\n" + md)
    log(f"done in {doc['seconds']:.0f} s; written to {opts.out / 'mnist_mlp.json'} and {opts.out / 'mnist_mlp.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
