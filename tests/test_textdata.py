"""Text calibration data: sentence files tokenized with tokenizer.json, .npz token files, pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clafuse.errors import DataError
from clafuse.textdata import (TokenBatch, load_text_calibration, load_tokenizer, masked_mean, read_sentences,
                              real_tokens, tokenize, trim)
from tests.text_helpers import token_id, write_tokenizer

pytest.importorskip("tokenizers")


@pytest.fixture()
def tokenizer_file(tmp_path):
    return write_tokenizer(tmp_path / "tokenizer.json")


def test_sentence_file_is_tokenized_padded_and_masked(tmp_path, tokenizer_file):
    text = tmp_path / "sents.txt"
    text.write_text("The cat sat.\n\n   \nA dog jumps, the fox running!\nzebra\n", encoding="utf-8")
    batch = load_text_calibration(text, tokenizer_file, vocab_size=20)
    cls, sep, pad, unk = (token_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
    the, cat, sat, dot = (token_id(t) for t in ("the", "cat", "sat", "."))
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64
    assert batch.input_ids.shape == (3, 11)  # blank lines skipped; the longest row sets the width
    assert batch.input_ids[0].tolist() == [cls, the, cat, sat, dot, sep] + [pad] * 5
    assert batch.input_ids[1].tolist() == [cls] + [token_id(t) for t in ("a", "dog", "jump", "##s", ",", "the", "fox")] \
        + [unk, token_id("!"), sep]  # "running": no word piece "run", so the whole word is [UNK]
    assert batch.input_ids[2, :3].tolist() == [cls, unk, sep]
    assert batch.attention_mask.tolist() == [[1] * 6 + [0] * 5, [1] * 11, [1] * 3 + [0] * 8]


def test_truncation_limit_and_vocab_check(tmp_path, tokenizer_file):
    text = tmp_path / "sents.txt"
    text.write_text("the cat sat on the mat\nthe dog\nthe fox\n", encoding="utf-8")
    batch = load_text_calibration(text, load_tokenizer(tmp_path), max_length=5, limit=2)
    assert batch.input_ids.shape == (2, 5)
    assert batch.input_ids[0, -1].item() == token_id("[SEP]")  # truncation keeps the special tokens
    with pytest.raises(DataError, match="does not fit the model's vocabulary of 10"):
        load_text_calibration(text, tokenizer_file, vocab_size=10)
    with pytest.raises(DataError, match="needs the model's tokenizer.json"):
        load_text_calibration(text)
    with pytest.raises(DataError, match="at least 2"):
        tokenize(["the cat"], load_tokenizer(tokenizer_file), max_length=1)


def test_npz_tokens_and_their_errors(tmp_path):
    ids = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]], dtype=np.int32)
    mask = (ids > 0).astype(np.int8)
    good = tmp_path / "tokens.npz"
    np.savez(good, input_ids=ids, attention_mask=mask)
    batch = load_text_calibration(good, limit=1)
    assert batch.input_ids.tolist() == [[2, 5, 6, 3]] and batch.attention_mask.dtype == torch.int64
    cases = {
        "lacks attention_mask": dict(input_ids=ids),
        "must have the same": dict(input_ids=ids, attention_mask=mask[:, :3]),
        "only 0 and 1": dict(input_ids=ids, attention_mask=mask * 2),
        "has no real token": dict(input_ids=ids, attention_mask=np.zeros_like(mask)),
        "2-d integer": dict(input_ids=ids.astype(np.float32), attention_mask=mask),
        "negative ids": dict(input_ids=-ids - 1, attention_mask=mask),
    }
    for message, arrays in cases.items():
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        with pytest.raises(DataError, match=message):
            load_text_calibration(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_text_calibration(tmp_path / "junk.npz")


def test_read_and_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_sentences(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no sentences"):
        read_sentences(tmp_path / "blank.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_sentences(tmp_path / "latin.txt")
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_pooling_counts_real_tokens_only():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(hidden, mask).tolist() == [[1.0, 2.0], [6.0, 7.0]]
    assert real_tokens(hidden, mask).tolist() == [[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]
    batch = TokenBatch(torch.tensor([[2, 5, 0, 0], [2, 5, 6, 0], [2, 0, 0, 0]]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]))
    assert trim(batch).input_ids.shape == (3, 3)
    assert [b.input_ids.shape[1] for b in batch.batches(2)] == [3, 1]


def test_batches_by_length_cover_every_row_once_with_little_padding():
    lengths = [3, 7, 1, 5, 7, 2]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    batch = TokenBatch(torch.arange(42).reshape(6, 7) * mask, mask)
    seen = []
    for rows, sub in batch.batches_by_length(2):
        seen += rows.tolist()
        assert sub.input_ids.shape[1] == max(lengths[r] for r in rows)
        assert torch.equal(sub.input_ids, batch.input_ids[rows, :sub.input_ids.shape[1]])
    assert seen == [1, 4, 3, 0, 5, 2]
