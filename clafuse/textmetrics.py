"""Label-free quality measures of a sentence encoder, against a teacher and on a built retrieval task.

No labelled sentence-similarity benchmark ships offline, so an encoder is measured by

- ``cosine``: mean cosine between its and the teacher's embedding of each sentence (the two must
  have the same width);
- ``spearman``: Spearman correlation between the two models' cosine similarities of all sentence
  pairs (width-free: it asks whether the student ranks pairs as the teacher does);
- retrieval built from the text itself: every text is cut into its first and second half (by
  words, :func:`split_halves`); each first half must find its own second half among all second
  halves by cosine: ``recall@1``, ``recall@5`` and ``mrr`` (mean reciprocal rank of the partner).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clafuse.errors import DataError


def cosine_agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean cosine between matching rows of two (n, d) embedding matrices."""
    if student.shape != teacher.shape:
        raise DataError(f"cannot compare embeddings of shape {list(student.shape)} with {list(teacher.shape)}")
    return float(F.cosine_similarity(student.double(), teacher.double(), dim=-1).mean())


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a 1-d tensor, ties sharing their mean rank."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    if int(counts.max()) > 1:
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors of equal length (ties get mean ranks)."""
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise DataError("Spearman correlation needs two 1-d tensors of the same length, at least 2")
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra @ rb) / denom) if denom > 0 else 0.0


def pair_similarities(emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every unordered pair of rows (i < j), as a 1-d tensor."""
    unit = F.normalize(emb.double(), dim=-1)
    sims = unit @ unit.T
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    return sims[i, j]


def similarity_spearman(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Spearman correlation between the student's and the teacher's pairwise cosine similarities
    of the same sentences (widths may differ)."""
    if len(student) != len(teacher) or len(student) < 3:
        raise DataError("pairwise similarities need the same sentences, at least 3")
    return spearman(pair_similarities(student), pair_similarities(teacher))


def split_halves(texts: Sequence[str], min_words: int = 4) -> tuple[list[str], list[str]]:
    """Each text of at least ``min_words`` words cut at its middle word into (first, second) half;
    shorter texts are left out. The i-th first half's partner is the i-th second half."""
    if min_words < 2:
        raise DataError("min_words must be at least 2")
    first, second = [], []
    for text in texts:
        words = text.split()
        if len(words) >= min_words:
            middle = len(words) // 2
            first.append(" ".join(words[:middle]))
            second.append(" ".join(words[middle:]))
    return first, second


def retrieval(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """Query i's partner is document i: ``recall@1``, ``recall@5`` (fraction of queries whose partner
    is among the 1 / 5 most cosine-similar documents) and ``mrr`` (mean of 1 / the partner's rank).
    A tie with the partner counts against it."""
    if queries.shape != documents.shape or len(queries) < 2:
        raise DataError("retrieval needs as many queries as documents, at least 2, of the same width")
    sims = F.normalize(queries.double(), dim=-1) @ F.normalize(documents.double(), dim=-1).T
    partner = sims.diagonal()
    rank = (sims >= partner[:, None]).sum(1).double()  # 1 = the partner is the best match
    return {"recall@1": float((rank <= 1).double().mean()), "recall@5": float((rank <= 5).double().mean()),
            "mrr": float((1.0 / rank).mean()), "candidates": int(len(documents))}


def encoder_metrics(embeddings: torch.Tensor, queries: torch.Tensor, documents: torch.Tensor,
                    teacher: torch.Tensor | None = None) -> dict[str, float]:
    """All measures of one encoder: retrieval from its ``queries``/``documents`` embeddings and, with the
    ``teacher``'s embeddings of the same sentences as ``embeddings``, ``cosine`` (when the widths agree,
    else None) and ``spearman``."""
    out: dict[str, float] = {}
    if teacher is not None:
        out["cosine"] = cosine_agreement(embeddings, teacher) if embeddings.shape == teacher.shape else None
        out["spearman"] = similarity_spearman(embeddings, teacher)
    out.update(retrieval(queries, documents))
    return out
