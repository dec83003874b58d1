"""Hugging Face model folders: ``config.json``, weights and tokenizer files, read and written.

A folder holds ``config.json`` and one of ``model.safetensors``, ``model.safetensors.index.json``
(shards), ``pytorch_model.bin`` (read with ``weights_only``). Sentence-transformers folders are
understood: when ``modules.json`` places the Transformer module in a subfolder (older releases use
``0_Transformer/``), the model is read from there, and the folder's other modules (pooling,
normalize) are copied along on writing.

Writing is atomic for the folder as a whole: everything goes into a hidden temp folder beside the
target, which is renamed into place once complete. An existing model folder under the target name
is replaced only then; any other existing folder or file is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from clafuse.errors import CheckpointError, ClafuseError
from clafuse.io.atomic import _fsync_dir
from clafuse.io.checkpoint import load_checkpoint, open_checkpoint, save_checkpoint

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_POOLING_DIM_KEY = "word_embedding_dimension"


@dataclass
class HFFolder:
    """A model folder as read: where the model lives, its config, weights and the files to carry along."""

    root: Path
    """The folder given (for sentence-transformers, the one holding ``modules.json``)."""
    model_dir: Path
    """The folder holding ``config.json`` and the weights (``root`` or e.g. ``root/0_Transformer``)."""
    config: dict[str, Any]
    state_dict: Mapping[str, torch.Tensor]
    weights: Path
    extra_files: list[Path] = field(default_factory=list)
    """Tokenizer and sentence-transformers files and folders, relative to ``root``."""

    @property
    def tokenizer_json(self) -> Path | None:
        """``tokenizer.json`` of the model, if it has one."""
        for folder in (self.model_dir, self.root):
            if (folder / "tokenizer.json").is_file():
                return folder / "tokenizer.json"
        return None


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder that looks like a Hugging Face model (``config.json`` somewhere
    :func:`read_hf_folder` would look)."""
    p = Path(path)
    return p.is_dir() and ((p / "config.json").is_file() or _st_model_dir(p) is not None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({' '.join(str(exc).split())[:120]})") from exc


def _st_model_dir(root: Path) -> Path | None:
    """The Transformer module's folder of a sentence-transformers model, if it has a separate one."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file)
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_file}: expected a list of modules")
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith("models.Transformer"):
            sub = root / str(module.get("path", ""))
            return sub if sub != root and (sub / "config.json").is_file() else None
    return None


def _weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def _extras(root: Path, model_dir: Path) -> list[Path]:
    found: list[Path] = []
    for folder in dict.fromkeys((model_dir, root)):
        for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES:
            if (folder / name).is_file():
                found.append((folder / name).relative_to(root))
    modules_file = root / "modules.json"
    if modules_file.is_file():
        for module in _read_json(modules_file):
            sub = root / str(module.get("path", "")) if isinstance(module, dict) else root
            if sub != root and sub != model_dir and sub.is_dir():
                found.append(sub.relative_to(root))
    return found


def read_hf_folder(path: str | os.PathLike[str], lazy: bool = False) -> HFFolder:
    """Read a Hugging Face (or sentence-transformers) model folder; CheckpointError if it is not one.
    With ``lazy``, safetensors weights are only opened (read tensor by tensor when used)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder")
    model_dir = _st_model_dir(root) or root
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{root}: not a Hugging Face model folder (no config.json)")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    weights = _weights_in(model_dir)
    return HFFolder(root=root, model_dir=model_dir, config=config,
                    state_dict=open_checkpoint(weights) if lazy else load_checkpoint(weights),
                    weights=weights, extra_files=_extras(root, model_dir))


def _copy_extras(source: HFFolder, dest_root: Path, hidden_size: int | None) -> None:
    for rel in source.extra_files:
        src, dst = source.root / rel, dest_root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
            pooling = dst / "config.json"
            if hidden_size is not None and pooling.is_file():
                doc = _read_json(pooling)
                if isinstance(doc, dict) and doc.get(_POOLING_DIM_KEY, hidden_size) != hidden_size:
                    doc[_POOLING_DIM_KEY] = hidden_size
                    pooling.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(src, dst)


def refuse_non_model(target: Path) -> None:
    """Refuse to write a model folder over a file or over a folder holding anything but a model."""
    if target.is_file() or target.is_symlink():
        raise ClafuseError(f"cannot write model folder {target}: a file of that name exists")
    if target.is_dir() and any(target.iterdir()) and not is_hf_folder(target):
        raise ClafuseError(f"cannot write model folder {target}: it exists and is not a model folder")


def write_hf_folder(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                    config: Mapping[str, Any], source: HFFolder | None = None,
                    max_shard_size: str | int | None = None) -> Path:
    """Write a model folder atomically: ``config.json``, ``model.safetensors`` (or shards with an
    index above ``max_shard_size``) and, from ``source``, its tokenizer and sentence-transformers
    files in the same relative places. A sentence-transformers pooling config gets the new
    ``hidden_size``. An existing model folder at ``path`` is replaced once the new one is complete."""
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        raise ClafuseError(f"cannot write {target}: directory {parent} does not exist")
    refuse_non_model(target)
    tmp = parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        model_dir = tmp / source.model_dir.relative_to(source.root) if source is not None else tmp
        model_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model_dir / "model.safetensors", state_dict, {"format": "pt"}, max_shard_size)
        (model_dir / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n",
                                                encoding="utf-8")
        if source is not None:
            hidden = config.get("hidden_size")
            _copy_extras(source, tmp, int(hidden) if isinstance(hidden, int) else None)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``; an old folder there is moved aside first
    and deleted only after the rename succeeded."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
