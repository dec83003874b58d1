"""Sentence encoders on tiny random BERTs: students built by layer selection, distillation from a
teacher's sentence embeddings (library and CLI), and the label-free measures of ``clafuse eval``."""

from __future__ import annotations

import json
import random

import pytest
import torch

from clafuse.arch.bert_model import BertSpec, bert_config, instantiate_bert
from clafuse.errors import DataError
from clafuse.io.checkpoint import load_checkpoint, save_checkpoint
from clafuse.io.hf_folder import read_hf_folder, write_hf_folder
from clafuse.textdata import load_tokenizer, tokenize
from clafuse.textmetrics import (cosine_agreement, encoder_metrics, retrieval, similarity_spearman, spearman,
                                 split_halves)
from clafuse.textmodels import load_text_model, random_bert, select_layers
from clafuse.training import FinetuneConfig
from clafuse.training.loop import finetune_objective
from clafuse.training.sentences import SentenceDistillation, SentenceEncoder, pooled_embeddings
from tests.cli_runner import invoke
from tests.text_helpers import SPECIAL, WORDS, write_tokenizer

SPEC = BertSpec(layers=3, hidden=16, heads=2, intermediate=24, vocab=len(SPECIAL) + len(WORDS), max_positions=32,
                type_vocab=2)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in WORDS if not w.startswith("##")]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def noisy_bert(spec: BertSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights larger than BERT's init, so that layers differ clearly."""
    state = random_bert(spec, seed, std=0.3)
    gen = torch.Generator().manual_seed(seed + 1000)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if "LayerNorm" in k else v for k, v in state.items()}


def folder(tmp_path, name: str, spec: BertSpec, seed: int):
    path = write_hf_folder(tmp_path / name, noisy_bert(spec, seed), bert_config(spec))
    write_tokenizer(path / "tokenizer.json")
    return path


def text_file(tmp_path, name: str, n: int, seed: int):
    path = tmp_path / name
    path.write_text("\n".join(sentences(n, seed)) + "\n", encoding="utf-8")
    return path


def tokens_for(texts, tmp_path):
    return tokenize(texts, load_tokenizer(write_tokenizer(tmp_path / "tok.json")))


# students without fusion


def test_select_layers_runs_the_chosen_layers_in_order():
    state = noisy_bert(SPEC, 0)
    net = instantiate_bert(SPEC, state)
    spec2, state2 = select_layers(SPEC, state, [2, 0])
    assert spec2.layers == 2 and list(state2) == list(random_bert(spec2, 0))
    assert state2["encoder.layer.0.intermediate.dense.weight"] is state["encoder.layer.2.intermediate.dense.weight"]
    small = instantiate_bert(spec2, state2)
    ids = torch.randint(0, SPEC.vocab, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        x = net.body.embeddings(ids)
        bias = (1.0 - mask.float()) * torch.finfo(torch.float32).min
        expected = net.layers[0](net.layers[2](x, bias), bias)
        assert torch.allclose(small.encode(ids, mask), expected, atol=1e-6)
    with pytest.raises(DataError, match="layer 3 does not exist"):
        select_layers(SPEC, state, [0, 3])
    with pytest.raises(DataError, match="at least one"):
        select_layers(SPEC, state, [])


def test_random_bert_is_seeded_and_loads():
    a, b, c = random_bert(SPEC, 1), random_bert(SPEC, 1), random_bert(SPEC, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.layer.0.attention.self.query.weight"],
                           c["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(a["encoder.layer.1.output.LayerNorm.weight"], torch.ones(16))
    assert float(a["embeddings.word_embeddings.weight"].std()) == pytest.approx(0.02, rel=0.2)
    instantiate_bert(SPEC, a)


# measures


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).double()
    b = a + torch.randn(40, generator=g, dtype=torch.float64)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_agreement_measures():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 8, generator=g)
    assert cosine_agreement(emb, 3 * emb) == pytest.approx(1.0)
    assert cosine_agreement(emb, -emb) == pytest.approx(-1.0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    # rotated embeddings rank all pairs alike (width-free), but do not point the same way
    assert similarity_spearman(emb @ rotation, emb) == pytest.approx(1.0)
    assert cosine_agreement(emb @ rotation, emb) < 0.9
    with pytest.raises(DataError):
        cosine_agreement(emb, emb[:, :4])


def test_retrieval_ranks_the_partner():
    docs = torch.eye(4)
    assert retrieval(docs, docs) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0, "candidates": 4}
    queries = docs[[1, 0, 2, 3]]  # queries 0 and 1 find each other's partner first, their own second
    result = retrieval(queries + 0.5 * docs, docs)
    assert result["recall@1"] == 0.5 and result["mrr"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    first, second = split_halves(["one two three four five", "too short", "a b c d"])
    assert first == ["one two", "a b"] and second == ["three four five", "c d"]
    emb = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    metrics = encoder_metrics(emb, docs, docs, teacher=emb)
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["spearman"] == pytest.approx(1.0)


# distillation


def test_distillation_moves_the_student_towards_the_teacher(tmp_path):
    teacher = instantiate_bert(SPEC, noisy_bert(SPEC, 1))
    student_spec, student_state = select_layers(SPEC, noisy_bert(SPEC, 2), [0, 2])
    student = instantiate_bert(student_spec, {k: v.clone() for k, v in student_state.items()})
    train, val = tokens_for(sentences(64, 0), tmp_path), tokens_for(sentences(24, 1), tmp_path)
    objective = SentenceDistillation(train, val, "cosine", teacher=teacher)
    before = objective.validate(student, 0, 1)["cosine"]
    seen = []
    config = FinetuneConfig(epochs=3, lr=3e-3, batch_size=16, optimizer="adamw")
    result = finetune_objective(SentenceEncoder(student), objective, config, on_epoch=seen.append)
    assert [set(r) >= {"train_cosine", "val_cosine", "val_loss"} for r in seen] == [True] * 3
    best = max(seen, key=lambda r: r["val_cosine"])
    assert result.best_epoch == best["epoch"] and best["val_cosine"] > before + 0.05
    assert objective.targets.known.all()  # every training sentence's target computed once and kept
    # the same run from precomputed targets is the same run
    targets, val_targets = pooled_embeddings(teacher, train), pooled_embeddings(teacher, val)
    again = instantiate_bert(student_spec, student_state)
    replay = finetune_objective(SentenceEncoder(again), SentenceDistillation(train, val, targets=targets,
                                                                             val_targets=val_targets), config)
    assert [round(h["val_cosine"], 5) for h in replay.history] == [round(h["val_cosine"], 5) for h in seen]


def test_a_student_equal_to_its_teacher_has_zero_loss(tmp_path):
    state = noisy_bert(SPEC, 3)
    tokens = tokens_for(sentences(10, 0), tmp_path)
    for loss in ("cosine", "mse"):
        objective = SentenceDistillation(tokens, tokens, loss, teacher=instantiate_bert(SPEC, state))
        metrics = objective.validate(SentenceEncoder(instantiate_bert(SPEC, state)), 0, 1)
        assert metrics["cosine"] == pytest.approx(1.0, abs=1e-6) and metrics["loss"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DataError, match="--loss"):
        SentenceDistillation(tokens, None, "kl", teacher=instantiate_bert(SPEC, state))
    with pytest.raises(DataError, match="needs a teacher"):
        SentenceDistillation(tokens, None)


# command line


def test_cli_finetune_and_eval_of_model_folders(tmp_path):
    teacher = folder(tmp_path, "teacher", SPEC, 1)
    spec2, state2 = select_layers(SPEC, noisy_bert(SPEC, 2), [0, 2])
    student = write_hf_folder(tmp_path / "student", state2, bert_config(spec2))
    write_tokenizer(student / "tokenizer.json")
    train, val = text_file(tmp_path, "train.txt", 48, 0), text_file(tmp_path, "val.txt", 20, 1)
    out = tmp_path / "distilled"
    r = invoke("finetune", student, "--teacher", teacher, "--data", train, "--val", val, "--epochs", 2,
               "--lr", "3e-3", "--batch-size", 16, "-o", out, "--metrics-out", tmp_path / "m.jsonl", "--json")
    assert r.code == 0, r
    report = json.loads(r.stdout)
    assert report["metric"] == "cosine" and len(report["history"]) == 2
    assert report["best_epoch"] == max(report["history"], key=lambda h: h["val_cosine"])["epoch"]
    written = read_hf_folder(out)
    assert written.config["num_hidden_layers"] == 2 and (out / "tokenizer.json").is_file()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2

    r = invoke("eval", student, out, "--teacher", teacher, "--data", val, "--json")
    assert r.code == 0, r
    doc = json.loads(r.stdout)
    before, after = doc["models"]
    assert doc["retrieval_pairs"] == 20 and after["layers"] == 2
    assert after["cosine"] > before["cosine"]
    assert after["cosine"] == pytest.approx(report["history"][report["best_epoch"] - 1]["val_cosine"], abs=1e-4)
    assert doc["teacher_metrics"]["recall@1"] >= 0 and "cosine" not in doc["teacher_metrics"]
    r = invoke("eval", out, "--teacher", teacher, "--data", val)
    assert r.code == 0 and "recall@1" in r.stdout, r


def test_cli_finetune_of_a_bare_state_dict(tmp_path):
    teacher = folder(tmp_path, "teacher", SPEC, 1)
    student = tmp_path / "student.safetensors"
    save_checkpoint(student, select_layers(SPEC, noisy_bert(SPEC, 2), [1])[1], {})
    train = text_file(tmp_path, "train.txt", 20, 0)
    out = tmp_path / "out.safetensors"
    r = invoke("finetune", student, "--teacher", teacher, "--data", train, "--batch-size", 8, "-o", out, "--json")
    assert r.code == 0, r
    model = load_text_model(out, config=read_hf_folder(teacher).config)
    assert model.spec.layers == 1 and model.spec.heads == 2 and set(load_checkpoint(out)) == set(load_checkpoint(student))


def test_cli_text_errors_are_one_line(tmp_path):
    teacher = folder(tmp_path, "teacher", SPEC, 1)
    train = text_file(tmp_path, "train.txt", 8, 0)
    cases = [
        (["finetune", teacher, "--data", train, "-o", tmp_path / "o"], "--teacher"),
        (["finetune", teacher, "--teacher", teacher, "--data", train, "--augment", "crop", "-o", tmp_path / "o"],
         "--augment applies to image classifiers"),
        (["finetune", teacher, "--teacher", teacher, "--data", train, "--loss", "kl", "-o", tmp_path / "o"], "--loss"),
        (["finetune", teacher, "--teacher", teacher, "--data", tmp_path / "none.txt", "-o", tmp_path / "o"],
         "no such file"),
    ]
    for args, message in cases:
        r = invoke(*args)
        assert r.code == 2 and message in r.stderr and "Traceback" not in r.stderr, r
    assert not (tmp_path / "o").exists()
    wide = folder(tmp_path, "wide", SPEC.model_copy(update={"hidden": 24, "heads": 3}), 4)
    r = invoke("finetune", wide, "--teacher", teacher, "--data", train, "-o", tmp_path / "o")
    assert r.code == 2 and "width 24 differs" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
