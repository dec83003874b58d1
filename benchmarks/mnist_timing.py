"""Wall time and peak memory of `clafuse align` and `clafuse fuse` on the MNIST MLP pair.

Repeats each command (a fresh process each time, start-up included) and reports the median and
the minimum, with the machine's load average, since a shared 2-core machine makes single runs
noisy. Uses the parents of ``benchmarks/mnist_mlp.py`` (run that first).

    .venv/bin/python benchmarks/mnist_timing.py [--runs 5]

Writes benchmarks/results/mnist_timing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "mnist"


def run(args: list[str]) -> tuple[float, float]:
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "clafuse", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clafuse {' '.join(args)} failed:\n{proc.stderr}")
    wall, rss = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(rss) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    deep, shallow = sorted(WORK.glob("A*.safetensors"))[0], sorted(WORK.glob("B*.safetensors"))[0]
    map_path, out = WORK / "timing-map.json", WORK / "timing-fused.safetensors"
    commands = {
        "clafuse --help": ["--help"],
        "clafuse align A B --data mnist": ["align", str(deep), str(shallow), "-o", str(map_path), "--data", "mnist", "--json"],
        "clafuse fuse --weights 0.5,0.5": ["fuse", "--map", str(map_path), "-o", str(out), "--weights", "0.5,0.5", "--json"],
    }
    report = {"runs": args.runs, "load_before": os.getloadavg(), "commands": {}}
    for label, argv in commands.items():
        samples = [run(argv) for _ in range(args.runs)]
        walls = [s[0] for s in samples]
        report["commands"][label] = {"median_s": statistics.median(walls), "min_s": min(walls),
                                     "peak_mb": max(s[1] for s in samples), "runs_s": walls}
        print(f"{label}: median {statistics.median(walls):.2f} s, min {min(walls):.2f} s, "
              f"peak {max(s[1] for s in samples):.0f} MB", flush=True)
    report["load_after"] = os.getloadavg()
    (ROOT / "results" / "mnist_timing.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
