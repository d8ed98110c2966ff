"""Plain-text tables: the one layout of every table bnfold prints without colour.

A table's cells are computed once, by the object it shows (``Report.rows()``,
``ValidationResult.rows()``); :func:`plain_table` lays them out for text (``.table()``, safe to
paste in a README) and :mod:`bnfold.cli.render` gives the same cells to rich.
"""

from __future__ import annotations

from collections.abc import Sequence


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a left-aligned table: every column but the last padded to its widest cell,
    two spaces apart, trailing blanks removed, a dash rule under the headers."""
    cells = [tuple(headers), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers) - 1)]
    lines = [("".join(f"{cell:<{w}}  " for cell, w in zip(r, widths, strict=False)) + r[-1])
             .rstrip() for r in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return lines
