"""Graph builders and runners for the ONNX fold tests.

``bn(...)`` adds a BatchNormalization with non-trivial statistics; ``model(...)`` wraps nodes
into a checked ModelProto; ``run_ort`` runs with ONNX Runtime graph optimizations disabled (so
ORT's own fusions cannot hide a bug); ``reference`` evaluates the *unfolded* model in float64
with onnx's reference evaluator (every float tensor upcast, so the only rounding left is the
one a folded model's weights carry).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
NP = {TensorProto.INT64: np.int64, TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
      TensorProto.BFLOAT16: ml_dtypes.bfloat16, TensorProto.DOUBLE: np.float64}


class Builder:
    """Collects nodes and initializers of one test graph (seeded, deterministic)."""

    def __init__(self, seed: int = 0, dtype: int = TensorProto.FLOAT,
                 param_dtype: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.param_dtype = param_dtype or dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray, dtype: int | None = None) -> str:
        arr = np.asarray(array, dtype=np.float64).astype(NP[dtype or self.dtype])
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def rand(self, name: str, shape: Sequence[int], scale: float = 0.5) -> str:
        return self.init(name, self.rng.normal(0, scale, size=shape))

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs),
                                           name=f"{op}_{len(self.nodes)}", **attrs))
        return outputs[0]

    def bn(self, x: str, y: str, c: int | Sequence[int], **attrs) -> str:
        """BN with mean ~ N(0, .5), var ~ U(.3, 3), gamma ~ ±U(.5, 1.5), beta ~ N(0, .5)."""
        shape = [c] if isinstance(c, int) else list(c)
        sign = np.where(self.rng.random(shape) < 0.2, -1.0, 1.0)
        pd = self.param_dtype
        names = [self.init(f"{y}_scale", (self.rng.random(shape) + 0.5) * sign, pd),
                 self.init(f"{y}_B", self.rng.normal(0, 0.5, shape), pd),
                 self.init(f"{y}_mean", self.rng.normal(0, 0.5, shape), pd),
                 self.init(f"{y}_var", self.rng.random(shape) * 2.7 + 0.3, pd)]
        return self.node("BatchNormalization", [x, *names], [y], **attrs)

    def model(self, inputs: dict[str, Sequence[int | str]], outputs: dict[str, Sequence | None],
              opset: int = 17, ir_version: int | None = None, infer: bool = True,
              **kwargs) -> onnx.ModelProto:
        """A checked model; ``infer=False`` leaves intermediate values without value_info."""
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(k, self.dtype, v) for k, v in inputs.items()],
            [helper.make_tensor_value_info(k, self.dtype, v) for k, v in outputs.items()],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
        m.ir_version = ir_version or min(onnx.IR_VERSION, 10)
        if infer:
            m = onnx.shape_inference.infer_shapes(m)
        onnx.checker.check_model(m, full_check=True)
        return m


def constant_node_weight(seed: int) -> onnx.ModelProto:
    """Conv + BN whose weight comes from a ``Constant`` node, not an initializer."""
    b = Builder(seed)
    w = numpy_helper.from_array(b.rng.normal(size=[4, 3, 1, 1]).astype(np.float32))
    b.node("Constant", [], ["w"], value=w)
    b.node("Conv", ["x", "w"], ["c"])
    b.bn("c", "y", 4)
    return b.model({"x": [2, 3, 4, 4]}, {"y": None})


def dynamo_bias_subgraph(seed: int) -> onnx.ModelProto:
    """Conv + BN with the dynamo exporter's zero bias: Expand(CastLike(0, x), Shape(w)[0:1])."""
    b = Builder(seed)
    b.rand("w", [4, 3, 1, 1])
    b.node("Shape", ["w"], ["ws"], start=0, end=1)
    b.node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0)))
    b.node("CastLike", ["zero", "x"], ["zl"])
    b.node("Expand", ["zl", "ws"], ["bias"])
    b.node("Conv", ["x", "w", "bias"], ["c"])
    b.bn("c", "y", 4)
    return b.model({"x": [2, 3, 4, 4]}, {"y": None})


def shared_weight(seed: int) -> onnx.ModelProto:
    """One weight initializer read by two Convs, each followed by its own BN."""
    b = Builder(seed)
    w = b.rand("w", [4, 4, 1, 1])
    b.node("Conv", ["x", w], ["c1"])
    b.node("Conv", ["x", w], ["c2"])
    b.bn("c1", "y1", 4)
    b.bn("c2", "y2", 4)
    return b.model({"x": [2, 4, 3, 3]}, {"y1": None, "y2": None})


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Fresh random inputs for every graph input without an initializer (static shapes;
    symbolic dims -> 2)."""
    rng = np.random.default_rng(seed)
    out = {}
    defaults = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in defaults:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in t.shape.dim]
        out[vi.name] = rng.normal(size=shape).astype(NP.get(t.elem_type, np.float32))
    return out


def run_ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every float tensor, type and Cast target upcast to float64."""
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def fix_graph(g: onnx.GraphProto) -> None:
        for init in g.initializer:
            _upcast(init)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in FLOATS:
                vi.type.tensor_type.elem_type = TensorProto.DOUBLE
        for node in g.node:
            for a in node.attribute:
                if a.name == "to" and a.i in FLOATS:
                    a.i = TensorProto.DOUBLE
                if a.type == onnx.AttributeProto.TENSOR:
                    _upcast(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(m.graph)
    return m


def _upcast(t: onnx.TensorProto) -> None:
    if t.data_type in FLOATS:
        arr = numpy_helper.to_array(t).astype(np.float64)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


class BatchNormalization(OpRun):
    """Inference BN for every opset (``spatial=0`` included), written out for the reference:
    ``Y = scale * (X - mean) / sqrt(var + epsilon) + B`` with parameters on axis 1 onward."""

    op_domain = ""

    def _run(self, x, scale, b, mean, var, epsilon=1e-5, **_ignored):  # type: ignore[override]
        shape = [1, *scale.shape] + [1] * (x.ndim - 1 - scale.ndim)
        p = [np.asarray(a, np.float64).reshape(shape) for a in (scale, b, mean, var)]
        eps = 1e-5 if epsilon is None else epsilon
        return ((x - p[2]) / np.sqrt(p[3] + eps) * p[0] + p[1],)


def reference(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """float64 evaluation of ``model`` (usually the unfolded original)."""
    ev = ReferenceEvaluator(to_float64(model), new_ops=[BatchNormalization])
    return ev.run(None, {k: v.astype(np.float64) for k, v in inputs.items()})


def rel_err(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """Max over outputs of max|got - want| / max|want|."""
    errs = []
    for g, w in zip(got, want, strict=True):
        g64, w64 = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g64.shape == w64.shape
        errs.append(float(np.max(np.abs(g64 - w64)) / max(float(np.max(np.abs(w64))), 1e-30)))
    return max(errs)


def count(model: onnx.ModelProto, op: str = "BatchNormalization") -> int:
    """Nodes of type ``op`` in the model, subgraphs included."""
    total = 0

    def walk(g: onnx.GraphProto) -> None:
        nonlocal total
        for n in g.node:
            total += n.op_type == op
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return total


def torch_convtranspose_bn(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """float64 reference for ``ConvTranspose(x, w[, bias]) -> BN(y_*)`` (one node each), from
    torch: onnx's reference ConvTranspose mishandles ``group > 1``."""
    import torch

    p = {i.name: torch.from_numpy(numpy_helper.to_array(i).astype(np.float64))
         for i in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    fn = {3: torch.nn.functional.conv_transpose1d, 4: torch.nn.functional.conv_transpose2d,
          5: torch.nn.functional.conv_transpose3d}[x.ndim]
    y = fn(torch.from_numpy(x.astype(np.float64)), p[conv.input[1]],
           p[conv.input[2]] if len(conv.input) > 2 else None,
           stride=list(attrs.get("strides", [1] * (x.ndim - 2))), groups=attrs.get("group", 1))
    y = torch.nn.functional.batch_norm(y, p["y_mean"], p["y_var"], p["y_scale"], p["y_B"],
                                       eps=1e-5)
    return [y.numpy()]
