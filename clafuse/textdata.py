"""Text calibration data for transformer encoders: token ids and attention masks.

Two sources: a text file of sentences (one per line, blank lines skipped) tokenized with the
checkpoint's own ``tokenizer.json`` through the ``tokenizers`` library, or an ``.npz`` holding
``input_ids`` and ``attention_mask`` arrays of equal (n, length) shape. Sequences are padded on
the right to the longest one (at most ``max_length`` tokens, longer ones truncated), so a mask of
ones followed by zeros marks the real tokens. Costs and statistics pool over real tokens only:
:func:`masked_mean` for sentence vectors, :func:`real_tokens` for token-level features.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clafuse.errors import DataError

DEFAULT_MAX_LENGTH = 128
_PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>")


@dataclass
class TokenBatch:
    """Token ids and 0/1 attention mask, both (n, length) int64, padded on the right."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, index: slice | torch.Tensor) -> "TokenBatch":
        """Rows ``index``, trimmed to their longest real sequence."""
        return trim(TokenBatch(self.input_ids[index], self.attention_mask[index]))

    def batches(self, size: int) -> Iterator["TokenBatch"]:
        """Consecutive batches of ``size`` rows, each trimmed to its longest real sequence."""
        for start in range(0, len(self), size):
            yield self.subset(slice(start, start + size))

    def batches_by_length(self, size: int) -> Iterator[tuple[torch.Tensor, "TokenBatch"]]:
        """Batches of ``size`` rows of similar length (longest first), each trimmed, with the row
        indices they hold: far less padding than consecutive batches when lengths vary."""
        order = torch.argsort(self.attention_mask.sum(1), descending=True, stable=True)
        for start in range(0, len(self), size):
            rows = order[start:start + size]
            yield rows, self.subset(rows)


def trim(batch: TokenBatch) -> TokenBatch:
    """Drop trailing columns that are padding in every row."""
    real = batch.attention_mask.any(0).nonzero()
    length = int(real.max()) + 1 if real.numel() else 1
    return TokenBatch(batch.input_ids[:, :length], batch.attention_mask[:, :length])


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a model folder holding one."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        candidates = [p / "tokenizer.json", *sorted(p.glob("*/tokenizer.json"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"{p}: no tokenizer.json in this folder")
        p = found
    if not p.is_file():
        raise DataError(f"{p}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # noqa: BLE001 - the Rust binding raises plain Exception on bad JSON
        raise DataError(f"{p}: not a tokenizers JSON file ({' '.join(str(exc).split())[:120]})") from exc


def _pad_id(tokenizer: Any) -> int:
    padding = tokenizer.padding
    if padding is not None:
        return int(padding["pad_id"])
    for token in _PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def read_sentences(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; DataError if there are none."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{p}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read as UTF-8 text ({' '.join(str(exc).split())[:120]})") from exc
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise DataError(f"{p}: no sentences (the file has no non-blank lines)")
    return sentences[:limit] if limit is not None else sentences


def tokenize(sentences: list[str], tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> TokenBatch:
    """Encode ``sentences`` with special tokens ([CLS] ... [SEP] for BERT), truncated to
    ``max_length`` tokens and right-padded to the longest."""
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if not sentences:
        raise DataError("no sentences to tokenize")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encodings = tokenizer.encode_batch(sentences)
    length = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), length), _pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((len(encodings), length), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, :len(encoding.ids)] = encoding.ids
        mask[row, :len(encoding.ids)] = 1
    return TokenBatch(torch.from_numpy(ids), torch.from_numpy(mask))


def load_npz_tokens(path: str | os.PathLike[str]) -> TokenBatch:
    """``input_ids`` and ``attention_mask`` from an ``.npz``; DataError unless they are integer
    (n, length) arrays of the same shape with a 0/1 mask and at least one real token per row."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as archive:
            missing = [k for k in ("input_ids", "attention_mask") if k not in archive.files]
            if missing:
                raise DataError(f"{p}: the .npz lacks {' and '.join(missing)} (has {', '.join(archive.files) or 'nothing'})")
            ids, mask = archive["input_ids"], archive["attention_mask"]
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: not a readable .npz file ({' '.join(str(exc).split())[:120]})") from exc
    for name, array in (("input_ids", ids), ("attention_mask", mask)):
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
            raise DataError(f"{p}: {name} must be a 2-d integer array, got {array.dtype} of shape {array.shape}")
    if ids.shape != mask.shape or ids.shape[0] == 0:
        raise DataError(f"{p}: input_ids {ids.shape} and attention_mask {mask.shape} must have the same non-empty shape")
    if not np.isin(mask, (0, 1)).all():
        raise DataError(f"{p}: attention_mask must hold only 0 and 1")
    if (mask.sum(1) == 0).any():
        raise DataError(f"{p}: row {int(np.argmax(mask.sum(1) == 0))} of attention_mask has no real token")
    if ids.min() < 0:
        raise DataError(f"{p}: input_ids holds negative ids")
    return TokenBatch(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)))


def load_text_calibration(path: str | os.PathLike[str], tokenizer: Any = None,
                          max_length: int = DEFAULT_MAX_LENGTH, limit: int | None = None,
                          vocab_size: int | None = None) -> TokenBatch:
    """Calibration tokens from ``path``: an ``.npz`` of ids and mask, or a sentence file tokenized
    with ``tokenizer`` (a ``tokenizers.Tokenizer`` or a path to ``tokenizer.json`` / a model
    folder). ``limit`` keeps the first rows; ``vocab_size`` checks that every id fits the model."""
    p = Path(path)
    if p.suffix.lower() == ".npz":
        batch = load_npz_tokens(p)
        if limit is not None:
            batch = trim(TokenBatch(batch.input_ids[:limit], batch.attention_mask[:limit]))
    else:
        if tokenizer is None:
            raise DataError(f"{p}: a sentence file needs the model's tokenizer.json")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        batch = tokenize(read_sentences(p, limit), tokenizer, max_length)
    if vocab_size is not None:
        top = int(batch.input_ids.max())
        if top >= vocab_size:
            raise DataError(f"{p}: token id {top} does not fit the model's vocabulary of {vocab_size}")
    return batch


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: (n, length, d) features and a 0/1 (n, length) mask -> (n, d)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def real_tokens(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The features of real tokens only, stacked: (n, length, d) -> (number of real tokens, d)."""
    return hidden[mask.bool()]


def pack_tokens(batch: TokenBatch, by_length: bool = True) -> torch.Tensor:
    """Ids and mask as one (n, 2, length) int64 tensor, the form calibration inputs take through
    alignment and fusion (rows sorted by length, longest first, with ``by_length``: consecutive
    batches then carry little padding)."""
    if by_length:
        order = torch.argsort(batch.attention_mask.sum(1), descending=True, stable=True)
        batch = TokenBatch(batch.input_ids[order], batch.attention_mask[order])
    return torch.stack([batch.input_ids, batch.attention_mask], 1).contiguous()


def unpack_tokens(x: torch.Tensor) -> TokenBatch:
    """The :class:`TokenBatch` of a packed (n, 2, length) tensor, trimmed to its longest row."""
    return trim(TokenBatch(x[:, 0].long(), x[:, 1].long()))
