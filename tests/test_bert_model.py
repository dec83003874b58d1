"""The plain-torch BERT against transformers' BertModel, its detection, and its symmetries.

The permutation helper at the bottom documents the function-preserving symmetries the fusion
description must respect: one residual-stream permutation for the whole depth (embedding
columns, every writer's rows, every reader's columns, every LayerNorm's gain and bias), per layer
a head permutation shared by query, key and value, inside each head one permutation shared by the
query and key rows and another shared by the value rows and the output projection's columns, and
a permutation of the FFN units.
"""

from __future__ import annotations

import pytest
import torch

from clafuse.arch.bert_model import (BertSpec, bert_config, bert_shapes, build_bert, check_bert, detect_bert,
                                     instantiate_bert, sentence_embeddings)
from clafuse.errors import SpecError
from clafuse.textdata import TokenBatch

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
             max_position_embeddings=16, type_vocab_size=2)


def hf_config(**changes):
    return transformers.BertConfig(**{**SIZES, **changes})


def random_hf(model_cls=None, seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = (model_cls or transformers.BertModel)(hf_config(**changes)).eval()
    with torch.no_grad():  # larger than BERT's init, so that attention patterns are far from uniform,
        for name, p in model.named_parameters():  # and LayerNorms away from (1, 0), so that they are tested
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn_like(p) * 0.8 / p.shape[1] ** 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SIZES["vocab_size"], (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def test_outputs_equal_transformers_bertmodel():
    hf = random_hf()
    spec = detect_bert(hf.state_dict(), hf.config.to_dict())
    assert spec == BertSpec(layers=3, hidden=24, heads=4, intermediate=40, vocab=50, max_positions=16,
                            type_vocab=2, pooler=True)
    net = instantiate_bert(spec, hf.state_dict())
    ids, mask, types = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        states = net.hidden_states(ids, mask, types)
    assert len(states) == len(ref.hidden_states) == 4
    for ours, theirs in zip(states, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(net.pooled(states[-1]), ref.pooler_output, atol=1e-5, rtol=0)


def test_our_state_dict_loads_strictly_into_transformers():
    spec = BertSpec(layers=2, hidden=24, heads=4, intermediate=40, vocab=50, max_positions=16, type_vocab=2,
                    pooler=True)
    torch.manual_seed(3)
    net = build_bert(spec).eval()
    hf = transformers.BertModel(transformers.BertConfig(**bert_config(spec))).eval()
    hf.load_state_dict(net.state_dict(), strict=True)
    ids, mask, types = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                             token_type_ids=types).last_hidden_state, atol=1e-5, rtol=0)
    assert set(net.state_dict()) == set(bert_shapes(spec))


@pytest.mark.parametrize("layout", ["sequence", "token"])
def test_bert_prefix_and_classifier(layout):
    cls = transformers.BertForSequenceClassification if layout == "sequence" else transformers.BertForTokenClassification
    hf = random_hf(cls, num_labels=3)
    sd = hf.state_dict()
    spec = detect_bert(sd, hf.config.to_dict())
    assert spec.prefix == "bert." and spec.classifier == 3
    assert spec.pooler == (layout == "sequence") and spec.classifier_on == ("pooled" if layout == "sequence" else "tokens")
    net = instantiate_bert(spec, sd)
    ids, mask, types = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                             token_type_ids=types).logits, atol=1e-5, rtol=0)


def test_sentence_transformers_prefix_and_position_ids_buffer():
    hf = random_hf()
    sd = {f"0.auto_model.{k}": v for k, v in hf.state_dict().items()}
    sd["0.auto_model.embeddings.position_ids"] = torch.arange(16)[None]
    spec = detect_bert(sd, hf.config.to_dict())
    assert spec.prefix == "0.auto_model." and spec.position_ids
    net = instantiate_bert(spec, sd)
    assert set(net.state_dict()) == set(sd)
    ids, mask, _ = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        ref_emb = torch.nn.functional.normalize((ref * weights).sum(1) / weights.sum(1), dim=-1)
    torch.testing.assert_close(sentence_embeddings(net, TokenBatch(ids, mask), batch_size=3), ref_emb,
                               atol=1e-5, rtol=0)


def test_detection_heads_and_errors():
    sd = random_hf().state_dict()
    with pytest.raises(SpecError, match="config.json"):  # width 24: no head size of 64 to assume
        detect_bert(sd)
    assert detect_bert(sd, heads=6).heads == 6
    assert detect_bert(sd, {"num_attention_heads": 4}).heads == 4
    wide = random_hf(hidden_size=128, num_attention_heads=8).state_dict()
    assert detect_bert(wide).heads == 2 and detect_bert(wide, {"num_attention_heads": 8}).heads == 8
    assert detect_bert({"fc.weight": torch.zeros(2, 2)}) is None
    with pytest.raises(SpecError, match="not a multiple of 5 heads"):
        detect_bert(sd, heads=5)
    with pytest.raises(SpecError, match="cls.predictions.bias"):
        detect_bert({**sd, "cls.predictions.bias": torch.zeros(50)}, heads=4)
    missing = {k: v for k, v in sd.items() if "layer.1.output.dense.bias" not in k}
    with pytest.raises(SpecError, match="layer.1.output.dense.bias"):
        detect_bert(missing, heads=4)
    gap = {k.replace("layer.2.", "layer.5."): v for k, v in sd.items()}
    with pytest.raises(SpecError, match=r"numbered \[0, 1, 5\]"):
        detect_bert(gap, heads=4)
    bad = {**sd, "encoder.layer.0.intermediate.dense.weight": torch.zeros(41, 24)}
    with pytest.raises(SpecError, match="intermediate.dense"):
        check_bert(detect_bert(sd, heads=4), bad)
    with pytest.raises(SpecError, match="activation 'swish'"):
        detect_bert(sd, {"num_attention_heads": 4, "hidden_act": "swish"})
    no_pooler = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
    assert not detect_bert(no_pooler, heads=4).pooler


# --- symmetries ------------------------------------------------------------------------------

def permute_bert(sd: dict[str, torch.Tensor], spec: BertSpec, stream: torch.Tensor, heads: list[torch.Tensor],
                 qk: list[list[torch.Tensor]], vo: list[list[torch.Tensor]], ffn: list[torch.Tensor]) -> dict:
    """Apply the symmetries of a BERT (no prefix). ``stream``: new residual unit i is old unit
    stream[i]. Per layer l: ``heads[l]`` (new head j is old head heads[l][j]); ``qk[l][j]`` and
    ``vo[l][j]``: unit order inside new head j for query/key and for value/output; ``ffn[l]``."""
    out = dict(sd)
    d, dh = spec.hidden, spec.head_size
    for key in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        out[f"embeddings.{key}.weight"] = sd[f"embeddings.{key}.weight"][:, stream]
    for key, value in sd.items():
        if "LayerNorm" in key:
            out[key] = value[stream]
    for layer in range(spec.layers):
        p = f"encoder.layer.{layer}."
        rows_qk = torch.cat([heads[layer][j] * dh + qk[layer][j] for j in range(spec.heads)])
        rows_vo = torch.cat([heads[layer][j] * dh + vo[layer][j] for j in range(spec.heads)])
        for name, rows in (("query", rows_qk), ("key", rows_qk), ("value", rows_vo)):
            out[f"{p}attention.self.{name}.weight"] = sd[f"{p}attention.self.{name}.weight"][rows][:, stream]
            out[f"{p}attention.self.{name}.bias"] = sd[f"{p}attention.self.{name}.bias"][rows]
        out[f"{p}attention.output.dense.weight"] = sd[f"{p}attention.output.dense.weight"][stream][:, rows_vo]
        out[f"{p}attention.output.dense.bias"] = sd[f"{p}attention.output.dense.bias"][stream]
        out[f"{p}intermediate.dense.weight"] = sd[f"{p}intermediate.dense.weight"][ffn[layer]][:, stream]
        out[f"{p}intermediate.dense.bias"] = sd[f"{p}intermediate.dense.bias"][ffn[layer]]
        out[f"{p}output.dense.weight"] = sd[f"{p}output.dense.weight"][stream][:, ffn[layer]]
        out[f"{p}output.dense.bias"] = sd[f"{p}output.dense.bias"][stream]
    if spec.pooler:  # the pooler reads the stream; its own outputs leave it
        out["pooler.dense.weight"] = sd["pooler.dense.weight"][:, stream]
    assert set(out) == set(sd)
    assert d == len(stream)
    return out


def random_symmetry(spec: BertSpec, g: torch.Generator):
    layers, heads, dh = spec.layers, spec.heads, spec.head_size
    return (torch.randperm(spec.hidden, generator=g),
            [torch.randperm(heads, generator=g) for _ in range(layers)],
            [[torch.randperm(dh, generator=g) for _ in range(heads)] for _ in range(layers)],
            [[torch.randperm(dh, generator=g) for _ in range(heads)] for _ in range(layers)],
            [torch.randperm(spec.intermediate, generator=g) for _ in range(layers)])


def test_symmetries_leave_outputs_unchanged():
    hf = random_hf()
    sd = hf.state_dict()
    spec = detect_bert(sd, hf.config.to_dict())
    stream, heads, qk, vo, ffn = random_symmetry(spec, torch.Generator().manual_seed(7))
    assert not torch.equal(stream, torch.arange(spec.hidden))
    permuted = permute_bert(sd, spec, stream, heads, qk, vo, ffn)
    ids, mask, types = inputs()
    with torch.no_grad():
        base = instantiate_bert(spec, sd).hidden_states(ids, mask, types)
        moved = instantiate_bert(spec, permuted).hidden_states(ids, mask, types)
        pooled = instantiate_bert(spec, permuted).pooled(moved[-1])
    for a, b in zip(base, moved):  # every hidden state is the old one with its units reordered
        torch.testing.assert_close(b, a[..., stream], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, instantiate_bert(spec, sd).pooled(base[-1]), atol=1e-5, rtol=0)


def test_moving_units_across_heads_or_untying_query_and_key_breaks_the_function():
    """Controls: the symmetries above are exactly the right ones, weaker ones change outputs."""
    hf = random_hf()
    sd = hf.state_dict()
    spec = detect_bert(sd, hf.config.to_dict())
    g = torch.Generator().manual_seed(8)
    ident_s = torch.arange(spec.hidden)
    ident_h = [torch.arange(spec.heads)] * spec.layers
    ident_u = [[torch.arange(spec.head_size)] * spec.heads] * spec.layers
    ident_f = [torch.arange(spec.intermediate)] * spec.layers
    ids, mask, types = inputs()
    with torch.no_grad():
        base = instantiate_bert(spec, sd)(ids, mask, types)

    untied = dict(sd)  # key rows permuted inside head 0, query rows not
    rows = torch.cat([torch.randperm(spec.head_size, generator=g), torch.arange(spec.head_size, spec.hidden)])
    untied["encoder.layer.0.attention.self.key.weight"] = sd["encoder.layer.0.attention.self.key.weight"][rows]
    untied["encoder.layer.0.attention.self.key.bias"] = sd["encoder.layer.0.attention.self.key.bias"][rows]
    across = permute_bert(sd, spec, ident_s, ident_h, ident_u, ident_u, ident_f)
    swap = torch.arange(spec.hidden)
    swap[[0, spec.head_size]] = swap[[spec.head_size, 0]]  # unit 0 of head 0 <-> unit 0 of head 1, in q and k
    for name in ("query", "key"):
        w = f"encoder.layer.0.attention.self.{name}"
        across[f"{w}.weight"], across[f"{w}.bias"] = sd[f"{w}.weight"][swap], sd[f"{w}.bias"][swap]
    for changed in (untied, across):
        with torch.no_grad():
            assert float((instantiate_bert(spec, changed)(ids, mask, types) - base).abs().max()) > 1e-2


def test_inputs_that_do_not_fit_are_data_errors():
    from clafuse.errors import DataError

    hf = random_hf()
    net = instantiate_bert(detect_bert(hf.state_dict(), hf.config.to_dict()), hf.state_dict())
    with pytest.raises(DataError, match="exceed the model's 16 positions"):
        net(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(DataError, match="token id 50 does not fit"):
        net(torch.full((1, 3), 50))
