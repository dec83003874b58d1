"""Issue 11 follow-up: is "searched fusion + 1 epoch" above "parent + 1 epoch" on the Fashion-MNIST
CNN pairs, or within the noise of the finetuning run itself?

``fashion_cnn.py`` finetunes every row once (seed 1), and the differences it reports between the
searched fusion and parent A after that epoch are 0.03-0.30 points. Here the same epoch
(``fashion_cnn.ONE_EPOCH``: SGD, peak lr 0.01, cosine) runs with several data-order seeds for both
parents and the label-free searched fusion (default budget), all cached by ``fashion_cnn.py`` (run
that first, with the same ``--subset``), and the difference to parent A is taken per seed (the same
seed gives both models the same batches). Test accuracy is only reported.

    .venv/bin/python benchmarks/fashion_seeds.py [--pairs resnet vgg] [--subset 10000] [--seeds 1 2 3] [--name N]

Writes benchmarks/results/fashion_seeds.json and benchmarks/results/fashion_seeds.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_cnn import DEFAULT_RUN, ONE_EPOCH, RESULTS, cached_models, subset  # noqa: E402

from clafuse import api  # noqa: E402
from clafuse.data import load_source  # noqa: E402
from clafuse.threads import use_threads  # noqa: E402
from clafuse.training import evaluate, finetune  # noqa: E402


def spread(values: list[float]) -> str:
    """Mean ± sd of accuracies (fractions) in points."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def markdown(report: dict) -> str:
    lines = [f"Fashion-MNIST CNN pairs of fashion_cnn.py ({report['subset']} training samples): one more epoch "
             f"(SGD, peak lr 0.01, cosine) for each model with data-order seeds {report['seeds']}; accuracy in %, "
             "mean ± sd over seeds; the difference to parent A is taken per seed.", ""]
    for pair, rows in report["pairs"].items():
        lines += [f"**{pair}**", "", "| model + 1 epoch | val | test | val - parent A | test - parent A | "
                  "seeds above parent A (val / test) |", "|---|---|---|---|---|---|"]
        base = rows["parent A"]
        for name, runs in rows.items():
            diffs = {split: [r[split] - b[split] for r, b in zip(runs, base)] for split in ("val", "test")}
            above = " / ".join(str(sum(d > 0 for d in diffs[s])) for s in ("val", "test"))
            lines.append(f"| {name} | {spread([r['val'] for r in runs])} | {spread([r['test'] for r in runs])} | "
                         + (f"{spread(diffs['val'])} | {spread(diffs['test'])} | {above} |" if name != "parent A"
                            else "- | - | - |"))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["resnet", "vgg"])
    parser.add_argument("--subset", type=int, default=10000, help="training samples (as fashion_cnn.py used)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--name", default=DEFAULT_RUN, help="the fashion_cnn.py run (its --name) whose models to "
                        "finetune; results go to NAME_seeds.json/.md (fashion_seeds.* for the default run)")
    args = parser.parse_args()
    use_threads()
    train = subset(load_source("fashion-mnist"), args.subset)
    val, test = load_source("fashion-mnist:val"), load_source("fashion-mnist:test")
    report: dict = {"subset": args.subset, "seeds": args.seeds, "pairs": {}}
    for pair in args.pairs:
        rows: dict[str, list[dict]] = {}
        for name, path in cached_models(pair, args.name).items():
            rows[name] = []
            for seed in args.seeds:
                model = api.load_model(path).module()
                start = time.perf_counter()
                result = finetune(model, train, val, replace(ONE_EPOCH, seed=seed))
                model.load_state_dict(result.best_state)
                run = {"seed": seed, "val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"],
                       "seconds": round(time.perf_counter() - start, 1)}
                rows[name].append(run)
                print(pair, name, run, flush=True)
        report["pairs"][pair] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "fashion_seeds" if args.name == DEFAULT_RUN else f"{args.name}_seeds"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
