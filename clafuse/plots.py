"""Learning-curve plots of a finetuning history (matplotlib with the Agg backend, imported lazily)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from clafuse.io.atomic import AtomicGroup, write_through


def plot_history(history: Sequence[dict], path: str | os.PathLike[str], metric: str = "accuracy",
                 group: AtomicGroup | None = None) -> None:
    """Write a PNG of train/val loss (left) and ``metric`` (right; accuracy, or cosine to the
    teacher for sentence encoders) against the epoch, atomically (when ``group`` commits, if given)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    for ax, key, title in zip(fig.subplots(1, 2), ("loss", metric), ("loss", metric)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        val = [(e, h[f"val_{key}"]) for e, h in zip(epochs, history) if h.get(f"val_{key}") is not None]
        if val:
            ax.plot([e for e, _ in val], [v for _, v in val], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_through(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), group)
