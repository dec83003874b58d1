"""A tiny BERT-style WordPiece tokenizer built in the test process (no downloads)."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "fox", "##s", "##ing", "jump", ".", ",", "!"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(path: Path) -> Path:
    """Write a lower-casing WordPiece ``tokenizer.json`` with [CLS] ... [SEP] to ``path``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.save(str(path))
    return path


def token_id(token: str) -> int:
    return (SPECIAL + WORDS).index(token)
