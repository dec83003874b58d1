"""Speed of ``clafuse fuse`` against a Git Re-Basin-style matching baseline, and of the corrections.

The baseline is written here on plain torch and SciPy (no clafuse fusion code): for two networks of
the same architecture, a permutation of each hidden space of the second onto the first's, found

- by **weight matching**: each permutation group in turn (random order) solves the linear assignment
  that maximises the summed inner products of every tensor axis in that group, the other axes
  already permuted; repeated until no group improves (Ainsworth et al., Git Re-Basin), or
- by **activation matching**: per group, the correlation of the units' calibration activations
  (the BatchNorm outputs and hidden Linear outputs in that group, summed), one assignment each;

then the permuted second network averaged with the first, and a **REPAIR-style** pass: every
BatchNorm's running statistics recomputed on the calibration inputs and its affine part set so that
each channel's output mean and std are the average of the parents' (one forward pass, each layer
seeing the corrected earlier ones).

Measured in one process, at the same torch thread count, on the same checkpoints and calibration
inputs (2000 ``fashion-mnist`` training images): both baselines and ``clafuse.api.fuse`` (default
and ``--correction repair``, after one ``clafuse.api.align``) on equal-depth pairs (a VGG-BN and a
ResNet, parents trained briefly so that the merged accuracies are a sanity check), and the default
fuse against ``--correction repair`` on the Fashion-MNIST ResNet pair of different depth. CPU time
(``time.process_time``) is the figure compared: on a shared machine wall time mostly measures the
other processes; wall time is reported beside it. Then the MNIST MLP pair: ``clafuse align`` and
``clafuse fuse`` (CLI, fresh processes) against ``python -c "import torch"`` in the same run, while
two background processes burn the cores (each bounded by a timeout).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/matching_baseline.py [--threads 1] [--repeats 3]

Writes benchmarks/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fashion_cnn  # noqa: E402  (the Fashion-MNIST pairs' architectures)

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "speed"
RESULTS = ROOT / "results"
Spec = dict[str, tuple[str | None, ...]]
"""Per tensor key, the permutation group of each axis (None: not permuted)."""


# --- permutation specs of the two architectures ---------------------------------------------------


def vgg_spec(state: dict[str, torch.Tensor]) -> Spec:
    """SmallVGG: each conv (with its BN) has its own group; the flattened map read by the first
    Linear moves in groups of its spatial positions; the hidden Linear has one group."""
    spec: Spec = {}
    prev: str | None = None
    convs = sorted({int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith("weight")
                    and state[k].dim() == 4})
    for i in convs:
        group = f"conv{i}"
        spec[f"features.{i}.weight"] = (group, prev, None, None)
        spec[f"features.{i}.bias"] = (group,)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            spec[f"features.{i + 1}.{leaf}"] = (group,)
        prev = group
    spec["classifier.0.weight"] = ("fc", prev)
    spec["classifier.0.bias"] = ("fc",)
    spec["classifier.2.weight"] = (None, "fc")
    spec["classifier.2.bias"] = (None,)
    return spec


def resnet_spec(state: dict[str, torch.Tensor]) -> Spec:
    """The small-stem ResNet: one residual-stream group per stage (stem, each block's second conv
    and the downsample write into it), one inner group per block."""
    spec: Spec = {}

    def bn(name: str, group: str) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{name}.{leaf}"] = (group,)

    stream = "stream1"
    spec["conv1.weight"] = (stream, None, None, None)
    bn("bn1", stream)
    stages = sorted({int(k.split(".")[0][5:]) for k in state if k.startswith("layer")})
    for s in stages:
        blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"layer{s}.")})
        for b in blocks:
            name = f"layer{s}.{b}"
            inner, out = f"{name}.inner", f"stream{s}"
            source = stream
            if f"{name}.downsample.0.weight" in state:
                spec[f"{name}.downsample.0.weight"] = (out, source, None, None)
                bn(f"{name}.downsample.1", out)
            spec[f"{name}.conv1.weight"] = (inner, source, None, None)
            bn(f"{name}.bn1", inner)
            spec[f"{name}.conv2.weight"] = (out, inner, None, None)
            bn(f"{name}.bn2", out)
            stream = out
    spec["fc.weight"] = (None, stream)
    spec["fc.bias"] = (None,)
    return spec


# --- the baseline -----------------------------------------------------------------------------------


def permute_axis(t: torch.Tensor, axis: int, perm: torch.Tensor) -> torch.Tensor:
    """``t`` with its axis reordered by ``perm``; an axis ``len(perm) * g`` long (a flattened map)
    moves in blocks of ``g``."""
    n = len(perm)
    if t.shape[axis] == n:
        return t.index_select(axis, perm)
    shape = list(t.shape)
    grouped = t.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:])
    return grouped.index_select(axis, perm).reshape(shape)


def permuted(spec: Spec, perms: dict[str, torch.Tensor], key: str, t: torch.Tensor,
             skip: int | None = None) -> torch.Tensor:
    for axis, group in enumerate(spec.get(key, ())):
        if group is not None and axis != skip and axis < t.dim():
            t = permute_axis(t, axis, perms[group])
    return t


def weight_matching(spec: Spec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], sizes: dict[str, int],
                    max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations of ``b``'s groups maximising the summed inner products with ``a``'s weights,
    by coordinate ascent over the groups (one linear assignment per group and sweep)."""
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    axes_of: dict[str, list[tuple[str, int]]] = {g: [] for g in sizes}
    for key, axes in spec.items():
        for axis, group in enumerate(axes):
            if group is not None:
                axes_of[group].append((key, axis))
    rng = np.random.default_rng(seed)
    names = list(sizes)
    for _ in range(max_iter):
        improved = False
        for g in rng.permutation(names):
            n = sizes[g]
            gain = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in axes_of[g]:
                wa = _rows(a[key].double(), axis, n)
                wb = _rows(permuted(spec, perms, key, b[key].double(), skip=axis), axis, n)
                gain += wa @ wb.T
            _, cols = linear_sum_assignment(gain.numpy(), maximize=True)
            cols = torch.from_numpy(cols)
            old = gain[torch.arange(n), perms[g]].sum()
            new = gain[torch.arange(n), cols].sum()
            if new > old + 1e-12:
                improved = True
            perms[g] = cols
        if not improved:
            break
    return perms


def _rows(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``t`` as one row per unit of its axis ``axis`` (``n`` units, or ``n`` blocks of positions)."""
    shape = list(t.shape)
    return t.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:]).movedim(axis, 0).reshape(n, -1)


def recorded(model: torch.nn.Module, spec: Spec, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per BatchNorm and hidden Linear module whose output axis is permuted, its outputs on ``x``
    as (units, samples x positions)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.Linear)) and spec.get(key, (None,))[0] is not None:
            def hook(_m, _i, h, name=name):
                out[name] = h.transpose(0, 1).reshape(h.shape[1], -1) if h.dim() > 2 else h.T.contiguous()
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def activation_matching(spec: Spec, acts_a: dict[str, torch.Tensor], acts_b: dict[str, torch.Tensor],
                        sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Per group, the assignment maximising the summed correlation of the units' activations."""
    perms = {}
    for g, n in sizes.items():
        corr = torch.zeros(n, n, dtype=torch.float64)
        for name in acts_a:
            if spec[f"{name}.weight"][0] != g:
                continue
            fa, fb = (_zscore(acts[name]) for acts in (acts_a, acts_b))
            corr += (fa @ fb.T).double() / fa.shape[1]
        _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
        perms[g] = torch.from_numpy(cols)
    return perms


def _zscore(f: torch.Tensor) -> torch.Tensor:
    f = f - f.mean(1, keepdim=True)
    return f / f.std(1, keepdim=True).clamp_min(1e-8)


def channel_stats(acts: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (f.mean(1), f.std(1)) for name, f in acts.items()}


def merge(spec: Spec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
          perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The average of ``a`` and ``b`` permuted onto ``a``'s units (integer buffers are ``a``'s)."""
    return {k: (v + permuted(spec, perms, k, b[k])) / 2 if v.is_floating_point() else v.clone() for k, v in a.items()}


@torch.no_grad()
def repair(model: torch.nn.Module, spec: Spec, x: torch.Tensor, stats_a: dict, stats_b: dict,
           perms: dict[str, torch.Tensor]) -> None:
    """Every BatchNorm's running statistics from what it receives on ``x``, and its affine part set
    so that each channel's output has the parents' average mean and std, in one pass."""
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.BatchNorm2d):
            continue
        perm = perms[spec[f"{name}.weight"][0]]
        mean_t = (stats_a[name][0] + stats_b[name][0][perm]) / 2
        std_t = (stats_a[name][1] + stats_b[name][1][perm]) / 2

        def hook(m, inputs, _h, mean_t=mean_t, std_t=std_t):
            z = inputs[0]
            var, mean = torch.var_mean(z, dim=(0, 2, 3))
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.weight.copy_(std_t * torch.sqrt(var + m.eps) / var.sqrt().clamp_min(1e-8))
            m.bias.copy_(mean_t)
            return torch.nn.functional.batch_norm(z, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

        hooks.append(module.register_forward_hook(hook))
    model.eval()
    model(x)
    for h in hooks:
        h.remove()


def baseline(kind: str, make: Callable[[], torch.nn.Module], spec_of: Callable, paths: list[Path], x: torch.Tensor,
             out: Path) -> None:
    """Read both checkpoints, match (``weights`` or ``activations``), average, REPAIR, write."""
    a, b = (load_file(str(p)) for p in paths)
    spec = spec_of(a)
    sizes = {axes[0]: a[k].shape[0] for k, axes in spec.items() if axes[0] is not None}
    models = []
    for state in (a, b):
        m = make()
        m.load_state_dict(state)
        models.append(m.eval())
    acts_a, acts_b = (recorded(m, spec, x) for m in models)
    if kind == "weights":
        perms = weight_matching(spec, a, b, sizes)
    else:
        perms = activation_matching(spec, acts_a, acts_b, sizes)
    stats_a, stats_b = channel_stats(acts_a), channel_stats(acts_b)
    del acts_a, acts_b
    fused = make()
    fused.load_state_dict(merge(spec, a, b, perms))
    repair(fused, spec, x, stats_a, stats_b, perms)
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(out))


# --- the measurements -------------------------------------------------------------------------------


EQUAL_PAIRS = {
    "vgg": (lambda: fashion_cnn.SmallVGG([16, 16, "M", 32, 32, 32, "M"]), vgg_spec,
            "VGG-BN [16,16,M,32,32,32,M], classifier 64-10, two seeds"),
    "resnet": (lambda: fashion_cnn.resnet([3, 3, 3]), resnet_spec, "ResNet [3,3,3], widths 16-32-64, two seeds"),
}


def trained(pair: str, seed: int, epochs: int, subset: int) -> Path:
    """A parent of ``pair`` trained ``epochs`` epochs on ``subset`` training images (cached)."""
    from clafuse.data import load_source
    from clafuse.training import FinetuneConfig, finetune

    path = WORK / f"{pair}-seed{seed}-e{epochs}-n{subset}.safetensors"
    if not path.exists():
        torch.manual_seed(seed)
        model = EQUAL_PAIRS[pair][0]()
        train = fashion_cnn.subset(load_source("fashion-mnist"), subset, seed)
        config = FinetuneConfig(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, seed=seed)
        result = finetune(model, train, load_source("fashion-mnist:val"), config)
        model.load_state_dict(result.best_state)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def measured(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def accuracy(make: Callable[[], torch.nn.Module], path: Path, val) -> float:
    from clafuse.training import evaluate

    model = make()
    model.load_state_dict(load_file(str(path)))
    return evaluate(model.eval(), val)["accuracy"]


def calibration() -> torch.Tensor:
    from clafuse.data import calibration_inputs, load_source

    return calibration_inputs(load_source("fashion-mnist"), 2000, 0)


def equal_pair(pair: str, repeats: int, epochs: int, subset: int) -> dict:
    """Both baselines and clafuse fuse (default, repair) on one equal-depth pair, interleaved."""
    from clafuse import api
    from clafuse.data import load_source

    make, spec_of, title = EQUAL_PAIRS[pair]
    paths = [trained(pair, seed, epochs, subset) for seed in (1, 2)]
    map_path = WORK / f"{pair}-map.json"
    align = [measured(lambda: api.align(paths, map_path, data="fashion-mnist")) for _ in range(repeats)]
    methods: dict[str, Callable[[Path], object]] = {
        "baseline: weight matching + REPAIR": lambda out: baseline("weights", make, spec_of, paths, calibration(), out),
        "baseline: activation matching + REPAIR": lambda out: baseline("activations", make, spec_of, paths,
                                                                        calibration(), out),
        "clafuse fuse (default)": lambda out: api.fuse(map_path, out, data="fashion-mnist"),
        "clafuse fuse --correction repair": lambda out: api.fuse(map_path, out, data="fashion-mnist",
                                                                 correction="repair"),
    }
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    outs = {m: WORK / f"{pair}-out{i}.safetensors" for i, m in enumerate(methods)}
    for _ in range(repeats):
        for m, fn in methods.items():
            times[m].append(measured(lambda: fn(outs[m])))
    val = load_source("fashion-mnist:val")
    rows = {f"parent {n}": {"val": accuracy(make, p, val)} for n, p in zip("AB", paths)}
    for m in methods:
        rows[m] = {"val": accuracy(make, outs[m], val),
                   "cpu_s": statistics.median(c for c, _ in times[m]), "wall_s": statistics.median(w for _, w in times[m]),
                   "cpu_runs_s": [round(c, 3) for c, _ in times[m]]}
    return {"title": title, "align_cpu_s": statistics.median(c for c, _ in align),
            "align_wall_s": statistics.median(w for _, w in align), "rows": rows}


def depth_pair_repair(repeats: int) -> dict:
    """Default fuse against ``--correction repair`` on the Fashion-MNIST ResNet pair ([3,3,3] vs
    [1,2,1]): fashion_cnn.py's trained parents when present, else freshly initialised ones."""
    from clafuse import api

    paths = [fashion_cnn.WORK / f"resnet-{n}.safetensors" for n in "AB"]
    trained_parents = all(p.exists() for p in paths)
    if not trained_parents:
        paths = [WORK / f"resnet-depth-{n}.safetensors" for n in "AB"]
        for p, layers, seed in zip(paths, ([3, 3, 3], [1, 2, 1]), (1, 2)):
            torch.manual_seed(seed)
            save_file({k: v.contiguous() for k, v in fashion_cnn.resnet(layers).state_dict().items()}, str(p))
    map_path = WORK / "resnet-depth-map.json"
    api.align(paths, map_path, data="fashion-mnist")
    times: dict[str, list[tuple[float, float]]] = {"default": [], "repair": []}
    for _ in range(repeats):
        times["default"].append(measured(lambda: api.fuse(map_path, WORK / "depth-out.safetensors",
                                                          data="fashion-mnist")))
        times["repair"].append(measured(lambda: api.fuse(map_path, WORK / "depth-out.safetensors",
                                                         data="fashion-mnist", correction="repair")))
    out = {"parents": "fashion_cnn.py's trained parents" if trained_parents else "freshly initialised"}
    for k, v in times.items():
        out[k] = {"cpu_s": statistics.median(c for c, _ in v), "wall_s": statistics.median(w for _, w in v)}
    out["ratio_cpu"] = out["repair"]["cpu_s"] / out["default"]["cpu_s"]
    out["ratio_wall"] = out["repair"]["wall_s"] / out["default"]["wall_s"]
    return out


def _wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return time.perf_counter() - start


def mlp_under_load(repeats: int, burn_s: int) -> dict:
    """``import torch`` against ``clafuse align`` / ``fuse`` of the MNIST MLP pair, fresh processes,
    interleaved, while one busy loop per core runs (each killed after ``burn_s`` seconds at most)."""
    mnist = ROOT / "_work" / "mnist"
    found = [sorted(mnist.glob(f"{n}*.safetensors")) for n in "AB"]
    if not all(found):
        return {"skipped": "no MNIST MLP parents in benchmarks/_work/mnist (run benchmarks/mnist_mlp.py)"}
    deep, shallow = found[0][0], found[1][0]
    map_path, out = WORK / "mlp-map.json", WORK / "mlp-fused.safetensors"
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "clafuse align": [sys.executable, "-m", "clafuse", "align", str(deep), str(shallow), "-o", str(map_path),
                          "--data", "mnist", "--json"],
        "clafuse fuse": [sys.executable, "-m", "clafuse", "fuse", "--map", str(map_path), "-o", str(out),
                         "--weights", "0.5,0.5", "--json"],
    }
    burners = [subprocess.Popen(["timeout", str(burn_s), sys.executable, "-c", "while True: pass"])
               for _ in range(os.cpu_count() or 1)]
    report: dict = {"burners": len(burners), "load_before": os.getloadavg()}
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
        env.pop("OMP_NUM_THREADS", None)
        for label, extra in (("clafuse default threads", []), ("--threads 0 (one per core)", ["--threads", "0"])):
            walls: dict[str, list[float]] = {c: [] for c in commands}
            for _ in range(repeats):
                for c, cmd in commands.items():
                    walls[c].append(_wall(cmd + (extra if c != "import torch" else []), env))
            med = {c: statistics.median(v) for c, v in walls.items()}
            report[label] = {"median_s": med, "runs_s": walls,
                             "align_ratio": med["clafuse align"] / med["import torch"],
                             "fuse_ratio": med["clafuse fuse"] / med["import torch"]}
    finally:
        for p in burners:
            p.kill()
            p.wait()
    report["load_after"] = os.getloadavg()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every in-process measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of the equal-depth parents")
    parser.add_argument("--subset", type=int, default=10000, help="training images of the equal-depth parents")
    parser.add_argument("--burn", type=int, default=300, help="seconds the background load may run at most")
    parser.add_argument("--parts", nargs="+", default=["equal", "depth", "mlp"], choices=["equal", "depth", "mlp"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "speed.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"threads": args.threads, "repeats": args.repeats, "machine": f"{platform.machine()}, "
                   f"{os.cpu_count()} cores, torch {torch.__version__}", "load_start": os.getloadavg()})
    if "equal" in args.parts:
        report["equal_depth"] = {pair: equal_pair(pair, args.repeats, args.epochs, args.subset) for pair in EQUAL_PAIRS}
    if "depth" in args.parts:
        report["resnet_repair"] = depth_pair_repair(args.repeats)
    if "mlp" in args.parts:
        report["mlp_under_load"] = mlp_under_load(args.repeats, args.burn)
    report["load_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "speed.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    lines = ["# Speed: clafuse fuse against a Git Re-Basin-style baseline, corrections, start-up under load", "",
             f"{r['machine']}; torch threads {r['threads']} for every in-process measurement; median of "
             f"{r['repeats']} interleaved runs; load average {r['load_start'][0]:.1f} at the start. CPU seconds "
             "(process time) are compared: the 2 cores are shared with other jobs, so wall time mostly measures "
             "them. Written by benchmarks/matching_baseline.py.", ""]
    for pair, e in r.get("equal_depth", {}).items():
        base = min(e["rows"][m]["cpu_s"] for m in e["rows"] if m.startswith("baseline"))
        lines += [f"**{e['title']}** (Fashion-MNIST, 2000 calibration images; align "
                  f"{e['align_cpu_s']:.2f} s CPU)", "",
                  "| method | CPU s | wall s | CPU / fastest baseline | (align + fuse) / fastest baseline | val % |",
                  "|---|---|---|---|---|---|"]
        for m, row in e["rows"].items():
            if "cpu_s" not in row:
                lines.append(f"| {m} | | | | | {100 * row['val']:.2f} |")
                continue
            both = f"{(row['cpu_s'] + e['align_cpu_s']) / base:.2f}" if m.startswith("clafuse") else ""
            lines.append(f"| {m} | {row['cpu_s']:.2f} | {row['wall_s']:.2f} | {row['cpu_s'] / base:.2f} | {both} | "
                         f"{100 * row['val']:.2f} |")
        lines.append("")
    if "resnet_repair" in r:
        d = r["resnet_repair"]
        lines += ["**`--correction repair` on the Fashion-MNIST ResNet pair ([3,3,3] vs [1,2,1])**, "
                  f"{d['parents']}: default fuse {d['default']['cpu_s']:.2f} s CPU ({d['default']['wall_s']:.2f} s "
                  f"wall), repair {d['repair']['cpu_s']:.2f} s CPU ({d['repair']['wall_s']:.2f} s wall): "
                  f"**{d['ratio_cpu']:.2f}x** the default (goal: under 2x).", ""]
    m = r.get("mlp_under_load")
    if m and "skipped" not in m:
        lines += [f"**MNIST MLP pair, CLI in fresh processes, under load** ({m['burners']} busy loops, load average "
                  f"{m['load_before'][0]:.1f} before): median wall seconds", "",
                  "| threads | import torch | clafuse align | clafuse fuse | align / import | fuse / import |",
                  "|---|---|---|---|---|---|"]
        for label in ("clafuse default threads", "--threads 0 (one per core)"):
            v = m[label]
            med = v["median_s"]
            lines.append(f"| {label} | {med['import torch']:.2f} | {med['clafuse align']:.2f} | "
                         f"{med['clafuse fuse']:.2f} | {v['align_ratio']:.2f} | {v['fuse_ratio']:.2f} |")
        lines.append("")
    elif m:
        lines += [f"MNIST MLP pair: {m['skipped']}.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
