"""``bnfold inspect --html``: the per-BN table as one small, self-contained HTML page.

Each BN gets its row (name, torch module path, action, into / reason) and a picture of its
graph neighbourhood: the nodes feeding the BN, the BN, and the nodes reading it, drawn as
inline SVG boxes; the BN is green when it folds, amber when it is kept, and the layer it folds
into is outlined. The page has inline CSS and SVG only: no scripts, fonts or links, so it
opens offline and shows the same everywhere.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from bnfold.io.staged_save import StagedFile
from bnfold.report import Entry, Report

_BOX_W, _BOX_H, _GAP, _ROW = 260, 34, 46, 40
_COLOURS = {"folded": "#d6f5d6", "kept": "#fde9c4", "inserted": "#d6ecf5", "skipped": "#eee"}
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.4em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.folded{color:#1a7f1a}.kept{color:#a86200}
code{font-size:90%}svg text{font:12px monospace}
"""


@dataclass
class Neighbourhood:
    """What feeds a BN and what reads it: ``(node name, label)`` pairs, the label as shown
    (``"Conv node_conv2d (layer1.conv1)"``); the name is matched against the fold's ``into``."""

    before: list[tuple[str, str]] = field(default_factory=list)
    after: list[tuple[str, str]] = field(default_factory=list)


def render(report: Report, title: str, around: Mapping[str, Neighbourhood]) -> str:
    """The HTML page for ``report``; ``around`` maps an entry's ``bn`` to its neighbours."""
    counts = ", ".join(f"{v} {report.label(k)}" for k, v in report.counts().items() if v)
    rows = "\n".join(_row(report, e, around.get(e.bn), i) for i, e in enumerate(report.entries))
    notes = "".join(f"<p>note: {html.escape(n)}</p>" for n in report.notes)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(report.pass_name)}: {html.escape(counts or 'no BN found')}</p>"
            f"{notes}\n<table><tr><th>BN</th><th>module</th><th>action</th>"
            f"<th>into / reason</th><th>neighbourhood</th></tr>\n{rows}\n</table></body></html>\n")


def write(path: str | os.PathLike[str], page: str) -> StagedFile:
    """Write ``page`` for ``path``, staged: the command commits it with its report
    (:class:`~bnfold.io.staged_save.StagedFile`)."""
    from bnfold.errors import BadInputError

    try:
        return StagedFile(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    except OSError as exc:
        raise BadInputError(f"--html {path}: could not write ({exc.strerror or exc})") from exc


def _row(report: Report, entry: Entry, around: Neighbourhood | None, index: int) -> str:
    detail = entry.into if entry.action in ("folded", "inserted") else entry.reason
    picture = _svg(entry, around, f"arrow{index}") if around is not None else ""
    return (f"<tr><td><code>{html.escape(entry.bn)}</code></td>"
            f"<td><code>{html.escape(entry.module or '')}</code></td>"
            f"<td class='{entry.action}'>{html.escape(report.label(entry.action))}</td>"
            f"<td>{html.escape(detail or '')}</td><td>{picture}</td></tr>")


def _svg(entry: Entry, around: Neighbourhood, arrow: str) -> str:
    """Three columns of boxes: inputs -> BN -> readers, with arrows; ``into`` outlined."""
    nothing = [("", "(nothing)")]
    columns = [around.before or nothing, [(entry.bn, f"BN {entry.module or entry.bn}")],
               around.after or nothing]
    height = max(len(c) for c in columns) * _ROW + 8
    width = 3 * _BOX_W + 2 * _GAP + 8
    parts = [f"<svg width='{width}' height='{height}' "
             f"role='img'><defs><marker id='{arrow}' markerWidth='8' markerHeight='8' refX='7' "
             f"refY='4' orient='auto'><path d='M0,0 L8,4 L0,8 z' fill='#666'/></marker></defs>"]
    centre = height / 2
    for col, labels in enumerate(columns):
        x = 4 + col * (_BOX_W + _GAP)
        top = centre - len(labels) * _ROW / 2
        for i, (name, label) in enumerate(labels):
            y = top + i * _ROW + (_ROW - _BOX_H) / 2
            fill = _COLOURS.get(entry.action, "#eee") if col == 1 else "#fff"
            into = entry.action == "folded" and name == entry.into
            stroke = "#1a7f1a' stroke-width='3" if into else "#888"
            parts.append(f"<rect x='{x}' y='{y}' width='{_BOX_W}' height='{_BOX_H}' rx='5' "
                         f"fill='{fill}' stroke='{stroke}'/><text x='{x + 6}' y='{y + 21}'>"
                         f"{html.escape(_fit(label))}</text>")
            if col != 1:  # an arrow from this box to the BN, or from the BN to it
                mid = y + _BOX_H / 2
                x1, y1, x2, y2 = ((x + _BOX_W, mid, x + _BOX_W + _GAP - 2, centre) if col == 0
                                  else (x - _GAP, centre, x - 2, mid))
                parts.append(f"<line x1='{x1}' y1='{y1}' x2='{x2}' y2='{y2}' stroke='#666' "
                             f"marker-end='url(#{arrow})'/>")
    parts.append("</svg>")
    return "".join(parts)


def _fit(label: str, width: int = 34) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"
