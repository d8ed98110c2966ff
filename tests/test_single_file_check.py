"""A single-file model is checked on its bytes, its large plain initializers hollow: the same
verdicts and messages as the checker on the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BadInputError
from bnfold.io.filechecks import HOLLOW_FROM_BYTES, _hollowed, check_onnx_file, check_single_file
from bnfold.io.fileio import load_for_pass
from bnfold.io.proto_stream import read_proto


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


def _single(path: Path) -> None:
    check_single_file(path, read_proto(path))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bytes_and_path_checks_agree(case: str, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(BROKEN[case]), path)
    assert _message(_single, path) == _message(check_onnx_file, path)
    with pytest.raises(BadInputError, match="invalid ONNX model"):
        load_for_pass(path)


def test_a_valid_model_passes_both(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])]), path)
    check_onnx_file(path)
    _single(path)
    assert isinstance(load_for_pass(path), onnx.ModelProto)


_BIG = (16, 16, 3, 3)  # 9 KiB of float32: handed to the checker hollow when plain


def _big_model(tensor: onnx.TensorProto, nodes: list[onnx.NodeProto] | None = None,
               ir_version: int = 8) -> onnx.ModelProto:
    """Conv(x, w) with ``tensor`` as its weight ``w`` (and any ``nodes`` after it)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])
    conv = helper.make_node("Conv", ["x", "w"], ["c" if nodes else "y"])
    graph = helper.make_graph([conv, *(nodes or [])], "g", [x], [y], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def _weight() -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(_BIG, np.float32), "w")


def _broken_weights() -> dict[str, onnx.TensorProto]:
    short, long, both, undefined, text, external, negative = (_weight() for _ in range(7))
    short.raw_data = short.raw_data[:-4]
    long.raw_data = long.raw_data + bytes(4)
    both.float_data.append(1.0)
    undefined.data_type = TensorProto.UNDEFINED
    text.data_type = TensorProto.STRING
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="no_such_file.bin")
    negative.dims[0] = -16
    return {"raw data too short": short, "raw data too long": long,
            "raw and float data": both, "undefined dtype": undefined, "string dtype": text,
            "external location": external, "negative dim": negative}


BIG_CASES = {
    "valid": _big_model(_weight()),
    "bad node after a big weight": _big_model(
        _weight(), [helper.make_node("NoSuchOp", ["c"], ["y"])]),
    "ir 3, initializer not an input": _big_model(_weight(), ir_version=3),
    **{name: _big_model(t) for name, t in _broken_weights().items()
       if name != "external location"},  # (check_single_file: models without external data)
}


def _verdict(check: object, path: Path) -> str:
    try:
        check(path)  # type: ignore[operator]
    except Exception as exc:  # onnx raises several kinds
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


@pytest.mark.parametrize("case", sorted(BIG_CASES))
def test_hollow_initializers_keep_the_checkers_verdict(case: str, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(BIG_CASES[case], path)
    verdict = _verdict(_single, path)
    assert verdict == _verdict(check_onnx_file, path)
    assert (verdict == "accepted") == (case in ("valid", "raw data too long"))


def test_plain_large_initializers_are_hollowed_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    weights = [_weight(), *_broken_weights().values()]
    for i, weight in enumerate(weights[1:]):
        weight.name = f"broken{i}"
    model = _big_model(weights[0])
    small = numpy_helper.from_array(np.ones(4, np.float32), "small")
    model.graph.initializer.extend([*weights[1:], small])
    onnx.save(model, path)
    hollow = _hollowed(read_proto(path), path.stat().st_size)
    assert hollow is not None
    first = hollow.graph.initializer[0]
    assert first.name == "w" and list(first.dims) == [0] and first.raw_data == b""
    assert [list(t.dims) for t in hollow.graph.initializer[1:]] == \
        [list(t.dims) for t in model.graph.initializer[1:]]
    assert hollow.graph.node == model.graph.node
    assert len(weights[0].raw_data) >= HOLLOW_FROM_BYTES


def test_many_small_initializers_are_not_searched(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    model = _big_model(_weight())
    model.graph.initializer.extend(
        numpy_helper.from_array(np.ones(1, np.float32), f"s{i}") for i in range(10))
    onnx.save(model, path)
    assert _hollowed(read_proto(path), path.stat().st_size) is None
    _single(path)
