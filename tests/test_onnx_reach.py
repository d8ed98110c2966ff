"""fold_onnx reach: dynamo exports of deep nets, constant budgets, training-mode BN by the
spec, graph-input parameters, Gemm beta; every fold checked against float64."""

from __future__ import annotations

import io
import math
import tracemalloc
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_cases import Builder, count, feeds, reference, rel_err, run_ort
from test_onnx_fold import check
from torch import nn

import bnfold
from bnfold.models import reach, zoo
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.onnx.fold import fold_onnx

FP32_TOL = 1e-5


def dynamo_export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (x,), dynamo=True, optimize=False,
                                 verbose=False).model_proto


def torchscript_export(model: nn.Module, x: torch.Tensor, opset: int = 17) -> onnx.ModelProto:
    """TorchScript export with every BN kept (``TrainingMode.PRESERVE``)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset,
                          training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(buf.getvalue())


def _ort_vs_float64(model: nn.Module, proto: onnx.ModelProto, x: torch.Tensor,
                    unfolded: onnx.ModelProto | None = None) -> float:
    """Relative error of ``proto`` in ORT against the torch model in float64 (or, for a model
    that casts to float32 itself, against ``unfolded`` evaluated in float64)."""
    feeds = {proto.graph.input[0].name: x.numpy()}
    try:
        with torch.no_grad():
            want = [model.double()(x.double()).numpy()]
    except RuntimeError:  # an explicit .to(torch.float32) inside the model
        assert unfolded is not None
        want = reference(unfolded, feeds)
    model.float()
    return rel_err(run_ort(proto, feeds), want)


# --------------------------------------------------------------------- 1. dynamo exports

def test_dynamo_deep_chain_folds_every_bn() -> None:
    """Deep layers' zero bias is ``Expand(CastLike(0, x), Shape(W)[0:1])``: CastLike reads
    only x's dtype, so the deepest layers fold like the first."""
    torch.manual_seed(0)
    blocks = [m for _ in range(24) for m in (nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                             nn.BatchNorm2d(4), nn.ReLU())]
    model = nn.Sequential(*blocks)
    randomize_bn_stats(model, 0)
    model.eval()
    proto = dynamo_export(model, torch.randn(2, 4, 8, 8))
    assert count(proto) == 24
    folded, report = fold_onnx(proto)
    assert count(folded) == 0, report.table()
    assert _ort_vs_float64(model, folded, torch.randn(2, 4, 8, 8)) < FP32_TOL


ZOOS = [(zoo, n) for n in zoo.ZOO] + [(reach, n) for n in reach.REACH]


@pytest.mark.parametrize(("source", "name"), ZOOS, ids=[n for _, n in ZOOS])
def test_dynamo_fold_leaves_what_fx_leaves(source, name: str) -> None:
    """The ONNX fold of a dynamo export keeps exactly the sites the FX fold keeps, which is
    what an exact folder must keep (``bn_left``), each with a reason."""
    model, x = source.get(name), source.example_input(name)
    entry = source.ZOO[name] if source is zoo else source.REACH[name]
    _, fx_report = bnfold.fold(model, (x,))
    _, report = fold_onnx(dynamo_export(model, x))
    assert len(report.kept) == len(fx_report.kept) == entry.bn_left, \
        report.table() + "\n" + fx_report.table()
    assert all(e.reason for e in report.kept)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(reach.REACH))
def test_reach_zoo_folds_exactly(name: str, dynamo: bool) -> None:
    """Every reach case, both exporters: exactly ``bn_left`` sites kept (each with a reason),
    the folded model equal to the unfolded torch model in float64 on a fresh input."""
    model, x = reach.get(name), reach.example_input(name)
    proto = (dynamo_export if dynamo else torchscript_export)(model, x)
    before = proto.SerializeToString()
    folded, report = fold_onnx(proto)
    assert proto.SerializeToString() == before
    onnx.checker.check_model(folded, full_check=True)
    assert len(report.kept) == reach.REACH[name].bn_left, report.table()
    assert all(e.reason and e.details.get("kind") for e in report.kept)
    assert _ort_vs_float64(model, folded, reach.example_input(name, seed=7), proto) < FP32_TOL
    again, rep2 = fold_onnx(folded)
    assert not rep2.changed and again.SerializeToString() == folded.SerializeToString()


def test_long_activation_ancestry_costs_nothing() -> None:
    """2000 activations before a layer whose bias is a dynamo-style constant cone."""
    b = Builder(3)
    h = "x"
    for i in range(2000):
        h = b.node("Relu", [h], [f"r{i}"])
    w = b.rand("w", [4, 4, 1, 1])
    b.node("Shape", [w], ["ws"], start=0, end=1)
    b.node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32)))
    b.node("CastLike", ["zero", h], ["zl"])
    b.node("Expand", ["zl", "ws"], ["bias"])
    b.node("Conv", [h, w, "bias"], ["c"])
    b.bn("c", "y", 4)
    check(b.model({"x": [2, 4, 3, 3]}, {"y": None}), 0)


# --------------------------------------------------------------------- constant budget

def _bomb(op: str, n: int, where: str) -> onnx.ModelProto:
    """Conv -> BN whose scale (or the conv's bias) is a constant of ``n`` elements built by
    ``op`` (an invalid model: the point is that reading it must not allocate ``n`` floats)."""
    b = Builder(4)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])] + (["big"] if where == "bias" else []),
           ["h"])
    shape = b.init("shape", np.array([n]), TensorProto.INT64)
    if op == "Expand":
        b.node("Expand", [b.init("zero", np.array(0.0)), shape], ["big"])
    elif op == "ReduceSum":  # over the empty axis of a [0, n] constant: n zeros
        b.node("ReduceSum", [b.init("empty", np.zeros((0, n))),
                             b.init("axis", np.array([0]), TensorProto.INT64)], ["big"],
               keepdims=0)
    elif op == "MatMul":  # [k, 1] @ [1, k] of two expanded zeros: k * k zeros
        k = math.isqrt(n)
        zero = b.init("zero", np.array(0.0))
        b.node("Expand", [zero, b.init("col", np.array([k, 1]), TensorProto.INT64)], ["a"])
        b.node("Expand", [zero, b.init("row", np.array([1, k]), TensorProto.INT64)], ["c"])
        b.node("MatMul", ["a", "c"], ["m"])
        b.node("Reshape", ["m", shape], ["big"])
    elif op == "ConstantOfShape":
        b.node("ConstantOfShape", [shape], ["big"],
               value=numpy_helper.from_array(np.zeros(1, np.float32)))
    else:
        b.node("Tile", [b.init("zero", np.zeros(1)), shape], ["big"])
    b.bn("h", "y", 4)
    if where == "scale":
        b.nodes[-1].input[1] = "big"
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("where", ["scale", "bias"])
@pytest.mark.parametrize("op", ["Expand", "ConstantOfShape", "Tile", "ReduceSum", "MatMul"])
def test_size_bomb_is_not_materialized(op: str, where: str) -> None:
    n = 2**24 if op == "MatMul" else 2**28  # (MatMul: two operands within the 4096 budget)
    proto = _bomb(op, n, where)
    assert proto.ByteSize() < 1000
    tracemalloc.start()
    try:
        _, report = fold_onnx(proto)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    (entry,) = report.kept
    assert f"{op} with {n} elements" in entry.reason and "budget" in entry.reason


def test_a_weight_norm_conv_folds_from_its_computed_weight() -> None:
    """dynamo computes a ``weight_norm`` conv's weight, ``g * v / ReduceL2(v)``: the cone is
    evaluated (a reduction yields at most one element per input position) and the BN folds."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv1d(3, 8, 3)), nn.BatchNorm1d(8), nn.ReLU())
    randomize_bn_stats(model).eval()
    x = torch.randn(2, 3, 16)
    out, report = fold_onnx(dynamo_export(model, x))
    assert [e.action for e in report.entries] == ["folded"] and count(out) == 0
    assert _ort_vs_float64(model, out, x) < 1e-5


@pytest.mark.parametrize("op", ["Expand", "Concat"])
def test_budget_is_configurable(op: str) -> None:
    """A BN whose B (12 zeros) is ``Expand(0, [12])`` or a ``Concat`` of three 4-element
    constants (bounded by the sum of its inputs): folded by default, kept under a budget
    of 8."""
    b = Builder(5)
    b.node("Conv", ["x", b.rand("w", [12, 3, 1, 1])], ["h"])
    if op == "Expand":
        b.node("Expand", [b.init("zero", np.array(0.0)),
                          b.init("shape", np.array([12]), TensorProto.INT64)], ["zeros"])
    else:
        part = b.init("part", np.zeros(4))
        b.node("Concat", [part, part, part], ["zeros"], axis=0)
    b.bn("h", "y", 12)
    b.nodes[-1].input[2] = "zeros"
    b.inits = [i for i in b.inits if i.name != "y_B"]
    m = b.model({"x": [2, 3, 4, 4]}, {"y": None})
    check(m, 0)
    _, report = fold_onnx(m, max_const_elements=8)
    assert f"{op} with 12 elements, over the constant-evaluation budget of 8" \
        in report.kept[0].reason


# --------------------------------------------------------------------- issue 8, item 8

@pytest.mark.parametrize("opset", [7, 9, 11, 13])
def test_declared_statistics_outputs_are_training_mode(opset: int) -> None:
    b = Builder(6)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    b.nodes[-1].output.extend(["rm", "rv", "sm", "sv"])  # declared, read by nothing
    m = b.model({"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4]}, opset=opset, ir_version=7)
    out, report = fold_onnx(m)
    assert count(out) == 1
    assert "training mode by the ONNX spec" in report.kept[0].reason
    # ONNX Runtime indeed normalizes with the batch statistics: not the inference BN.
    x = feeds(m)
    assert rel_err(run_ort(m, x), reference(m, x)) > 1e-2


def test_parameter_graph_input_without_initializer_reason() -> None:
    b = Builder(7)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y", 4)
    b.inits = [i for i in b.inits if i.name != "y_mean"]
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4]),
                       helper.make_tensor_value_info("y_mean", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = fold_onnx(m)
    reason = report.kept[0].reason
    assert "without an initializer" in reason and "keep_initializers_as_inputs" not in reason


@pytest.mark.parametrize("beta", [0.3, 0.0, 2.0])
def test_bn_into_gemm_without_c_and_beta(beta: float) -> None:
    b = Builder(8)
    b.bn("x", "h", 6)
    b.node("Gemm", ["h", b.rand("w", [6, 5])], ["y"], beta=beta)
    _, report = check(b.model({"x": [3, 6]}, {"y": None}), 0)
    assert report.folded[0].details["direction"] == "backward"


# --------------------------------------------------------------------- 2. BN in every spelling

def _frozen_bn(b: Builder, x: str, y: str, c: int, rank: int = 4, unsqueeze: bool = False
               ) -> str:
    """tf2onnx / TorchScript FrozenBN: ``x * Reshape(scale) + Unsqueeze(shift)`` with
    ``scale = gamma * Reciprocal(Sqrt(var + eps))``, ``shift = beta - mean * scale``."""
    rng = b.rng
    g = b.init(f"{y}_g", (rng.random(c) + 0.5) * np.where(rng.random(c) < 0.2, -1, 1))
    beta, mean = b.rand(f"{y}_beta", [c]), b.rand(f"{y}_mean", [c])
    var = b.init(f"{y}_var", rng.random(c) * 2.7 + 0.3)
    eps = b.init(f"{y}_eps", np.array([1e-5]))
    s = b.node("Add", [var, eps], [f"{y}_ve"])
    s = b.node("Sqrt", [s], [f"{y}_sd"])
    s = b.node("Reciprocal", [s], [f"{y}_inv"])
    s = b.node("Mul", [g, s], [f"{y}_s"])
    t = b.node("Mul", [mean, s], [f"{y}_ms"])
    t = b.node("Sub", [beta, t], [f"{y}_t"])
    tail = [1] * (rank - 2)
    shape = b.init(f"{y}_shape", np.array([1, c, *tail]), TensorProto.INT64)
    s = b.node("Reshape", [s, shape], [f"{y}_s4"])
    if unsqueeze:
        axes = b.init(f"{y}_axes", np.array([0, *range(2, rank)]), TensorProto.INT64)
        t = b.node("Unsqueeze", [t, axes], [f"{y}_t4"])
    else:
        t = b.node("Reshape", [t, shape], [f"{y}_t4"])
    h = b.node("Mul", [x, s], [f"{y}_xs"])
    return b.node("Add", [h, t], [y])


@pytest.mark.parametrize("unsqueeze", [False, True])
def test_frozen_bn_chain_folds_forward(unsqueeze: bool) -> None:
    b = Builder(9)
    b.node("Conv", ["x", b.rand("w", [6, 3, 3, 3])], ["c"], pads=[1, 1, 1, 1])
    _frozen_bn(b, "c", "f", 6, unsqueeze=unsqueeze)
    b.node("Relu", ["f"], ["y"])
    out, report = check(b.model({"x": [2, 3, 5, 5]}, {"y": None}), 0)
    (entry,) = report.entries
    assert entry.action == "folded" and entry.details["kind"] == "affine Mul+Add"
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]


def test_input_normalization_folds_backward() -> None:
    """``(x - mean) / std`` before an unpadded conv: folded into it (Sub+Div)."""
    b = Builder(10)
    b.node("Sub", ["x", b.rand("mean", [3, 1, 1])], ["centered"])
    b.node("Div", ["centered", b.init("std", [[[0.229]], [[0.224]], [[0.225]]])], ["n"])
    b.node("Conv", ["n", b.rand("w", [4, 3, 3, 3])], ["y"])
    _, report = check(b.model({"x": [2, 3, 6, 6]}, {"y": None}), 0)
    assert report.entries[0].details == {"direction": "backward", "layer": "Conv",
                                         "kind": "affine Sub+Div"}


def test_bn_before_a_pixel_unshuffle_into_a_conv_names_what_blocks_it() -> None:
    """TorchScript's PixelUnshuffle (Reshape -> Transpose -> Reshape) between a BN and a conv
    regroups the channels: the reason names the Reshape and its Transpose reader, not a Gemm
    that is not there."""
    class Unshuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.pu, self.conv = nn.BatchNorm2d(4), nn.PixelUnshuffle(2), \
                nn.Conv2d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.pu(self.bn(torch.relu(x))))

    torch.manual_seed(0)
    model, x = randomize_bn_stats(Unshuffle()).eval(), torch.randn(2, 4, 6, 6)
    folded, report = fold_onnx(torchscript_export(model, x))
    (entry,) = report.kept
    assert "/pu/Reshape (Reshape) regroups the BN's channels and feeds /pu/Transpose " \
        "(Transpose), not a Gemm" in entry.reason, entry.reason
    assert _ort_vs_float64(model, folded, x) < FP32_TOL


def test_scalar_and_off_channel_affines_are_kept_with_reason() -> None:
    b = Builder(11)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.node("Mul", ["c", b.rand("cols", [5])], ["m"])  # scales W (the last axis)
    b.node("Relu", ["m"], ["r"])
    b.node("Conv", ["r", b.rand("w2", [4, 4, 1, 1])], ["c2"])
    b.node("Mul", ["c2", b.init("alpha", [1.7])], ["s"])
    b.node("Add", ["s", b.init("beta", [-0.3])], ["y"])
    out, report = check(b.model({"x": [2, 3, 5, 5]}, {"y": None}), 0)
    reasons = {e.details["kind"]: e.reason for e in report.kept}
    assert "normalizes axis 3" in reasons["affine Mul"]
    assert "scalar affine" in reasons["Mul"]
    assert count(out, "Mul") == 2


def test_python_number_scale_is_not_a_site() -> None:
    b = Builder(12)
    b.node("MatMul", ["x", b.rand("w", [5, 6])], ["m"])
    b.node("Mul", ["m", b.init("half", np.array(0.5))], ["y"])
    _, report = check(b.model({"x": [2, 5]}, {"y": None}), 0)
    assert report.entries == []


def test_training_bn_on_a_constant_is_evaluated_once() -> None:
    """Weight standardization: a training-mode BN over the weight, then a Conv and a BN."""
    b = Builder(13)
    w = b.rand("w", [1, 6, 27])
    b.bn(w, "wn", 6, training_mode=1)
    b.nodes[-1].output.extend(["wn_running_mean", "wn_running_var"])  # declared, unread
    b.node("Reshape", ["wn", b.init("wshape", np.array([6, 3, 3, 3]), TensorProto.INT64)],
           ["ws"])
    b.node("Conv", ["x", "ws"], ["c"], pads=[1, 1, 1, 1])
    b.bn("c", "y", 6)
    m = b.model({"x": [2, 3, 5, 5]}, {"y": [2, 6, 5, 5]}, infer=False)
    out, report = check(m, 0, ref=False)
    assert [e.details["direction"] for e in report.entries] == ["constant", "forward"]
    # float64 reference: standardize the weight with torch, conv, BN.
    p = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype(np.float64))
         for i in m.graph.initializer}
    x = feeds(m)["x"]
    wn = torch.nn.functional.batch_norm(p["w"], None, None, p["wn_scale"], p["wn_B"],
                                        training=True, eps=1e-5).reshape(6, 3, 3, 3)
    h = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), wn, padding=1)
    want = torch.nn.functional.batch_norm(h, p["y_mean"], p["y_var"], p["y_scale"],
                                          p["y_B"], eps=1e-5)
    assert rel_err(run_ort(out, {"x": x}), [want.numpy()]) < FP32_TOL


# --------------------------------------------------------------------- 3. no-ops

@pytest.mark.parametrize("opset", [11, 13])
def test_forward_and_backward_through_identity_and_dropout(opset: int) -> None:
    b = Builder(14)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.node("Identity", ["c"], ["i"])
    b.node("Dropout", ["i"], ["d"], ratio=0.3) if opset < 12 else \
        b.node("Dropout", ["i", b.init("ratio", np.array(0.3))], ["d"])
    b.bn("d", "z", 4)
    b.node("Relu", ["z"], ["r"])
    b.bn("r", "z2", 4)
    b.node("Dropout", ["z2"], ["d2"])
    b.node("Identity", ["d2"], ["i2"])
    b.node("Gemm", [b.node("Flatten", ["i2"], ["f"]), b.rand("w2", [4, 3])], ["y"])
    _, report = check(b.model({"x": [2, 3, 1, 1]}, {"y": [2, 3]}, opset=opset, infer=False), 0)
    assert [e.details["direction"] for e in report.entries] == ["forward", "backward"]


def test_training_dropout_is_not_a_noop() -> None:
    b = Builder(15)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.inits.append(numpy_helper.from_array(np.array(True), "on"))
    b.node("Dropout", ["c", b.init("ratio", np.array(0.0)), "on"], ["d"])
    b.bn("d", "y", 4)
    _, report = fold_onnx(b.model({"x": [2, 3, 4, 4]}, {"y": None}))
    assert "Dropout" in report.kept[0].reason


# --------------------------------------------------------------------- 4. linear structure

def test_concat_of_layers_splits_and_folds() -> None:
    b = Builder(16)
    b.node("Conv", ["x", b.rand("w1", [3, 3, 3, 3])], ["a"], pads=[1, 1, 1, 1])
    b.node("ConvTranspose", ["x", b.rand("w2", [3, 2, 1, 1])], ["t"])
    b.node("Concat", ["a", "t"], ["cat"], axis=1)
    b.bn("cat", "y", 5)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 0)
    assert report.folded[0].into == "Conv_0, ConvTranspose_1"


def test_concat_with_one_non_layer_keeps_a_smaller_bn() -> None:
    b = Builder(17)
    b.node("Conv", ["x", b.rand("w1", [6, 3, 1, 1])], ["a"])
    b.node("Concat", ["a", "x"], ["cat"], axis=1)
    b.bn("cat", "y", 9)
    out, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 1)
    (entry,) = report.kept
    assert "smaller BatchNormalization" in entry.reason and entry.into == "Conv_0"
    (bn,) = [n for n in out.graph.node if n.op_type == "BatchNormalization"]
    assert bn.input[0] == "x"
    sizes = {i.name: numpy_helper.to_array(i).size for i in out.graph.initializer}
    assert all(sizes[n] == 3 for n in list(bn.input)[1:])


@pytest.mark.parametrize("form", ["BatchNormalization", "Mul+Add"])
def test_a_smaller_bn_over_an_untyped_concat_input(form: str) -> None:
    """The non-layer input is an intermediate value no ``value_info`` types (TorchScript's
    exports declare none): the smaller BN takes the BN's parameter type, or, for an affine
    chain, the concat's element type read off the folded layer's weight (an
    ``AssertionError`` before)."""
    b = Builder(17)
    b.node("Conv", ["x", b.rand("w1", [6, 3, 1, 1])], ["a"])
    b.node("Relu", ["x"], ["r"])
    b.node("Concat", ["a", "r"], ["cat"], axis=1)
    if form == "BatchNormalization":
        b.bn("cat", "y", 9)
    else:
        b.node("Mul", ["cat", b.rand("s", [1, 9, 1, 1])], ["m"])
        b.node("Add", ["m", b.rand("t", [1, 9, 1, 1])], ["y"])
    model = b.model({"x": [2, 3, 4, 4]}, {"y": None})
    del model.graph.value_info[:]
    _, report = check(model, 1)
    assert "smaller BatchNormalization" in report.kept[0].reason


def test_the_torchscript_export_of_a_concat_with_a_relu_input_folds() -> None:
    class CatRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([torch.relu(self.c1(x)), self.c2(x)], 1))

    torch.manual_seed(0)
    model, x = randomize_bn_stats(CatRelu()).eval(), torch.randn(2, 3, 8, 8)
    folded, report = fold_onnx(torchscript_export(model, x))
    (entry,) = report.kept
    assert entry.into == "/c2/Conv" and "smaller BatchNormalization" in entry.reason
    assert _ort_vs_float64(model, folded, x) < 1e-5


@pytest.mark.parametrize("op", ["Concat", "Add"])
def test_a_layer_output_read_twice_by_one_node_says_so(op: str) -> None:
    b = Builder(17)
    b.node("Conv", ["x", b.rand("w1", [3, 3, 1, 1])], ["a"])
    b.node(op, ["a", "a"], ["j"], **({"axis": 1} if op == "Concat" else {}))
    b.bn("j", "y", 6 if op == "Concat" else 3)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 1)
    assert f"Conv_0 output 'a' is read 2 times by {op}_1" in report.kept[0].reason
    assert "also feeds nothing" not in report.kept[0].reason


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_concat_off_the_channel_axis_folds_the_whole_bn_into_each_layer(axis: int) -> None:
    """A siamese batch (axis 0) or a spatial concat of two convs: each input holds every
    channel, ``BN(cat(y1, y2)) = cat(BN(y1), BN(y2))``, so each conv takes the whole BN."""
    b = Builder(19)
    b.node("Conv", ["x", b.rand("w1", [4, 3, 3, 3])], ["a"], pads=[1, 1, 1, 1])
    b.node("Conv", ["x", b.rand("w2", [4, 3, 3, 3]), b.rand("b2", [4])], ["c"],
           pads=[1, 1, 1, 1])
    b.node("Concat", ["a", "c"], ["cat"], axis=axis)
    b.bn("cat", "y", 4)
    _, report = check(b.model({"x": [2, 3, 5, 5]}, {"y": None}), 0)
    assert report.folded[0].into == "Conv_0, Conv_1"


def test_off_axis_concat_of_one_layer_output_twice_folds_once() -> None:
    """``Concat(a, a, axis=0)``: the conv behind ``a`` takes the BN once."""
    b = Builder(20)
    b.node("Gemm", ["x", b.rand("w", [5, 3]), b.rand("bias", [5])], ["a"], transB=1)
    b.node("Concat", ["a", "a"], ["cat"], axis=0)
    b.bn("cat", "y", 5)
    _, report = check(b.model({"x": [4, 3]}, {"y": None}), 0)
    assert report.folded[0].into == "Gemm_0"


def test_off_axis_concat_with_a_non_layer_keeps_the_bn_saying_which() -> None:
    b = Builder(21)
    b.node("Conv", ["x", b.rand("w1", [3, 3, 1, 1])], ["a"])
    b.node("Concat", ["a", "x"], ["cat"], axis=0)
    b.bn("cat", "y", 3)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 1)
    assert "on axis 0 (not the channel axis 1" in report.kept[0].reason
    assert "input 'x' does not fold" in report.kept[0].reason


def test_concat_with_two_non_layers_keeps_whole_bn() -> None:
    b = Builder(18)
    b.node("Conv", ["x", b.rand("w1", [6, 3, 1, 1])], ["a"])
    b.node("Relu", ["x"], ["r"])
    b.node("Concat", ["a", "x", "r"], ["cat"], axis=1)
    b.bn("cat", "y", 12)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 1)
    assert "kept whole" in report.kept[0].reason
    assert "of which 2 inputs are not foldable" in report.kept[0].reason


def test_concat_names_the_first_two_non_layers() -> None:
    """Once two inputs are not foldable layers the BN stays whole, and the inputs after them
    are not planned (a DenseNet concat reads every earlier layer of its block)."""
    b = Builder(18)
    b.node("Relu", ["x"], ["r"])
    b.node("Sigmoid", ["x"], ["s"])
    b.node("Conv", ["x", b.rand("w1", [6, 3, 1, 1])], ["a"])
    b.node("Concat", ["x", "r", "s", "a"], ["cat"], axis=1)
    b.bn("cat", "y", 15)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 1)
    (entry,) = report.kept
    assert "of which 2 or more inputs are not foldable" in entry.reason
    assert "'x'" in entry.reason and "'r'" in entry.reason and "'s'" not in entry.reason


def test_sum_of_layers_scales_each_and_shifts_once() -> None:
    b = Builder(19)
    b.node("Conv", ["x", b.rand("w1", [4, 3, 3, 3])], ["a"], pads=[1, 1, 1, 1])
    b.node("Conv", ["x", b.rand("w2", [4, 3, 1, 1])], ["c"])
    b.node("Add", ["a", "c"], ["s"])
    b.bn("s", "y", 4)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 0)
    assert report.folded[0].into == "Conv_0, Conv_1"


_TREES = {  # expression -> its nodes (op, inputs, output); the last output is the sum
    "a-b": [("Sub", "a", "b", "s")],
    "(a+b)+c": [("Add", "a", "b", "ab"), ("Add", "ab", "c", "s")],
    "a+(b+c)": [("Add", "b", "c", "bc"), ("Add", "a", "bc", "s")],
    "(a+b)+(c+d)": [("Add", "a", "b", "ab"), ("Add", "c", "d", "cd"), ("Add", "ab", "cd", "s")],
    "(a+b)-c": [("Add", "a", "b", "ab"), ("Sub", "ab", "c", "s")],
    "a-(b-c)": [("Sub", "b", "c", "bc"), ("Sub", "a", "bc", "s")],
}


@pytest.mark.parametrize("tree", list(_TREES))
def test_a_sum_of_more_layers_scales_each_and_shifts_once(tree: str) -> None:
    """Exporters write a sum of n layers as a tree of binary Adds (and a difference as Sub):
    each summand's layer is scaled and the shift goes into the leftmost one's bias, which no
    Sub negates (kept before: the inner Add is no layer, and Sub was no sum)."""
    b = Builder(19)
    names = sorted({v for op in _TREES[tree] for v in op[1:3] if len(v) == 1})
    for name in names:
        b.node("Conv", ["x", b.rand(f"w{name}", [4, 3, 3, 3])], [name], pads=[1, 1, 1, 1])
    for op, left, right, out in _TREES[tree]:
        b.node(op, [left, right], [out])
    b.bn("s", "y", 4)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 0)
    assert len(report.folded[0].into.split(", ")) == len(names)


def test_an_inner_sum_read_elsewhere_is_not_taken_apart() -> None:
    b = Builder(19)
    for name in "abc":
        b.node("Conv", ["x", b.rand(f"w{name}", [4, 3, 1, 1])], [name])
    b.node("Add", ["a", "b"], ["ab"])
    b.node("Add", ["ab", "c"], ["s"])
    b.bn("s", "y", 4)
    b.node("Relu", ["ab"], ["r"])
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None, "r": None}), 1)
    assert "for summand 'ab': Add_3 output 'ab' also feeds Relu_6" in report.kept[0].reason


def test_the_torchscript_export_of_a_sum_of_three_convs_folds() -> None:
    class Sum3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.ModuleList(nn.Conv2d(3, 4, k, padding=k // 2) for k in (1, 3, 5))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.c[0](x) + self.c[1](x) + self.c[2](x))

    torch.manual_seed(0)
    model, x = randomize_bn_stats(Sum3()).eval(), torch.randn(2, 3, 8, 8)
    folded, report = fold_onnx(torchscript_export(model, x))
    assert [e.action for e in report.entries] == ["folded"]
    assert _ort_vs_float64(model, folded, x) < 1e-5


def test_sum_with_a_non_layer_is_kept() -> None:
    b = Builder(20)
    b.node("Conv", ["x", b.rand("w1", [3, 3, 1, 1])], ["a"])
    b.node("Add", ["a", "x"], ["s"])
    b.bn("s", "y", 3)
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 1)
    assert "its input is the sum Add_1" in report.kept[0].reason


def test_bn_read_by_several_layers_folds_into_each() -> None:
    b = Builder(21)
    w = b.rand("w", [4, 3, 1, 1])
    b.bn("x", "n", 3)
    b.node("Conv", ["n", w], ["a"])
    b.node("Conv", ["n", w], ["c"], strides=[2, 2])  # shares the weight: copied
    b.node("Gemm", [b.node("Flatten", ["x"], ["f"]), b.rand("g", [48, 2])], ["z"])
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"a": None, "c": None, "z": None}), 0)
    assert report.folded[0].into == "Conv_1, Conv_2"


def test_bn_read_by_a_padded_conv_too_is_kept() -> None:
    b = Builder(22)
    b.bn("x", "n", 3)
    b.node("Conv", ["n", b.rand("w1", [4, 3, 1, 1])], ["a"])
    b.node("Conv", ["n", b.rand("w2", [4, 3, 3, 3])], ["c"], pads=[1, 1, 1, 1])
    _, report = check(b.model({"x": [2, 3, 4, 4]}, {"a": None, "c": None}), 1)
    assert "every reader must be a foldable layer, but for Conv_2" in report.kept[0].reason


def test_layer_read_only_by_bns_folds_into_copies() -> None:
    """TorchScript merges two identical convs that each had a BN: one copy per BN."""
    b = Builder(23)
    b.node("Conv", ["x", b.rand("w", [4, 3, 3, 3]), b.rand("bias", [4])], ["c"],
           pads=[1, 1, 1, 1])
    b.bn("c", "y1", 4)
    b.bn("c", "y2", 4)
    b.node("Add", ["y1", "y2"], ["y"])
    out, report = check(b.model({"x": [2, 3, 4, 4]}, {"y": None}), 0)
    assert [e.into for e in report.entries] == ["Conv_0", "Conv_0_copy"]
    assert count(out, "Conv") == 2


def test_layer_read_by_a_training_bn_too_is_not_copied() -> None:
    b = Builder(25)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["c"])
    b.bn("c", "y1", 4)
    b.bn("c", "y2", 4, training_mode=1)
    b.nodes[-1].output.extend(["y2_running_mean", "y2_running_var"])
    graph_outputs = {"y1": [2, 4, 4, 4], "y2": [2, 4, 4, 4]}
    out, report = check(b.model({"x": [2, 3, 4, 4]}, graph_outputs, infer=False), 2, ref=False)
    assert count(out, "Conv") == 1 and "also feeds" in report.kept[0].reason
