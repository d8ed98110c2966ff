"""A single-file model is checked on its bytes: the same verdicts and messages as the path."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.errors import BadInputError
from bnfold.io.filechecks import check_onnx_file, check_single_file
from bnfold.io.fileio import load_for_pass


def _model(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


BROKEN = {
    "unknown op": [helper.make_node("NoSuchOp", ["x"], ["y"])],
    "unsorted": [helper.make_node("Relu", ["t"], ["y"]), helper.make_node("Relu", ["x"], ["t"])],
    "bad attribute": [helper.make_node("Relu", ["x"], ["y"], alpha=1.0)],
}


def _message(check: object, path: Path) -> str:
    with pytest.raises(Exception) as info:  # onnx raises several kinds
        check(path)  # type: ignore[operator]
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bytes_and_path_checks_agree(case: str, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(BROKEN[case]), path)
    assert _message(check_single_file, path) == _message(check_onnx_file, path)
    with pytest.raises(BadInputError, match="invalid ONNX model"):
        load_for_pass(path)


def test_a_valid_model_passes_both(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])]), path)
    check_onnx_file(path)
    check_single_file(path)
    assert isinstance(load_for_pass(path), onnx.ModelProto)
