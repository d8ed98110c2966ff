"""Static shapes for the fold rules: declared ones first, else ONNX shape inference.

Some rules need a value's rank or dims (the MatMul feature axis, layout ops between a layer
and its BN, the positions per channel before a Flatten). Exporters often leave intermediate
values without ``value_info`` (torch's TorchScript exporter does for MatMul outputs), so when a
rule asks for a shape nobody declared, ``onnx.shape_inference`` (as onnx-ir's
``ShapeInferencePass`` runs it: non-strict, with data propagation, every initializer a graph
input and those over 1000 bytes without their values) runs once per model. The working model
is never annotated: inferred shapes only guide planning, so the output's ``value_info`` is the
input's. If inference cannot tell, the rule keeps the BN and says the shape is unknown.

A model read from a ``ModelProto`` is inferred on that protobuf (:func:`inference_input`: the
message the pass would serialize from the unchanged model), without cloning and serializing
the model; after folds changed it, a value that protobuf's inference cannot tell is inferred
on the model as it stands (:class:`Shapes`). Inferred shapes are turned into ``ir.Shape`` only
for the values a rule asks about.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping

import onnx

from bnfold.lazy_ir import ir
from bnfold.passes.onnx.graphs import model_graphs

Dims = list[int | None]
#: How a refusal says a needed shape is unknown.
UNKNOWN = "unknown (not declared, and ONNX shape inference could not tell)"
#: Initializers over this many bytes go to inference without their values (onnx-ir's limit).
VALUE_LIMIT = 1000


def declared_dims(value: ir.Value) -> Dims | None:
    """The value's declared dims (``None`` for symbolic ones), or ``None`` if rank unknown."""
    return _dims(value.shape)


def _dims(shape: ir.Shape | None) -> Dims | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape]


class Shapes:
    """Dims of values of one model: declared, else inferred once on first need.

    ``source``: the ``ModelProto`` the model was deserialized from (with ``apart``, the
    indices of initializers whose data it holds apart). The main graph of a model without
    subgraphs is then inferred on it (:func:`inference_input`), once; after the model was
    :meth:`edited`, a value that inference on the source leaves unknown (one a fold made, or
    one it could not tell) is inferred on the model as it stands. A fold keeps every value it
    leaves in place the shape it had (it changes weights, not shapes; a value it renames
    takes the place of one of the same shape), so what the source tells still holds."""

    def __init__(self, model: ir.Model, source: onnx.ModelProto | None = None,
                 apart: Collection[int] = ()) -> None:
        self._model = model
        self._source = source
        self._apart = apart
        self._edited = False
        self._on_source: Mapping[str, ir.Shape | None] | None = None
        self._inferred: dict[int, Mapping[str, ir.Shape | None]] | None = None

    def edited(self) -> None:
        """The model was changed: it no longer equals ``source``."""
        self._edited = True

    def dims(self, graph: ir.Graph, value: ir.Value) -> Dims | None:
        """Dims of ``value`` (of ``graph``), declared or inferred; ``None`` if unknown."""
        declared = declared_dims(value)
        if declared is not None or not value.name:
            return declared
        if self._source is not None and graph is self._model.graph:
            if self._on_source is None:
                self._on_source = _infer_source(self._model, self._source, self._apart)
            if self._on_source is not None:
                found = self._on_source.get(value.name)
                if found is not None or not self._edited:
                    return _dims(found)
            else:  # a source inference cannot take: the model is inferred on itself
                self._source = None
        if self._inferred is None:
            self._inferred = _infer(self._model)
        return _dims(self._inferred.get(id(graph), {}).get(value.name))


def _infer_source(model: ir.Model, source: onnx.ModelProto, apart: Collection[int]
                  ) -> Mapping[str, ir.Shape | None] | None:
    """Shapes of the main graph of ``model``, inferred on ``source`` (:func:`inference_input`)
    and read as :func:`_infer` reads them; ``None`` when ``model`` has subgraphs or
    :func:`inference_input` does not take ``source``."""
    if len(model_graphs(model)) != 1:
        return None
    given = inference_input(source, apart)
    if given is None:
        return None
    try:
        return _ProtoShapes(_infer_proto(given).graph)
    except Exception:  # as the pass: inference failed, only declared shapes are known
        return {}


def _infer(model: ir.Model) -> dict[int, Mapping[str, ir.Shape | None]]:
    """Inferred shapes by graph (``id``) and value name, for values without a declared one.

    A model of one graph is inferred on the protobuf onnx-ir's ``ShapeInferencePass``
    serializes from a clone, and its shapes are read off the result as
    ``ir.serde.deserialize_graph`` would read them (:class:`_ProtoShapes`); a failed
    inference leaves only the declared shapes, as the pass does. A model with subgraphs takes
    the pass itself, on a clone."""
    from onnx_ir.passes.common import ShapeInferencePass  # (onnx-ir: imported at first use)

    call_onnx_api = onnx_api_caller()
    graphs = model_graphs(model)
    if len(graphs) == 1 and call_onnx_api is not None:
        try:
            proto = call_onnx_api(_infer_proto, model.clone())
        except Exception:  # as the pass: inference failed, only declared shapes are known
            return {id(model.graph): {}}
        return {id(model.graph): _ProtoShapes(proto.graph)}
    clone = model.clone()  # shares tensors
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    return {id(original): _shapes(inferred)
            for original, inferred in zip(graphs, model_graphs(clone), strict=True)}


def onnx_api_caller() -> Callable[..., onnx.ModelProto] | None:
    """onnx-ir's own way to call ONNX's C API on a model (a private module of the pass's);
    ``None`` for an onnx-ir laid out otherwise (every model then takes the pass itself)."""
    try:
        from onnx_ir.passes.common._c_api_utils import call_onnx_api
    except ImportError:
        return None
    return call_onnx_api


def _infer_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with inferred shapes, as :class:`ShapeInferencePass` infers them here."""
    return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False,
                                             data_prop=True)


def inference_input(source: onnx.ModelProto, apart: Collection[int] = ()
                    ) -> onnx.ModelProto | None:
    """The message onnx-ir's inference call makes of the model read from ``source`` (a
    model without subgraphs): its nodes, declarations and functions, every initializer also
    a graph input typed from its dims, and only initializers of at most :data:`VALUE_LIMIT`
    bytes kept. ``apart``: indices of initializers whose ``raw_data`` is held apart
    (:class:`~bnfold.io.split_proto.SplitProto`), none of which may be kept. ``None`` (the
    model is serialized instead) for a model the two could see otherwise: IR version < 4, an
    initializer that is a graph input, external, sparse, of a string or unknown dtype, or
    held apart and small."""
    graph = source.graph
    if source.ir_version < 4 or graph.sparse_initializer:
        return None
    inputs = {i.name for i in graph.input}
    out = onnx.ModelProto(ir_version=source.ir_version)
    out.opset_import.extend(source.opset_import)
    out.functions.extend(source.functions)
    g = out.graph
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    for index, tensor in enumerate(graph.initializer):
        size = _nbytes(tensor)
        if (size is None or tensor.name in inputs or (size <= VALUE_LIMIT and index in apart)
                or tensor.data_location == onnx.TensorProto.EXTERNAL):
            return None
        info = g.input.add(name=tensor.name).type.tensor_type
        info.elem_type = tensor.data_type
        info.shape.SetInParent()
        for d in tensor.dims:
            info.shape.dim.add(dim_value=d)
        if size <= VALUE_LIMIT:
            g.initializer.append(tensor)
    return out


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    """``nbytes`` of the tensor onnx-ir makes of ``tensor`` (from its dims and dtype);
    ``None`` for a string or unknown dtype."""
    try:
        dtype = ir.DataType(tensor.data_type)
        if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
            return None
        return math.ceil(dtype.itemsize * math.prod(tensor.dims))
    except ValueError:
        return None


class _ProtoShapes(Mapping[str, "ir.Shape | None"]):
    """The shape of each value of an inferred ``GraphProto`` as ``ir.serde.deserialize_graph``
    gives it (graph outputs' declarations over graph inputs' over ``value_info``), each read
    on first lookup and kept (a fold asks for one value's shape in many tries)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        types = {i.name: i.type for i in graph.value_info}
        types.update((i.name, i.type) for i in graph.input)
        types.update((o.name, o.type) for o in graph.output)
        self._types = types
        self._read: dict[str, ir.Shape | None] = {}

    def __getitem__(self, name: str) -> ir.Shape | None:
        if name not in self._read:
            self._read[name] = ir.serde.deserialize_type_proto_for_shape(self._types[name])
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)


def _shapes(graph: ir.Graph) -> dict[str, ir.Shape]:
    """The shape of each named value of ``graph`` that has one."""
    values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
    return {name: value.shape for name, value in values.items() if value.shape is not None}
