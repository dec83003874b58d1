"""Where align and fuse spend their time, data loading against the rest (cProfile, in-process).

Two pairs with MNIST-shaped inputs: the MNIST MLP pair's shapes (784-400-200-100-10 and
784-400-10, default PyTorch init; weights do not change the data path) on ``mnist``, and a small
VGG-BN pair (1x28x28, conv 16-M-32-M vs 16-16-M-32-M) on ``fashion-mnist``. Each pair is aligned
and fused twice: with an empty data cache (the set is decoded and cached) and with a warm one (the
cached split is memory-mapped). Reported per run: total seconds, seconds inside data loading
(``load_source``: decoding, caching, standardising), drawing the calibration samples
(``calibration_inputs``) and the five most expensive functions outside the data package.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_profile.py

Writes benchmarks/results/data_profile.json and .md.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clafuse import api
from clafuse.arch.vgg import VGGFamily, VGGLinear, VGGSpec

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "data_profile"
DATA_FUNCS = {"load_source": "clafuse/data/sources.py", "calibration_inputs": "clafuse/data/common.py"}


def mlp_pair() -> tuple[Path, Path]:
    paths = []
    for name, widths in (("mlp-deep", [784, 400, 200, 100, 10]), ("mlp-shallow", [784, 400, 10])):
        torch.manual_seed(len(widths))
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        path = WORK / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in nn.Sequential(*layers).state_dict().items()}, str(path))
        paths.append(path)
    return paths[0], paths[1]


def cnn_pair() -> tuple[Path, Path]:
    family = VGGFamily()
    paths = []
    for name, config in (("cnn-deep", [16, 16, "M", 32, "M"]), ("cnn-shallow", [16, "M", 32, "M"])):
        spec = VGGSpec(in_channels=1, config=config, batch_norm=True, input_size=(1, 28, 28), avgpool=None,
                       classifier=[VGGLinear(index=0, in_features=32 * 7 * 7, out_features=64),
                                   VGGLinear(index=3, in_features=64, out_features=10)])
        torch.manual_seed(len(config))
        module = family.build(spec)
        path = WORK / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
        paths.append(path)
    return paths[0], paths[1]


def profiled(fn, *args, **kwargs) -> dict:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(fn, *args, **kwargs)
    total = time.perf_counter() - start
    stats = pstats.Stats(prof).stats
    row = {"total_s": round(total, 3)}
    for func, path in DATA_FUNCS.items():
        row[f"{func}_s"] = round(sum(v[3] for k, v in stats.items() if k[2] == func and k[0].endswith(path)), 3)
    outside = sorted(((v[3], f"{Path(k[0]).name}:{k[2]}") for k, v in stats.items()
                      if "clafuse/" in k[0] and "clafuse/data/" not in k[0] and "clafuse/api/" not in k[0]),
                     reverse=True)
    row["top_outside_data"] = [[name, round(t, 3)] for t, name in outside[:5]]
    return row


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    WORK.mkdir(parents=True, exist_ok=True)
    report = {"threads": torch.get_num_threads(), "load": os.getloadavg(), "runs": {}}
    for label, (deep, shallow), data in (("mlp/mnist", mlp_pair(), "mnist"),
                                         ("cnn/fashion-mnist", cnn_pair(), "fashion-mnist")):
        cache = Path(tempfile.mkdtemp(prefix="clafuse-profile-"))
        os.environ["CLAFUSE_CACHE"] = str(cache)
        try:
            for state in ("cold", "warm"):
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                m = WORK / f"{label.split('/')[0]}-map.json"
                report["runs"][f"{label} align ({state} cache)"] = profiled(
                    api.align, [deep, shallow], m, data=data)
                report["runs"][f"{label} fuse ({state} cache)"] = profiled(
                    api.fuse, m, WORK / f"{label.split('/')[0]}-fused.safetensors", data=data)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    (ROOT / "results" / "data_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Data loading in align and fuse (cProfile, in-process)", "",
             f"threads {report['threads']}, load average {report['load'][0]:.1f}", "",
             "| run | total s | load_source s | calibration_inputs s | top functions outside data/ (cumulative s) |",
             "|---|---|---|---|---|"]
    for name, row in report["runs"].items():
        top = ", ".join(f"{f} {t}" for f, t in row["top_outside_data"][:3])
        lines.append(f"| {name} | {row['total_s']} | {row['load_source_s']} | {row['calibration_inputs_s']} | {top} |")
    (ROOT / "results" / "data_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
