"""``eval``: accuracy and loss of checkpoints and of their prediction ensemble."""

from __future__ import annotations

import os
from typing import Any, Sequence

from clafuse.api.models import check_fits, load_model
from clafuse.data import load_source
from clafuse.errors import DataError


def evaluate_checkpoints(paths: Sequence[str | os.PathLike], data: str,
                         archs: Sequence[str | os.PathLike | None] | None = None) -> dict[str, Any]:
    """Accuracy and loss of each checkpoint on ``data`` (test split by default), and of their
    prediction ensemble when there are several."""
    from clafuse.training import evaluate, evaluate_ensemble

    archs = list(archs) if archs else [None] * len(paths)
    models = [load_model(p, a) for p, a in zip(paths, archs)]
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
