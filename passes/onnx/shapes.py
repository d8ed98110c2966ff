"""Static shapes for the fold rules: declared ones first, else ONNX shape inference.

Some rules need a value's rank or dims (the MatMul feature axis, layout ops between a layer
and its BN, the positions per channel before a Flatten). Exporters often leave intermediate
values without ``value_info`` (torch's TorchScript exporter does for MatMul outputs), so when a
rule asks for a shape nobody declared, ``onnx.shape_inference`` (through onnx-ir's
``ShapeInferencePass``, non-strict, with data propagation) runs once per model on a clone
whose large tensors are left out. The working model is never annotated: inferred shapes only
guide planning, so the output's ``value_info`` is the input's. If inference cannot tell, the
rule keeps the BN and says the shape is unknown.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

try:  # onnx-ir's own way to call ONNX's C API on a model (a private module of the pass's)
    from onnx_ir.passes.common._c_api_utils import call_onnx_api
except ImportError:  # an onnx-ir laid out otherwise: every model takes the pass itself
    call_onnx_api = None

from bnfold.passes.onnx.graphs import model_graphs

Dims = list[int | None]
#: How a refusal says a needed shape is unknown.
UNKNOWN = "unknown (not declared, and ONNX shape inference could not tell)"


def declared_dims(value: ir.Value) -> Dims | None:
    """The value's declared dims (``None`` for symbolic ones), or ``None`` if rank unknown."""
    return _dims(value.shape)


def _dims(shape: ir.Shape | None) -> Dims | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape]


class Shapes:
    """Dims of values of one model: declared, else inferred once on first need."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._inferred: dict[int, dict[str, ir.Shape]] | None = None

    def dims(self, graph: ir.Graph, value: ir.Value) -> Dims | None:
        """Dims of ``value`` (of ``graph``), declared or inferred; ``None`` if unknown."""
        declared = declared_dims(value)
        if declared is not None or not value.name:
            return declared
        if self._inferred is None:
            self._inferred = _infer(self._model)
        return _dims(self._inferred.get(id(graph), {}).get(value.name))


def _infer(model: ir.Model) -> dict[int, dict[str, ir.Shape]]:
    """Shapes by graph (``id``) and value name: what onnx-ir's ``ShapeInferencePass`` (on a
    clone) leaves on each value, an inferred shape, else the declared one. A model without
    subgraphs has them read off the inferred protobuf (:func:`_inferred_shapes`), not off a
    model built from it and merged into the clone, which costs more than the inference."""
    clone = model.clone()  # shares tensors; the inference call drops large ones while it runs
    graphs = model_graphs(clone)
    if len(graphs) == 1 and call_onnx_api is not None:
        try:
            proto = call_onnx_api(_infer_proto, clone)
        except Exception:  # as the pass: inference failed, the clone keeps its declared shapes
            proto = None
        shapes = None if proto is None else _inferred_shapes(proto.graph)
        if proto is None or shapes is not None:
            return {id(model.graph): _shapes(clone.graph, shapes or {})}
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    return {id(original): _shapes(inferred, {})
            for original, inferred in zip(model_graphs(model), graphs, strict=True)}


def _infer_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with inferred shapes, as :class:`ShapeInferencePass` infers them here."""
    return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                             data_prop=True)


def _shapes(graph: ir.Graph, inferred: dict[str, ir.Shape | None]) -> dict[str, ir.Shape]:
    """The shape of each named value of ``graph``: ``inferred[name]`` unless absent or
    ``None``, else the declared one (what the pass's merge leaves); unknown ones left out."""
    values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
    out = {}
    for name, value in values.items():
        shape = inferred.get(name)
        shape = value.shape if shape is None else shape
        if shape is not None:
            out[name] = shape
    return out


def _inferred_shapes(graph: onnx.GraphProto) -> dict[str, ir.Shape | None] | None:
    """Each value's shape as ``ir.serde.deserialize_graph`` would give it: graph inputs from
    their declarations, node outputs from ``value_info``, graph outputs from theirs (last);
    ``None`` when an initializer is not a graph input (the inference call makes every one
    an input; else the general path decides)."""
    shape_of = ir.serde.deserialize_type_proto_for_shape
    shapes: dict[str, ir.Shape | None] = {i.name: shape_of(i.type) for i in graph.input}
    if any(t.name not in shapes for t in graph.initializer):
        return None
    info = {i.name: i for i in graph.value_info}
    for node in graph.node:
        for name in node.output:
            if name and name not in shapes:
                shapes[name] = shape_of(info[name].type) if name in info else None
    for out in graph.output:
        if out.name in shapes:
            shapes[out.name] = shape_of(out.type)
    return shapes
