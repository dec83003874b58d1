"""Sentence encoders (BERT family) as files: reading, writing, and students built from them.

A text model is a Hugging Face model folder (``config.json``, weights, ``tokenizer.json``) or a bare
BERT state dict (``.safetensors``, ``.pt``, ...). A bare state dict has no config: its head count
comes from ``heads``, else from a ``config`` given (e.g. the teacher's, when the widths agree), else
BERT's head size of 64; its tokenizer must be given. Students are written back in the input's
form: a folder (config updated, tokenizer files copied) for a folder, else a checkpoint file.

Students without fusion: :func:`select_layers` keeps chosen encoder layers of a deeper model
(DistilBERT's "every other layer" is ``[1, 3, 5]`` of 6), :func:`random_bert` draws a fresh one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from clafuse.arch.bert_model import BertNet, BertSpec, bert_config, bert_shapes, detect_bert, instantiate_bert
from clafuse.errors import CheckpointError, DataError
from clafuse.io.atomic import sha256_file
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint, save_checkpoint
from clafuse.io.hf_folder import HFFolder, is_hf_folder, read_hf_folder, write_hf_folder

_LAYER = "encoder.layer."
_WORD_KEY = "embeddings.word_embeddings.weight"


@dataclass
class TextModel:
    """A BERT-family encoder read from ``path``, with its config and tokenizer when known."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    spec: BertSpec
    config: dict[str, Any]
    folder: HFFolder | None = None
    tokenizer: Path | None = None

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.folder.weights if self.folder is not None else self.path)

    def net(self) -> BertNet:
        """The plain-torch network with a copy of the weights (float32, eval mode)."""
        return instantiate_bert(self.spec, {k: v.clone() for k, v in self.state_dict.items()})


def is_text_model(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a model folder, or a checkpoint file with BERT's word-embedding key (its
    keys are read, its tensors only when the file is not safetensors); nothing is validated here."""
    p = Path(path)
    if p.is_dir():
        return is_hf_folder(p)
    try:
        keys = list(open_checkpoint(p).keys())
    except (CheckpointError, OSError):
        return False
    return any(k.endswith(_WORD_KEY) for k in keys)


def load_text_model(path: str | os.PathLike[str], heads: int | None = None, config: Mapping[str, Any] | None = None,
                    tokenizer: str | os.PathLike[str] | None = None) -> TextModel | None:
    """The BERT encoder at ``path`` (folder or checkpoint file), or None when it holds another model.

    ``config`` stands in for a bare state dict's missing ``config.json`` (only its head count, eps and
    activation are used, and the head count only when it divides the width); ``tokenizer`` (a
    ``tokenizer.json`` or a folder holding one) overrides the folder's own."""
    p = Path(path)
    if p.is_dir() and is_hf_folder(p):
        folder = read_hf_folder(p)
        spec = detect_bert(folder.state_dict, folder.config, heads)
        if spec is None:
            return None
        return TextModel(p, folder.state_dict, spec, dict(folder.config), folder,
                         Path(tokenizer) if tokenizer is not None else folder.tokenizer_json)
    state_dict = load_checkpoint(p)
    base = dict(config or {})
    words = next((v for k, v in state_dict.items() if k.endswith(_WORD_KEY)), None)
    if heads is None and "num_attention_heads" in base and words is not None and words.ndim == 2 \
            and int(words.shape[1]) % int(base["num_attention_heads"]):
        base.pop("num_attention_heads")
    spec = detect_bert(state_dict, base, heads)
    if spec is None:
        return None
    return TextModel(p, state_dict, spec, bert_config(spec, base or None), None,
                     Path(tokenizer) if tokenizer is not None else None)


def require_text_model(path: str | os.PathLike[str], what: str, **kwargs: Any) -> TextModel:
    """:func:`load_text_model`, raising DataError when ``path`` is not a BERT encoder."""
    model = load_text_model(path, **kwargs)
    if model is None:
        raise DataError(f"{what} {path} is not a BERT-family text encoder")
    return model


def save_text_model(out: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], spec: BertSpec,
                    like: TextModel, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` in ``like``'s form: a model folder (``config.json`` from ``like``'s with
    ``spec``'s sizes, tokenizer and sentence-transformers files copied) when ``like`` came from one,
    else a checkpoint file with ``metadata``. Both are written atomically."""
    if like.folder is not None:
        return write_hf_folder(out, state_dict, bert_config(spec, like.config), source=like.folder)
    save_checkpoint(out, dict(state_dict), dict(metadata or {}))
    return Path(out)


def select_layers(spec: BertSpec, state_dict: Mapping[str, torch.Tensor],
                  layers: Sequence[int]) -> tuple[BertSpec, dict[str, torch.Tensor]]:
    """A BERT made of encoder layers ``layers`` (in the order given) of ``state_dict``, renumbered
    from 0; embeddings, pooler and classifier kept. Tensors are shared, not copied."""
    if not layers:
        raise DataError("select at least one layer")
    bad = [i for i in layers if not 0 <= i < spec.layers]
    if bad:
        raise DataError(f"layer {bad[0]} does not exist (the model has layers 0..{spec.layers - 1})")
    inner = f"{spec.prefix}{_LAYER}"
    out: dict[str, torch.Tensor] = {k: v for k, v in state_dict.items() if not k.startswith(inner)}
    for new, old in enumerate(layers):
        source = f"{inner}{old}."
        for key, value in state_dict.items():
            if key.startswith(source):
                out[f"{inner}{new}.{key[len(source):]}"] = value
    new_spec = spec.model_copy(update={"layers": len(layers)})
    order = bert_shapes(new_spec)
    return new_spec, {k: out[k] for k in order}


def random_bert(spec: BertSpec, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Fresh weights for ``spec`` as BERT initialises them: Linear and embedding weights normal with
    ``std``, biases zero, LayerNorm gains one and biases zero; ``position_ids`` as usual."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in bert_shapes(spec).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1])[None]
        elif "LayerNorm.weight" in key:
            state[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            state[key] = torch.zeros(shape)
        else:
            state[key] = torch.randn(shape, generator=gen) * std
    return state
