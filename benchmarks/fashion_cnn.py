"""Issue 3 benchmark: VGG-style and ResNet pairs with BatchNorm on Fashion-MNIST.

Trains each pair briefly (on a subset of the training split, to fit 2 CPU cores), then reports
parents, their ensemble, fused one-shot with and without BatchNorm reset, with REPAIR and with
the default regression correction, fused by ``clafuse fuse --search`` (issue 11: label-free on
held-out training samples, and by accuracy on fashion-mnist:val), fused + 1 epoch of finetuning
(and each parent + 1 epoch), and the wall time and peak memory of `clafuse align` / `clafuse
fuse` (real CLI, start-up included). Each search's printed command is run again and its output
compared with the searched one tensor by tensor. Selection is on the validation split; test
accuracy is only reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fashion_cnn.py [--pairs resnet vgg] [--subset 10000] [--epochs 3] [--name N]

Writes benchmarks/results/fashion_cnn.json and benchmarks/results/fashion_cnn.md (``--name N``:
``N.json`` / ``N.md``, parents in ``benchmarks/_work/N``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from clafuse import api
from clafuse.data import Dataset, load_source
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint
from clafuse.search.split import DEFAULT_HOLDOUT, calibration_split
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


# ``fuse --search`` rows, fixed before any run: label-free (KL to the parents' ensemble on
# held-out samples of the map's calibration source, the training split) with the default budget
# and with 24 candidates, and by accuracy on validation labels. ``fuse`` scores accuracy on the
# held-out part of its calibration source, so those rows calibrate on fashion-mnist:val too (the
# build samples and the held-out ones are then both validation samples; "val unseen" is the
# rest of the validation split).
SEARCHES = {
    "fused, search (label-free), budget 8": [],
    "fused, search (label-free), budget 24": ["--budget", "24"],
    "fused, search (accuracy on val), budget 8": ["--scoring", "accuracy", "--data", "fashion-mnist:val"],
    "fused, search (accuracy on val), budget 24": ["--scoring", "accuracy", "--data", "fashion-mnist:val",
                                                   "--budget", "24"],
}


# "+ 1 epoch": one more epoch at a finetuning rate (peak lr 0.01, cosine) for every row; the
# parents' own peak rate (0.05) lowered every model on validation, the parents included.
ONE_EPOCH = FinetuneConfig(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=128, seed=1)


DEFAULT_RUN = "fashion_cnn"  # --name of the recorded run: results/fashion_cnn.*, parents in _work/fashion


def work_folder(name: str = DEFAULT_RUN) -> Path:
    """Where a run named ``name`` (``--name``) keeps its parents and fusions."""
    return WORK if name == DEFAULT_RUN else ROOT / "_work" / name


def cached_models(pair: str, name: str = DEFAULT_RUN) -> dict[str, Path]:
    """The parents and the label-free searched fusion (default budget) a run of this script named
    ``name`` left for ``pair``, by row name; for the follow-up benchmarks that finetune them."""
    work = work_folder(name)
    paths = {"parent A": work / f"{pair}-A.safetensors", "parent B": work / f"{pair}-B.safetensors",
             "fused, search (label-free), budget 8": work / f"{pair}-search-0.safetensors"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"run benchmarks/fashion_cnn.py first: missing {', '.join(missing)}")
    return paths


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


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold the same tensor names with bit-identical values."""
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape
                                          and torch.equal(sa[k], sb[k]) for k in sa)


def searched(map_path: Path, out: Path, extra: list[str]) -> tuple[dict, dict]:
    """Run ``fuse --search`` with ``extra``; then the command it prints, compared bit for bit.
    Returns the search record and the CLI's JSON."""
    secs, mb, stdout = timed(["fuse", "--map", str(map_path), "-o", str(out), "--search", "--json", *extra])
    doc = json.loads(stdout)
    found = doc["search"]
    again = out.with_name(out.stem + "-repeat.safetensors")
    words = shlex.split(found["command"])[2:]
    words[words.index("-o") + 1] = str(again)
    repeat_s, _, _ = timed(["fuse", *words, "--json"])
    weights = found["chosen"]["weights"]
    record = {"chosen": found["chosen"], "mapping": doc["mapping"], "from_vertex": round(min(weights), 4),
              "candidates": len(found["table"]), "stopped": found["stopped"], "search_seconds": found["seconds"],
              "fuse_seconds": doc["seconds"], "wall_seconds": secs, "peak_mb": mb, "score": found["score"],
              "references": found["references"], "holdout_samples": found["holdout_samples"],
              "command": found["command"], "repeat_wall_seconds": repeat_s,
              "repeated_bit_for_bit": same_tensors(out, again),
              "table": [{k: r[k] for k in ("weights", "mappings", "inserted", "correction", "refit", "kl",
                                           "agreement", "accuracy", "seconds") if k in r} for r in found["table"]]}
    return record, doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["resnet", "vgg"], choices=sorted(PAIRS))
    parser.add_argument("--subset", type=int, default=10000, help="training samples used (of 50k; the recorded run: 10000)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="calibration samples for align/fuse")
    parser.add_argument("--mix", nargs="+", type=float, default=[0.5],
                        help="weights of A to try for the default fusion; the best on validation is finetuned")
    parser.add_argument("--name", default=DEFAULT_RUN,
                        help="results stem and work folder: another name keeps its own parents (for other --subset/--epochs)")
    args = parser.parse_args()
    work = work_folder(args.name)
    use_threads()  # half the usable cores, as the CLI: two threads on a shared 2-core machine ran many times slower
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    train = subset(load_source("fashion-mnist"), args.subset)
    val, test = load_source("fashion-mnist:val"), load_source("fashion-mnist:test")
    # The validation samples the accuracy-scored searches neither build from nor score on (the
    # split fuse --search draws with the map's seed, 0).
    used = calibration_split(len(val), args.samples, DEFAULT_HOLDOUT, seed=0)
    keep = torch.ones(len(val), dtype=torch.bool)
    keep[torch.cat([used.build, used.holdout])] = False
    unseen = Dataset(val.x[keep], val.y[keep], "fashion-mnist:val unseen")
    config = FinetuneConfig(epochs=args.epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, seed=0)
    previous = RESULTS / f"{args.name}.json"
    report: dict = json.loads(previous.read_text()) if previous.exists() else {"pairs": {}}
    report.update({"subset": args.subset, "epochs": args.epochs, "samples": args.samples})
    for pair in args.pairs:
        make_a, make_b, title = PAIRS[pair]
        rows: dict[str, dict] = {}
        paths = {}
        for name, make, seed in (("A", make_a, 1), ("B", make_b, 2)):
            path = work / f"{pair}-{name}.safetensors"
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
        map_path = work / f"{pair}-map.json"
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
            out = work / f"{pair}-fused-{len(rows)}.safetensors"
            secs, mb, _ = timed(["fuse", "--map", str(map_path), "-o", str(out), "--weights", "0.5,0.5", "--json", *extra])
            model = api.load_model(out).module()
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
            if not extra:
                timing["fuse"] = {"seconds": secs, "peak_mb": mb}
                candidates = {0.5: (rows[label]["val"], out)}
        for mix in (m for m in args.mix if m != 0.5):
            out = work / f"{pair}-fused-mix{mix}.safetensors"
            timed(["fuse", "--map", str(map_path), "-o", str(out), "--weights", f"{mix},{1 - mix}", "--json"])
            model = api.load_model(out).module()
            label = f"fused, default, weights {mix:g},{1 - mix:g}"
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
            candidates[mix] = (rows[label]["val"], out)
        searches: dict[str, dict] = {}
        first_of: dict[str, str] = {}  # the same choice on the same calibration data is the same model: tuned once
        for key, (label, extra) in enumerate(SEARCHES.items()):
            out = work / f"{pair}-search-{key}.safetensors"
            record, _ = searched(map_path, out, extra)
            on_val = "fashion-mnist:val" in extra
            model = api.load_model(out).module()
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
            if on_val:
                rows[label]["val_unseen"] = evaluate(model, unseen)["accuracy"]
            record["tuned_as"] = first_of.setdefault(json.dumps([record["chosen"], on_val], sort_keys=True), label)
            searches[label] = record
            print(f"{pair} {label}: val {rows[label]['val']:.4f}, chosen {record['chosen']}, "
                  f"{record['candidates']} candidates in {record['search_seconds']} s, "
                  f"repeated bit for bit: {record['repeated_bit_for_bit']}", flush=True)
        chosen = max(candidates, key=lambda m: candidates[m][0])
        default_fused = candidates[chosen][1]
        finetuned = [(f"fused (default, weights {chosen:g},{1 - chosen:g}, best on val) + 1 epoch", default_fused)]
        finetuned += [(f"{label} + 1 epoch", work / f"{pair}-search-{key}.safetensors")
                      for key, label in enumerate(SEARCHES) if searches[label]["tuned_as"] == label]
        finetuned += [("parent A + 1 epoch", paths["A"]), ("parent B + 1 epoch", paths["B"])]
        for label, path in finetuned:
            model = api.load_model(path).module()
            t0 = time.perf_counter()
            result = finetune(model, train, val, ONE_EPOCH)
            model.load_state_dict(result.best_state)
            rows[label] = {"val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
            print(f"{pair} {label}: val {rows[label]['val']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        report["pairs"][pair] = {"title": title, "rows": rows, "timing": timing, "searches": searches,
                                 "load": os.getloadavg(), "threads": torch.get_num_threads()}
        print(json.dumps(report["pairs"][pair], indent=1), flush=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = markdown(report)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def markdown(report: dict) -> list[str]:
    """The results as markdown: per pair the accuracy table, the searches' choices and the times."""
    lines = [f"Fashion-MNIST, parents trained {report['epochs']} epochs on {report['subset']} training samples; "
             f"calibration {report['samples']} samples; accuracy in %. Rows scored on val use samples of the "
             "validation split to build and choose the fusion; their \"val unseen\" column is the rest of it.", ""]
    for entry in report["pairs"].values():
        lines += [f"**{entry['title']}**", "", "| model | val | test | val unseen |", "|---|---|---|---|"]
        lines += [f"| {k} | {percent(v.get('val'))} | {percent(v.get('test'))} | {percent(v.get('val_unseen'))} |"
                  for k, v in entry["rows"].items()]
        t = entry["timing"]
        lines += ["", f"align {t['align']['seconds']:.1f} s / {t['align']['peak_mb']:.0f} MB peak; "
                      f"fuse {t['fuse']['seconds']:.1f} s / {t['fuse']['peak_mb']:.0f} MB peak (CLI, start-up included).", ""]
        if not entry.get("searches"):
            continue
        lines += ["| search | weights (A,B) | from 0/1 | mapping | inserted | correction | head refit | candidates | "
                  "search (JSON) | fuse --search wall | repeat wall | repeated bit for bit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in entry["searches"].items():
            c = r["chosen"]
            lines.append(f"| {label.split(', ', 1)[1]} | {', '.join(f'{w:g}' for w in c['weights'])} | "
                         f"{r['from_vertex']:g} | rank {c['mappings'][0]}: {r['mapping']} | {c['inserted']} | "
                         f"{c['correction']} | {'yes' if c['refit_head'] else 'no'} | {r['candidates']} ({r['stopped']}) | "
                         f"{r['search_seconds']:.1f} s | {r['wall_seconds']:.1f} s | {r['repeat_wall_seconds']:.1f} s | "
                         f"{'yes' if r['repeated_bit_for_bit'] else 'NO'} |")
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
