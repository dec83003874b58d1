"""Peak memory and wall time of a weight-based ``clafuse fuse`` of two wide MLPs, against width
and depth.

Each run writes two random MLP checkpoints (784 -> ``depth`` hidden layers of ``width`` -> 10,
float32 safetensors), aligns them with the data-free ``neuron`` metric and fuses them with the
weight signal, each command in its own process; its peak resident memory comes from the kernel
(``wait4``'s ``ru_maxrss``). The goal (issue 5): the fuse of 8 layers of width 4096 peaks below
twice the output checkpoint's size plus 300 MB.

    python benchmarks/fuse_memory.py              # the full sweep (about 15 minutes on 2 cores)
    python benchmarks/fuse_memory.py --quick      # small widths only

Writes benchmarks/results/fuse_memory.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "_work" / "fuse_memory"
MB = 1e6
HEADLINE = (4096, 8)
WIDTHS = [512, 1024, 2048, 4096, 8192]
WIDTH_SWEEP_DEPTH = 4
DEPTHS = [2, 4, 8, 16]
DEPTH_SWEEP_WIDTH = 2048


def write_mlp(path: Path, width: int, depth: int, seed: int) -> int:
    """A random MLP checkpoint, written by a child process (this process stays small: a child's
    peak RSS counts the parent's memory at fork time); returns its size in bytes."""
    subprocess.run([sys.executable, __file__, "--write", str(path), str(width), str(depth), str(seed)], check=True)
    return path.stat().st_size


def _write_mlp(path: Path, width: int, depth: int, seed: int) -> None:
    import torch

    from clafuse.io.checkpoint import save_checkpoint

    gen = torch.Generator().manual_seed(seed)
    widths = [784, *[width] * depth, 10]
    state = {}
    for k, (i, o) in enumerate(zip(widths, widths[1:])):
        state[f"layers.{k}.weight"] = torch.randn(o, i, generator=gen) * (2 / i) ** 0.5
        state[f"layers.{k}.bias"] = torch.zeros(o)
    save_checkpoint(path, state)


def measured(args: list[str]) -> tuple[float, float]:
    """Run ``python -m clafuse ARGS``; return (seconds, peak RSS in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clafuse", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"clafuse {' '.join(args)} failed: {stderr}")
    return seconds, usage.ru_maxrss * 1024 / MB


def import_floor() -> float:
    """Peak RSS of a process that only imports what fuse imports."""
    proc = subprocess.Popen([sys.executable, "-c", "import torch, clafuse.api, clafuse.fusion.transport as t; t._pot()"])
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024 / MB


def run_case(width: int, depth: int) -> dict:
    folder = WORK / f"w{width}-d{depth}"
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / "A.safetensors", folder / "B.safetensors"
    size_a = write_mlp(a, width, depth, seed=0)
    size_b = write_mlp(b, width, depth, seed=1)
    align_s, align_mb = measured(["align", str(a), str(b), "--metric", "neuron", "-o", str(folder / "map.json")])
    out = folder / "fused.safetensors"
    fuse_s, fuse_mb = measured(["fuse", "--map", str(folder / "map.json"), "--signal", "weights", "-o", str(out)])
    out_mb = out.stat().st_size / MB
    bound = 2 * out_mb + 300
    row = {"width": width, "depth": depth, "input_mb": round((size_a + size_b) / MB, 1),
           "output_mb": round(out_mb, 1), "align_s": round(align_s, 2), "align_peak_mb": round(align_mb, 1),
           "fuse_s": round(fuse_s, 2), "fuse_peak_mb": round(fuse_mb, 1), "bound_mb": round(bound, 1),
           "within_bound": fuse_mb < bound}
    for p in (a, b, out):
        p.unlink()
    print(json.dumps(row), flush=True)
    return row


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    sweeps = [("width", [r for r in rows if r["sweep"] == "width"], f"depth {WIDTH_SWEEP_DEPTH}"),
              ("depth", [r for r in rows if r["sweep"] == "depth"], f"width {DEPTH_SWEEP_WIDTH}")]
    for col, (key, part, fixed) in enumerate(sweeps):
        xs = [r[key] for r in part]
        ax = axes[0][col]
        ax.plot(xs, [r["fuse_peak_mb"] for r in part], "o-", label="fuse peak RSS")
        ax.plot(xs, [r["bound_mb"] for r in part], "k--", label="goal: 2 x output + 300 MB")
        ax.plot(xs, [r["output_mb"] for r in part], "s:", label="output checkpoint")
        ax.plot(xs, [r["input_mb"] for r in part], "^:", label="both inputs")
        ax.axhline(floor, color="grey", lw=0.8, label="import floor")
        ax.set(xlabel=key, ylabel="MB", title=f"memory vs {key} ({fixed})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        ax.plot(xs, [r["fuse_s"] for r in part], "o-", label="fuse")
        ax.plot(xs, [r["align_s"] for r in part], "s-", label="align (neuron metric)")
        ax.set(xlabel=key, ylabel="seconds", title=f"wall time vs {key} ({fixed})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="widths up to 1024 and depths up to 4 only")
    parser.add_argument("--write", nargs=4, metavar=("PATH", "WIDTH", "DEPTH", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        _write_mlp(Path(args.write[0]), *map(int, args.write[1:]))
        return
    widths = [w for w in WIDTHS if w <= 1024] if args.quick else WIDTHS
    depths = [d for d in DEPTHS if d <= 4] if args.quick else DEPTHS
    floor = import_floor()
    rows = []
    if not args.quick:
        rows.append({"sweep": "headline", **run_case(*HEADLINE)})
    rows += [{"sweep": "width", **run_case(w, WIDTH_SWEEP_DEPTH)} for w in widths]
    rows += [{"sweep": "depth", **run_case(DEPTH_SWEEP_WIDTH if not args.quick else 512, d)} for d in depths]
    RESULTS.mkdir(exist_ok=True)
    from importlib.metadata import version

    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {version('torch')}",
           "import_floor_mb": round(floor, 1), "rows": rows}
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"fuse_memory{suffix}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Weight-based fuse of two MLPs: peak memory and wall time\n",
             f"{doc['machine']}; import floor (python + torch + clafuse + POT): {doc['import_floor_mb']} MB.",
             "Goal: fuse peak < 2 x output + 300 MB.\n",
             "| sweep | width | depth | inputs MB | output MB | align s | align peak MB | fuse s | fuse peak MB | goal MB | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sweep']} | {r['width']} | {r['depth']} | {r['input_mb']} | {r['output_mb']} | "
                     f"{r['align_s']} | {r['align_peak_mb']} | {r['fuse_s']} | {r['fuse_peak_mb']} | {r['bound_mb']} | "
                     f"{'yes' if r['within_bound'] else 'NO'} |")
    (RESULTS / f"fuse_memory{suffix}.md").write_text("\n".join(lines) + "\n")
    plot(rows, floor, RESULTS / f"fuse_memory{suffix}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
