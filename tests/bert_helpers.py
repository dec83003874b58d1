"""Tiny random BERT checkpoints and model folders for the bert family's tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from clafuse.arch.bert_model import BertSpec, bert_config, build_bert
from clafuse.io.hf_folder import write_hf_folder
from text_helpers import SPECIAL, WORDS, write_tokenizer

SENTENCES = ["the cat sat on the mat .", "a dog ran !", "the fox jumps , the dog sat .", "cats sat on a mat",
             "the dog ran on the mat", "a fox , a cat , a dog .", "jumping cats !", "the mat sat on the cat",
             "a dog jumps on a fox .", "the the the", "fox", "on a mat , the fox ran ."]


def tiny_spec(layers: int = 3, **changes) -> BertSpec:
    fields = dict(layers=layers, hidden=16, heads=4, intermediate=24, vocab=len(SPECIAL + WORDS), max_positions=24,
                  type_vocab=2, pooler=True)
    return BertSpec(**{**fields, **changes})


def random_bert(spec: BertSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights, LayerNorms included (so that permuting their units shows)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in build_bert(spec).state_dict().items()}
    for key, value in sd.items():
        if value.is_floating_point():
            base = 1.0 if key.endswith("LayerNorm.weight") else 0.0
            sd[key] = base + 0.3 * torch.randn(value.shape, generator=g)
    return sd


def write_folder(path: Path, spec: BertSpec, sd: dict[str, torch.Tensor]) -> Path:
    """A model folder: config.json, model.safetensors and the tiny tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    write_hf_folder(path, sd, bert_config(spec))
    write_tokenizer(path / "tokenizer.json")
    return path


def write_sentences(path: Path) -> Path:
    path.write_text("\n".join(SENTENCES * 2) + "\n", encoding="utf-8")
    return path
