"""How the torch thread count affects finetune, eval and fuse, on an idle and on a busy machine.

An MNIST MLP (784-400-200-100-10, and a 784-300-100-10 partner for fusing) is finetuned for one
epoch on 10,000 training samples (batch 64), evaluated on 10,000 test samples, and fused with a
shallower MLP (activations from 1,000 samples), through :mod:`clafuse.api` in a fresh process
per setting: 1 thread, 2 threads, and torch's default (one per core), each on the machine as it is
("idle") and while two other processes each keep one core busy ("loaded", what a shared machine
or a parallel job does). Each setting runs ``--runs`` times; the median is reported with the load
average before the run, since the machine may be shared with other work.

    .venv/bin/python benchmarks/threads.py [--runs 2] [--train 10000]

Writes benchmarks/results/threads.json and benchmarks/results/threads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "threads"
RESULTS = ROOT / "results"
SETTINGS = {"1": 1, "2": 2, "torch default": 0}

WORKER = r"""
import json, sys, time
from pathlib import Path
from clafuse import api
from clafuse.threads import use_threads
work = Path(sys.argv[1]); threads = use_threads(int(sys.argv[2]))
out = {"threads": threads}
t = time.perf_counter()
api.evaluate_checkpoints([work / "deep.safetensors"], str(work / "test.npz"))
out["eval_s"] = time.perf_counter() - t
t = time.perf_counter()
api.fuse(work / "map.json", work / f"fused-{threads}.safetensors")
out["fuse_s"] = time.perf_counter() - t
report = api.finetune_checkpoint(work / "deep.safetensors", work / f"tuned-{threads}.safetensors",
                                 data=str(work / "train.npz"), val=str(work / "val.npz"), epochs=1)
out["epoch_s"] = report["history"][0]["seconds"]
print(json.dumps(out))
"""


def prepare(train: int) -> None:
    """Checkpoints, data subsets and the map under benchmarks/_work/threads."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from clafuse import api
    from clafuse.data import load_source

    WORK.mkdir(parents=True, exist_ok=True)
    for name, split, n in (("train", "train", train), ("val", "val", 2000), ("test", "test", 10000)):
        ds = load_source("mnist", split)
        np.savez(WORK / f"{name}.npz", x=ds.x[:n].numpy(), y=ds.y[:n].numpy())
    for name, widths, seed in (("deep", [400, 200, 100], 0), ("shallow", [300, 100], 1)):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Flatten()]
        for i, o in zip([784, *widths], widths):
            layers += [nn.Linear(i, o), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 10))
        save_file({k: v.contiguous() for k, v in nn.Sequential(*layers).state_dict().items()},
                  str(WORK / f"{name}.safetensors"))
    api.align([WORK / "deep.safetensors", WORK / "shallow.safetensors"], WORK / "map.json",
              data=str(WORK / "train.npz"), samples=1000)


def run_setting(threads: int, loaded: bool) -> dict:
    burners = []
    if loaded:
        # Bounded in time by timeout(1), so a burner outlives no interrupted benchmark by long.
        burners = [subprocess.Popen(["timeout", "900", sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        time.sleep(1.0)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT.parent)
    try:
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, "-c", WORKER, str(WORK), str(threads)], env=env, check=True,
                              capture_output=True, text=True)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--train", type=int, default=10000)
    args = parser.parse_args()
    prepare(args.train)
    rows = []
    for loaded in (False, True):
        for label, threads in SETTINGS.items():
            runs = [run_setting(threads, loaded) for _ in range(args.runs)]
            row = {"threads": label, "machine": "loaded" if loaded else "idle", "runs": runs,
                   **{k: statistics.median(r[k] for r in runs) for k in ("epoch_s", "eval_s", "fuse_s", "load_before")}}
            rows.append(row)
            print(f"{row['machine']:6} threads {label:13} epoch {row['epoch_s']:6.2f} s  eval {row['eval_s']:5.2f} s  "
                  f"fuse {row['fuse_s']:5.2f} s  (load {row['load_before']:.1f})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    (RESULTS / "threads.json").write_text(json.dumps({"cores": cores, "runs": args.runs, "train": args.train,
                                                      "rows": rows}, indent=2) + "\n")
    lines = [
        "# Thread count: finetune, eval and fuse, idle and loaded",
        "",
        f"`benchmarks/threads.py --runs {args.runs} --train {args.train}` on {cores} cores. MNIST MLP "
        "784-400-200-100-10: one finetune epoch on the training subset (batch 64, with validation on 2,000), "
        "eval on 10,000 test samples, fuse with a 784-300-100-10 MLP (1,000 calibration samples). "
        "\"loaded\": two other processes each keep a core busy. Median of the runs, seconds; the load average "
        "before each setting shows what else the machine was doing (a load above the core count means "
        "other jobs shared it even when \"idle\").",
        "",
        "| machine | threads | epoch s | eval s | fuse s | load avg |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['machine']} | {row['threads']} | {row['epoch_s']:.2f} | {row['eval_s']:.2f} | "
                     f"{row['fuse_s']:.2f} | {row['load_before']:.1f} |")
    best = {m: min((r for r in rows if r["machine"] == m), key=lambda r: r["epoch_s"])["threads"]
            for m in ("idle", "loaded")}
    lines += ["", f"Fastest finetune epoch: {best['idle']} thread(s) idle, {best['loaded']} loaded. clafuse's "
              "default is half the usable cores, at least one (1 here); `--threads 0` gives torch's default."]
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
