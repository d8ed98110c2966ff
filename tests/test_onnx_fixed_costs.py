"""Fast paths for small models give what the slow paths give: reused reference kernels
(:func:`bnfold.passes.onnx.consts._run`) and shapes read off the inferred protobuf
(:mod:`bnfold.passes.onnx.shapes`); a save with fewer system calls still cleans up
(:mod:`bnfold.io.staged_save`)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference.ops import load_op
from onnx_cases import rel_err, run_ort
from onnx_ir.passes.common import ShapeInferencePass
from test_onnx_fold_zoo import _float64_reference

from bnfold.models import zoo
from bnfold.passes.onnx.consts import _run
from bnfold.passes.onnx.shapes import Shapes, _infer_proto, inference_input, onnx_api_caller

_X = np.arange(24, dtype=np.float32).reshape(2, 3, 4)


@pytest.mark.parametrize(("op", "attrs", "args"), [
    ("Shape", {"start": 1}, [_X]),
    ("Shape", {"start": 0, "end": 2}, [_X]),  # same op, other attributes: another kernel
    ("Shape", {}, [_X]),
    ("Transpose", {"perm": [2, 0, 1]}, [_X]),  # a list attribute: built afresh
    ("Expand", {}, [np.float32(1.5), np.array([2, 3], np.int64)]),
    ("CastLike", {}, [np.float64(0.25), _X]),
    ("Softmax", {"axis": 1}, [_X]),
    ("Softmax", {"axis": 2}, [_X]),
])
def test_run_equals_a_fresh_kernels_eval(op: str, attrs: dict, args: list) -> None:
    node = ir.Node("", op, [ir.Value(name=f"x{i}") for i in range(len(args))],
                   [ir.Attr(k, ir.AttributeType.INTS if isinstance(v, list)
                            else ir.AttributeType.INT, v) for k, v in attrs.items()])
    for _ in range(2):  # the second run reuses the kernel the first built
        out = _run(node, args, 17)
        expected = load_op("", op, 17).eval(*args, **attrs)
        assert out is not None and len(out) == 1
        np.testing.assert_array_equal(out[0], expected)
        assert out[0].dtype == np.asarray(expected).dtype


def test_run_of_an_op_it_cannot_evaluate_is_none() -> None:
    node = ir.Node("", "NoSuchOp", [ir.Value(name="x")])
    assert _run(node, [_X], 17) is None


def _reference_shapes(model: ir.Model) -> dict[int, dict[str, list]]:
    """What :func:`_infer` gave before its fast path: ``ShapeInferencePass`` on a clone, then
    every named value's shape."""
    clone = model.clone()
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    out = {}
    for original, inferred in zip(model.graphs(), clone.graphs(), strict=True):
        values = ir.convenience.create_value_mapping(inferred, include_subgraphs=False)
        out[id(original)] = {n: _dims(v.shape) for n, v in values.items() if v.shape is not None}
    return out


def _dims(shape: ir.Shape) -> list:
    return [d if isinstance(d, int) else ("sym", d.value) for d in shape]


def _torchscript(name: str) -> onnx.ModelProto:
    model, x = zoo.get(name), zoo.example_input(name)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE,
                          dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    return onnx.load_from_string(buf.getvalue())


def _handmade() -> onnx.ModelProto:
    """MatMul outputs without value_info, a symbolic dim, an output declared without a shape,
    an initializer with no value_info, and a value inference cannot shape (a Reshape to a
    runtime shape)."""
    f = TensorProto.FLOAT
    w = helper.make_tensor("w", f, [4, 3], np.ones(12, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["y"]),
             helper.make_node("Identity", ["m"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["n", 4]),
                                           helper.make_tensor_value_info("s", TensorProto.INT64,
                                                                         [2])],
                              [helper.make_tensor_value_info("y", f, None),
                               helper.make_tensor_value_info("z", f, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _broken() -> onnx.ModelProto:
    """A model shape inference fails on (a Conv with a mismatched weight)."""
    f = TensorProto.FLOAT
    w = helper.make_tensor("w", f, [2, 5, 1, 1], np.ones(10, np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", f, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", f, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with_if() -> onnx.ModelProto:
    """A model with an If (subgraphs: the general path)."""
    f = TensorProto.FLOAT
    branch = [helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"y{i}"])], f"b{i}",
                                [], [helper.make_tensor_value_info(f"y{i}", f, None)])
              for i in range(2)]
    w = helper.make_tensor("w", f, [4, 3], np.ones(12, np.float32))
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch[0], else_branch=branch[1])],
        "g", [helper.make_tensor_value_info("x", f, [2, 4]),
              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make", [
    lambda: _torchscript("levit_block"), lambda: _torchscript("mlp_heads"),
    lambda: _torchscript("resnet_small"), _handmade, _broken,
    _with_if,
], ids=["levit_block", "mlp_heads", "resnet_small", "handmade", "broken", "if_branches"])
@pytest.mark.parametrize("on_source", [False, True], ids=["serialized", "on_source"])
def test_inferred_shapes_equal_the_pass_on_a_clone(make, on_source: bool) -> None:
    """Every named value's dims, declared or inferred, equal what the pass on a clone leaves:
    inferred on the model's serialization or on the protobuf it was read from."""
    proto = make()
    model = ir.serde.deserialize_model(proto)
    shapes = Shapes(model, proto if on_source else None)
    reference = _reference_shapes(model)
    inferred = 0
    for graph in model.graphs():
        values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
        expected = reference[id(graph)]
        for name, value in values.items():
            want = expected.get(name)
            want = None if want is None else [d if isinstance(d, int) else None for d in want]
            assert shapes.dims(graph, value) == want, name
            inferred += value.shape is None and want is not None
    assert inferred or make is _broken  # (not vacuous: some shapes came from inference)


def test_inference_on_the_source_is_the_serialized_message() -> None:
    """:func:`inference_input` gives the message onnx-ir's inference call serializes: the
    same inferred ``value_info``, inputs and outputs."""
    proto = _torchscript("levit_block")
    model = ir.serde.deserialize_model(proto)
    via_ir = onnx_api_caller()(_infer_proto, model.clone())
    given = inference_input(proto)
    assert given is not None
    direct = _infer_proto(given)
    for field in ("input", "output", "value_info"):
        assert ([v.SerializeToString() for v in getattr(direct.graph, field)]
                == [v.SerializeToString() for v in getattr(via_ir.graph, field)]), field
    held = proto.graph.initializer
    small = next(i for i, t in enumerate(held) if t.dims and np.prod(t.dims) * 4 <= 1000)
    assert inference_input(proto, apart=[small]) is None  # its bytes are not in the proto


def test_after_an_edit_what_the_source_cannot_tell_is_inferred_on_the_model(monkeypatch
                                                                           ) -> None:
    """A value inference on the source shapes is read from there, before and after an edit
    (the model itself is never inferred then); one it cannot tell (a value the edit made) is
    inferred on the model as it stands."""
    from bnfold.passes.onnx import shapes as shapes_module

    proto = _handmade()
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    shapes = Shapes(model, proto)
    on_model = []
    real = shapes_module._infer
    monkeypatch.setattr(shapes_module, "_infer", lambda m: on_model.append(m) or real(m))
    matmul, reshaped = graph.node(0).outputs[0], graph.node(2).outputs[0]
    assert shapes.dims(graph, matmul) == [None, 3]
    assert shapes.dims(graph, reshaped) == [None, None] and not on_model  # (rank only)
    added = ir.Node("", "Relu", [matmul], name="added")
    added.outputs[0].name = "added_out"
    graph.append(added)
    shapes.edited()
    assert shapes.dims(graph, matmul) == [None, 3] and not on_model
    assert shapes.dims(graph, added.outputs[0]) == [None, 3] and on_model == [model]


def test_a_save_whose_temp_file_cannot_get_its_mode_leaves_nothing(tmp_path, monkeypatch) -> None:
    """The graph's temporary file is removed when setting its permission bits fails; the
    target keeps its old contents and mode."""
    import os

    from bnfold.errors import BadInputError
    from bnfold.io import staged_save
    from bnfold.io.fileio import save_onnx

    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    target.chmod(0o640)

    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(staged_save.os, "fchmod", refuse)
    with pytest.raises(BadInputError, match="could not write"):
        save_onnx(_handmade(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert target.read_bytes() == b"old" and os.stat(target).st_mode & 0o777 == 0o640


@pytest.mark.parametrize("name", ["mlp_bn1d", "mlp_heads", "levit_block",
                                  "linear_seq_wrong_axis"])
def test_a_fold_inferred_on_its_source_equals_one_inferred_on_the_model(name, monkeypatch
                                                                        ) -> None:
    """Models whose MatMul folds need inferred shapes: ``fold_onnx`` of the ``ModelProto``
    (inferred on that protobuf) gives the bytes and report of ``fold_onnx`` of its onnx-ir
    model (inferred on the model's serialization)."""
    from bnfold.passes.onnx import shapes
    from bnfold.passes.onnx.fold import fold_onnx

    proto = _torchscript(name)
    on_model = fold_onnx(ir.serde.deserialize_model(proto))
    used = []
    given = shapes.inference_input
    monkeypatch.setattr(shapes, "inference_input", lambda *a: used.append(a) or given(*a))
    on_source = fold_onnx(proto)
    assert used, "no shape was read off the source"
    assert on_source.report == on_model.report
    assert on_source.model.SerializeToString() == \
        ir.serde.serialize_model(on_model.model).SerializeToString()
    assert on_source.report.folded  # (not vacuous)
    x = zoo.example_input(name, seed=7)  # and the fold is exact: against torch in float64
    got = run_ort(on_source.model, {"input": x.numpy()})
    assert rel_err(got, _float64_reference(name, x)) < 1e-5
