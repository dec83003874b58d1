"""Hugging Face model folders: written atomically with config and tokenizer, read back, loaded by transformers."""

from __future__ import annotations

import json

import pytest
import torch

import clafuse.io.hf_folder as hf_folder
from clafuse.arch.bert_model import BertSpec, bert_config, build_bert, detect_bert
from clafuse.errors import CheckpointError, ClafuseError
from clafuse.io.hf_folder import is_hf_folder, read_hf_folder, write_hf_folder
from tests.text_helpers import write_tokenizer

SPEC = BertSpec(layers=3, hidden=16, heads=2, intermediate=24, vocab=20, max_positions=12, type_vocab=2, pooler=True)


def random_state(spec: BertSpec = SPEC, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_bert(spec).state_dict().items()}


def drop_last_layer(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if f"encoder.layer.{layers - 1}." not in k}


@pytest.fixture()
def parent(tmp_path):
    """A sentence-transformers style folder: model files at the top, a pooling module beside."""
    folder = tmp_path / "parent"
    folder.mkdir()
    write_hf_folder(folder, random_state(), {**bert_config(SPEC), "note": "kept"})
    write_tokenizer(folder / "tokenizer.json")
    (folder / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                                  "pooling_mode_mean_tokens": True}))
    return folder


def test_round_trip_updates_config_and_copies_tokenizer(tmp_path, parent):
    source = read_hf_folder(parent)
    assert source.model_dir == parent and source.weights.name == "model.safetensors"
    assert {str(p) for p in source.extra_files} == {"tokenizer.json", "vocab.txt", "modules.json", "1_Pooling"}
    spec = detect_bert(source.state_dict, source.config)
    assert spec == SPEC
    shallow = spec.model_copy(update={"layers": 2})
    out = write_hf_folder(tmp_path / "child", drop_last_layer(source.state_dict, 3),
                          bert_config(shallow, source.config), source=source)
    child = read_hf_folder(out)
    assert child.config["num_hidden_layers"] == 2 and child.config["note"] == "kept"
    assert child.config["hidden_size"] == 16 and child.config["num_attention_heads"] == 2
    assert detect_bert(child.state_dict, child.config) == shallow
    for name in ("tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (parent / name).read_bytes()
    for key, value in drop_last_layer(source.state_dict, 3).items():
        assert torch.equal(child.state_dict[key], value)
    assert child.tokenizer_json == out / "tokenizer.json"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_transformers_loads_the_written_folder_strictly(tmp_path, parent):
    transformers = pytest.importorskip("transformers")
    source = read_hf_folder(parent)
    model, info = transformers.BertModel.from_pretrained(parent, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ids = torch.tensor([[2, 7, 8, 3, 0]])
    mask = (ids > 0).long()
    from clafuse.arch.bert_model import instantiate_bert

    ours = instantiate_bert(detect_bert(source.state_dict, source.config), source.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(ids, mask), model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=0)


def test_sentence_transformers_subfolder_layout_and_pooling_width(tmp_path):
    root = tmp_path / "st"
    (root / "0_Transformer").mkdir(parents=True)
    write_hf_folder(root / "0_Transformer", random_state(), bert_config(SPEC))
    write_tokenizer(root / "0_Transformer" / "tokenizer.json")
    (root / "modules.json").write_text(json.dumps([
        {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16}))
    assert is_hf_folder(root)
    source = read_hf_folder(root)
    assert source.model_dir == root / "0_Transformer"
    assert source.tokenizer_json == root / "0_Transformer" / "tokenizer.json"
    wide = SPEC.model_copy(update={"hidden": 32})
    out = write_hf_folder(tmp_path / "wide", random_state(wide), bert_config(wide, source.config), source=source)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 32
    again = read_hf_folder(out)
    assert again.model_dir == out / "0_Transformer" and again.config["hidden_size"] == 32
    assert (out / "0_Transformer" / "tokenizer.json").is_file() and (out / "modules.json").is_file()


def test_sharded_weights_round_trip(tmp_path):
    sd = random_state()
    out = write_hf_folder(tmp_path / "sharded", sd, bert_config(SPEC), max_shard_size=4000)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    back = read_hf_folder(out)
    assert back.weights.name == "model.safetensors.index.json"
    assert set(back.state_dict) == set(sd) and all(torch.equal(back.state_dict[k], v) for k, v in sd.items())


def test_writing_is_atomic(tmp_path, parent, monkeypatch):
    old = (parent / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_folder, "save_checkpoint", fail)
    with pytest.raises(OSError, match="disk full"):
        write_hf_folder(parent, random_state(seed=1), bert_config(SPEC))
    with pytest.raises(OSError):
        write_hf_folder(tmp_path / "new", random_state(seed=1), bert_config(SPEC))
    monkeypatch.undo()
    assert (parent / "model.safetensors").read_bytes() == old and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]
    write_hf_folder(parent, random_state(seed=1), bert_config(SPEC))  # a model folder is replaced whole
    assert (parent / "model.safetensors").read_bytes() != old and not (parent / "tokenizer.json").exists()

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "a.txt").write_text("mine")
    with pytest.raises(ClafuseError, match="not a model folder"):
        write_hf_folder(precious, random_state(), bert_config(SPEC))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ClafuseError, match="a file of that name"):
        write_hf_folder(tmp_path / "file", random_state(), bert_config(SPEC))
    with pytest.raises(ClafuseError, match="does not exist"):
        write_hf_folder(tmp_path / "no" / "out", random_state(), bert_config(SPEC))
    assert (precious / "a.txt").read_text() == "mine"


def test_read_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        read_hf_folder(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        read_hf_folder(tmp_path)


def test_position_ids_buffer_is_read_other_integer_matrices_refused(tmp_path):
    """Older transformers saved ``embeddings.position_ids`` (int64, 1 x positions) beside the weights."""
    spec = SPEC.model_copy(update={"position_ids": True})
    sd = random_state(spec)
    assert sd["embeddings.position_ids"].dtype == torch.int64
    out = write_hf_folder(tmp_path / "old", sd, bert_config(spec))
    back = read_hf_folder(out)
    assert torch.equal(back.state_dict["embeddings.position_ids"], torch.arange(12)[None])
    assert detect_bert(back.state_dict, back.config) == spec
    write_hf_folder(tmp_path / "odd", {**sd, "embeddings.token_ids": torch.zeros(1, 4, dtype=torch.int64)},
                    bert_config(spec))
    with pytest.raises(CheckpointError, match="'embeddings.token_ids' has dtype int64"):
        read_hf_folder(tmp_path / "odd")
