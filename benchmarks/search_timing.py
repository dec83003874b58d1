"""Wall time of ``clafuse align``, ``clafuse fuse`` and ``clafuse fuse --search`` (default budget)
for the MNIST MLP pairs of ``mnist_mlp.py``, each a separate CLI process (start-up included), with
the CLI's default threads: is a searched 2-model MNIST fusion under 10 s on 2 cores?

    .venv/bin/python benchmarks/search_timing.py [--pairs 3] [--runs 3]

Needs the cached parents of ``mnist_mlp.py`` (``benchmarks/_work/mnist``). Writes
``benchmarks/results/search_timing.json`` and ``.md`` with the machine's load average, since the
wall time measures whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "mnist"
RESULTS = ROOT / "results"


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clafuse", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.pairs):
            a, b = WORK / f"A_seed{2 * p}.safetensors", WORK / f"B_seed{2 * p + 1}.safetensors"
            if not (a.exists() and b.exists()):
                raise SystemExit(f"run benchmarks/mnist_mlp.py first: {a} or {b} is missing")
            for _ in range(args.runs):
                m, out = str(Path(tmp) / "map.json"), str(Path(tmp) / "fused.safetensors")
                rows.append({"pair": p, "align": wall(["align", str(a), str(b), "--data", "mnist", "-o", m]),
                             "fuse": wall(["fuse", "--map", m, "-o", out]),
                             "search": wall(["fuse", "--map", m, "-o", out, "--search"])})
    med = {k: statistics.median(r[k] for r in rows) for k in ("align", "fuse", "search")}
    doc = {"benchmark": "search_timing", "cpus": os.cpu_count(), "load_before": load_before,
           "load_after": os.getloadavg(), "median_seconds": med, "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_timing.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"CLI wall time, median of {len(rows)} runs ({args.pairs} MNIST MLP pairs x {args.runs}), each command "
             f"its own process with the default threads, {os.cpu_count()} cores, load average "
             f"{load_before[0]:.2f} before / {doc['load_after'][0]:.2f} after.", "",
             "| command | wall (median) | min-max |", "|---|---:|---:|"]
    for key, label in (("align", "align (CKA on 2,000 samples)"), ("fuse", "fuse (default)"),
                       ("search", "fuse --search (default budget)")):
        values = [r[key] for r in rows]
        lines.append(f"| {label} | {med[key]:.2f} s | {min(values):.2f}-{max(values):.2f} s |")
    lines.append(f"| align + fuse --search | {med['align'] + med['search']:.2f} s | |")
    (RESULTS / "search_timing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
