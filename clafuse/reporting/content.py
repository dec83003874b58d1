"""What a report holds, computed once by :mod:`clafuse.reporting.build` and laid out by
:mod:`clafuse.reporting.html` (and printed by ``--json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clafuse.align.mapfile import MapFile
from clafuse.reporting.mapping import PairView, letter
from clafuse.reporting.stats import PlanStats


@dataclass
class ReportFigure:
    """One figure: a file-name stem (for ``--png-dir``), a caption and the PNG bytes."""

    name: str
    caption: str
    png: bytes


@dataclass
class AlignmentSection:
    view: PairView
    words: dict[str, str]
    changes: list[str]
    heatmaps: list[ReportFigure]
    transport: list[PlanStats] | None


@dataclass
class FusedSection:
    path: str
    similarity: list[dict[str, Any]] | None
    chart: ReportFigure | None
    accuracy: list[dict[str, Any]] | None
    data: str | None


@dataclass
class Report:
    """Everything the page shows, computed once; :mod:`clafuse.reporting.html` only lays it out."""

    map_path: str
    doc: MapFile
    target: int
    calibration: str | None
    alignments: list[AlignmentSection]
    fused: FusedSection | None = None
    notes: list[str] = field(default_factory=list)

    def figures(self) -> list[ReportFigure]:
        out = [f for a in self.alignments for f in a.heatmaps]
        if self.fused is not None and self.fused.chart is not None:
            out.append(self.fused.chart)
        return out

    def summary(self) -> dict[str, Any]:
        """The report as plain data (what ``--json`` prints)."""
        return {
            "map": self.map_path,
            "target": letter(self.target),
            "calibration": self.calibration,
            "alignments": [{
                "shallow": a.view.shallow_letter, "deep": a.view.deep_letter,
                "mapping": a.words, "changes": a.changes,
                "transport": None if a.transport is None else [s.as_dict() for s in a.transport],
            } for a in self.alignments],
            "fused": None if self.fused is None else {
                "path": self.fused.path, "similarity": self.fused.similarity, "accuracy": self.fused.accuracy,
                "data": self.fused.data},
            "notes": self.notes,
        }
