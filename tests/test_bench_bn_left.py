"""The BN-left table's cells: bnfold's columns leave exactly the expected count, a wrong
peer result is marked WRONG (torch.fx fuse folds a BatchNorm1d over tokens on the wrong axis),
and a crash is a cell, not an abort."""

from __future__ import annotations

from benchmarks.bench_bn_left import REP_LEFT, _cell, _fx_cells, _onnx_cells
from bnfold.models import reach, rep


def test_fx_cells_count_and_catch_a_wrong_fold() -> None:
    ours, fuse = _fx_cells(reach, "linear_bn1d_tokens")
    assert ours == str(reach.REACH["linear_bn1d_tokens"].bn_left) == "1"
    assert fuse.startswith("WRONG 0 (err ")


def test_rep_patterns_leave_their_expected_count() -> None:
    for name in rep.PATTERNS:
        assert _fx_cells(rep, name)[0] == str(REP_LEFT[name]), name


def test_onnx_cells_bnfold_leaves_the_expected_count_in_both_exports() -> None:
    cells = _onnx_cells(reach, "add_of_layers")
    assert cells["bnfold"] == ["1", "1"] and reach.REACH["add_of_layers"].bn_left == 1
    assert set(cells) == {"bnfold", "onnxscript", "onnxoptimizer", "onnxslim", "onnxruntime"}
    assert all(len(c) == 2 for c in cells.values())


def test_a_crashing_tool_is_a_cell() -> None:
    def boom() -> None:
        raise ValueError("x")

    assert _cell(boom, lambda r: 0.0, lambda r: 0) == "crash (ValueError)"
    assert _cell(lambda: None, lambda r: 0.5, lambda r: 3) == "WRONG 3 (err 5.0e-01)"
