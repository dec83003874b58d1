"""Issue 3 benchmark: VGG-style and ResNet pairs with BatchNorm on Fashion-MNIST.

Trains each pair briefly (on a subset of the training split, to fit 2 CPU cores), then reports
parents, their ensemble, fused one-shot with and without BatchNorm reset, with REPAIR and with
the default regression correction, fused + 1 epoch of finetuning (and each parent + 1 epoch),
and the wall time and peak memory of `clafuse align` / `clafuse fuse` (real CLI, start-up
included). Selection is on the validation split; test accuracy is only reported.

    .venv/bin/python benchmarks/fashion_cnn.py [--pairs resnet vgg] [--subset 20000] [--epochs 3]

Writes benchmarks/results/fashion_cnn.json and benchmarks/results/fashion_cnn.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from clafuse import api
from clafuse.data import Dataset, load_source
from clafuse.io.checkpoint import save_checkpoint
from clafuse.threads import use_threads
from clafuse.training import FinetuneConfig, evaluate, evaluate_ensemble, finetune

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work" / "fashion"
RESULTS = ROOT / "results"


def resnet(layers: list[int]) -> torch.nn.Module:
    from clafuse.arch.resnet import ResNet, ResNetSpec

    return ResNet(ResNetSpec(block="basic", layers=layers, widths=[16, 32, 64], stem_width=16, stem="small",
                             in_channels=1, num_classes=10))


class SmallVGG(torch.nn.Module):
    """torchvision-layout VGG with BN for 1x28x28 inputs and a ``hidden``-10 classifier."""

    def __init__(self, config: list, hidden: int = 64) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 1
        for item in config:
            if item == "M":
                layers.append(torch.nn.MaxPool2d(2))
            else:
                layers += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.BatchNorm2d(item), torch.nn.ReLU()]
                channels = item
        side = 28 // 2 ** config.count("M")
        self.features = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Sequential(torch.nn.Linear(channels * side * side, hidden), torch.nn.ReLU(),
                                              torch.nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


PAIRS = {
    "resnet": (lambda: resnet([3, 3, 3]), lambda: resnet([1, 2, 1]), "ResNet [3,3,3] vs [1,2,1], widths 16-32-64"),
    "vgg": (lambda: SmallVGG([16, 16, "M", 32, 32, 32, "M"]), lambda: SmallVGG([16, "M", 32, "M"]),
            "VGG [16,16,M,32,32,32,M] vs [16,M,32,M], BN, classifier 64-10"),
}


def subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    if n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Dataset(ds.x[idx], ds.y[idx], f"{ds.name}[{n}]")


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run the CLI under /usr/bin/time: wall seconds, peak RSS in MB, stdout."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "clafuse", *cmd],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clafuse {' '.join(cmd)} failed:\n{proc.stderr}")
    wall, rss = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(rss) / 1024, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["resnet", "vgg"], choices=sorted(PAIRS))
    parser.add_argument("--subset", type=int, default=20000, help="training samples used (of 50k)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="calibration samples for align/fuse")
    parser.add_argument("--mix", nargs="+", type=float, default=[0.5],
                        help="weights of A to try for the default fusion; the best on validation is finetuned")
    args = parser.parse_args()
    use_threads()  # half the usable cores, as the CLI: two threads on a shared 2-core machine ran many times slower
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    train = subset(load_source("fashion-mnist"), args.subset)
    val, test = load_source("fashion-mnist:val"), load_source("fashion-mnist:test")
    config = FinetuneConfig(epochs=args.epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, seed=0)
    # "+ 1 epoch": one more epoch at a finetuning rate (peak lr 0.01, cosine) for every row; the
    # parents' own peak rate (0.05) lowered every model on validation, the parents included.
    one_epoch = FinetuneConfig(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=128, seed=1)
    previous = RESULTS / "fashion_cnn.json"
    report: dict = json.loads(previous.read_text()) if previous.exists() else {"pairs": {}}
    report.update({"subset": args.subset, "epochs": args.epochs, "samples": args.samples})
    for pair in args.pairs:
        make_a, make_b, title = PAIRS[pair]
        rows: dict[str, dict] = {}
        paths = {}
        for name, make, seed in (("A", make_a, 1), ("B", make_b, 2)):
            path = WORK / f"{pair}-{name}.safetensors"
            if not path.exists():
                torch.manual_seed(seed)
                model = make()
                t0 = time.perf_counter()
                result = finetune(model, train, val, FinetuneConfig(**{**config.__dict__, "seed": seed}))
                model.load_state_dict(result.best_state)
                save_checkpoint(path, model.state_dict())
                print(f"{pair} {name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
            paths[name] = path
        models = {n: api.load_model(p).module() for n, p in paths.items()}
        for n, m in models.items():
            rows[f"parent {n}"] = {"val": evaluate(m, val)["accuracy"], "test": evaluate(m, test)["accuracy"]}
        rows["ensemble A+B"] = {"val": evaluate_ensemble(list(models.values()), val)["accuracy"],
                                "test": evaluate_ensemble(list(models.values()), test)["accuracy"]}
        map_path = WORK / f"{pair}-map.json"
        align_s, align_mb, _ = timed(["align", str(paths["A"]), str(paths["B"]), "-o", str(map_path),
                                      "--data", "fashion-mnist", "--samples", str(args.samples), "--json"])
        variants = {
            "fused, averaged BN statistics": ["--no-bn-reset", "--correction", "none"],
            "fused, BN reset": ["--correction", "none"],
            "fused, BN reset + REPAIR": ["--correction", "repair"],
            "fused, default (BN reset + regress)": [],
            "fused, default, inserted=average": ["--inserted", "average"],
            "fused, default, inserted=keep": ["--inserted", "keep"],
        }
        timing = {"align": {"seconds": align_s, "peak_mb": align_mb}}
        for label, extra in variants.items():
            out = WORK / f"{pair}-fused-{len(rows)}.safetensors"
            secs, mb, _ = timed(["fuse", "--map", str(map_path), "-o", str(out), "--weights", "0.5,0.5", "--json", *extra])
            model = api.load_model(out).module()
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
            if not extra:
                timing["fuse"] = {"seconds": secs, "peak_mb": mb}
                candidates = {0.5: (rows[label]["val"], out)}
        for mix in (m for m in args.mix if m != 0.5):
            out = WORK / f"{pair}-fused-mix{mix}.safetensors"
            timed(["fuse", "--map", str(map_path), "-o", str(out), "--weights", f"{mix},{1 - mix}", "--json"])
            model = api.load_model(out).module()
            label = f"fused, default, weights {mix:g},{1 - mix:g}"
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
            candidates[mix] = (rows[label]["val"], out)
        chosen = max(candidates, key=lambda m: candidates[m][0])
        default_fused = candidates[chosen][1]
        for label, path in ((f"fused (default, weights {chosen:g},{1 - chosen:g}, best on val) + 1 epoch",
                             default_fused), ("parent A + 1 epoch", paths["A"]),
                            ("parent B + 1 epoch", paths["B"])):
            model = api.load_model(path).module()
            result = finetune(model, train, val, one_epoch)
            model.load_state_dict(result.best_state)
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
        report["pairs"][pair] = {"title": title, "rows": rows, "timing": timing, "load": os.getloadavg()}
        print(json.dumps(report["pairs"][pair], indent=1), flush=True)
        (RESULTS / "fashion_cnn.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Fashion-MNIST, parents trained {args.epochs} epochs on {args.subset} training samples; "
             f"calibration {args.samples} samples; accuracy in %.", ""]
    for pair, entry in report["pairs"].items():
        lines += [f"**{entry['title']}**", "", "| model | val | test |", "|---|---|---|"]
        lines += [f"| {k} | {100 * v['val']:.2f} | {100 * v['test']:.2f} |" for k, v in entry["rows"].items()]
        t = entry["timing"]
        lines += ["", f"align {t['align']['seconds']:.1f} s / {t['align']['peak_mb']:.0f} MB peak; "
                      f"fuse {t['fuse']['seconds']:.1f} s / {t['fuse']['peak_mb']:.0f} MB peak (CLI, start-up included).", ""]
    (RESULTS / "fashion_cnn.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
