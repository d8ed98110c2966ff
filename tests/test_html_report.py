"""``bnfold inspect --html``: a self-contained page with each BN's row and neighbourhood."""

from __future__ import annotations

import re

import onnx
import torch
from onnx_cases import Builder

from bnfold.cli.html_report import Neighbourhood, render
from bnfold.exporter import export_unfolded
from bnfold.models import zoo
from bnfold.report import Report


def rows(page: str) -> list[str]:
    return re.findall(r"<tr><td>.*?</tr>", page)


def assert_self_contained(page: str) -> None:
    for forbidden in ("<script", "http:", "https:", "src=", "<link", "@import"):
        assert forbidden not in page


def test_dynamo_onnx_page_has_a_row_and_a_picture_per_bn(tmp_path, run_cli) -> None:
    path, page_path = tmp_path / "rs.onnx", tmp_path / "out" / "rs.html"
    export_unfolded(zoo.get("resnet_small"), (zoo.example_input("resnet_small"),), path)
    res = run_cli("inspect", path, "--html", page_path)
    assert res.returncode == 0, res.stderr
    page = page_path.read_text()
    assert_self_contained(page)
    table = rows(page)
    assert len(table) == 9 and all("<svg" in r and "would fold" in r for r in table)
    assert "<code>layer2.down.1</code>" in table[5]
    # the layer each BN folds into is the outlined box, and it is the BN's producer
    for row in table:
        into = re.search(r"<td>(node_conv2d[_0-9]*)</td>", row)[1]
        outlined = re.findall(r"stroke-width='3'/><text[^>]*>Conv (\S+)", row)
        assert outlined == [into]
    assert "Add node_add_1 (layer2)" in table[5]


def test_kept_bn_shows_every_reader(tmp_path, run_cli) -> None:
    b = Builder(0)
    h = b.node("Conv", ["x", b.rand("w", [4, 3, 3, 3])], ["h"])
    z = b.bn(h, "z", 4)
    b.node("Add", [z, h], ["y"])
    path, page_path = tmp_path / "m.onnx", tmp_path / "m.html"
    onnx.save(b.model({"x": [1, 3, 5, 5]}, {"y": [1, 4, 3, 3]}), path)
    assert run_cli("inspect", path, "--html", page_path).returncode == 0
    (row,) = rows(page_path.read_text())
    assert "would keep" in row and "also feeds" in row
    assert "fill='#fde9c4'" in row and "Add Add_" in row and "Conv Conv_0" in row
    assert "stroke-width='3'" not in row


def test_pt2_page_uses_the_fx_graph(tmp_path, run_cli) -> None:
    model = zoo.get("resnet_small").eval()
    program = torch.export.export(model, (zoo.example_input("resnet_small"),))
    src, page_path = tmp_path / "m.pt2", tmp_path / "m.html"
    torch.export.save(program, src)
    assert run_cli("inspect", src, "--html", page_path).returncode == 0
    page = page_path.read_text()
    assert_self_contained(page)
    table = rows(page)
    assert len(table) == 9 and "stem.1 (batch_norm)" in table[0]
    assert "conv2d conv2d" in table[0] and "relu relu" in table[0]


def test_names_are_escaped() -> None:
    report = Report("fold_onnx")
    report.add("<b>bn</b>", "kept", reason="a & b")
    page = render(report, "t<i>", {"<b>bn</b>": Neighbourhood([("", "<img>")], [])})
    assert "<b>bn</b>" not in page and "&lt;b&gt;bn&lt;/b&gt;" in page
    assert "<img>" not in page and "a &amp; b" in page and "t&lt;i&gt;" in page
