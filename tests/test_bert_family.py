"""The ``bert`` family through the one engine: a permuted copy (stream, heads, units within heads,
FFN units) fuses back to the original, one-hot mixing weights give a parent back, balancing
inserts fitted near-identity layers or drops the deeper net's unmatched layers, fused weights load
strictly into transformers' BertModel with our outputs, and the CLI end to end on model folders."""

from __future__ import annotations

import json

import pytest
import torch

from bert_helpers import random_bert, tiny_spec, write_folder, write_sentences
from cli_runner import invoke
from clafuse.arch.bert import BertFamily
from clafuse.arch.bert_model import instantiate_bert
from clafuse.arch.network import run
from clafuse.errors import ClafuseError
from clafuse.fusion.engines import Member, Source, fuse_members
from clafuse.fusion.otfusion import FusionSettings
from clafuse.io.hf_folder import read_hf_folder
from clafuse.textdata import TokenBatch, pack_tokens, unpack_tokens
from test_bert_model import permute_bert, random_symmetry

FAMILY = BertFamily()
EXACT = dict(correction="none", bn_reset=False)


def tokens(n: int = 30, length: int = 9, vocab: int = 20, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, 2 + i % (length - 2):] = 0
    return pack_tokens(TokenBatch(ids * mask, mask))


def hidden(spec, sd, x):
    tb = unpack_tokens(x)
    with torch.no_grad():
        return instantiate_bert(spec, sd).hidden_states(tb.input_ids, tb.attention_mask), tb.attention_mask.bool()


def fuse(spec_t, sd_t, spec_s, sd_s, mapping, deeper, weights=(0.5, 0.5), x=None, **settings):
    source = Source(Member(FAMILY, spec_s, sd_s), [mapping], deeper=deeper)
    return fuse_members(Member(FAMILY, spec_t, sd_t), [source], list(weights), x,
                        FusionSettings(**{**EXACT, **settings}))


@pytest.mark.parametrize("signal", ["weights", "activations"])
def test_permuted_copy_fuses_back_to_the_original(signal):
    spec = tiny_spec(3)
    sd = random_bert(spec)
    perm_args = random_symmetry(spec, torch.Generator().manual_seed(3))
    assert any(not torch.equal(h, torch.arange(spec.heads)) for h in perm_args[1])
    permuted = permute_bert(sd, spec, *perm_args)
    x = tokens()
    reference, mask = hidden(spec, sd, x)
    out = fuse(spec, sd, spec, permuted, [0, 1, 2], False, x=x if signal == "activations" else None, signal=signal)
    for key, value in sd.items():
        torch.testing.assert_close(out.state_dict[key], value, atol=1e-6, rtol=0, msg=key)
    fused, _ = hidden(spec, out.state_dict, x)
    torch.testing.assert_close(fused[-1][mask], reference[-1][mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("correction", ["none", "repair", "regress"])
def test_one_hot_weights_give_a_parent_back(correction):
    """Every correction leaves a parent given all the weight as it is: its sites' targets are
    what it computes itself (for ``regress`` through the post-LN writers' LayerNorms, too)."""
    spec = tiny_spec(2)
    a, b = random_bert(spec, 0), random_bert(spec, 1)
    x = tokens()
    ha, mask = hidden(spec, a, x)
    hb, _ = hidden(spec, b, x)
    first = fuse(spec, a, spec, b, [0, 1], False, weights=(1.0, 0.0), x=x, signal="activations",
                 correction=correction)
    exact = dict(atol=0, rtol=0) if correction == "none" else dict(atol=2e-5, rtol=1e-5)
    for key, value in a.items():
        torch.testing.assert_close(first.state_dict[key], value, **exact, msg=key)
    second = fuse(spec, a, spec, b, [0, 1], False, weights=(0.0, 1.0), x=x, signal="activations",
                  correction=correction)
    got, _ = hidden(spec, second.state_dict, x)
    # B moved into A's units: the same function, its stream permuted
    moved = got[-1][mask]
    order = torch.cdist(moved.T, hb[-1][mask].T).argmin(1)
    assert sorted(order.tolist()) == list(range(spec.hidden))
    torch.testing.assert_close(moved, hb[-1][mask][:, order], atol=1e-4 if correction == "regress" else 1e-5, rtol=0)


def test_fused_weights_load_strictly_into_transformers_with_our_outputs():
    transformers = pytest.importorskip("transformers")
    from clafuse.arch.bert_model import bert_config

    spec = tiny_spec(3)
    out = fuse(spec, random_bert(spec, 0), tiny_spec(2), random_bert(tiny_spec(2), 1), [0, 2], False, x=tokens(),
               signal="activations", correction="regress")
    model = transformers.BertModel(transformers.BertConfig(**bert_config(spec))).eval()
    model.load_state_dict(out.state_dict, strict=True)
    x = tokens(seed=5)
    ours, mask = hidden(spec, out.state_dict, x)
    tb = unpack_tokens(x)
    with torch.no_grad():
        theirs = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).last_hidden_state
    torch.testing.assert_close(ours[-1][mask], theirs[mask], atol=1e-5, rtol=1e-5)
    assert set(out.approximate) == {"encoder.layer.1+identity"} and 0 <= out.approximate["encoder.layer.1+identity"] < 1


def test_near_identity_is_fitted_and_its_error_reported():
    """Post-LN: LN(LN(x)) is not x; the fitted layer beats the unfitted (unit gain) one and the
    reported error is the measured one."""
    spec_d, spec_s = tiny_spec(3), tiny_spec(2)
    sd = random_bert(spec_s, 1)
    x = tokens()
    from clafuse.fusion.balance import fit_inserted, insert_blocks

    net = insert_blocks(FAMILY.describe(spec_s), [[0, 2]], FAMILY.describe(spec_d))
    unfitted = run(net, sd, x)
    fitted_net = fit_inserted(net, sd, x)
    block = fitted_net.blocks[2]
    assert block.inserted and 0 < block.attrs["identity_error"] < 0.5
    exact = run(FAMILY.describe(spec_s), sd, x)
    fitted = run(fitted_net, sd, x)
    assert (fitted - exact).norm() < (unfitted - exact).norm()
    with pytest.raises(ClafuseError, match="calibration data"):
        fuse(spec_d, random_bert(spec_d), spec_s, sd, [0, 2], False, x=None, signal="weights")


def test_deeper_source_drops_its_unmatched_layers():
    spec_d, spec_s = tiny_spec(3), tiny_spec(2, pooler=False)
    deep, shallow = random_bert(spec_d, 0), random_bert(spec_s, 1)
    out = fuse(spec_s, shallow, spec_d, deep, [0, 2], True, weights=(0.0, 1.0), signal="weights")
    assert set(out.state_dict) == set(shallow)
    kept = {k.replace("encoder.layer.2.", "encoder.layer.1."): v for k, v in deep.items()
            if "encoder.layer.1." not in k and not k.startswith("pooler.")}
    x = tokens()
    want, mask = hidden(spec_s, kept, x)
    got, _ = hidden(spec_s, out.state_dict, x)
    order = torch.cdist(got[-1][mask].T, want[-1][mask].T).argmin(1)
    torch.testing.assert_close(got[-1][mask], want[-1][mask][:, order], atol=1e-5, rtol=0)


def test_compression_corrects_towards_what_the_deeper_model_really_computes():
    """Teacher into a shallower student (weights 0, 1): the kept layers are recorded in the whole
    teacher, so with ``repair`` the student's last LayerNorm output gets the per-unit mean and
    std the teacher's last layer has after all its layers, on the calibration tokens, and ends
    nearer the teacher's output than plain layer dropping. ``regress`` (the default) refits each
    post-LN writer through its LayerNorm and then restores those statistics as well: nearer
    still, on the calibration tokens and on others."""
    spec_d, spec_s = tiny_spec(4), tiny_spec(2, pooler=False)
    deep, shallow = random_bert(spec_d, 0), random_bert(spec_s, 1)
    x = tokens(n=60)
    want, mask = hidden(spec_d, deep, x)
    dropped = fuse(spec_s, shallow, spec_d, deep, [0, 3], True, weights=(0.0, 1.0), x=x, correction="none")
    repaired = fuse(spec_s, shallow, spec_d, deep, [0, 3], True, weights=(0.0, 1.0), x=x, correction="repair")
    refit = fuse(spec_s, shallow, spec_d, deep, [0, 3], True, weights=(0.0, 1.0), x=x, correction=None)
    outs = {"dropped": dropped, "repaired": repaired, "refit": refit}
    got = {name: hidden(spec_s, out.state_dict, x)[0][-1][mask].double() for name, out in outs.items()}
    # the student answers in its own stream order: the teacher's embedding columns, permuted
    key = "embeddings.word_embeddings.weight"
    order = torch.cdist(dropped.state_dict[key].T, deep[key].T).argmin(1)
    assert sorted(order.tolist()) == list(range(spec_d.hidden))
    teacher = want[-1][mask].double()[:, order]
    torch.testing.assert_close(got["repaired"].mean(0), teacher.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(got["repaired"].std(0), teacher.std(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got["dropped"].std(0), teacher.std(0), atol=1e-2)
    torch.testing.assert_close(got["refit"].mean(0), teacher.mean(0), atol=1e-4, rtol=0)
    torch.testing.assert_close(got["refit"].std(0), teacher.std(0), atol=1e-4, rtol=1e-4)
    error = {name: float((g - teacher).norm() / teacher.norm()) for name, g in got.items()}
    assert error["refit"] < error["repaired"] < error["dropped"]
    writer = "encoder.layer.1.output.dense.weight"
    assert not torch.allclose(refit.state_dict[writer], repaired.state_dict[writer])
    other = tokens(n=60, seed=9)
    want, mask = hidden(spec_d, deep, other)
    teacher = want[-1][mask].double()[:, order]
    held_out = {name: float((hidden(spec_s, out.state_dict, other)[0][-1][mask].double() - teacher).norm())
                for name, out in outs.items()}
    assert held_out["refit"] < held_out["repaired"] < held_out["dropped"]


def test_different_head_counts_are_refused():
    spec_a, spec_b = tiny_spec(2), tiny_spec(2, heads=2)
    with pytest.raises(ClafuseError, match="heads"):
        fuse(spec_a, random_bert(spec_a), spec_b, random_bert(spec_b), [0, 1], False, signal="weights")


def test_cli_on_model_folders(tmp_path):
    deep_spec, shallow_spec = tiny_spec(3), tiny_spec(2, pooler=False)
    deep = write_folder(tmp_path / "deep", deep_spec, random_bert(deep_spec, 0))
    shallow = write_folder(tmp_path / "shallow", shallow_spec, random_bert(shallow_spec, 1))
    data = write_sentences(tmp_path / "sentences.txt")
    r = invoke("inspect", deep, "--json")
    assert r.code == 0, r
    assert json.loads(r.stdout)["family"] == "bert"
    r = invoke("align", deep, shallow, "--data", data, "-o", tmp_path / "map.yaml")
    assert r.code == 0, r
    r = invoke("fuse", "--map", tmp_path / "map.yaml", "-o", tmp_path / "fused/", "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    assert list(doc["approximate_identities"]) and "near-identity" in r.stderr
    assert doc["correction"] == "regress"  # the BERT description's default, through the post-LN norms
    folder = read_hf_folder(tmp_path / "fused")
    assert folder.config["num_hidden_layers"] == 3 and folder.tokenizer_json is not None
    r = invoke("fuse", "--map", tmp_path / "map.yaml", "--target", "shallow", "-o", tmp_path / "small", "--json")
    assert r.code == 0, r
    small = read_hf_folder(tmp_path / "small")
    assert small.config["num_hidden_layers"] == 2 and set(small.state_dict) == set(read_hf_folder(shallow).state_dict)
    r = invoke("eval", deep, tmp_path / "fused", tmp_path / "small", "--data", data, "--json")
    assert r.code == 0, r
    rows = json.loads(r.stdout)["models"]
    assert rows[0]["cosine_to_first"] == pytest.approx(1.0) and len(rows) == 3
    # Run again into the same model folders (-o with and without a trailing slash): replaced.
    (tmp_path / "small" / "stale.bin").write_bytes(b"old")
    for out in (tmp_path / "small", f"{tmp_path / 'fused'}/"):
        r = invoke("fuse", "--map", tmp_path / "map.yaml", "--target", "shallow", "-o", out, "--json")
        assert r.code == 0, r
    assert not (tmp_path / "small" / "stale.bin").exists()
    assert read_hf_folder(tmp_path / "fused").config["num_hidden_layers"] == 2
    # ... but never over an input's folder, or a folder holding something other than a model.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for out, said in ((shallow, "shallow"), (tmp_path / "notes", "not a model folder")):
        r = invoke("fuse", "--map", tmp_path / "map.yaml", "--target", "shallow", "-o", out)
        assert r.code != 0 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert set(read_hf_folder(shallow).state_dict) == set(small.state_dict)
    r = invoke("fuse", "--map", tmp_path / "map.yaml", "-o", tmp_path / "x.safetensors", "--signal", "weights")
    assert r.code == 0, r
    r = invoke("align", deep, shallow, "--data", "mnist", "-o", tmp_path / "bad.yaml")
    assert r.code != 0 and r.stderr.strip().startswith("clafuse: error:") and len(r.stderr.strip().splitlines()) == 1


def test_recording_runs_in_sequence_batches_and_keeps_token_rows_in_float16():
    """A BERT is recorded 32 sentences at a time (attention grows with length squared) and its
    per-token activations are kept in float16, like feature maps; batching changes nothing else."""
    from clafuse.fusion.corrections import record

    spec = tiny_spec(2)
    sd = random_bert(spec)
    net = FAMILY.describe(spec)
    assert net.batch == 32
    x = tokens(n=70)
    real = int(unpack_tokens(x).attention_mask.sum())
    acts, pre, out = record(net, sd, x, spaces=True, sites=True)
    one = FAMILY.describe(spec)
    one.batch = len(x)
    acts_one, _, out_one = record(one, sd, x, spaces=True, sites=True)
    assert acts["stream"].dtype == torch.float16 and acts["stream"].shape == (real, spec.hidden)
    assert all(v.dtype == torch.float16 for v in acts.values())
    assert all(v.shape[0] >= real for v in acts.values())
    for name, value in acts.items():  # query/key rows are stacked per batch: compare their Gram matrices
        a, b = value.float(), acts_one[name].float()
        if name.endswith((":qk", ":vo")):
            a, b = a.T @ a / len(a), b.T @ b / len(b)
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, out_one, atol=1e-5, rtol=1e-5)
    assert all(v.dtype == torch.float32 for v in pre.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("target_wide", [True, False])
def test_encoders_of_different_widths_fuse_both_ways(target_wide):
    """Hidden 24 (3 layers) with hidden 16 (2 layers): the shallower one's near-identity layer has
    its own width, the pooler's units are matched like any others, the target's shapes are kept
    and one-hot weights on the target give it back; different head counts are refused up front."""
    wide, narrow = tiny_spec(3, hidden=24, intermediate=40), tiny_spec(2)
    sd_w, sd_n = random_bert(wide, 0), random_bert(narrow, 1)
    x = tokens()
    if target_wide:
        args = (wide, sd_w, narrow, sd_n, [0, 2], False)
    else:
        args = (narrow, sd_n, wide, sd_w, [0, 2], True)
    spec_t, sd_t = args[0], args[1]
    kept = fuse(*args, weights=(1.0, 0.0), x=x)
    assert all(torch.equal(kept.state_dict[k], v) for k, v in sd_t.items())
    mixed = fuse(*args, x=x)
    assert {k: v.shape for k, v in mixed.state_dict.items()} == {k: v.shape for k, v in sd_t.items()}
    states, mask = hidden(spec_t, mixed.state_dict, x)
    assert torch.isfinite(states[-1][mask]).all()
    assert FAMILY.incompatibility(narrow, tiny_spec(2, heads=2)) == "attention heads 4 vs 2"
