"""Distilling sentence encoders: match a teacher's mean-pooled sentence embeddings.

The student is trained through :class:`SentenceEncoder` (mean of the last hidden state over real
tokens, as sentence-transformers pools). The targets are the teacher's unnormalised mean-pooled
embeddings of the same sentences, each tokenized with its own model's tokenizer; they are computed
once per sentence when first needed (or given precomputed) and kept. Loss ``cosine`` is
``1 - cos(student, teacher)`` averaged over the batch, ``mse`` the mean squared difference of the
embeddings; the metric reported and selected on is the mean cosine to the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clafuse import distributed as ddp
from clafuse.errors import DataError
from clafuse.options import SentenceLoss, check_choice
from clafuse.textdata import TokenBatch, masked_mean
from clafuse.training.config import FinetuneConfig
from clafuse.training.objectives import Objective

class SentenceEncoder(nn.Module):
    """Wraps an encoder with ``encode(input_ids, attention_mask)`` (e.g. a ``BertNet``) so that its
    forward is the mean-pooled sentence embedding; the wrapped model's state dict keys gain an
    ``encoder.`` prefix, so save ``wrapper.encoder``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(self.encoder.encode(input_ids, attention_mask), attention_mask)


@torch.no_grad()
def pooled_embeddings(encoder: nn.Module, tokens: TokenBatch, batch_size: int = 64) -> torch.Tensor:
    """Unnormalised mean-pooled embeddings (float32, CPU) of every row of ``tokens``, batched by
    length; ``encoder`` has ``encode(input_ids, attention_mask)``. Its train/eval mode is kept."""
    was_training = encoder.training
    encoder.eval()
    device = next(iter(encoder.parameters())).device
    try:
        out: torch.Tensor | None = None
        for rows, batch in tokens.batches_by_length(batch_size):
            mask = batch.attention_mask.to(device)
            emb = masked_mean(encoder.encode(batch.input_ids.to(device), mask), mask).float().cpu()
            if out is None:
                out = torch.zeros(len(tokens), emb.shape[1])
            out[rows] = emb
    finally:
        encoder.train(was_training)
    if out is None:
        raise DataError("no sentences to embed")
    return out


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, loss: SentenceLoss) -> torch.Tensor:
    """Mean ``1 - cosine`` or mean squared error between rows of two (n, d) embedding matrices."""
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher)


class _Targets:
    """A teacher's embeddings of a fixed set of sentences, computed row by row when first asked for."""

    def __init__(self, teacher: nn.Module | None, tokens: TokenBatch | None, given: torch.Tensor | None) -> None:
        self.teacher, self.tokens = teacher, tokens
        self.values = given
        self.known = torch.ones(len(given), dtype=torch.bool) if given is not None else None

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        if self.known is None or not bool(self.known[index].all()):
            assert self.teacher is not None and self.tokens is not None
            missing = index if self.known is None else index[~self.known[index]]
            emb = pooled_embeddings(self.teacher, self.tokens.subset(missing))
            if self.values is None:
                self.values = torch.zeros(len(self.tokens), emb.shape[1])
                self.known = torch.zeros(len(self.tokens), dtype=torch.bool)
            self.values[missing] = emb
            self.known[missing] = True
        return self.values[index]


class SentenceDistillation(Objective):
    """Distil ``teacher``'s sentence embeddings into the student (trained as a :class:`SentenceEncoder`).

    ``train``/``val`` are the sentences tokenized for the student; ``teacher_train``/``teacher_val``
    the same sentences tokenized for the teacher (default: the student's tokens, for a shared
    vocabulary). ``targets``/``val_targets`` may give the teacher's embeddings precomputed (then the
    teacher is not run on those sentences)."""

    metric = "cosine"

    def __init__(self, train: TokenBatch, val: TokenBatch | None, loss: SentenceLoss = "cosine", *,
                 teacher: nn.Module | None = None, teacher_train: TokenBatch | None = None,
                 teacher_val: TokenBatch | None = None, targets: torch.Tensor | None = None,
                 val_targets: torch.Tensor | None = None, name: str = "training sentences") -> None:
        check_choice("--loss", loss, SentenceLoss, error=DataError)
        if teacher is None and (targets is None or (val is not None and val_targets is None)):
            raise DataError("sentence distillation needs a teacher or its embeddings")
        for tokens, teacher_tokens, what in ((train, teacher_train, "training"), (val, teacher_val, "validation")):
            if tokens is not None and teacher_tokens is not None and len(teacher_tokens) != len(tokens):
                raise DataError(f"the teacher's {what} tokens have {len(teacher_tokens)} rows, the student's {len(tokens)}")
        self.train, self.val, self.loss, self.name, self.distill = train, val, loss, name, True
        self.targets = _Targets(teacher, teacher_train if teacher_train is not None else train, targets)
        self.val_targets = (_Targets(teacher, teacher_val if teacher_val is not None else val, val_targets)
                            if val is not None else None)

    def __len__(self) -> int:
        return len(self.train)

    def has_val(self) -> bool:
        return self.val is not None

    def check(self, config: FinetuneConfig) -> None:
        super().check(config)
        if config.augment != "none":
            raise DataError("--augment applies to images, not to sentences")

    def batch_loss(self, net: nn.Module, local: torch.Tensor, rows: slice, total: int,
                   gen: torch.Generator, autocast: torch.autocast) -> tuple[torch.Tensor, float]:
        if len(local) == 0:
            batch = self.train.subset(slice(0, 1))
            with autocast:
                out = net(batch.input_ids, batch.attention_mask)
            return out.sum() * 0.0, 0.0
        batch = self.train.subset(local)
        target = self.targets.rows(local)
        device = next(iter(net.parameters())).device
        with ddp.same_on_every_rank():
            with autocast:
                student = net(batch.input_ids.to(device), batch.attention_mask.to(device))
            student = student.float()
            if student.shape[1] != target.shape[1]:
                raise DataError(f"the student's embeddings have {student.shape[1]} dimensions but the "
                                f"teacher's {target.shape[1]}")
        target = target.to(device)
        loss = embedding_loss(student, target, self.loss)
        cosine = float(F.cosine_similarity(student.detach(), target, dim=-1).sum())
        return loss, cosine

    def validate(self, model: nn.Module, rank: int, world: int) -> dict[str, float]:
        assert self.val is not None and self.val_targets is not None
        student = pooled_embeddings(_encoder_of(model), self.val)
        target = self.val_targets.rows(torch.arange(len(self.val)))
        if student.shape[1] != target.shape[1]:
            raise DataError(f"the student's embeddings have {student.shape[1]} dimensions but the "
                            f"teacher's {target.shape[1]}")
        return {"loss": float(embedding_loss(student, target, self.loss)),
                "cosine": float(F.cosine_similarity(student, target, dim=-1).mean())}


def _encoder_of(model: nn.Module) -> nn.Module:
    return model.encoder if isinstance(model, SentenceEncoder) else model
