"""fold_onnx reach: dynamo exports of deep nets, constant budgets, training-mode BN by the
spec, graph-input parameters, Gemm beta; every fold checked against float64."""

from __future__ import annotations

import io
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
    """The ONNX fold of a dynamo export keeps exactly the sites an exact folder must keep
    (``bn_left``, which the FX fold's own tests hold it to), each with a reason."""
    model, x = source.get(name), source.example_input(name)
    entry = source.ZOO[name] if source is zoo else source.REACH[name]
    _, report = fold_onnx(dynamo_export(model, x))
    assert len(report.kept) == entry.bn_left, report.table()
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

def _bomb(op: str, n: int) -> onnx.ModelProto:
    """Conv -> BN whose scale is a constant of ``n`` elements built by ``op`` (an invalid
    model: the point is that reading it must not allocate ``n`` floats)."""
    b = Builder(4)
    b.node("Conv", ["x", b.rand("w", [4, 3, 1, 1])], ["h"])
    shape = b.init("shape", np.array([n]), TensorProto.INT64)
    if op == "Expand":
        b.node("Expand", [b.init("zero", np.array(0.0)), shape], ["big"])
    elif op == "ConstantOfShape":
        b.node("ConstantOfShape", [shape], ["big"],
               value=numpy_helper.from_array(np.zeros(1, np.float32)))
    else:
        b.node("Tile", [b.init("zero", np.zeros(1)), shape], ["big"])
    b.bn("h", "y", 4)
    b.nodes[-1].input[1] = "big"
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Expand", "ConstantOfShape", "Tile"])
def test_size_bomb_is_not_materialized(op: str) -> None:
    proto = _bomb(op, 2**28)
    assert proto.ByteSize() < 1000
    tracemalloc.start()
    try:
        _, report = fold_onnx(proto)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    (entry,) = report.kept
    assert f"{op} with {2**28} elements" in entry.reason and "budget" in entry.reason


def test_budget_is_configurable() -> None:
    """A BN whose B is ``Expand(0, [8])``: folded by default, kept under a budget of 4."""
    b = Builder(5)
    b.node("Conv", ["x", b.rand("w", [8, 3, 1, 1])], ["h"])
    b.node("Expand", [b.init("zero", np.array(0.0)),
                      b.init("shape", np.array([8]), TensorProto.INT64)], ["zeros"])
    b.bn("h", "y", 8)
    b.nodes[-1].input[2] = "zeros"
    b.inits = [i for i in b.inits if i.name != "y_B"]
    m = b.model({"x": [2, 3, 4, 4]}, {"y": None})
    check(m, 0)
    _, report = fold_onnx(m, max_const_elements=4)
    assert "Expand with 8 elements, over the constant-evaluation budget of 4" \
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
