#!/usr/bin/env python3
"""Wall time and peak memory of ``clafuse align`` + ``clafuse fuse`` on full-size ResNet34 + ResNet18.

Both networks are torchvision-layout (ImageNet stem, widths 64-128-256-512, 1000 classes) with
random weights and randomised BatchNorm statistics and affine parameters, saved as safetensors.
Every command runs through the real CLI in its own subprocess under ``/usr/bin/time -f '%e %M'``
(wall seconds, max RSS in KB):

* weights:     ``align --metric neuron`` then ``fuse --signal weights`` (no data);
* activations: ``align --data x.npz --samples 200`` (CKA) then ``fuse`` (activation signal,
  BatchNorm reset and fc refit, the defaults), x: 200 standard-normal images of 3x32x32.

Also measured, for reference: the peak RSS of a process that only imports torch, POT and
clafuse's fusion code (the floor every command pays before touching a checkpoint).

Each set of commands runs once per ``--threads`` setting: torch's default intra-op threads, and
``OMP_NUM_THREADS=1`` (on a shared, oversubscribed machine torch's threads wait for each other and
one thread is several times faster; the two settings show how much of the time is that).

Goals: weight-based fuse < 30 s; activation-based align + fuse < 60 s; every command's peak
RSS < 4x the two input checkpoints' size. ``--repeat N`` runs each command N times (median
reported). ``--profile`` additionally runs each fuse under cProfile and stores the top entries.
Writes ``benchmarks/results/resnet_timing.json`` and ``.md``.

Run: ``.venv/bin/python benchmarks/resnet_timing.py [--profile]`` (3-5 minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from clafuse.arch.resnet import ResNetFamily, ResNetSpec

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "_work" / "resnet_timing"
RESULTS = ROOT / "benchmarks" / "results"
TIME = "/usr/bin/time"
GOALS = {"weights_fuse_s": 30.0, "activations_align_plus_fuse_s": 60.0, "peak_rss_over_inputs": 4.0}
SPECS = {  # torchvision resnet34 / resnet18: block, blocks per stage
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet18": ("basic", [2, 2, 2, 2]),
}


def torchvision_shapes(layers: list[int], num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a torchvision BasicBlock ResNet (ImageNet stem, widths 64-512), from
    clafuse's own builder on the meta device (tests check it against torchvision's key list)."""
    spec = ResNetSpec(block="basic", layers=layers, widths=[64, 128, 256, 512], stem_width=64,
                      num_classes=num_classes)
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ResNetFamily().build(spec).state_dict().items()}


def random_checkpoint(layers: list[int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in torchvision_shapes(layers).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_mean"):
            out[key] = 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            out[key] = 0.5 + 1.5 * torch.rand(shape, generator=g)
        elif len(shape) == 4:
            out[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key == "fc.weight":
            out[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif key.endswith("weight"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def prepare(samples: int) -> dict[str, Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, (name, (_, layers)) in enumerate(SPECS.items()):
        path = WORK / f"{name}.safetensors"
        if not path.exists():
            save_file(random_checkpoint(layers, seed), str(path))
        paths[name] = path
    x = WORK / "x.npz"
    if not x.exists():
        np.savez(x, x=np.random.default_rng(0).standard_normal((samples, 3, 32, 32)).astype(np.float32))
    paths["x"] = x
    return paths


def clafuse_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clafuse", *args]


def timed(argv: list[str], env: dict[str, str]) -> dict:
    """Run ``argv`` under /usr/bin/time in WORK; wall seconds and peak RSS (KB)."""
    proc = subprocess.run([TIME, "-f", "%e %M", *argv], cwd=WORK, env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"resnet_timing: {shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    wall, rss = lines[-1].split()
    return {"wall_s": float(wall), "peak_rss_kb": int(rss)}


def measure(name: str, args: list[str], repeat: int, env: dict[str, str], inputs_kb: float, argv=None) -> dict:
    argv = argv or clafuse_argv(args)
    runs = [timed(argv, env) for _ in range(repeat)]
    wall = statistics.median(r["wall_s"] for r in runs)
    rss = statistics.median(r["peak_rss_kb"] for r in runs)
    print(f"  {name:<22} {wall:7.2f} s  {rss / 1024:7.0f} MB  ({rss / inputs_kb:.2f}x inputs)", flush=True)
    return {"command": name, "args": args, "runs": runs, "wall_s": wall, "peak_rss_kb": rss,
            "peak_rss_mb": round(rss / 1024, 1), "peak_rss_over_inputs": round(rss / inputs_kb, 3)}


def profile(args: list[str], env: dict[str, str], top: int = 20) -> list[dict]:
    out = WORK / "profile.out"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "clafuse", *args], cwd=WORK, env=env,
                   capture_output=True, check=True)
    stats = pstats.Stats(str(out), stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls,
                     "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def check_goals(results: dict) -> list[dict]:
    act_total = results["activations_align"]["wall_s"] + results["activations_fuse"]["wall_s"]
    worst = max((k for k in results if k != "import_floor"), key=lambda k: results[k]["peak_rss_over_inputs"])
    return [
        {"goal": "weight-based fuse < 30 s", "measured": f"{results['weights_fuse']['wall_s']:.2f} s "
         f"(align + fuse {results['weights_align']['wall_s'] + results['weights_fuse']['wall_s']:.2f} s)",
         "met": results["weights_fuse"]["wall_s"] < GOALS["weights_fuse_s"]},
        {"goal": "activation-based align + fuse < 60 s", "measured": f"{act_total:.2f} s",
         "met": act_total < GOALS["activations_align_plus_fuse_s"]},
        {"goal": "peak RSS < 4x inputs (every command)",
         "measured": f"{results[worst]['peak_rss_over_inputs']:.2f}x ({results[worst]['command']})",
         "met": results[worst]["peak_rss_over_inputs"] < GOALS["peak_rss_over_inputs"]},
    ]


def markdown(doc: dict) -> str:
    lines = [
        "# ResNet34 + ResNet18 timing (full size, random weights)",
        "",
        f"{doc['date']}, {doc['machine']['cpus']} CPUs (shared; load average {doc['machine']['load_avg_1m_before']} "
        f"before, {doc['machine']['load_avg_1m_after']} after), torch {doc['versions']['torch']}, "
        f"{doc['repeat']} run(s) per command (median).",
        f"Inputs: resnet34 {doc['inputs']['resnet34_mb']} MB + resnet18 {doc['inputs']['resnet18_mb']} MB = "
        f"{doc['inputs']['total_mb']} MB; 4x inputs = {round(4 * doc['inputs']['total_mb'], 1)} MB. "
        f"Calibration: {doc['calibration']}.",
        "",
    ]
    for config in doc["configs"]:
        r = config["results"]
        floor = r["import_floor"]["peak_rss_kb"]
        label = "torch's default" if config["threads"] == "default" else f"OMP_NUM_THREADS={config['threads']}"
        lines += [f"## Intra-op threads: {label}", "",
                  "| command | wall (s) | peak RSS (MB) | RSS / inputs | (RSS - import floor) / inputs |",
                  "|---|---:|---:|---:|---:|"]
        for key in ("import_floor", "weights_align", "weights_fuse", "activations_align", "activations_fuse"):
            m = r[key]
            above = (m["peak_rss_kb"] - floor) / (doc["inputs"]["total_mb"] * 1024) if key != "import_floor" else 0
            lines.append(f"| `{m['command']}` | {m['wall_s']:.2f} | {m['peak_rss_mb']:.0f} | "
                         f"{m['peak_rss_over_inputs']:.2f}x | {above:.2f}x |")
        lines += ["", "| goal | measured | met |", "|---|---|:---:|"]
        lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |" for g in config["goals"]]
        lines.append("")
        for name, rows in config["profiles"].items():
            lines += [f"### cProfile: `{name}` (top by own time)", "", "| function | calls | own (s) | cum (s) |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{row['function']}` | {row['calls']} | {row['tottime_s']} | {row['cumtime_s']} |"
                      for row in rows[:12]]
            lines.append("")
    lines += ["The import floor is a process that only imports torch, POT and clafuse's fusion modules: "
              "memory every clafuse command pays before reading a checkpoint.", ""]
    if doc.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in doc["notes"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="also run each fuse under cProfile")
    parser.add_argument("--threads", default="default,1",
                        help="comma-separated intra-op thread settings to measure: 'default' (torch's choice) "
                             "or a number (OMP_NUM_THREADS for the subprocesses)")
    parser.add_argument("--notes", type=Path, help="a text file of notes (one per line) to add to the report")
    opts = parser.parse_args()

    base_env = dict(os.environ)
    base_env.setdefault("PYTHONPATH", str(ROOT))
    base_env.pop("OMP_NUM_THREADS", None)
    load_before = round(os.getloadavg()[0], 2)
    paths = prepare(opts.samples)
    sizes = {name: paths[name].stat().st_size / 1024 for name in SPECS}
    inputs_kb = sum(sizes.values())
    print(f"inputs {inputs_kb / 1024:.1f} MB; 4x = {4 * inputs_kb / 1024:.1f} MB; load {load_before}", flush=True)
    r34, r18, x = paths["resnet34"].name, paths["resnet18"].name, paths["x"].name
    floor_code = ("import torch, clafuse.api, clafuse.fusion.engines; "
                  "from clafuse.fusion.transport import _pot; _pot()")
    configs = []
    for threads in [t.strip() for t in opts.threads.split(",") if t.strip()]:
        env = dict(base_env) if threads == "default" else {**base_env, "OMP_NUM_THREADS": threads}
        print(f"threads: {threads}", flush=True)
        results = {
            "import_floor": measure("python -c 'import torch, ot, clafuse.api'", ["-c", floor_code], opts.repeat,
                                    env, inputs_kb, argv=[sys.executable, "-c", floor_code]),
            "weights_align": measure("align --metric neuron",
                                     ["align", r34, r18, "-o", "map_w.json", "--metric", "neuron", "--json"],
                                     opts.repeat, env, inputs_kb),
            "weights_fuse": measure("fuse --signal weights",
                                    ["fuse", "--map", "map_w.json", "-o", "fused_w.safetensors", "--signal",
                                     "weights", "--json"], opts.repeat, env, inputs_kb),
            "activations_align": measure("align --data (cka)",
                                         ["align", r34, r18, "-o", "map_a.json", "--data", x, "--samples",
                                          str(opts.samples), "--json"], opts.repeat, env, inputs_kb),
            "activations_fuse": measure("fuse (activations)",
                                        ["fuse", "--map", "map_a.json", "-o", "fused_a.safetensors", "--json"],
                                        opts.repeat, env, inputs_kb),
        }
        profiles = {}
        if opts.profile:
            for key in ("weights_fuse", "activations_fuse"):
                profiles[results[key]["command"]] = profile(results[key]["args"], env)
        configs.append({"threads": threads, "results": results, "goals": check_goals(results),
                        "profiles": profiles})
    doc = {
        "benchmark": "resnet_timing",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m_before": load_before, "load_avg_1m_after": round(os.getloadavg()[0], 2)},
        "versions": {"torch": torch.__version__},
        "repeat": opts.repeat,
        "inputs": {"resnet34_mb": round(sizes["resnet34"] / 1024, 1), "resnet18_mb": round(sizes["resnet18"] / 1024, 1),
                   "total_mb": round(inputs_kb / 1024, 1)},
        "calibration": f"{opts.samples} standard-normal images 3x32x32 (.npz)",
        "configs": configs,
        "notes": [line.strip() for line in opts.notes.read_text().splitlines() if line.strip()] if opts.notes else [],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resnet_timing.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "resnet_timing.md").write_text(markdown(doc))
    for config in configs:
        for goal in config["goals"]:
            print(f"  threads {config['threads']}: {'ok  ' if goal['met'] else 'MISS'} {goal['goal']}: "
                  f"{goal['measured']}")


if __name__ == "__main__":
    main()
