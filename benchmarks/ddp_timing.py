"""Time per epoch of `clafuse finetune` in one process and data parallel in two (torchrun, gloo, CPU).

A small VGG with BatchNorm ([16, M, 32, M], one linear classifier) finetunes for one epoch on a
subset of Fashion-MNIST, one intra-op thread per process, through the real CLI. The epoch time is
rank 0's `seconds` of the epoch (training and validation); the wall time includes start-up. Each
setting runs ``--runs`` times and the median is reported, with the load average, since the
machine may be shared.

    .venv/bin/python benchmarks/ddp_timing.py [--samples 4000] [--runs 2]

Writes benchmarks/results/ddp_timing.json and benchmarks/results/ddp_timing.md.
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

import numpy as np
import torch

from clafuse.arch.registry import FAMILIES
from clafuse.arch.vgg import VGGLinear, VGGSpec
from clafuse.data import load_source
from clafuse.io.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "ddp"
RESULTS = ROOT / "results"


def prepare(data: str, samples: int, val_samples: int) -> tuple[Path, Path, Path]:
    """The checkpoint and the train/val subsets as .npz files under benchmarks/_work/ddp."""
    WORK.mkdir(parents=True, exist_ok=True)
    spec = VGGSpec(in_channels=1, config=[16, "M", 32, "M"], batch_norm=True, avgpool=None, input_size=(1, 28, 28),
                   classifier=[VGGLinear(index=0, in_features=32 * 7 * 7, out_features=10)])
    torch.manual_seed(0)
    ckpt = WORK / "vgg.safetensors"
    save_checkpoint(ckpt, FAMILIES["vgg"].build(spec).state_dict())
    paths = WORK / "train.npz", WORK / "val.npz"
    for path, split, n in zip(paths, ("train", "val"), (samples, val_samples)):
        ds = load_source(data, split=split)
        np.savez(path, x=ds.x[:n].numpy(), y=ds.y[:n].numpy())
    return ckpt, *paths


def run(procs: int, args: list[str]) -> tuple[float, float]:
    """(epoch seconds, wall seconds) of one finetune run with ``procs`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd = [*(launcher if procs > 1 else [sys.executable]), "-m", "clafuse", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)["history"][0]["seconds"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--val-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    ckpt, train, val = prepare(args.data, args.samples, args.val_samples)
    finetune = ["finetune", str(ckpt), "--data", str(train), "--val", str(val), "-o", str(WORK / "out.safetensors"),
                "--epochs", "1", "--batch-size", str(args.batch_size), "--lr", "0.05", "--json"]
    report = {"data": args.data, "train_samples": args.samples, "val_samples": args.val_samples,
              "batch_size": args.batch_size, "model": "VGG [16, M, 32, M] + BatchNorm, Linear(1568, 10)",
              "threads_per_process": 1, "cpu_count": os.cpu_count(), "runs": args.runs,
              "load_before": os.getloadavg(), "settings": {}}
    for procs in (1, 2):
        samples = [run(procs, finetune) for _ in range(args.runs)]
        epochs, walls = [s[0] for s in samples], [s[1] for s in samples]
        report["settings"][str(procs)] = {"epoch_s_median": statistics.median(epochs), "epoch_s": epochs,
                                          "wall_s_median": statistics.median(walls), "wall_s": walls}
        print(f"{procs} process(es): epoch {statistics.median(epochs):.2f} s, wall {statistics.median(walls):.2f} s",
              flush=True)
    report["load_after"] = os.getloadavg()
    one, two = (report["settings"][k]["epoch_s_median"] for k in ("1", "2"))
    report["speedup"] = one / two
    report["note"] = ("shared machine: 2 CPU cores with other jobs running, so the processes compete with "
                      "them; treat the numbers as indicative")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp_timing.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report)


def write_markdown(report: dict) -> None:
    """benchmarks/results/ddp_timing.md from the report."""
    rows = "\n".join(f"| {k} | {v['epoch_s_median']:.2f} | {v['wall_s_median']:.2f} |"
                     for k, v in report["settings"].items())
    busy = min(report["load_before"][0], report["load_after"][0]) >= report["cpu_count"]
    caveat = (" The load average stayed above the number of cores, so the second process found no idle core "
              "and could not speed the epoch up; the numbers show the synchronisation cost (one gradient "
              "all-reduce and four per BatchNorm layer per step) on a busy machine, not the speed-up on free "
              "cores." if busy else "")
    (RESULTS / "ddp_timing.md").write_text(
        f"# DDP timing: `clafuse finetune`, 1 vs 2 processes on CPU\n\n"
        f"{report['model']}, {report['train_samples']} {report['data']} training and {report['val_samples']} "
        f"validation images, batch {report['batch_size']} (global), 1 epoch, 1 thread per process, gloo; median "
        f"of {report['runs']} runs (`benchmarks/ddp_timing.py`).\n\n"
        f"| processes | epoch (s) | wall incl. start-up (s) |\n|---|---|---|\n{rows}\n\n"
        f"Speed-up of the epoch: {report['speedup']:.2f}x. Load average (1, 5, 15 min) before / after: "
        f"{', '.join(f'{x:.2f}' for x in report['load_before'])} / "
        f"{', '.join(f'{x:.2f}' for x in report['load_after'])} on {report['cpu_count']} cores.\n\n"
        f"Note: {report['note']}.{caveat}\n")

if __name__ == "__main__":
    main()
