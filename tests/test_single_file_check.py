"""A single-file model is checked on its parsed proto, its large initializers hollow: the same
verdicts and messages as ``onnx.checker`` on the file's bytes and on its path."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.errors import BadInputError
from bnfold.io import filechecks, split_proto
from bnfold.io.filechecks import check_onnx_file, check_single_file
from bnfold.io.fileio import load_for_pass
from bnfold.io.proto_stream import read_proto
from bnfold.io.split_proto import SplitProto, read_split


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


def _check_parsed(path: Path) -> None:
    check_single_file(path, read_proto(path))


#: How the checked model was read: parsed whole, or with its large ``raw_data`` held apart
#: (as the CLI reads it; the files here are small, so the split is forced).
READERS = {"parsed": read_proto, "split": read_split}


@pytest.fixture(params=sorted(READERS))
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> object:
    if request.param == "split":
        monkeypatch.setattr(split_proto, "SPLIT_MIN", 0)
        monkeypatch.setattr(split_proto, "BYTES_PER_ENTRY", 1)
    return READERS[request.param]


def _message(check: object, path: Path) -> str:
    with pytest.raises(Exception) as info:  # onnx raises several kinds
        check(path)  # type: ignore[operator]
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bytes_and_path_checks_agree(case: str, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(BROKEN[case]), path)
    assert _message(_check_parsed, path) == _message(check_onnx_file, path)
    with pytest.raises(BadInputError, match="invalid ONNX model"):
        load_for_pass(path)


def test_a_valid_model_passes_both(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])]), path)
    check_onnx_file(path)
    _check_parsed(path)
    assert isinstance(load_for_pass(path), SplitProto)


# ------------------------------------------------------------------ large tensors, hollow

N = 20_000  # float32 elements: 80,000 bytes, over HOLLOW_MIN


def _big(tensors: list[onnx.TensorProto], ir_version: int = 8,
         nodes: list[onnx.NodeProto] | None = None) -> onnx.ModelProto:
    """x -> Add(x, w) -> y, with ``tensors`` as its initializers."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [N])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])
    graph = helper.make_graph(nodes or [helper.make_node("Add", ["x", "w"], ["y"])], "g", [x],
                              [y], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def _raw(dtype: int = TensorProto.FLOAT, dims: tuple[int, ...] = (N,), size: int = 4 * N,
         name: str = "w", **fields: object) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=dtype, dims=dims, raw_data=bytes(size))
    for field, value in fields.items():
        if isinstance(value, list):
            getattr(tensor, field).extend(value)
        else:
            setattr(tensor, field, value)
    return tensor


def _untyped() -> onnx.TensorProto:
    tensor = _raw()
    tensor.ClearField("data_type")
    return tensor


def _unnamed() -> onnx.TensorProto:
    tensor = _raw()
    tensor.ClearField("name")
    return tensor


def _in_ir3() -> onnx.ModelProto:
    model = _big([_raw(name="v")], ir_version=3)  # an initializer that is not a graph input
    model.graph.node[0].input[1] = "v"
    return model


BIG = {
    "valid": _big([_raw()]),
    "valid, raw_data longer than needed": _big([_raw(size=4 * N + 7)]),
    "valid, doc string and metadata": _big([_raw(doc_string="d", metadata_props=[
        onnx.StringStringEntryProto(key="k", value="v")])]),
    "raw_data too short": _big([_raw(size=4 * N - 1)]),
    "negative dim": _big([_raw(dims=(-N,))]),
    "dims product overflows": _big([_raw(dims=(2**62, 4, 0))]),
    "bytes overflow": _big([_raw(dims=(2**62,))]),
    "zero elements with data": _big([_raw(dims=(0, N))]),
    "raw_data and float_data": _big([_raw(float_data=[1.0])]),
    "string in raw_data": _big([_raw(dtype=TensorProto.STRING)]),
    "undefined dtype": _big([_raw(dtype=TensorProto.UNDEFINED)]),
    "no dtype": _big([_untyped()]),
    "int4, packed": _big([_raw(dtype=TensorProto.INT4, dims=(2 * N,), size=N)]),
    "int4 too short": _big([_raw(dtype=TensorProto.INT4, dims=(2 * N + 3,), size=N)]),
    "external with raw_data": _big([_raw(data_location=TensorProto.EXTERNAL)]),
    "duplicate names": _big([_raw(), _raw()]),
    "empty name": _big([_raw(name="")]),
    "no name": _big([_unnamed()]),
    "IR 3, initializer not an input": _in_ir3(),
    "IR version too new": _big([_raw()], ir_version=99),
    "unsorted": _big([_raw()], nodes=[helper.make_node("Add", ["x", "t"], ["y"]),
                                      helper.make_node("Relu", ["w"], ["t"])]),
    "bad node": _big([_raw()], nodes=[helper.make_node("Add", ["x", "w"], ["y"], bad=1)]),
    "unknown op": _big([_raw()], nodes=[helper.make_node("NoSuch", ["x", "w"], ["y"])]),
    "SSA": _big([_raw()], nodes=[helper.make_node("Add", ["x", "w"], ["y"]),
                                 helper.make_node("Relu", ["x"], ["y"])]),
}
#: Cases whose large tensor the checker accepts, so that it is handed over hollow.
HOLLOWED = {"valid", "valid, raw_data longer than needed", "valid, doc string and metadata",
            "duplicate names", "empty name", "no name", "IR 3, initializer not an input",
            "IR version too new", "unsorted", "bad node", "unknown op", "SSA"}


def _outcome(check: object, path: Path) -> str:
    try:
        check(path)  # type: ignore[operator]
    except Exception as exc:  # onnx raises several kinds
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def _compare(model: onnx.ModelProto, path: Path, monkeypatch: pytest.MonkeyPatch,
             reader: object) -> bool:
    """Assert the check's outcome on the model ``reader`` read is the file bytes' and the
    path's; whether it went hollow."""
    path.write_bytes(model.SerializeToString())
    read = reader(path)  # type: ignore[operator]
    if reader is read_split:
        assert isinstance(read, SplitProto) and (
            bool(read.data) == any(len(t.raw_data) >= 64 * 1024 for t in model.graph.initializer))
    hollowed = []
    real = filechecks._hollow
    monkeypatch.setattr(filechecks, "_hollow", lambda *a: hollowed.append(1) or real(*a))
    ours = _outcome(lambda p: check_single_file(p, read), path)
    assert ours == _outcome(lambda p: onnx.checker.check_model(p.read_bytes()), path)
    assert ours == _outcome(check_onnx_file, path)
    return bool(hollowed)


@pytest.mark.parametrize("case", sorted(BIG))
def test_hollow_check_agrees_with_the_file(case: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           reader: object) -> None:
    assert _compare(BIG[case], tmp_path / "m.onnx", monkeypatch, reader) == (case in HOLLOWED)


@pytest.mark.parametrize("dtype", sorted(filechecks._CHECKED_WIDTHS))
@pytest.mark.parametrize("short", [0, 1])
def test_each_hollowed_dtype_agrees(dtype: int, short: int, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, reader: object) -> None:
    """Every dtype the check hollows: exactly the bytes it needs (hollow, accepted) and one
    byte fewer (refused by the checker, with its message)."""
    width = filechecks._CHECKED_WIDTHS[dtype]
    tensor = _raw(dtype=dtype, dims=(N, 4), size=4 * N * width - short)
    model = _big([tensor], nodes=[helper.make_node("Identity", ["x"], ["y"])])
    assert _compare(model, tmp_path / "m.onnx", monkeypatch, reader) == (not short)


def test_many_small_tensors_are_checked_on_the_file(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    reader: object) -> None:
    """One large tensor among many small ones: the file's bytes, not a copy of the graph."""
    small = [onnx.TensorProto(name=f"s{i}", data_type=TensorProto.FLOAT, dims=[1],
                              raw_data=bytes(4)) for i in range(20)]
    assert not _compare(_big([_raw(), *small]), tmp_path / "m.onnx", monkeypatch, reader)


def test_load_for_pass_refuses_a_short_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(BIG["raw_data too short"], path)
    with pytest.raises(BadInputError, match="invalid ONNX model") as info:
        load_for_pass(path)
    assert "raw_data size (79999 bytes) is too small" in str(info.value)
