"""Report figures as PNG bytes: each alignment group's cost heat-map with the chosen path, and the
fused network's per-layer similarity to its parents (matplotlib's Agg canvas, without pyplot's
global state; PNGs carry no software tag, so the same inputs give the same bytes)."""

from __future__ import annotations

import io
from typing import Any

from clafuse.reporting.mapping import GroupView, PairView

_ANNOTATE_MAX_CELLS = 160


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def cost_heatmap(view: PairView, group: GroupView) -> bytes:
    """Shallow layers (rows) against deep layers (columns), brighter = lower cost; the chosen
    mapping is boxed and joined by a line, unmatched deep layers are labelled with their fate."""
    import numpy as np

    cost = np.asarray(group.cost, dtype=np.float64)
    n, m = cost.shape
    fig = _figure(min(2.6 + 0.75 * m, 16.0), min(1.9 + 0.55 * n, 12.0))
    ax = fig.add_subplot()
    image = ax.imshow(cost, cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label="layer cost", shrink=0.9)
    matched = set(group.mapping)
    ax.set_xticks(range(m), [name if j in matched else f"{name}\n({view.fate})" for j, name in
                             enumerate(group.deep_layers)], rotation=45 if m > 8 else 0, fontsize=8)
    ax.set_yticks(range(n), group.shallow_layers, fontsize=8)
    ax.set_xlabel(f"{view.deep_letter} (deep) layers")
    ax.set_ylabel(f"{view.shallow_letter} (shallow) layers")
    ax.set_title(f"group {group.name}: {view.shallow_letter} into {view.deep_letter}, total cost "
                 f"{group.total_cost:.4f}", fontsize=10)
    ax.plot(group.mapping, range(n), color="#e8112d", linewidth=2, marker="o", markersize=5)
    for i, j in enumerate(group.mapping):
        ax.add_patch(_box(j, i))
    if n * m <= _ANNOTATE_MAX_CELLS:
        middle = (cost.min() + cost.max()) / 2
        for i in range(n):
            for j in range(m):
                ax.text(j, i + 0.3, f"{cost[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if cost[i, j] > middle else "black")
    return _png(fig)


def _box(x: float, y: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="#e8112d", linewidth=2)


def similarity_chart(rows: list[dict[str, Any]], models: list[str]) -> bytes:
    """Grouped bars: per fused layer, linear CKA with each parent (missing values left out)."""
    count = len(rows)
    fig = _figure(min(3.0 + 0.6 * count * len(models), 16.0), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(models), 1)
    for k, name in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i, row in enumerate(rows)
              if row["similarity"].get(name) is not None]
        ys = [row["similarity"][name] for row in rows if row["similarity"].get(name) is not None]
        ax.bar(xs, ys, width=width, label=f"fused vs {name}")
    ax.set_xticks(range(count), [row["layer"] for row in rows], rotation=45 if count > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("linear CKA")
    ax.set_title("similarity of the fused network's layers to each parent", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
