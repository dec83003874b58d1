#!/usr/bin/env python3
"""One-shot fusion of the Fashion-MNIST CNN pairs of fashion_cnn.py with the default correction
(``--correction regress``) at several weights: accuracy, wall time and peak memory of ``fuse``.

Written to measure the regression of conv layers (through their BatchNorm) against the version
before it, which repaired conv layers and regressed only the Linear ones: run it from each
checkout with its own ``--label``. Each ``fuse`` is a fresh CLI process (start-up included);
accuracy by ``clafuse eval`` on ``fashion-mnist:val`` and ``:test`` (nothing is selected here).
Needs the parents and maps fashion_cnn.py leaves in ``benchmarks/_work`` (the runs
``fashion_cnn`` and ``fashion_cnn_resnet50k``).

    .venv/bin/python benchmarks/conv_regress.py --label after

Writes benchmarks/results/conv_regress-LABEL.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work"
RESULTS = ROOT / "results"
# (work folder of fashion_cnn.py's run, pair, what its parents are)
PAIRS = [("fashion", "vgg", "VGG, parents 10k images x 3 epochs"),
         ("fashion", "resnet", "ResNet [3,3,3] + [1,2,1], parents 10k images x 3 epochs"),
         ("fashion_cnn_resnet50k", "resnet", "ResNet [3,3,3] + [1,2,1], parents 50k images x 6 epochs")]
WEIGHTS = ["0.5,0.5", "0.7,0.3", "0.9,0.1"]


def clafuse(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak resident KB (GNU time) and stdout of one CLI run."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as timing:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", timing.name, sys.executable, "-m", "clafuse", *args],
                              check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        return seconds, int(timing.read().strip().splitlines()[-1]), done.stdout


def accuracy(path: Path, split: str) -> float:
    _, _, out = clafuse(["eval", str(path), "--data", f"fashion-mnist:{split}", "--json"])
    return json.loads(out)["models"][0]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="names the results file (e.g. before, after)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run, pair, title in PAIRS:
            map_path = WORK / run / f"{pair}-map.json"
            if not map_path.exists():
                raise SystemExit(f"run benchmarks/fashion_cnn.py first: {map_path} is missing")
            for weights in WEIGHTS:
                out = Path(tmp) / "fused.safetensors"
                seconds, peak, _ = clafuse(["fuse", "--map", str(map_path), "-o", str(out), "--weights", weights,
                                            "--samples", "1000"])
                rows.append({"run": run, "pair": pair, "title": title, "weights": weights, "fuse_seconds": seconds,
                             "fuse_peak_mb": peak / 1024, "val": accuracy(out, "val"), "test": accuracy(out, "test")})
                print(rows[-1], flush=True)
    doc = {"benchmark": "conv_regress", "label": args.label, "cpus": os.cpu_count(),
           "load_avg": os.getloadavg(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"conv_regress-{args.label}.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"`fuse --weights W --samples 1000` (default correction, regress) on the Fashion-MNIST CNN pairs, "
             f"code: {args.label}; accuracy in % (val / test), wall time of the CLI process and its peak memory "
             f"({os.cpu_count()} cores, load average {doc['load_avg'][0]:.1f} at the end).", "",
             "| pair | weights (A,B) | val | test | fuse wall | peak |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['title']} | {r['weights']} | {100 * r['val']:.2f} | {100 * r['test']:.2f} | "
                     f"{r['fuse_seconds']:.1f} s | {r['fuse_peak_mb']:.0f} MB |")
    (RESULTS / f"conv_regress-{args.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
