"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG data URLs, no
scripts, and a Content-Security-Policy that forbids loading anything from elsewhere."""

from __future__ import annotations

import base64
from html import escape

from clafuse.reporting.content import AlignmentSection, FusedSection, Report, ReportFigure
from clafuse.reporting.mapping import letter

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f2f2f2; }
code, .mapping { font-family: ui-monospace, monospace; }
.mapping { background: #f6f8fa; border-left: 4px solid #e8112d; padding: .4em .7em; }
.changes li { margin: .2em 0; }
.note { color: #6a4b00; background: #fff6d6; padding: .4em .7em; }
figure { margin: .8em 0; } figcaption { font-size: .85em; color: #555; }
img { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; } dt { font-weight: 600; }
"""


def render_page(report: Report) -> str:
    """The whole page as a string."""
    doc = report.doc
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>clafuse report: {escape(report.map_path)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>clafuse report: {escape(report.map_path)}</h1>",
        "<dl>",
        _dt("tool", doc.tool),
        _dt("layer cost", doc.settings.metric),
        _dt("pins", f"first {'on' if doc.settings.pin_first else 'off'}, last {'on' if doc.settings.pin_last else 'off'}"),
        _dt("calibration data", report.calibration or "none"),
        _dt("fusion target", f"{letter(report.target)} ({doc.models[report.target].path})"),
        "</dl>",
        *(f'<p class="note">{escape(note)}</p>' for note in report.notes),
        "<h2>Models</h2>",
        _table(["model", "path", "family", "hidden layers", "role"],
               [[letter(i), m.path, m.family, str(sum(len(g.layers) for g in m.groups)), m.role]
                for i, m in enumerate(doc.models)]),
    ]
    for section in report.alignments:
        parts += _alignment(section)
    if report.fused is not None:
        parts += _fused(report.fused)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _alignment(section: AlignmentSection) -> list[str]:
    view = section.view
    parts = [f'<h2 id="align-{escape(view.shallow_letter)}-{escape(view.deep_letter)}">Alignment: '
             f"{escape(view.shallow_letter)} into {escape(view.deep_letter)}</h2>"]
    for group, figure in zip(view.groups, section.heatmaps):
        parts += [
            f"<h3>group {escape(group.name)} (total cost {group.total_cost:.4f})</h3>",
            f'<p class="mapping">{escape(section.words[group.name])}</p>',
            _figure(figure, f"cost heat-map of group {group.name}: {section.words[group.name]}"),
        ]
    parts.append("<h3>Inserted and dropped layers</h3>")
    if section.changes:
        parts.append('<ul class="changes">' + "".join(f"<li>{escape(c)}</li>" for c in section.changes) + "</ul>")
    else:
        parts.append("<p>none: every layer is matched</p>")
    parts.append("<h3>Neuron transport per matched layer pair</h3>")
    if section.transport is None:
        parts.append('<p class="note">not computed: no calibration data</p>')
    else:
        parts += [
            "<p>sharpness: share of each neuron's mass on its main partner (1 = a permutation); cost ratio: "
            "matched cost over the cost of a random pairing (lower is a better match).</p>",
            _table(["group", "from", "onto", "neurons", "sharpness", "non-zeros", "matched cost", "random cost",
                    "cost ratio"],
                   [[s.group, s.source, s.target, f"{s.n_source} x {s.n_target}", f"{s.sharpness:.3f}",
                     str(s.nonzeros), f"{s.matched_cost:.4f}", f"{s.mean_cost:.4f}", f"{s.cost_ratio:.3f}"]
                    for s in section.transport], numeric_from=3),
        ]
    return parts


def _fused(fused: FusedSection) -> list[str]:
    parts = [f"<h2>Fused network: {escape(fused.path)}</h2>"]
    if fused.similarity is None:
        parts.append('<p class="note">layer similarity not computed: no calibration data</p>')
    else:
        models = sorted(fused.similarity[0]["similarity"], key=lambda m: (len(m), m)) if fused.similarity else []
        header = ["layer", *(f"CKA with {m}" for m in models), *(f"{m} layer" for m in models)]
        rows = [[row["layer"],
                 *("-" if row["similarity"].get(m) is None else f"{row['similarity'][m]:.3f}" for m in models),
                 *(row["counterpart"].get(m, "-") for m in models)] for row in fused.similarity]
        parts += ["<h3>Per-layer similarity to each parent (linear CKA of activations)</h3>",
                  _table(header, rows, numeric_from=1, numeric_to=1 + len(models))]
        if fused.chart is not None:
            parts.append(_figure(fused.chart, fused.chart.caption))
    if fused.accuracy is None:
        parts.append('<p class="note">no accuracy table: pass --data with labelled data</p>')
    else:
        parts += [f"<h3>Accuracy on {escape(fused.data or '')}</h3>",
                  _table(["model", "checkpoint", "accuracy", "loss"],
                         [[r["model"], r["path"], f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}"]
                          for r in fused.accuracy], numeric_from=2)]
    return parts


def _dt(term: str, value: str) -> str:
    return f"<dt>{escape(term)}</dt><dd>{escape(value)}</dd>"


def _figure(figure: ReportFigure, alt: str) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
            f"<figcaption>{escape(figure.caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[str]], numeric_from: int | None = None,
           numeric_to: int | None = None) -> str:
    def cell(k: int, value: str) -> str:
        numeric = numeric_from is not None and k >= numeric_from and (numeric_to is None or k < numeric_to)
        return f'<td class="num">{escape(value)}</td>' if numeric else f"<td>{escape(value)}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(k, v) for k, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
