"""Which layer cost maps paraphrase-MiniLM-L3-v2 into all-MiniLM-L6-v2 usefully?

For each way of turning a layer's output into rows for linear CKA (:func:`clafuse.arch.bert.layer_features`:
mean-pooled sentence vectors, real tokens, real tokens centred per token id), the 3 x 6 cost
matrix on calibration sentences (train split) and the DP mapping with pinned ends; then for every
mapping found (and the layer selections of METHOD.md's leads) the two models fused into the
3-layer layout (``--target shallow``: L6's unmatched layers dropped, equal weights, activation
signal) and scored on held-out sentences (val split) by the mean cosine of the fused model's
sentence embeddings to the 6-layer teacher's. Results: benchmarks/results/text_layer_costs.{json,md}.

    python benchmarks/text/layer_costs.py --work benchmarks/_work [--calibration 200 --val 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models as text_models  # noqa: E402

from clafuse.align.costs import linear_cka  # noqa: E402
from clafuse.align.dp import solve_alignment  # noqa: E402
from clafuse.api.common import model_calibration  # noqa: E402
from clafuse.api.models import load_model  # noqa: E402
from clafuse.arch.bert import centre_by_token, layer_features  # noqa: E402
from clafuse.fusion.engines import Member, Source, fuse_members  # noqa: E402
from clafuse.fusion.otfusion import FusionSettings  # noqa: E402
from clafuse.textdata import unpack_tokens  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def states(model, x: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Per batch: every layer's output (embeddings excluded) and the real-token mask."""
    net = model.family.instantiate(model.spec, model.state_dict)
    out, masks = [], []
    with torch.no_grad():
        for start in range(0, len(x), 64):
            b = unpack_tokens(x[start:start + 64])
            out.append(net.hidden_states(b.input_ids, b.attention_mask)[1:])
            masks.append((b.attention_mask.bool(), b.input_ids))
    return out, masks


def features(hidden, masks, how: str) -> list[torch.Tensor]:
    layers = len(hidden[0])
    rows = [torch.cat([layer_features(h[i], m, how) for h, (m, _) in zip(hidden, masks)]) for i in range(layers)]
    if how == "centred":
        ids = torch.cat([t[m] for m, t in masks])
        rows = [centre_by_token(r, ids) for r in rows]
    return rows


def embed(model, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(model.family.forward(model.spec, model.state_dict, x), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=text_models.WORK)
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--val", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    l6 = load_model(text_models.minilm_l6_folder())
    l3 = load_model(args.work / "paraphrase-MiniLM-L3-v2")
    x = model_calibration([l6, l3], str(args.work / "fortunes" / "train.txt"), args.calibration, 0)
    xv = model_calibration([l6, l3], str(args.work / "fortunes" / "val.txt"), args.val, 0)
    started = time.perf_counter()
    h6, m6 = states(l6, x)
    h3, m3 = states(l3, x)
    costs, mappings = {}, {}
    for how in ("tokens", "centred", "mean"):
        f6, f3 = features(h6, m6, how), features(h3, m3, how)
        cost = [[1.0 - linear_cka(a, b) for b in f6] for a in f3]
        mapping, _ = solve_alignment(cost, True, True)
        costs[how] = [[round(c, 4) for c in row] for row in cost]
        mappings[how] = mapping
        print(how, mapping, costs[how], flush=True)
    del h6, h3
    teacher = embed(l6, xv)
    rows = [{"mapping": "paraphrase-MiniLM-L3-v2 alone", "cosine": round(float((embed(l3, xv) * teacher).sum(1).mean()), 4)}]
    candidates = {tuple(m): [k for k, v in mappings.items() if v == m] for m in mappings.values()}
    for extra in ([0, 3, 5], [1, 3, 5], [0, 2, 5], [0, 1, 5]):
        candidates.setdefault(tuple(extra), [])
    for mapping, found_by in candidates.items():
        for correction in ("none", "repair", "regress"):
            out = fuse_members(Member(l3.family, l3.spec, l3.state_dict),
                               [Source(Member(l6.family, l6.spec, l6.state_dict), [list(mapping)], deeper=True)],
                               [0.5, 0.5], x, FusionSettings(signal="activations", correction=correction))
            fused = embed(type(l3)(l3.path, out.state_dict, l3.family, l3.spec), xv)
            rows.append({"mapping": list(mapping), "found_by": found_by, "correction": correction,
                         "cosine": round(float((fused * teacher).sum(1).mean()), 4)})
            print(rows[-1], flush=True)
    doc = {"calibration_sentences": args.calibration, "val_sentences": args.val, "costs": costs, "mappings": mappings,
           "fused_L3_layout_equal_weights": rows, "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_layer_costs.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Layer costs for MiniLM-L3 into MiniLM-L6 (linear CKA, pinned ends)", "",
             f"{args.calibration} calibration sentences (fortunes train), {args.val} held-out (val).", "",
             "| features | DP mapping | cost rows (L3 layer x L6 layer) |", "|---|---|---|"]
    lines += [f"| {how} | {mappings[how]} | {costs[how]} |" for how in costs]
    lines += ["", "Fused into the 3-layer layout (equal weights, activation signal), cosine to the L6 teacher:", "",
              "| mapping | found by | correction | cosine |", "|---|---|---|---|"]
    lines += [f"| {r['mapping']} | {', '.join(r.get('found_by', [])) or '-'} | {r.get('correction', '-')} | {r['cosine']} |"
              for r in rows]
    (RESULTS / "text_layer_costs.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
