"""``eval``: accuracy and loss of checkpoints and of their prediction ensemble."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clafuse import progress
from clafuse.api.common import load_data, model_calibration, model_index, model_letter
from clafuse.api.models import LoadedModel, check_fits, load_model
from clafuse.data.normalize import Normalization
from clafuse.errors import ClafuseError, DataError
from clafuse.io.checkpoint import read_metadata
from clafuse.io.keys import KeyMap
from clafuse.textmetrics import spearman


def is_fused(model: LoadedModel) -> bool:
    """Whether ``model`` is a ``clafuse fuse`` output: its metadata names the map it came from
    (safetensors outputs carry it; torch files have no metadata)."""
    try:
        return "map_sha256" in read_metadata(model.weights_path)
    except ClafuseError:
        return False


def ensemble_members(models: Sequence[LoadedModel], ensemble_of: Sequence[str | int] | None) -> list[int]:
    """Indices of the models the ensemble averages: those named by ``ensemble_of`` (letters A, B, ...
    in the order given, 0-based indices or paths), else every model that is not a fused output."""
    if ensemble_of is not None:
        paths = [str(m.path) for m in models]
        depths = [m.depth for m in models]
        chosen = sorted({model_index(c.strip() if isinstance(c, str) else c, paths, depths, "--ensemble-of")
                         for c in ensemble_of})
        if len(chosen) < 2:
            raise ClafuseError(f"--ensemble-of needs at least two different models, got {list(ensemble_of)}")
        return chosen
    return [i for i, m in enumerate(models) if not is_fused(m)]


def evaluate_checkpoints(paths: Sequence[str | os.PathLike], data: str,
                         archs: Sequence[str | os.PathLike | None] | None = None,
                         keys: KeyMap | Sequence[KeyMap | None] | None = None,
                         normalize: Normalization | str | None = None,
                         ensemble_of: Sequence[str | int] | None = None) -> dict[str, Any]:
    """Accuracy and loss of each checkpoint on ``data`` (test split by default, standardised by
    ``normalize``), and of the prediction ensemble of the parents: the models ``ensemble_of``
    names, else all but fused outputs (an ensemble row needs at least two). ``keys`` is the key
    handling of every checkpoint, or one per checkpoint."""
    from clafuse.training import evaluate, evaluate_ensemble

    archs = list(archs) if archs else [None] * len(paths)
    per_model = list(keys) if isinstance(keys, (list, tuple)) else [keys] * len(paths)
    with progress.step(f"reading {len(paths)} checkpoint{'s' if len(paths) > 1 else ''}"):
        models = [load_model(p, a, keys=k) for p, a, k in zip(paths, archs, per_model)]
    if models[0].family.token_limits(models[0].spec) is not None:
        return evaluate_text(models, data)
    members = ensemble_members(models, ensemble_of)
    ds = load_data(data, "test", normalize)
    if ds.y is None:
        raise DataError(f"data {data}: evaluation needs labels (array 'y')")
    modules = []
    for m in models:
        check_fits(m, ds.x, f"data {data}")
        modules.append(m.module())
    rows = []
    with progress.step(f"evaluating on {len(ds)} samples"):
        for k, (m, mod) in enumerate(zip(models, modules)):
            rows.append({"path": str(m.path), **evaluate(mod, ds)})
            progress.advance(k + 1, len(models), str(m.path))
        doc: dict[str, Any] = {"data": data, "num_samples": len(ds), "models": rows}
        if len(members) > 1:
            doc["ensemble"] = evaluate_ensemble([modules[i] for i in members], ds)
            doc["ensemble_of"] = [model_letter(i) for i in members]
    return doc


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
