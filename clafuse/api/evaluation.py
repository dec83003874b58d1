"""``eval``: accuracy and loss of checkpoints and of their prediction ensemble."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clafuse.api.common import model_calibration
from clafuse.api.models import LoadedModel, check_fits, load_model
from clafuse.data import load_source
from clafuse.errors import DataError


def evaluate_checkpoints(paths: Sequence[str | os.PathLike], data: str,
                         archs: Sequence[str | os.PathLike | None] | None = None) -> dict[str, Any]:
    """Accuracy and loss of each checkpoint on ``data`` (test split by default), and of their
    prediction ensemble when there are several."""
    from clafuse.training import evaluate, evaluate_ensemble

    archs = list(archs) if archs else [None] * len(paths)
    models = [load_model(p, a) for p, a in zip(paths, archs)]
    if models[0].family.token_limits(models[0].spec) is not None:
        return evaluate_text(models, data)
    ds = load_source(data, split="test")
    if ds.y is None:
        raise DataError(f"data {data}: evaluation needs labels (array 'y')")
    modules = []
    for m in models:
        check_fits(m, ds.x, f"data {data}")
        modules.append(m.module())
    rows = [{"path": str(m.path), **evaluate(mod, ds)} for m, mod in zip(models, modules)]
    doc: dict[str, Any] = {"data": data, "num_samples": len(ds), "models": rows}
    if len(modules) > 1:
        doc["ensemble"] = evaluate_ensemble(modules, ds)
    return doc


def _ranks(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v)
    out[torch.argsort(v)] = torch.arange(len(v), dtype=v.dtype)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (ties broken by position)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-30))


def evaluate_text(models: Sequence[LoadedModel], data: str) -> dict[str, Any]:
    """Text encoders on the sentences of ``data`` (all of them): each model's sentence embeddings
    (mean-pooled, or its logits) against the first model's, as the mean cosine between a
    sentence's two embeddings and the Spearman correlation of all pairwise cosine similarities
    (the first model being the teacher or reference; no labels needed)."""
    x = model_calibration(models, data, 2 ** 62, 0)
    embeddings = [F.normalize(m.family.forward(m.spec, m.state_dict, x).flatten(1).float(), dim=-1) for m in models]
    first = embeddings[0]
    upper = torch.triu_indices(len(x), len(x), 1)
    ref = (first @ first.T)[upper[0], upper[1]]
    rows = []
    for m, e in zip(models, embeddings):
        if e.shape != first.shape:
            raise DataError(f"{m.path} gives {tuple(e.shape[1:])} outputs per sentence, the first model "
                            f"{tuple(first.shape[1:])}: they cannot be compared")
        sims = (e @ e.T)[upper[0], upper[1]]
        rows.append({"path": str(m.path), "cosine_to_first": round(float((e * first).sum(1).mean()), 6),
                     "similarity_spearman_to_first": round(spearman(sims, ref), 6) if len(ref) > 1 else None})
    return {"data": data, "num_samples": len(x), "kind": "text", "models": rows}
