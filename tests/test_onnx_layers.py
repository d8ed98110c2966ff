"""The ONNX layer table against the ops themselves: for every row (and attribute variant), the
channel count is the output's, and a forward and a backward fold through the row's axes, groups
and bias scale reproduce ``BN(layer(x))`` / ``layer(BN(x))`` in float64 (onnx's reference
evaluator, random weights and non-trivial BN statistics)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold.algebra import BNParams, backward_fold_refusal, fold_backward, fold_forward
from bnfold.geometry import ConvGeometry
from passes.onnx.layers import LAYERS, conv_geometry, is_default, layer_kind
from tests.onnx_cases import Builder
from tests.test_algebra import random_bn
from tests.test_onnx_fold import check

# (op, attributes, x shape, weight shape, bias shape)
CASES = [
    ("Conv", {"group": 1}, (2, 4, 5, 5), (6, 4, 3, 3), (6,)),
    ("Conv", {"group": 2}, (2, 4, 5, 5), (6, 2, 3, 3), (6,)),
    ("ConvTranspose", {"group": 1, "pads": [2, 2, 2, 2]}, (2, 4, 5, 5), (4, 6, 3, 3), (6,)),
    ("ConvTranspose", {"group": 2, "pads": [2, 2, 2, 2]}, (2, 4, 5, 5), (4, 3, 3, 3), (6,)),
    ("Gemm", {"transB": 0, "beta": 0.5, "alpha": 1.0}, (3, 4), (4, 6), (6,)),
    ("Gemm", {"transB": 1, "beta": 0.5, "alpha": 1.0}, (3, 4), (6, 4), (6,)),
    ("MatMul", {}, (3, 4), (4, 6), (6,)),
]


def _run(op: str, attrs: dict, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``layer(x)`` in float64; MatMul's bias is the ``Add`` after it. ConvTranspose runs in
    torch (same weight layout; onnx's reference evaluator ignores its ``group``)."""
    if op == "ConvTranspose":
        return F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                  padding=attrs["pads"][0], groups=attrs["group"]).numpy()
    dt = TensorProto.DOUBLE
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
                 helper.make_node("Add", ["m", "b"], ["y"])]
    else:
        nodes = [helper.make_node(op, ["x", "W", "b"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dt, None)],
                              [helper.make_tensor_value_info("y", dt, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def _bn(a: np.ndarray, bn: BNParams) -> np.ndarray:
    s, t = bn.scale_shift()
    shape = [1] * a.ndim
    shape[1] = -1
    return a * s.reshape(shape) + t.reshape(shape)


def _node(op: str, attrs: dict) -> ir.Node:
    return ir.Node("", op, [], [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()])


@pytest.mark.parametrize("op,attrs,x_shape,w_shape,b_shape", CASES)
def test_row_axes_groups_and_bias_scale(op: str, attrs: dict, x_shape: tuple, w_shape: tuple,
                                        b_shape: tuple) -> None:
    rng = np.random.default_rng(len(w_shape) + sum(w_shape))
    x = rng.normal(size=x_shape)
    w, b = rng.normal(size=w_shape), rng.normal(size=b_shape)
    node = _node(op, attrs)
    kind = layer_kind(node)
    assert kind is LAYERS[op]
    y = _run(op, attrs, x, w, b)
    channels = kind.channels(node, w.shape)
    assert channels == y.shape[1]

    out_bn = random_bn(channels, rng)
    fwd = fold_forward(w, b, out_bn, out_axis=kind.out_axis(node), groups=kind.groups(node),
                       bias_scale=kind.bias_scale(node))
    reset = dict(attrs, beta=1.0) if kind.bias_scale_attr else attrs
    np.testing.assert_allclose(_run(op, reset, x, fwd.weight, fwd.bias), _bn(y, out_bn),
                               rtol=1e-12, atol=1e-12)

    in_bn = random_bn(x_shape[1], rng)
    geometry = ConvGeometry.symmetric(w_shape[2:], attrs.get("pads", [0] * 4)[:len(w_shape) - 2])
    assert backward_fold_refusal(kind.exactness, in_bn, geometry) is None
    scale = kind.bias_scale(node)
    bwd = fold_backward(w, b * scale, in_bn, in_axis=kind.in_axis(node),
                        out_axis=kind.out_axis(node), groups=kind.groups(node))
    np.testing.assert_allclose(_run(op, reset, x, bwd.weight, bwd.bias),
                               _run(op, attrs, _bn(x, in_bn), w, b), rtol=1e-12, atol=1e-12)


def test_layer_kind_is_default_domain_only() -> None:
    custom = ir.Node("com.example", "Conv", [])
    assert not is_default(custom) and layer_kind(custom) is None
    assert layer_kind(ir.Node("ai.onnx", "Gemm", [])) is LAYERS["Gemm"]
    assert layer_kind(ir.Node("", "Relu", [])) is None


@pytest.mark.parametrize("attrs,begin,output_padding", [
    ({"pads": [1, 0, 2, 1]}, (1, 0), (0, 0)),
    ({"auto_pad": "VALID", "pads": [1, 1, 1, 1]}, (0, 0), (0, 0)),
    ({"auto_pad": "SAME_UPPER"}, None, (0, 0)),
    ({"output_shape": [9, 9], "output_padding": [1, 1]}, (0, 0), None),
])
def test_conv_geometry_reads_the_attributes(attrs: dict, begin: tuple | None,
                                           output_padding: tuple | None) -> None:
    g = conv_geometry(_node("ConvTranspose", attrs), [3, 3])
    assert g.pads_begin == begin and g.output_padding == output_padding
    assert conv_geometry(_node("Conv", {"auto_pad": "SAME_LOWER"}), [1, 1]).unpadded()


def test_copying_pad_does_not_excuse_the_convs_own_zero_pads() -> None:
    """``BN -> Pad(reflect) -> Conv(pads=1)``: the Pad copies BN outputs (exact), but the Conv
    pads the shifted values with zeros, so the fold is refused (it was once folded, inexactly)."""
    b = Builder(4)
    b.bn("x", "n", 4)
    pads = b.init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1]), TensorProto.INT64)
    b.node("Pad", ["n", pads], ["p"], mode="reflect")
    b.node("Conv", ["p", b.rand("w", [6, 4, 3, 3])], ["y"], pads=[1, 1, 1, 1])
    _, report = check(b.model({"x": [2, 4, 7, 7]}, {"y": None}), 1)
    assert "zero-padded" in report.kept[0].reason
