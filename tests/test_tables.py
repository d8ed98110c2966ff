"""One layout for every plain-text table; the cells come from the object shown."""

from __future__ import annotations

from bnfold.report import HEADERS, Report
from bnfold.tables import plain_table


def test_plain_table_pads_all_but_the_last_column() -> None:
    lines = plain_table(("a", "bb", "c"), [("xyz", "", ""), ("1", "22", "last cell")])
    assert lines == ["a    bb  c", "-" * 18, "xyz", "1    22  last cell"]


def test_report_rows_feed_its_table() -> None:
    report = Report("fold_onnx")
    report.add("bn1", "folded", into="conv1")
    report.add("bn2", "kept", reason="conv output also feeds add_1")
    report.add("bn3", "kept")
    assert report.rows() == [("bn1", "folded", "conv1"),
                             ("bn2", "kept", "conv output also feeds add_1"), ("bn3", "kept", "")]
    assert report.table().splitlines()[:5] == plain_table(HEADERS, report.rows())
    assert report.summary() == "fold_onnx: 1 folded, 2 kept"
    assert Report("insert").summary(nothing="none") == "insert: none"
