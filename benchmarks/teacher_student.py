"""Teacher-student benchmark: a larger teacher fused into a small student's architecture.

On Fashion-MNIST (a training subset, to fit two shared CPU cores), trains a teacher and, at one
student epoch budget E, compares: the student from scratch, the student distilled from the teacher
(KD), a fused initialisation (`align STUDENT0 TEACHER` + `fuse --target A`, i.e. the teacher fused
into the student's architecture) finetuned, and the fused initialisation distilled. Every
student-sized training epoch counts towards E, including the pre-training of STUDENT0. Pairs:

- ``vgg``: VGG with BatchNorm, teacher twice as wide as the student at the same depth (fusing a
  deeper VGG into a shallower one fails: merge folds only fully-connected layers without BatchNorm);
- ``mlp``: teacher deeper and wider than the student (depth by merge, width by transport).

Learning rates, STUDENT0 and the mixing weights are chosen on the validation split (mean over
seeds); test accuracy is only reported. Training, align, fuse and evaluation go through the library
API (`clafuse.api`).

    nice .venv/bin/python benchmarks/teacher_student.py [--pairs vgg mlp] [--subset 10000] [--budget 3]

Training runs on one thread (two shared CPU cores). Trained checkpoints and finished runs are cached
in benchmarks/_work/teacher_student/, so a rerun skips them. Writes
benchmarks/results/teacher_student.json and benchmarks/results/teacher_student.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clafuse import api
from clafuse.data import load_source
from clafuse.io.checkpoint import save_checkpoint
from fashion_cnn import SmallVGG

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "teacher_student"
RESULTS = ROOT / "results"
SCRATCH_LRS = (0.02, 0.05, 0.1)
FUSED_LRS = (0.01, 0.02, 0.05)
PROBE_LR = 0.02
TEACHER_LR = 0.05
STUDENT0_LR = 0.05
# Fused initialisations tried: (STUDENT0, teacher weight). STUDENT0 "1ep" is the student after one
# from-scratch epoch at STUDENT0_LR (then E-1 finetuning epochs); "init" is the untrained student
# (then E epochs), which only makes sense with the teacher alone (weight 1).
FUSED_INITS = (("1ep", 0.5), ("1ep", 0.7), ("1ep", 1.0), ("init", 1.0))
TRAIN = {"momentum": 0.9, "batch_size": 128, "weight_decay": 5e-4, "schedule": "cosine"}
KD = {"kd_alpha": 0.5, "kd_temperature": 4.0}


VGG = SmallVGG  # the Fashion-MNIST VGG of fashion_cnn.py (BN, ``hidden``-10 classifier)


def mlp(hidden: list[int]) -> torch.nn.Module:
    """``fc1..fcN`` (with biases) and ReLU between them, 784 inputs, 10 classes."""
    layers: OrderedDict[str, torch.nn.Module] = OrderedDict(flatten=torch.nn.Flatten())
    widths = [784, *hidden, 10]
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers[f"fc{i}"] = torch.nn.Linear(n_in, n_out)
        if i < len(widths) - 1:
            layers[f"relu{i}"] = torch.nn.ReLU()
    return torch.nn.Sequential(layers)


@dataclass
class Pair:
    title: str
    teacher: Callable[[], torch.nn.Module]
    student: Callable[[], torch.nn.Module]


PAIRS = {
    "vgg": Pair("VGG with BatchNorm: teacher [32,M,64,M] + 128-10, student [16,M,32,M] + 64-10 (width by transport)",
                lambda: VGG([32, "M", 64, "M"], 128), lambda: VGG([16, "M", 32, "M"], 64)),
    "mlp": Pair("MLP: teacher 784-400-200-100-10, student 784-100-50-10 (depth by merge, width by transport)",
                lambda: mlp([400, 200, 100]), lambda: mlp([100, 50])),
}


class Runs:
    """Finished runs, cached in ``runs.json`` beside their outputs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.file = work / "runs.json"
        self.done: dict[str, dict] = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.used: set[str] = set()

    def get(self, key: str, run: Callable[[Path], dict], ext: str = ".safetensors") -> dict:
        """The record of run ``key``, running ``run(output_path)`` unless it is cached; checkpoints
        (``ext`` .safetensors) get their validation and test accuracy."""
        path = self.work / f"{key}{ext}"
        self.used.add(key)
        if key in self.done and path.exists():
            return self.done[key]
        started = time.perf_counter()
        record = run(path)
        record = {"path": str(path), "seconds": round(time.perf_counter() - started, 2), **record}
        if ext == ".safetensors":
            record.update(accuracy(path, [split for split in ("val", "test") if split not in record]))
        self.done[key] = record
        self.file.write_text(json.dumps(self.done, indent=1) + "\n")
        score = f", val {pct(record['val'])}" if "val" in record else ""
        print(f"{self.work.name} {key}: {record['seconds']:.0f} s{score}", flush=True)
        return record


def accuracy(path: Path, splits: list[str]) -> dict[str, float]:
    """Accuracy of a checkpoint on each of ``splits`` of fashion-mnist."""
    return {split: api.evaluate_checkpoints([path], f"fashion-mnist:{split}")["models"][0]["accuracy"]
            for split in splits}


def init_checkpoint(path: Path, make: Callable[[], torch.nn.Module], seed: int) -> Path:
    """Write a freshly initialised model (``torch.manual_seed(seed)``) unless it exists."""
    if not path.exists():
        torch.manual_seed(seed)
        save_checkpoint(path, make().state_dict())
    return path


def subset_npz(path: Path, n: int, seed: int = 0) -> None:
    """Write ``n`` samples of the fashion-mnist train split (standardised) to ``path``."""
    if path.exists():
        return
    train = load_source("fashion-mnist")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    np.savez(path, x=train.x[idx].numpy(), y=train.y[idx].numpy())


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def run_pair(pair: Pair, work: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """All runs of one teacher-student pair; the chosen rows, gains, one-shot accuracies and the grid."""
    budget = args.budget
    work.mkdir(parents=True, exist_ok=True)
    runs = Runs(work)

    def train(init: Path, epochs: int, lr: float, seed: int, teacher: Path | None = None) -> Callable[[Path], dict]:
        def run(out: Path) -> dict:
            result = api.finetune_checkpoint(init, out, data=str(data), val="fashion-mnist", epochs=epochs, lr=lr,
                                             seed=seed, teacher=teacher, **TRAIN, **KD)
            best = result["best_epoch"]
            return {"best_epoch": best, "epochs": epochs, "lr": lr, "val": result["history"][best - 1]["val_accuracy"]}
        return run

    teacher_init = init_checkpoint(work / "teacher-init.safetensors", pair.teacher, 100)
    teacher = runs.get("teacher", train(teacher_init, args.teacher_epochs, TEACHER_LR, 100))
    teacher_path = Path(teacher["path"])

    grid: dict[str, dict[str, list[dict]]] = {}

    def add(row: str, config: str, record: dict) -> None:
        grid.setdefault(row, {}).setdefault(config, []).append(record)

    def choose(row: str, configs: list[str] | None = None) -> str:
        return max(configs or grid[row], key=lambda c: mean([r["val"] for r in grid[row][c]]))

    inits = {seed: init_checkpoint(work / f"student-init-s{seed}.safetensors", pair.student, 1000 + seed)
             for seed in args.seeds}
    for seed in args.seeds:
        for lr in SCRATCH_LRS:
            add("scratch", f"lr {lr}", runs.get(f"scratch-lr{lr}-s{seed}", train(inits[seed], budget, lr, seed)))
            add("scratch + KD", f"lr {lr}",
                runs.get(f"kd-lr{lr}-s{seed}", train(inits[seed], budget, lr, seed, teacher_path)))

    fused: dict[tuple[str, float, int], dict] = {}
    one_shot: dict[str, list[dict]] = {}
    for seed in args.seeds:
        student0 = {"init": {"path": str(inits[seed]), "seconds": 0.0},
                    "1ep": runs.get(f"student0-1ep-s{seed}", train(inits[seed], 1, STUDENT0_LR, seed))}
        maps = {}
        for name, s0 in student0.items():
            def align(out: Path, s0: dict = s0) -> dict:
                doc = api.align([Path(s0["path"]), teacher_path], out, data=str(data), samples=args.samples)
                return {"mapping": [g.mapping for g in doc.alignments[0].groups]}
            maps[name] = runs.get(f"map-{name}-s{seed}", align, ext=".json")
        for name, weight in FUSED_INITS:
            def fuse(out: Path, name: str = name, weight: float = weight) -> dict:
                info = api.fuse(Path(maps[name]["path"]), out, target="A", weights=[1 - weight, weight])
                return {"balance": info["balance"], "mapping": info["mapping"], "weights": info["weights"]}
            record = runs.get(f"fused-{name}-w{weight}-s{seed}", fuse)
            record = {**record, "pre_seconds": student0[name]["seconds"] + maps[name]["seconds"] + record["seconds"]}
            fused[name, weight, seed] = record
            one_shot.setdefault(f"STUDENT0 {name}, teacher weight {weight:g}", []).append(record)

    def fused_runs(name: str, weight: float, lr: float, kd: bool) -> None:
        row, key = ("fused + KD", "kd") if kd else ("fused + finetune", "ft")
        for seed in args.seeds:
            init = fused[name, weight, seed]
            epochs = budget - (1 if name == "1ep" else 0)
            record = runs.get(f"fused-{name}-w{weight}-{key}-lr{lr}-s{seed}",
                              train(Path(init["path"]), epochs, lr, seed, teacher_path if kd else None))
            add(row, f"STUDENT0 {name}, teacher weight {weight:g}, lr {lr}",
                {**record, "total_seconds": init["pre_seconds"] + record["seconds"]})

    # Stage 1: the fused initialisation, finetuned at PROBE_LR, chosen on validation.
    for name, weight in FUSED_INITS:
        fused_runs(name, weight, PROBE_LR, kd=False)
    best = choose("fused + finetune")
    name, weight = next((n, w) for n, w in FUSED_INITS if best.startswith(f"STUDENT0 {n}, teacher weight {w:g},"))
    # Stage 2: the learning rate of that initialisation, with and without KD.
    for lr in FUSED_LRS:
        if lr != PROBE_LR:
            fused_runs(name, weight, lr, kd=False)
        fused_runs(name, weight, lr, kd=True)
    prefix = f"STUDENT0 {name}, teacher weight {weight:g}, lr "
    chosen = {"scratch": choose("scratch"), "scratch + KD": choose("scratch + KD"),
              "fused + finetune": choose("fused + finetune", [c for c in grid["fused + finetune"] if c.startswith(prefix)]),
              "fused + KD": choose("fused + KD")}
    rows: dict[str, dict[str, Any]] = {}
    pre = 1 if name == "1ep" else 0
    for row, config in chosen.items():
        records = grid[row][config]
        spent = f"{budget}" if row.startswith("scratch") else f"{pre} + {budget - pre}"
        rows[row] = {"config": config, "student_epochs": spent, "val": mean([r["val"] for r in records]),
                     "test": mean([r["test"] for r in records]), "test_per_seed": [r["test"] for r in records],
                     "seconds": mean([r.get("total_seconds", r["seconds"]) for r in records])}
    rows["teacher"] = {"config": f"{args.teacher_epochs} epochs, lr {TEACHER_LR}", "student_epochs": "-",
                       "val": teacher["val"], "test": teacher["test"], "test_per_seed": [teacher["test"]],
                       "seconds": teacher["seconds"]}
    gains = {"fused + finetune vs scratch": ("fused + finetune", "scratch"),
             "fused + KD vs scratch + KD": ("fused + KD", "scratch + KD")}
    return {
        "title": pair.title, "rows": rows,
        "compute_seconds": round(sum(runs.done[k]["seconds"] for k in runs.used), 1),
        "test_gains": {k: [a - b for a, b in zip(rows[x]["test_per_seed"], rows[y]["test_per_seed"])]
                       for k, (x, y) in gains.items()},
        "one_shot": {tag: {"val": mean([r["val"] for r in rs]), "test": mean([r["test"] for r in rs]),
                           "balance": rs[0]["balance"], "mapping": rs[0]["mapping"]} for tag, rs in one_shot.items()},
        "grid": {row: {c: [{k: r[k] for k in ("val", "test", "best_epoch", "seconds")} for r in rs]
                       for c, rs in configs.items()} for row, configs in grid.items()},
    }


def write_markdown(report: dict) -> None:
    """The markdown summary: chosen rows, gains, one-shot fused accuracy and the validation grid."""
    lines = [f"Fashion-MNIST, {report['subset']} training samples, student epoch budget E = {report['budget']}, "
             f"seeds {', '.join(map(str, report['seeds']))} (mean; test per seed in brackets); teacher trained "
             f"{report['teacher_epochs']} epochs; calibration {report['samples']} samples of the training subset; "
             f"SGD momentum 0.9, batch 128, weight decay 5e-4, cosine; KD alpha {report['kd']['kd_alpha']}, "
             f"T {report['kd']['kd_temperature']}. Student epochs: STUDENT0 pre-training (STUDENT0 1ep: one epoch "
             f"at lr {report['student0_lr']}) + finetuning. Fused initialisations probed at lr {report['probe_lr']}, "
             f"then the learning rate of the best one tuned. Every "
             f"setting chosen on validation; accuracy in %; wall time per seed, one thread on a shared 2-core machine.", ""]
    for entry in report["pairs"].values():
        lines += [f"**{entry['title']}**", "", "| row | chosen on val | student epochs | val | test | wall s |",
                  "|---|---|---|---|---|---|"]
        for row, r in entry["rows"].items():
            lines.append(f"| {row} | {r['config']} | {r['student_epochs']} | {pct(r['val'])} | {pct(r['test'])} "
                         f"({' / '.join(pct(v) for v in r['test_per_seed'])}) | {r['seconds']:.0f} |")
        lines += ["", "Test gains at equal budget (points, per seed): "
                  + "; ".join(f"{k}: {' / '.join(f'{100 * g:+.2f}' for g in v)}" for k, v in entry["test_gains"].items()),
                  "", "One-shot fused students (before any finetuning), val / test:", ""]
        lines += [f"- {tag}: {pct(v['val'])} / {pct(v['test'])}" for tag, v in entry["one_shot"].items()]
        lines += ["", "Validation grid (mean best-epoch val accuracy over seeds):", "", "| row | setting | val |",
                  "|---|---|---|"]
        for row, configs in entry["grid"].items():
            lines += [f"| {row} | {c} | {pct(mean([r['val'] for r in rs]))} |" for c, rs in configs.items()]
        lines.append("")
    per_pair = ", ".join(f"{k} {v['compute_seconds']:.0f} s" for k, v in report["pairs"].items())
    compute = sum(entry["compute_seconds"] for entry in report["pairs"].values())
    lines.append(f"Training, align, fuse and evaluation of every run above: {compute:.0f} s in all ({per_pair}); "
                 f"this invocation {report['wall_seconds']:.0f} s (cached steps are not re-run).")
    (RESULTS / "teacher_student.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["vgg", "mlp"], choices=sorted(PAIRS))
    parser.add_argument("--subset", type=int, default=10000, help="training samples used (of 50k)")
    parser.add_argument("--budget", type=int, default=3, help="student epochs E for every row")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=1000, help="calibration samples for align/fuse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = WORK / f"train-{args.subset}.npz"
    subset_npz(data, args.subset)
    tag = f"n{args.subset}-t{args.teacher_epochs}-e{args.budget}-c{args.samples}"
    report: dict[str, Any] = {
        "subset": args.subset, "budget": args.budget, "teacher_epochs": args.teacher_epochs, "seeds": args.seeds,
        "samples": args.samples, "train": TRAIN, "kd": KD, "scratch_lrs": SCRATCH_LRS, "fused_lrs": FUSED_LRS,
        "probe_lr": PROBE_LR, "student0_lr": STUDENT0_LR, "fused_inits": FUSED_INITS, "pairs": {},
    }
    for name in args.pairs:
        report["pairs"][name] = run_pair(PAIRS[name], WORK / f"{name}-{tag}", data, args)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["load"] = os.getloadavg()
    (RESULTS / "teacher_student.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report)


if __name__ == "__main__":
    main()
