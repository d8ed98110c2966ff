"""bnfold.insert_bn_onnx: BatchNormalization after Conv / ConvTranspose / Gemm / MatMul, on the
right axis, opset-appropriate; the output passes onnx.checker (full_check) and its ONNX Runtime
output equals a float64 reference of the graph with each inserted BN = y / sqrt(1 + eps)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError, UnsupportedError

EPS = 0.44  # a fresh BN scales by 1/sqrt(1 + eps) = 1/1.2: visible in the outputs
K = 1 / np.sqrt(1 + EPS)
FLOAT = onnx.TensorProto.FLOAT


def _model(nodes: list, inits: dict, x_shape: list, y_shape: list, opset: int = 17
           ) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rng_inits(shapes: dict) -> dict:
    rng = np.random.default_rng(0)
    return {k: rng.normal(0, 0.4, s) for k, s in shapes.items()}


CONV_INITS = _rng_inits({"W1": (8, 3, 3, 3), "B1": (8,), "W2": (8, 3, 2, 2), "B2": (6,),
                         "W3": (2, 6, 1, 1), "B3": (2,)})


def conv_net(opset: int = 17) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose (group 2: 8 -> 6 channels) -> LeakyRelu -> Conv (output)."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("ConvTranspose", ["a1", "W2", "B2"], ["h2"], name="up2", strides=[2, 2],
                         group=2),
        helper.make_node("LeakyRelu", ["h2"], ["a2"], name="lrelu2", alpha=0.1),
        helper.make_node("Conv", ["a2", "W3", "B3"], ["y"], name="conv3"),
    ]
    return _model(nodes, CONV_INITS, ["N", 3, 6, 6], ["N", 2, 12, 12], opset)


def conv_ref(x: np.ndarray, position: str | None) -> np.ndarray:
    w = {k: torch.tensor(v) for k, v in CONV_INITS.items()}
    k_before = K if position == "before_activation" else 1.0
    k_after = K if position == "after_activation" else 1.0
    h = torch.tensor(x, dtype=torch.float64)
    h = F.relu(F.conv2d(h, w["W1"], w["B1"], padding=1) * k_before) * k_after
    h = F.conv_transpose2d(h, w["W2"], w["B2"], stride=2, groups=2) * k_before
    h = F.leaky_relu(h, 0.1) * k_after
    return F.conv2d(h, w["W3"], w["B3"]).numpy()


GEMM_INITS = _rng_inits({"B1": (16, 5), "C1": (16,), "B2": (16, 7), "C2": (7,),
                         "B3": (7, 3), "C3": (3,)})


def gemm_net() -> onnx.ModelProto:
    """Gemm(transB=1) -> Tanh -> Gemm(transB=0) -> Sigmoid -> Gemm (output)."""
    nodes = [
        helper.make_node("Gemm", ["x", "B1", "C1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Tanh", ["h1"], ["a1"], name="tanh1"),
        helper.make_node("Gemm", ["a1", "B2", "C2"], ["h2"], name="fc2"),
        helper.make_node("Sigmoid", ["h2"], ["a2"], name="sig2"),
        helper.make_node("Gemm", ["a2", "B3", "C3"], ["y"], name="fc3"),
    ]
    return _model(nodes, GEMM_INITS, ["N", 5], ["N", 3])


def gemm_ref(x: np.ndarray) -> np.ndarray:
    w = GEMM_INITS
    h = np.tanh((x @ w["B1"].T + w["C1"]) * K)
    h = 1 / (1 + np.exp(-(h @ w["B2"] + w["C2"]) * K))
    return h @ w["B3"] + w["C3"]


SEQ_INITS = _rng_inits({"W1": (8, 16), "b1": (16,), "W2": (16, 4)})


def seq_net(x_shape: list | None = None, unknown_rank: bool = False) -> onnx.ModelProto:
    """MatMul + Add on [N, L, C] -> Relu -> MatMul (output); with ``unknown_rank`` the first
    MatMul reads an Identity output whose shape the graph does not record."""
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"], name="id") if unknown_rank else None,
        helper.make_node("MatMul", ["xi" if unknown_rank else "x", "W1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "W2"], ["y"], name="mm2"),
    ]
    return _model([n for n in nodes if n is not None], SEQ_INITS, x_shape or ["N", "L", 8],
                  ["N", "L", 4])


def run(model: onnx.ModelProto | ir.Model, x: np.ndarray) -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(np.float32)})[0]


def bn_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "BatchNormalization"]


def close(out: np.ndarray, ref: np.ndarray) -> bool:
    return float(np.abs(out - ref).max() / np.abs(ref).max()) < 1e-5


X_CONV = np.random.default_rng(1).normal(0, 1, (3, 3, 6, 6))


@pytest.mark.parametrize("position", ["before_activation", "after_activation"])
def test_conv_and_conv_transpose(position: str) -> None:
    model, report = bnfold.insert_bn_onnx(conv_net(), position=position, eps=EPS)
    assert [(e.bn, e.details["channels"]) for e in report.inserted] == [("conv1_bn", 8),
                                                                        ("up2_bn", 6)]
    assert report.skipped[0].to_dict() == {
        "bn": "conv3", "action": "skipped", "reason": "produces a graph output (skip_last=True)"}
    bn = bn_nodes(model)[0]
    assert bn.inputs[0].producer().name == ("conv1" if position == "before_activation"
                                           else "relu1")
    assert close(run(model, X_CONV), conv_ref(X_CONV, position))
    assert not close(run(conv_net(), X_CONV), conv_ref(X_CONV, position))  # the test can fail


def test_gemm_both_layouts() -> None:
    model, report = bnfold.insert_bn_onnx(gemm_net(), eps=EPS)
    assert [e.details["channels"] for e in report.inserted] == [16, 7]
    x = np.random.default_rng(2).normal(0, 1, (4, 5))
    assert close(run(model, x), gemm_ref(x))


@pytest.mark.parametrize("unknown_rank", [False, True])
def test_matmul_on_sequences_normalizes_the_features(unknown_rank: bool) -> None:
    proto = seq_net(unknown_rank=unknown_rank)
    model, report = bnfold.insert_bn_onnx(proto, eps=EPS, position="after_activation")
    entry = report.inserted[0]
    assert entry.details["axis"] == "last (Reshape to [-1, C])"
    assert entry.details["after"] == "relu1"
    x = np.random.default_rng(3).normal(0, 1, (2, 5, 8))
    w = SEQ_INITS
    ref = np.maximum(x @ w["W1"] + w["b1"], 0) * K @ w["W2"]
    assert close(run(model, x), ref)


def test_matmul_2d_gets_bn_directly_after_its_bias_add() -> None:
    proto = seq_net(["N", 8])
    proto.graph.output[0].type.tensor_type.shape.dim.pop(1)
    model, report = bnfold.insert_bn_onnx(proto, eps=EPS)
    assert report.inserted[0].details["axis"] == 1
    assert report.inserted[0].details["position"] == "after the layer's bias Add"
    assert bn_nodes(model)[0].inputs[0].producer().name == "bias1"
    x = np.random.default_rng(3).normal(0, 1, (6, 8))
    w = SEQ_INITS
    assert close(run(model, x), np.maximum((x @ w["W1"] + w["b1"]) * K, 0) @ w["W2"])


@pytest.mark.parametrize("opset", [9, 13, 15, 21])
def test_opsets_attributes_and_initializers(opset: int) -> None:
    model, _ = bnfold.insert_bn_onnx(conv_net(opset), eps=EPS, momentum=0.2)
    bn = bn_nodes(model)[0]
    assert {k: round(a.as_float(), 6) for k, a in bn.attributes.items()} == {
        "epsilon": EPS, "momentum": 0.8}
    assert [v.name for v in bn.inputs[1:]] == [f"conv1_bn.{k}"
                                               for k in ("scale", "bias", "mean", "var")]
    values = [v.const_value.numpy() for v in bn.inputs[1:]]
    assert [v.tolist() for v in values] == [[1.0] * 8, [0.0] * 8, [0.0] * 8, [1.0] * 8]
    assert all(v.dtype == np.float32 for v in values)
    assert close(run(model, X_CONV), conv_ref(X_CONV, "before_activation"))


def test_idempotent_and_existing_bn(conv_bn_proto) -> None:
    once, _ = bnfold.insert_bn_onnx(conv_net())
    twice, report = bnfold.insert_bn_onnx(once)
    assert not report.inserted
    assert ir.serde.serialize_model(twice) == ir.serde.serialize_model(once)
    _, report = bnfold.insert_bn_onnx(conv_bn_proto(), skip_last=False)
    assert report.skipped[0].reason == "already followed by BatchNormalization 'bn'"
    seq_once, _ = bnfold.insert_bn_onnx(seq_net(), position="after_activation")
    _, report = bnfold.insert_bn_onnx(seq_once)  # BN reached through Relu and Reshape
    assert not report.inserted


def test_a_head_read_only_inside_if_bodies_is_the_head() -> None:
    """The If's bodies capture the conv's output by name (not an input of the If): the conv
    still produces the graph output, so skip_last leaves it alone."""
    def body(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["c1"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}",
                                                                onnx.TensorProto.FLOAT, None)])

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv0"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["c1"], name="head"),
         helper.make_node("If", ["cond"], ["y"], then_branch=body("then", "Identity"),
                          else_branch=body("else", "Neg"))], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 6, 6]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 6, 6])],
        [numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w1"),
         numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32) * 0.5, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = bnfold.insert_bn_onnx(model)
    assert [(e.bn, e.action) for e in report.entries] == [("conv0_bn", "inserted"),
                                                          ("head", "skipped")]


def _if_model(then_nodes: list, else_nodes: list, outputs: list[str], after: list,
              graph_outputs: list[str]) -> onnx.ModelProto:
    """``conv A(x) -> a``, then an ``If`` whose branches (capturing ``a``) give ``outputs``,
    then the nodes ``after``; ``graph_outputs`` are [2, 4, 6, 6] floats."""
    def body(name: str, nodes: list) -> onnx.GraphProto:
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            o, onnx.TensorProto.FLOAT, None) for o in outputs])

    inits = [numpy_helper.from_array(np.full((4, 3, 1, 1), 0.5, np.float32), "wa"),
             numpy_helper.from_array(np.full((4, 4, 1, 1), 0.25, np.float32), "wb")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "wa"], ["a"], name="A"),
         helper.make_node("If", ["cond"], [f"if_{o}" for o in outputs],
                          then_branch=body("then", then_nodes),
                          else_branch=body("else", else_nodes)), *after], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 6, 6]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [2, 4, 6, 6])
         for o in graph_outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_layer_whose_path_through_an_if_crosses_another_layer_gets_its_bn() -> None:
    """The walk back from a graph output follows the body output that becomes it and stops
    at a layer inside a body too: A reaches the output only through the bodies' convs (then),
    or only through an If output that feeds conv B (else); either way A is no head."""
    through_conv = _if_model([helper.make_node("Conv", ["a", "wb"], ["o"])],
                             [helper.make_node("Conv", ["a", "wb"], ["o"])], ["o"], [],
                             ["if_o"])
    _, report = bnfold.insert_bn_onnx(through_conv)
    assert [(e.bn, e.action) for e in report.entries] == [("A_bn", "inserted")]
    other_output = _if_model(
        [helper.make_node("Relu", ["x"], ["o1"]), helper.make_node("Neg", ["a"], ["o2"])],
        [helper.make_node("Relu", ["x"], ["o1"]), helper.make_node("Identity", ["a"], ["o2"])],
        ["o1", "o2"], [helper.make_node("Conv", ["if_o2", "wb"], ["b"], name="B")],
        ["if_o1", "b"])
    _, report = bnfold.insert_bn_onnx(other_output)
    assert [(e.bn, e.action) for e in report.entries] == [("A_bn", "inserted"),
                                                          ("B", "skipped")]


def test_skip_last_false_keeps_the_output_name() -> None:
    model, report = bnfold.insert_bn_onnx(conv_net(), skip_last=False, eps=EPS)
    assert len(report.inserted) == 3
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer().op_type == "BatchNormalization"
    assert close(run(model, X_CONV), conv_ref(X_CONV, "before_activation") * K)


def test_include_exclude() -> None:
    _, report = bnfold.insert_bn_onnx(conv_net(), include="ConvTranspose")
    assert [e.bn for e in report.inserted] == ["up2_bn"]
    _, report = bnfold.insert_bn_onnx(conv_net(), exclude=["conv*"])
    assert [e.bn for e in report.inserted] == ["up2_bn"]
    assert report.skipped[0].reason == "excluded by 'conv*'"
    with pytest.raises(BadInputError, match="include takes"):
        bnfold.insert_bn_onnx(conv_net(), include=[1])


def test_drop_bias() -> None:
    model, report = bnfold.insert_bn_onnx(conv_net(), drop_bias=True)
    dropped = "dropped (BN's bias takes its role)"
    assert [e.details["bias"] for e in report.inserted] == [dropped] * 2
    assert "B1" not in model.graph.initializers and "B3" in model.graph.initializers
    assert len(next(n for n in model.graph if n.name == "conv1").inputs) == 2
    run(model, X_CONV)
    _, report = bnfold.insert_bn_onnx(conv_net(), drop_bias=True, position="after_activation")
    assert report.inserted[0].details["bias"].startswith("kept: an activation")


def test_matmul_with_computed_weight_is_skipped() -> None:
    nodes = [helper.make_node("MatMul", ["x", "x"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    _, report = bnfold.insert_bn_onnx(_model(nodes, {}, [4, 4], [4, 4]), skip_last=False)
    assert report.skipped[0].reason == "MatMul weight (second input) is not a constant"


def test_input_not_mutated_and_path_input(tmp_path) -> None:
    original = ir.serde.deserialize_model(conv_net())
    before = ir.serde.serialize_model(original)
    bnfold.insert_bn_onnx(original)
    assert ir.serde.serialize_model(original) == before
    path = tmp_path / "m.onnx"
    onnx.save(conv_net(), path)
    model, _ = bnfold.insert_bn_onnx(str(path))
    assert len(bn_nodes(model)) == 2


def test_bad_input(tmp_path) -> None:
    relu = _model([helper.make_node("Relu", ["x"], ["y"])], {}, [2], [2])
    with pytest.raises(BadInputError, match="no Conv, ConvTranspose, Gemm or MatMul"):
        bnfold.insert_bn_onnx(relu)
    with pytest.raises(UnsupportedError, match="opset 6"):
        bnfold.insert_bn_onnx(conv_net(6))
    with pytest.raises(BadInputError, match="no such file"):
        bnfold.insert_bn_onnx(tmp_path / "missing.onnx")
    with pytest.raises(BadInputError, match="position must be"):
        bnfold.insert_bn_onnx(conv_net(), position="later")


# --------------------------------------------------------------------------------------------
# training_mode=True: training-mode BatchNormalization with running-statistics outputs.
# --------------------------------------------------------------------------------------------

def _batch_norm64(h: torch.Tensor, axis_last: bool = False) -> tuple[torch.Tensor, ...]:
    """Training-mode BN with scale 1, bias 0, in float64: (output, batch mean, population var)."""
    dims = tuple(range(h.dim() - 1)) if axis_last else (0, *range(2, h.dim()))
    mean, var = h.mean(dims, keepdim=True), h.var(dims, unbiased=False, keepdim=True)
    return (h - mean) / torch.sqrt(var + EPS), mean.flatten(), var.flatten()


def _conv_train_ref(x: np.ndarray) -> tuple[np.ndarray, list[tuple[torch.Tensor, ...]]]:
    w = {k: torch.tensor(v) for k, v in CONV_INITS.items()}
    h, *stats1 = _batch_norm64(F.conv2d(torch.tensor(x), w["W1"], w["B1"], padding=1))
    h = F.conv_transpose2d(F.relu(h), w["W2"], w["B2"], stride=2, groups=2)
    h, *stats2 = _batch_norm64(h)
    return F.conv2d(F.leaky_relu(h, 0.1), w["W3"], w["B3"]).numpy(), [stats1, stats2]


def _seq_train_ref(x: np.ndarray) -> tuple[np.ndarray, list[tuple[torch.Tensor, ...]]]:
    w = {k: torch.tensor(v) for k, v in SEQ_INITS.items()}
    h, *stats = _batch_norm64(torch.tensor(x) @ w["W1"] + w["b1"], axis_last=True)
    return (torch.relu(h) @ w["W2"]).numpy(), [stats]


def _run_with_running_stats(model: ir.Model, report: bnfold.Report,
                            x: np.ndarray) -> list[np.ndarray]:
    """Run the model with the BNs' running-statistics outputs exposed as graph outputs."""
    proto = ir.serde.serialize_model(model)
    proto.graph.output.extend(helper.make_tensor_value_info(name, FLOAT, [e.details["channels"]])
                              for e in report.inserted for name in e.details["running_stats"])
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(np.float32)})


@pytest.mark.parametrize("opset", [9, 13, 14, 15, 17])
@pytest.mark.parametrize("net", ["conv", "seq"])
def test_training_mode_bn_normalizes_with_batch_stats_and_updates_running_stats(
        opset: int, net: str) -> None:
    proto = conv_net(opset) if net == "conv" else seq_net()
    if net == "seq":
        proto.opset_import[0].version = opset
    x = X_CONV if net == "conv" else np.random.default_rng(4).normal(0, 1, (3, 5, 8))
    model, report = bnfold.insert_bn_onnx(proto, eps=EPS, momentum=0.2, training_mode=True)
    ref, stats = (_conv_train_ref if net == "conv" else _seq_train_ref)(x)
    bns = bn_nodes(model)
    assert len(bns) == len(stats) == len(report.inserted)
    for bn in bns:
        assert len(bn.outputs) == (3 if opset >= 14 else 5)
        mode = bn.attributes.get("training_mode")
        assert (mode.as_int() if mode is not None else None) == (1 if opset >= 14 else None)
    assert all(e.details["mode"] == "training" for e in report.inserted)
    outs = _run_with_running_stats(model, report, x)
    assert close(outs[0], ref)
    assert not close(run(bnfold.insert_bn_onnx(proto, eps=EPS).model, x), ref)  # can fail
    for (mean_out, var_out), (mean, var) in zip(
            zip(outs[1::2], outs[2::2], strict=True), stats, strict=True):
        # ONNX: running = input * 0.8 + batch * 0.2, population variance; inputs are 0 and 1
        np.testing.assert_allclose(mean_out, 0.2 * mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var_out, 0.8 + 0.2 * var.numpy(), rtol=1e-5)


def test_training_mode_is_idempotent_and_inference_mode_is_the_default() -> None:
    once, _ = bnfold.insert_bn_onnx(conv_net(), training_mode=True)
    _, report = bnfold.insert_bn_onnx(once, training_mode=True)
    assert not report.inserted
    model, report = bnfold.insert_bn_onnx(conv_net())
    assert all(len(bn.outputs) == 1 and "training_mode" not in bn.attributes
               for bn in bn_nodes(model))
    assert all(e.details["mode"] == "inference" and "running_stats" not in e.details
               for e in report.inserted)


# --------------------------------------------------------------------------------------------
# Audit: Constant-node weights, taken names, Dropout before a BN, subgraphs, option types.
# --------------------------------------------------------------------------------------------

def test_constant_node_weight_and_taken_parameter_names() -> None:
    proto = conv_net()
    w1 = next(i for i in proto.graph.initializer if i.name == "W1")
    proto.graph.initializer.remove(w1)
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["W1"], value=w1))
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32),
                                                           "conv1_bn.scale"))
    model, report = bnfold.insert_bn_onnx(proto, eps=EPS)
    assert [(e.bn, e.details["channels"]) for e in report.inserted] == [("conv1_bn", 8),
                                                                        ("up2_bn", 6)]
    assert bn_nodes(model)[0].inputs[1].name == "conv1_bn.scale_1"
    assert close(run(model, X_CONV), conv_ref(X_CONV, "before_activation"))


def test_constant_node_weight_leaves_the_callers_proto_untouched() -> None:
    proto = conv_net()
    w1 = next(i for i in proto.graph.initializer if i.name == "W1")
    proto.graph.initializer.remove(w1)
    w1.name = "a_tensor_named_otherwise"  # onnx-ir's get_const_tensor would rename it in place
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["W1"], value=w1))
    before = proto.SerializeToString()
    model, report = bnfold.insert_bn_onnx(proto, eps=EPS)
    assert proto.SerializeToString() == before
    assert [e.bn for e in report.inserted] == ["conv1_bn", "up2_bn"]
    assert close(run(model, X_CONV), conv_ref(X_CONV, "before_activation"))


def test_dropout_before_a_bn_and_layers_in_subgraphs() -> None:
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Dropout", ["h"], ["d"], name="drop"),
             helper.make_node("BatchNormalization", ["d", "s", "b", "m", "v"], ["y"], name="bn")]
    inits = {"W1": CONV_INITS["W1"], "B1": CONV_INITS["B1"],
             **{k: np.ones(8) for k in ("s", "b", "m", "v")}}
    _, report = bnfold.insert_bn_onnx(_model(nodes, inits, ["N", 3, 6, 6], ["N", 8, 6, 6]),
                                      skip_last=False)
    assert report.skipped[0].reason == "already followed by BatchNormalization 'bn'"

    body = helper.make_graph([helper.make_node("Conv", ["x", "W1"], ["t"], name="inner")],
                             "body", [], [helper.make_tensor_value_info("t", FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="outer"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)]
    proto = _model(nodes, {"W1": CONV_INITS["W1"], "zero": np.array(0.0)}, [1, 3, 6, 6],
                   [1, 8, 4, 4])
    _, report = bnfold.insert_bn_onnx(proto)
    assert report.notes == ["2 Conv/ConvTranspose/Gemm/MatMul node(s) inside If/Loop/Scan "
                            "bodies were not considered"]


def test_option_types() -> None:
    with pytest.raises(BadInputError, match="no cumulative average"):
        bnfold.insert_bn_onnx(conv_net(), momentum=None)
    with pytest.raises(BadInputError, match="momentum must be a number"):
        bnfold.insert_bn_onnx(conv_net(), momentum="0.1")
    with pytest.raises(BadInputError, match="include takes"):
        bnfold.insert_bn_onnx(conv_net(), include=ir.Node)


@pytest.mark.parametrize("drop_bias", [False, True])
def test_an_ir_3_model_lists_the_new_initializers_among_its_inputs(drop_bias: bool) -> None:
    """IR < 4 requires every initializer to be a graph input: the inserted BN's tensors are
    added there, a dropped bias leaves; the result passes the checker and, with eps=0 and
    identity statistics, computes what the input computes (float64 reference)."""
    rng = np.random.default_rng(0)
    wc, bc = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    wd = rng.standard_normal((2, 3, 1, 1))
    tensors = {"Wc": wc, "Bc": bc, "Wd": wd}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "Wd"], ["y"], name="head")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2, 5, 5])] + [
            helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, v.shape)
            for k, v in tensors.items()],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2, 3, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    out, report = bnfold.insert_bn_onnx(model, eps=0.0, drop_bias=drop_bias)
    proto = ir.serde.serialize_model(out)
    onnx.checker.check_model(proto, full_check=True)
    inputs = {i.name for i in proto.graph.input}
    assert {t.name for t in proto.graph.initializer} <= inputs and ("Bc" in inputs) != drop_bias
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]
                               ).run(None, {"x": x})[0]
    h = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(wc),
                 None if drop_bias else torch.from_numpy(bc))
    want = F.conv2d(torch.relu(h), torch.from_numpy(wd)).numpy()
    assert report.by_action("inserted") and np.abs(got - want).max() / np.abs(want).max() < 1e-5
