"""The full-size architecture benchmark's tables, on a narrow net and a small input: bnfold's
BN-left cells match the exact count, each peer's are counted, and the ratios are filled in."""

from __future__ import annotations

from benchmarks.bench_arch import fx_table, onnx_table
from bnfold.models import arch


def test_onnx_table_counts_bns_left_and_fills_ratios() -> None:
    table = onnx_table(["repvgg_a0"], repeat=1, exports=("TorchScript",), width=0.125,
                       small=True)
    row = next(line for line in table.splitlines() if "repvgg_a0 (TorchScript)" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == str(arch.ARCHS["repvgg_a0"].bn_total) == "61"
    assert cells[4] == str(arch.ARCHS["repvgg_a0"].bn_left) == "17"
    assert cells[5].endswith(")") and all(float(c) > 0 for c in cells[6:])
    assert "**median**" in table


def test_fx_table_judges_both_tools() -> None:
    table = fx_table(["resnet18"], repeat=1, width=0.125, small=True)
    row = next(line for line in table.splitlines() if line.startswith("| resnet18"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("ok (0 BN left, err") and cells[4].startswith("ok (0 BN left")
    assert float(cells[6]) > 0
