"""fold_onnx on hand-built graphs: every pattern, checked in ORT and against float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx.inliner import inline_local_functions
from onnx_cases import (
    Builder,
    constant_node_weight,
    count,
    dynamo_bias_subgraph,
    feeds,
    reference,
    rel_err,
    run_ort,
    shared_weight,
    torch_convtranspose_bn,
)

from bnfold.io.fileio import load_for_pass
from bnfold.io.split_proto import SplitProto
from bnfold.passes.onnx.fold import fold_onnx, inspect_onnx

FP32_TOL = 1e-5


def used_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            names.update(n.input)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
        names.update(o.name for o in g.output)
        names.update(i.name for i in g.input)  # an initializer that is an input is an API

    walk(model.graph)
    return names


def check_value_info(before: onnx.GraphProto, after: onnx.GraphProto) -> None:
    """No stale value_info (for a value that is gone), none dropped for a kept value."""
    existing = {i.name for i in after.initializer} | {o for n in after.node for o in n.output}
    infos = {v.name: v.type for v in after.value_info}
    assert set(infos) <= existing, f"stale value_info: {set(infos) - existing}"
    outputs = {o.name for o in after.output}
    for v in before.value_info:
        if v.name in existing and v.name not in outputs:
            assert infos.get(v.name) == v.type, f"value_info of {v.name} dropped or changed"


def check(model: onnx.ModelProto, bn_left: int, tol: float = FP32_TOL, ort: bool = True,
          ref: bool = True):
    """Fold, then check every guarantee; return the folded model and report."""
    before = model.SerializeToString()
    out, report = fold_onnx(model)
    assert model.SerializeToString() == before, "input ModelProto was mutated"
    onnx.checker.check_model(out, full_check=True)
    assert count(out) == bn_left, report.table()
    assert [(v.name, v.type) for v in out.graph.input] == [
        (v.name, v.type) for v in model.graph.input]
    assert [(v.name, v.type) for v in out.graph.output] == [
        (v.name, v.type) for v in model.graph.output]
    assert list(out.opset_import) == list(model.opset_import)
    assert list(out.metadata_props) == list(model.metadata_props)
    dead = {i.name for i in out.graph.initializer} - used_names(out)
    assert not dead, f"dead initializers left: {dead}"
    check_value_info(model.graph, out.graph)
    again, rep2 = fold_onnx(out)
    assert again.SerializeToString() == out.SerializeToString(), "not idempotent"
    assert not rep2.changed
    assert fold_onnx(model).model.SerializeToString() == out.SerializeToString()
    if not ref:
        return out, report
    x = feeds(model)
    want = reference(model, x)
    assert rel_err(reference(out, x), want) < tol
    if ort:
        assert rel_err(run_ort(out, x), want) < tol
        assert rel_err(run_ort(out, x), run_ort(model, x)) < 10 * tol
    return out, report


# --------------------------------------------------------------------- Conv / ConvTranspose

@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn(dims: int, groups: int, bias: bool) -> None:
    b = Builder(dims * 10 + groups)
    k = [3] * dims
    ins = ["x", b.rand("w", [8, 8 // groups, *k])] + ([b.rand("bias", [8])] if bias else [])
    b.node("Conv", ins, ["c"], group=groups, pads=[1] * 2 * dims)
    b.bn("c", "y", 8)
    m = b.model({"x": [2, 8, *[6] * dims]}, {"y": None})
    _, report = check(m, 0)
    assert report.folded[0].into == "Conv_0"


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad(auto_pad: str) -> None:
    b = Builder(3)
    b.node("Conv", ["x", b.rand("w", [4, 3, 3, 3])], ["c"], auto_pad=auto_pad, strides=[2, 2])
    b.bn("c", "y", 4)
    check(b.model({"x": [2, 3, 7, 7]}, {"y": None}), 0)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn(dims: int, groups: int, bias: bool) -> None:
    b = Builder(dims + groups)
    k = [2] * dims
    ins = ["x", b.rand("w", [4, 6 // groups, *k])] + ([b.rand("bias", [6])] if bias else [])
    b.node("ConvTranspose", ins, ["c"], group=groups, strides=[2] * dims)
    b.bn("c", "y", 6)
    m = b.model({"x": [2, 4, *[3] * dims]}, {"y": None})
    if groups == 1:
        check(m, 0)
        return
    # onnx's reference ConvTranspose mishandles groups: the float64 reference is torch's.
    out, _ = check(m, 0, ort=False, ref=False)
    x = feeds(m)
    want = torch_convtranspose_bn(m, x["x"])
    assert rel_err(run_ort(out, x), want) < FP32_TOL
    assert rel_err(run_ort(m, x), want) < FP32_TOL


# --------------------------------------------------------------------- Gemm / MatMul

@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, [], [1], [6], [1, 6], [3, 6]])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.5)])
def test_gemm_bn(trans_a: int, trans_b: int, c_shape, alpha: float, beta: float) -> None:
    b = Builder(7)
    w = b.rand("w", [6, 5] if trans_b else [5, 6])
    ins = ["x", w] + ([] if c_shape is None else [b.rand("c0", c_shape)])
    b.node("Gemm", ins, ["g"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    b.bn("g", "y", 6)
    out, _ = check(b.model({"x": [5, 3] if trans_a else [3, 5]}, {"y": None}), 0)
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert {a.name: a for a in gemm.attribute}["beta"].f == 1.0


def test_matmul_add_bn() -> None:
    b = Builder(2)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.node("Add", [b.rand("c0", [6]), "m"], ["a"])
    b.bn("a", "y", 6)
    check(b.model({"x": [4, 5]}, {"y": None}), 0)


def test_matmul_bn_no_bias_adds_one() -> None:
    b = Builder(2)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.bn("m", "y", 6)
    out, _ = check(b.model({"x": [4, 5]}, {"y": None}), 0)
    assert count(out, "Add") == 1


def test_matmul_rank3_wrong_axis_is_kept_with_reason() -> None:
    b = Builder(2)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.bn("m", "y", 4)  # normalizes L (4), not the features (6)
    _, report = check(b.model({"x": [2, 4, 5]}, {"y": None}), 1)
    assert "do not line up" in report.kept[0].reason


def test_matmul_constant_on_the_left_is_kept_with_reason() -> None:
    b = Builder(2)
    b.node("MatMul", [b.rand("w", [6, 5]), "x"], ["m"])
    b.bn("m", "y", 6)
    _, report = check(b.model({"x": [2, 5, 7]}, {"y": None}), 1)
    assert "constant on the left" in report.kept[0].reason


def test_matmul_rank3_through_transpose_folds() -> None:
    b = Builder(2)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.node("Transpose", ["m"], ["t"], perm=[0, 2, 1])
    b.bn("t", "y", 6)
    check(b.model({"x": [2, 4, 5]}, {"y": None}), 0)


def test_matmul_flatten_bn_reshape_folds() -> None:
    """LeViT's Linear_BN: MatMul on [N, L, C] -> Reshape [N*L, C] -> BN."""
    b = Builder(5)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.node("Reshape", ["m", b.init("shape", np.array([-1, 6]), TensorProto.INT64)], ["r"])
    b.inits[-1] = onnx.numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")
    b.bn("r", "y", 6)
    check(b.model({"x": [2, 4, 5]}, {"y": None}), 0)


def test_matmul_add_bias_of_higher_rank_is_kept() -> None:
    """``Add`` broadcasts a rank-3 bias: the MatMul features move to axis 2, not axis 1."""
    b = Builder(2)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.node("Add", ["m", b.rand("c0", [2, 6, 6])], ["a"])
    b.bn("a", "y", 6)  # normalizes the MatMul's rows (6 of them), not its features
    _, report = check(b.model({"x": [6, 5]}, {"y": None}), 1)
    assert "do not line up" in report.kept[0].reason


@pytest.mark.parametrize("case", ["conv_output", "matmul_transpose", "matmul_backward"])
def test_graph_without_value_info(case: str) -> None:
    """TorchScript-style graphs declare no intermediate shapes: the rules that need one get it
    from shape inference (on a clone), the output gains no value_info, and a graph output
    that now comes straight from the layer keeps its declared type."""
    b = Builder(40)
    if case == "conv_output":
        b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
        b.bn("c", "y", 4)
        m = b.model({"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4]}, infer=False)
    elif case == "matmul_transpose":
        b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
        b.node("Transpose", ["m"], ["t"], perm=[0, 2, 1])
        b.bn("t", "y", 6)
        m = b.model({"x": [2, 4, 5]}, {"y": [2, 6, 4]}, infer=False)
    else:
        b.node("Relu", ["x"], ["r"])
        b.bn("r", "n", 5)
        b.node("MatMul", ["n", b.rand("w", [5, 3])], ["y"])
        m = b.model({"x": [4, 5]}, {"y": [4, 3]}, infer=False)
    assert not m.graph.value_info
    out, _ = check(m, 0)
    # only initializers (annotated by onnx-ir) and the fold's own new values gain value_info
    assert all(v.name in {i.name for i in out.graph.initializer} or v.name.endswith("_unbiased")
               for v in out.graph.value_info)


# --------------------------------------------------------------------- backward folds

@pytest.mark.parametrize("groups", [1, 2])
def test_bn_before_conv_pad0_folds(groups: int) -> None:
    b = Builder(4)
    b.bn("x", "n", 4)
    b.node("Conv", ["n", b.rand("w", [6, 4 // groups, 3, 3]), b.rand("bias", [6])], ["y"],
           group=groups)
    _, report = check(b.model({"x": [2, 4, 7, 7]}, {"y": None}), 0)
    assert report.folded[0].details["direction"] == "backward"


def test_bn_before_zero_padded_conv_is_kept() -> None:
    b = Builder(4)
    b.bn("x", "n", 4)
    b.node("Conv", ["n", b.rand("w", [6, 4, 3, 3])], ["y"], pads=[1, 1, 1, 1])
    _, report = check(b.model({"x": [2, 4, 7, 7]}, {"y": None}), 1)
    assert "zero-padded" in report.kept[0].reason


def test_bn_reflect_pad_conv_folds() -> None:
    b = Builder(4)
    b.bn("x", "n", 4)
    pads = b.init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1]), TensorProto.INT64)
    b.inits[-1] = onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), pads)
    b.node("Pad", ["n", pads], ["p"], mode="reflect")
    b.node("Conv", ["p", b.rand("w", [6, 4, 3, 3])], ["y"])
    check(b.model({"x": [2, 4, 7, 7]}, {"y": None}), 0)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_before_gemm_and_matmul(trans_b: int) -> None:
    b = Builder(8)
    b.bn("x", "n", 5)
    b.node("Gemm", ["n", b.rand("w", [6, 5] if trans_b else [5, 6]), b.rand("c0", [6])], ["g"],
           transB=trans_b)
    b.bn("x2", "n2", 5)
    b.node("MatMul", ["n2", b.rand("w2", [5, 3])], ["y2"])
    check(b.model({"x": [3, 5], "x2": [3, 5]}, {"g": None, "y2": None}), 0)


@pytest.mark.parametrize("op", ["Flatten", "Reshape"])
def test_bn_flatten_gemm_folds(op: str) -> None:
    b = Builder(9)
    b.bn("x", "n", 3)
    if op == "Flatten":
        b.node("Flatten", ["n"], ["f"], axis=1)
    else:
        b.inits.append(onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
        b.node("Reshape", ["n", "shape"], ["f"])
    b.node("Gemm", ["f", b.rand("w", [4, 12])], ["y"], transB=1)
    check(b.model({"x": [2, 3, 2, 2]}, {"y": None}), 0)


def test_bn_before_conv_transpose_with_stride_is_kept() -> None:
    b = Builder(9)
    b.bn("x", "n", 4)
    b.node("ConvTranspose", ["n", b.rand("w", [4, 2, 2, 2])], ["y"], strides=[2, 2])
    _, report = check(b.model({"x": [2, 4, 3, 3]}, {"y": None}), 1)
    assert "ConvTranspose" in report.kept[0].reason


# --------------------------------------------------------------------- what must be kept

def _conv_bn(opset: int = 17, **bn_attrs) -> Builder:
    b = Builder(11)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4, **bn_attrs)
    return b


def test_training_mode_is_kept() -> None:
    b = _conv_bn(training_mode=1)
    b.nodes[-1].output.extend(["rm", "rv"])
    m = b.model({"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4]})
    _, report = fold_onnx(m)
    assert report.kept and "training_mode=1" in report.kept[0].reason


def test_opset6_is_test_0_is_kept_and_is_test_1_folds() -> None:
    for is_test, action in ((0, "kept"), (1, "folded")):
        m = _conv_bn(is_test=is_test).model({"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4]},
                                           opset=6, ir_version=4)
        out, report = fold_onnx(m)
        assert report.entries[0].action == action, report.table()
        onnx.checker.check_model(out, full_check=True)
    assert "is_test=0" in fold_onnx(_conv_bn(is_test=0).model(
        {"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4]}, opset=6, ir_version=4)).report.kept[0].reason


def test_used_statistics_outputs_are_kept() -> None:
    b = Builder(1)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4, is_test=1)
    b.nodes[-1].output.extend(["rm", "rv", "sm", "sv"])
    m = b.model({"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4], "rm": [4]}, opset=6, ir_version=4)
    _, report = fold_onnx(m)
    assert "is read by the graph output" in report.kept[0].reason


def test_layer_output_with_other_reader_is_kept() -> None:
    b = _conv_bn()
    b.node("Add", ["y", "c"], ["z"])
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"z": None}), 1)
    assert report.kept[0].reason.startswith("Conv_0 output 'c' also feeds Add_2;")


@pytest.mark.parametrize("opset", [7, 8, 9, 11, 13, 14, 15, onnx.defs.onnx_opset_version()])
def test_opsets(opset: int) -> None:
    check(_conv_bn().model({"x": [2, 3, 4, 4]}, {"y": None}, opset=opset), 0)


@pytest.mark.parametrize("uniform", [True, False])
def test_spatial0(uniform: bool) -> None:
    b = Builder(12)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", [4, 2, 2], spatial=0)
    if uniform:  # per-activation parameters equal within each channel: folds exactly
        for t in b.inits[-4:]:
            arr = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(
                np.broadcast_to(arr[:, :1, :1], arr.shape).copy(), t.name))
    m = b.model({"x": [2, 3, 2, 2]}, {"y": None}, opset=7)
    out, report = fold_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    if uniform:
        assert count(out) == 0
        x = feeds(m)
        assert rel_err(run_ort(out, x), reference(m, x)) < FP32_TOL
    else:
        assert "spatial=0" in report.kept[0].reason


def test_ir3_initializers_are_inputs_and_fold() -> None:
    """IR version 3 lists every initializer as a graph input (MXNet/old ONNX zoo models); there
    they are constants, so BNs fold. The graph inputs stay exactly as they were, and tensors the
    fold adds (a new bias, a shared weight's copy) are Constant nodes, not new inputs."""
    b = Builder(41)
    w = b.rand("w", [4, 3, 3, 3])
    b.node("Conv", ["x", w], ["c1"])
    b.node("Conv", ["x", w, b.rand("bias", [4])], ["c2"])
    b.bn("c1", "y1", 4, spatial=1)
    b.bn("c2", "y2", 4)
    v = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        b.nodes, "g", [v("x", TensorProto.FLOAT, [2, 3, 5, 5])] + [
            v(i.name, i.data_type, list(i.dims)) for i in b.inits],
        [v("y1", TensorProto.FLOAT, [2, 4, 3, 3]), v("y2", TensorProto.FLOAT, [2, 4, 3, 3])],
        b.inits)
    m = onnx.helper.make_model(graph, ir_version=3,
                               opset_imports=[onnx.helper.make_opsetid("", 7)])
    onnx.checker.check_model(m, full_check=True)
    out, report = check(m, 0)
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    assert {i.name for i in out.graph.initializer} == {i.name for i in m.graph.initializer}
    assert count(out, "Constant") == 2  # Conv_0's copy of the shared w, and its new bias
    assert "IR version 3" in report.notes[0]


def test_initializer_that_is_a_graph_input_is_kept_with_remedy() -> None:
    """From IR version 4 on, an initializer listed as a graph input can be overridden."""
    b = _conv_bn()
    m = b.model({"x": [2, 3, 4, 4]}, {"y": None})
    m.graph.input.append(onnx.helper.make_tensor_value_info("y_mean", TensorProto.FLOAT, [4]))
    _, report = check(m, 1)
    assert "keep_initializers_as_inputs=False" in report.kept[0].reason
    assert "--freeze-initializer-inputs" in report.kept[0].reason


def _weights_as_inputs(seed: int = 0) -> onnx.ModelProto:
    """A Conv -> BN -> Relu -> Conv -> BN model with every initializer a graph input too."""
    b = Builder(seed)
    b.node("Conv", ["x", b.rand("w1", [4, 3, 3, 3])], ["c1"], pads=[1, 1, 1, 1])
    b.bn("c1", "n1", 4)
    b.node("Relu", ["n1"], ["r"])
    b.node("Conv", ["r", b.rand("w2", [5, 4, 1, 1]), b.rand("b2", [5])], ["c2"])
    b.bn("c2", "y", 5)
    m = b.model({"x": [2, 3, 6, 6]}, {"y": None})
    m.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                         for t in m.graph.initializer)
    return m


@pytest.mark.parametrize("kind", ["ModelProto", "onnx_ir.Model", "SplitProto", "path"])
def test_frozen_initializer_inputs_fold(kind: str, tmp_path) -> None:
    """freeze_initializer_inputs takes the weights off the graph inputs, and every BN folds
    (on the protobuf path and on onnx-ir's); the input is left as it was."""
    m = _weights_as_inputs()
    assert count(fold_onnx(m).model) == 2
    before = m.SerializeToString()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    given = {"ModelProto": m, "onnx_ir.Model": ir.serde.deserialize_model(m),
             "SplitProto": load_for_pass(path), "path": path}[kind]
    out, report = fold_onnx(given, freeze_initializer_inputs=True)
    out = ir.serde.serialize_model(out) if isinstance(out, ir.Model) else (
        out.whole() if isinstance(out, SplitProto) else out)
    assert count(out) == 0 and report.notes[0].startswith("froze 11 graph input(s)")
    assert [i.name for i in out.graph.input] == ["x"]
    x = feeds(m)
    assert rel_err(run_ort(out, x), reference(m, x)) < FP32_TOL
    assert m.SerializeToString() == before and onnx.load(path).SerializeToString() == before


def test_frozen_initializer_inputs_inspect_and_ir3() -> None:
    m = _weights_as_inputs()
    report = inspect_onnx(m, freeze_initializer_inputs=True)
    assert len(report.folded) == 2 and "froze 11" in report.notes[0]
    m.ir_version = 3  # initializers are graph inputs by definition: constants already
    out, report = fold_onnx(m, freeze_initializer_inputs=True)
    assert count(out) == 0 and not any("froze" in n for n in report.notes)
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    x = feeds(m)
    assert rel_err(reference(out, x), reference(m, x)) < FP32_TOL


# --------------------------------------------------------------------- dtypes

@pytest.mark.parametrize(("dtype", "tol"), [(TensorProto.FLOAT16, 2e-3),
                                            (TensorProto.BFLOAT16, 1.6e-2),
                                            (TensorProto.DOUBLE, 1e-12)])
def test_dtypes(dtype: int, tol: float) -> None:
    b = Builder(13, dtype=dtype)
    b.node("Conv", ["x", b.rand("w", [4, 3, 3, 3]), b.rand("bias", [4])], ["c"])
    b.bn("c", "y", 4)
    m = b.model({"x": [2, 3, 5, 5]}, {"y": None}, opset=22)  # bf16 Conv needs opset 22
    out, _ = check(m, 0, tol=tol, ort=False)  # ORT CPU lacks bf16 / fp64 Conv
    if dtype == TensorProto.FLOAT16:
        x = feeds(m)
        assert rel_err(run_ort(out, x), reference(m, x)) < 5e-3


def test_bn15_fp16_data_fp32_params() -> None:
    b = Builder(14, dtype=TensorProto.FLOAT16, param_dtype=TensorProto.FLOAT)
    b.node("Conv", ["x", b.rand("w", [4, 3, 3, 3])], ["c"])
    b.bn("c", "y", 4)
    m = b.model({"x": [2, 3, 5, 5]}, {"y": None}, opset=15)
    out, _ = check(m, 0, tol=2e-3, ort=False)
    x = feeds(m)
    assert rel_err(run_ort(out, x), reference(m, x)) < 5e-3
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    dtypes = {i.name: i.data_type for i in out.graph.initializer}
    assert {dtypes[n] for n in conv.input[1:]} == {TensorProto.FLOAT16}


def test_fp16_fold_is_correctly_rounded() -> None:
    from bnfold.algebra import BNParams, fold_forward, round_to

    b = Builder(15, dtype=TensorProto.FLOAT16)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    m = b.model({"x": [1, 3, 2, 2]}, {"y": None})
    out, _ = fold_onnx(m)
    arr = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    got = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    s = arr["y_scale"].astype(np.float64) / np.sqrt(arr["y_var"].astype(np.float64) + 1e-5)
    exact = arr["w"].astype(np.float64) * s[:, None, None, None]
    np.testing.assert_array_equal(got["w"], round_to(exact, np.float16))
    del BNParams, fold_forward


def test_fp16_overflow_is_refused() -> None:
    b = Builder(16, dtype=TensorProto.FLOAT16)
    b.node("Conv", ["x", b.init("w", np.full([4, 3, 1, 1], 60000.0))], ["c"])
    b.bn("c", "y", 4)
    for t in b.inits:
        if t.name == "y_var":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(4, 1e-3, np.float16), t.name))
    m = b.model({"x": [1, 3, 2, 2]}, {"y": None})
    out, report = fold_onnx(m)
    assert count(out) == 1 and "not finite" in report.kept[0].reason
    assert out.SerializeToString() == fold_onnx(m).model.SerializeToString()


# --------------------------------------------------------------------- weights and names

def test_weights_in_constant_nodes() -> None:
    out, _ = check(constant_node_weight(17), 0)
    assert count(out, "Constant") == 0


def test_bias_from_constant_subgraph() -> None:
    """The dynamo exporter's zero bias: Expand(CastLike(0, x), Shape(weight)[0:1])."""
    out, _ = check(dynamo_bias_subgraph(18), 0)
    assert count(out, "Expand") == 0 and count(out, "Shape") == 0


def test_shared_weight_is_copied_and_both_fold() -> None:
    out, _ = check(shared_weight(19), 0)
    names = sorted(i.name for i in out.graph.initializer)
    assert names == ["Conv_0_bnfold_bias", "Conv_0_bnfold_weight", "Conv_1_bnfold_bias", "w"]


def test_new_names_unique_when_taken() -> None:
    b = Builder(20)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    b.rand("Conv_0_bnfold_bias", [4])
    b.node("Add", ["y", "Conv_0_bnfold_bias"], ["z"], )
    b.nodes[-1].op_type = "Add"
    m = b.model({"x": [2, 3, 4, 4]}, {"z": None})
    out, _ = check(m, 0)
    assert "Conv_0_bnfold_bias_1" in {i.name for i in out.graph.initializer}


def test_bn_output_is_graph_output_keeps_name_and_value_info() -> None:
    b = _conv_bn()
    b.node("Relu", ["c"], ["r"])  # c now has two readers: the BN stays ...
    m = b.model({"x": [2, 3, 4, 4]}, {"y": None, "r": None})
    check(m, 1)
    b2 = _conv_bn()
    b2.node("Relu", ["y"], ["r"])  # ... here it folds; y stays an output name
    m2 = b2.model({"x": [2, 3, 4, 4]}, {"y": None, "r": None})
    out, _ = check(m2, 0)
    kept = {v.name for v in m2.graph.value_info} - {"y", "c"}  # c is now named y
    assert kept <= {v.name for v in out.graph.value_info}


# --------------------------------------------------------------------- subgraphs, inputs

def test_bn_inside_if_branch_folds() -> None:
    inner = Builder(21)
    inner.node("Conv", ["x", inner.rand("w", [4, 3, 1, 1])], ["c"])
    inner.bn("c", "yt", 4)
    then_g = onnx.helper.make_graph(inner.nodes, "then", [],
                                    [onnx.helper.make_tensor_value_info("yt", 1, None)],
                                    inner.inits)
    other = Builder(22)
    other.node("Relu", ["x"], ["ye"])
    else_g = onnx.helper.make_graph(other.nodes, "else", [],
                                    [onnx.helper.make_tensor_value_info("ye", 1, None)])
    b = Builder(23)
    b.node("ReduceMean", ["x"], ["mean"], keepdims=0)
    b.node("Constant", [], ["zero"], value=onnx.numpy_helper.from_array(np.float32(0)))
    b.node("Greater", ["mean", "zero"], ["cond"])
    b.node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    m = b.model({"x": [2, 3, 4, 4]}, {"y": None}, opset=17)
    _, report = check(m, 0)
    assert report.folded[0].action == "folded"


def test_ir_model_input_not_mutated_and_inspect() -> None:
    import onnx_ir as ir

    m = _conv_bn().model({"x": [2, 3, 4, 4]}, {"y": None})
    model = ir.serde.deserialize_model(m)
    text = ir.to_onnx_text(model) if hasattr(ir, "to_onnx_text") else None
    out, report = fold_onnx(model)
    assert isinstance(out, ir.Model) and report.changed
    assert sum(n.op_type == "BatchNormalization" for n in model.graph) == 1
    if text is not None:
        assert ir.to_onnx_text(model) == text
    rep = inspect_onnx(model)
    assert [(e.bn, e.action, e.into) for e in rep.entries] == [("BatchNormalization_1",
                                                                 "folded", "Conv_0")]
    # a dry run: same action names, but it says so, and it did not change anything
    assert rep.dry_run and not rep.changed and rep.to_dict()["dry_run"]
    assert "would fold" in rep.table() and " folded" not in rep.table()
    assert not report.dry_run and report.to_dict()["dry_run"] is False
    assert sum(n.op_type == "BatchNormalization" for n in model.graph) == 1
    out2, _ = fold_onnx(model, inplace=True)
    assert out2 is model and sum(n.op_type == "BatchNormalization" for n in model.graph) == 0


def test_bad_input_is_one_line_error(tmp_path) -> None:
    from bnfold.errors import BadInputError

    with pytest.raises(BadInputError):
        fold_onnx(42)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(BadInputError) as err:
        fold_onnx(bad)
    assert "\n" not in str(err.value)


def test_bn_inside_loop_body_with_outer_weights_folds() -> None:
    """Loop body: state -> Conv(outer-scope weight) -> BN -> next state (a body output)."""
    b = Builder(24)
    w = b.rand("w", [3, 3, 1, 1])
    body = Builder(25)
    body.node("Identity", ["cond_in"], ["cond_out"])
    body.node("Conv", ["s_in", w], ["c"])
    body.bn("c", "s_out", 3)
    v = onnx.helper.make_tensor_value_info
    body_g = onnx.helper.make_graph(
        body.nodes, "body",
        [v("i", TensorProto.INT64, []), v("cond_in", TensorProto.BOOL, []),
         v("s_in", TensorProto.FLOAT, [2, 3, 4, 4])],
        [v("cond_out", TensorProto.BOOL, []), v("s_out", TensorProto.FLOAT, [2, 3, 4, 4])],
        body.inits)
    b.inits.append(onnx.numpy_helper.from_array(np.array(3, np.int64), "trip"))
    b.inits.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    b.node("Loop", ["trip", "cond", "x"], ["y"], body=body_g)
    m = b.model({"x": [2, 3, 4, 4]}, {"y": [2, 3, 4, 4]})
    _, report = check(m, 0)
    assert [e.action for e in report.entries] == ["folded"]


def test_metadata_doc_and_producer_are_kept() -> None:
    m = _conv_bn().model({"x": [2, 3, 4, 4]}, {"y": None}, producer_name="tf2onnx",
                         doc_string="user doc")
    onnx.helper.set_model_props(m, {"author": "someone", "license": "MIT"})
    out, _ = check(m, 0)
    assert (out.producer_name, out.doc_string) == ("tf2onnx", "user doc")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone", "license": "MIT"}


def test_weight_computed_from_input_deep_chain_is_kept_quickly() -> None:
    """A run-time weight behind 3000 nodes: a bounded search, no recursion error."""
    b = Builder(26)
    prev = "wx"
    for i in range(3000):
        prev = b.node("Relu", [prev], [f"r{i}"])
    b.node("Conv", ["x", prev], ["c"])
    b.bn("c", "y", 4)
    m = b.model({"x": [2, 3, 4, 4], "wx": [4, 3, 1, 1]}, {"y": None})
    _, report = fold_onnx(m)
    assert "is not a constant" in report.kept[0].reason


def test_bn_inside_model_local_function_is_reported_kept() -> None:
    """A BN in a function body is never skipped silently: kept, with the remedy; inlining the
    function first lets it fold."""
    b = Builder(27)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    inner = Builder(28)
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in (
        onnx.numpy_helper.from_array(np.linspace(0.5, 2, 4).astype(np.float32), "s"),
        onnx.numpy_helper.from_array(np.linspace(-1, 1, 4).astype(np.float32), "bb"),
        onnx.numpy_helper.from_array(np.linspace(-.3, .4, 4).astype(np.float32), "mu"),
        onnx.numpy_helper.from_array(np.linspace(0.5, 3, 4).astype(np.float32), "v"))]
    inner.node("BatchNormalization", ["i", "s", "bb", "mu", "v"], ["o"])
    fn = onnx.helper.make_function("local", "MyBN", ["i"], ["o"], consts + inner.nodes,
                                   [onnx.helper.make_opsetid("", 17)])
    b.nodes.append(onnx.helper.make_node("MyBN", ["c"], ["y"], domain="local", name="call"))
    v = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(b.nodes, "g", [v("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                                   [v("y", TensorProto.FLOAT, [2, 4, 4, 4])], b.inits)
    m = onnx.helper.make_model(graph, functions=[fn], ir_version=10, opset_imports=[
        onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)])
    out, report = fold_onnx(m)
    onnx.checker.check_model(out, full_check=True)
    assert [(e.bn, e.action) for e in report.entries] == [("local.MyBN/BatchNormalization_0",
                                                           "kept")]
    assert "inline" in report.kept[0].reason
    assert [(e.bn, e.action) for e in inspect_onnx(m).entries] == [(report.entries[0].bn, "kept")]
    check(inline_local_functions(m), 0)
