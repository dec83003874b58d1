"""Issue 11 follow-up: one epoch of distillation from the parents' ensemble, for the searched
fusion and for each parent, on the Fashion-MNIST CNN pairs of ``fashion_cnn.py``.

``fashion_cnn.py`` gives every row the same plain epoch (cross-entropy, peak lr 0.01, cosine).
Here the fused model found by ``fuse --search`` (label-free, default budget) and both parents get
that epoch with ``finetune --teacher A --teacher B``'s loss instead: 0.5 * T^2 * KL to the
parents' mean softmax prediction at T = 4 plus 0.5 * cross-entropy. Every model gets the same
teacher, so the comparison stays fair. It reuses ``fashion_cnn.py``'s cached parents and searched
fusions (run that first, with the same ``--subset``). Test accuracy is only reported; there is no
selection beyond the one epoch.

    .venv/bin/python benchmarks/fashion_kd.py [--pairs resnet vgg] [--subset 10000]

Writes benchmarks/results/fashion_kd.json and benchmarks/results/fashion_kd.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_cnn import ONE_EPOCH, RESULTS, cached_models, subset  # noqa: E402

from clafuse import api  # noqa: E402
from clafuse.data import load_source  # noqa: E402
from clafuse.threads import use_threads  # noqa: E402
from clafuse.training import evaluate, evaluate_ensemble, finetune  # noqa: E402
from clafuse.training.objectives import Ensemble  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["resnet", "vgg"])
    parser.add_argument("--subset", type=int, default=10000, help="training samples (as fashion_cnn.py used)")
    args = parser.parse_args()
    use_threads()
    train = subset(load_source("fashion-mnist"), args.subset)
    val, test = load_source("fashion-mnist:val"), load_source("fashion-mnist:test")
    # fashion_cnn.py's "+ 1 epoch" recipe, with the parents' ensemble as the teacher.
    kd_epoch = replace(ONE_EPOCH, kd_alpha=0.5, kd_temperature=4.0)
    report: dict = {"subset": args.subset, "pairs": {}}
    for pair in args.pairs:
        paths = cached_models(pair)
        parents = [api.load_model(paths[n]).module() for n in ("parent A", "parent B")]
        rows = {"ensemble A+B": {"val": evaluate_ensemble(parents, val)["accuracy"],
                                 "test": evaluate_ensemble(parents, test)["accuracy"]}}
        for name, path in paths.items():
            model = api.load_model(path).module()
            start = time.perf_counter()
            result = finetune(model, train, val, kd_epoch, teacher=Ensemble(parents))
            model.load_state_dict(result.best_state)
            rows[f"{name} + 1 epoch distilled from the ensemble"] = {
                "val": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"],
                "seconds": round(time.perf_counter() - start, 1)}
            print(pair, name, rows[f"{name} + 1 epoch distilled from the ensemble"], flush=True)
        report["pairs"][pair] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fashion_kd.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Fashion-MNIST CNN pairs of fashion_cnn.py ({args.subset} training samples): one epoch (peak lr "
             "0.01, cosine) distilled from the parents' ensemble (alpha 0.5, T 4) for every row; accuracy in %.", ""]
    for pair, rows in report["pairs"].items():
        lines += [f"**{pair}**", "", "| model | val | test |", "|---|---|---|"]
        lines += [f"| {k} | {100 * v['val']:.2f} | {100 * v['test']:.2f} |" for k, v in rows.items()]
        lines.append("")
    (RESULTS / "fashion_kd.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
