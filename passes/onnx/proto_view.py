"""A read-only view of one ONNX ``GraphProto`` for :mod:`.direct`, built in one linear scan.

It gives the fast path what the onnx-ir passes read off ``ir.Node`` / ``ir.Value``, without
converting the model: :class:`NodeView` has the ``op_type``/``domain``/``name``/``inputs``/
``outputs``/``attributes``/``metadata_props`` that :mod:`.layers`, :mod:`.bn`, :mod:`.names`
and :mod:`.validity` read, so both paths share those rules. Anything the view does not model
exactly (an attribute of an unexpected type, a name produced twice, a node reading a value
before it is produced, a ``Constant`` of a kind it does not read) raises :class:`NotPlain`:
the caller then takes the full onnx-ir path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import onnx

from bnfold.passes.onnx.consts import TYPE_ONLY_INPUTS
from bnfold.passes.onnx.layers import DEFAULT_DOMAINS

_A = onnx.AttributeProto
_SCALAR_CONSTANTS = {"value_float": (), "value_int": ()}
_VECTOR_CONSTANTS = ("value_floats", "value_ints")


class NotPlain(Exception):
    """The graph is not one the fast path models exactly: take the full path."""


class Attrs:
    """A node's attributes read like ``ir.Node.attributes`` (``get_int`` ...)."""

    __slots__ = ("_by_name",)

    def __init__(self, attrs: Iterable[onnx.AttributeProto]) -> None:
        self._by_name = {a.name: a for a in attrs}

    def _get(self, name: str, kind: int) -> onnx.AttributeProto | None:
        attr = self._by_name.get(name)
        if attr is not None and attr.type != kind:
            raise NotPlain(f"attribute {name} has type {attr.type}")
        return attr

    def get_int(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, _A.INT)
        return default if attr is None else attr.i

    def get_float(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, _A.FLOAT)
        return default if attr is None else attr.f

    def get_ints(self, name: str, default: Any = None) -> Any:
        attr = self._get(name, _A.INTS)
        return default if attr is None else list(attr.ints)


class ValueView:
    """A value by name: ``producer()`` is its :class:`NodeView` (``None`` for inputs and
    initializers)."""

    __slots__ = ("_graph", "name")

    def __init__(self, name: str, graph: GraphView) -> None:
        self.name, self._graph = name, graph

    def producer(self) -> NodeView | None:
        index = self._graph.producer.get(self.name)
        return None if index is None else self._graph.view(index)


class NodeView:
    """One node, with the names of its inputs and outputs as they stand after the fast
    path's edits so far (``input_names`` / ``output_names`` are what it writes back)."""

    __slots__ = (
        "_graph",
        "attributes",
        "domain",
        "index",
        "input_names",
        "name",
        "op_type",
        "output_names",
        "proto",
    )

    def __init__(self, proto: onnx.NodeProto, index: int, graph: GraphView) -> None:
        self.proto, self.index, self._graph = proto, index, graph
        self.op_type, self.domain, self.name = proto.op_type, proto.domain, proto.name
        self.input_names = list(proto.input)
        self.output_names = list(proto.output)
        self.attributes = Attrs(proto.attribute)

    @property
    def inputs(self) -> list[ValueView | None]:
        return [ValueView(n, self._graph) if n else None for n in self.input_names]

    @property
    def outputs(self) -> list[ValueView | None]:
        return [ValueView(n, self._graph) if n else None for n in self.output_names]

    @property
    def metadata_props(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}


class GraphView:
    """Producers, readers, initializers, declared shapes and the possibly-constant values of
    one graph without subgraphs (:class:`NotPlain` otherwise), from one pass over it."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        if len(self.initializers) != len(graph.initializer):
            raise NotPlain("an initializer name is used twice")
        self.producer: dict[str, int] = {}
        #: name -> [(node index, input index)], every reader of every value
        self.readers: dict[str, list[tuple[int, int]]] = {}
        self.constant = set(self.initializers)  # a superset of what consts.Constants finds
        self._views: dict[int, NodeView] = {}
        known = self.inputs | self.constant
        for index, node in enumerate(graph.node):
            self._scan(index, node, known)
        self.declared = self._declared_shapes()

    def _scan(self, index: int, node: onnx.NodeProto, known: set[str]) -> None:
        if any(a.type in (_A.GRAPH, _A.GRAPHS) for a in node.attribute):
            raise NotPlain("a node has a subgraph")
        default = node.domain in DEFAULT_DOMAINS
        type_only = TYPE_ONLY_INPUTS.get(node.op_type, ()) if default else ()
        constant = default
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name not in known:
                raise NotPlain(f"{name!r} is read before it is produced")
            self.readers.setdefault(name, []).append((index, i))
            constant = constant and (name in self.constant or i in type_only)
        for name in node.output:
            if not name:
                continue
            if name in known:
                raise NotPlain(f"{name!r} is produced twice")
            known.add(name)
            self.producer[name] = index
            if constant:
                self.constant.add(name)

    def view(self, index: int) -> NodeView:
        """The (one, shared) :class:`NodeView` of node ``index``."""
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = NodeView(self.graph.node[index], index, self)
        return view

    def data_readers(self, name: str) -> list[tuple[int, int]]:
        """Readers of ``name``'s data (as :func:`.consts.data_uses`: a default-domain
        ``Shape``/``Size``/``CastLike`` reads only the dtype or shape of some inputs)."""
        nodes = self.graph.node
        return [(n, i) for n, i in self.readers.get(name, [])
                if nodes[n].domain not in DEFAULT_DOMAINS
                or i not in TYPE_ONLY_INPUTS.get(nodes[n].op_type, ())]

    def _declared_shapes(self) -> dict[str, tuple[int | None, ...] | None]:
        shapes: dict[str, tuple[int | None, ...] | None] = {}
        g = self.graph
        for info in (*g.input, *g.output, *g.value_info):
            shape = _type_shape(info.type)
            if shapes.setdefault(info.name, shape) != shape:
                raise NotPlain(f"{info.name!r} is declared with two shapes")
        return shapes

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The tensor of the default-domain ``Constant`` node (``value`` attribute, stored
        inline) that produces ``name``, if one does."""
        index = self.producer.get(name)
        if index is None:
            return None
        node = self.graph.node[index]
        if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS \
                or len(node.attribute) != 1 or node.attribute[0].name != "value" \
                or node.attribute[0].type != _A.TENSOR \
                or node.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return node.attribute[0].t

    def infos(self, *names: str) -> list[onnx.ValueInfoProto]:
        """The graph output and value_info entries that declare ``names``."""
        g = self.graph
        return [v for v in (*g.output, *g.value_info) if v.name in names]

    def shape(self, value: ValueView | None) -> tuple[int | None, ...] | None:
        """Static dims of ``value`` as :func:`.validity._shape` reads them: a constant's, else
        the declared ones (``None`` for a symbolic dim)."""
        if value is None:
            return None
        tensor = self.initializers.get(value.name)
        if tensor is not None:
            return tuple(tensor.dims)
        node = value.producer()
        if node is not None and node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            return _constant_shape(node.proto)
        return self.declared.get(value.name)


def _type_shape(type_proto: onnx.TypeProto) -> tuple[int | None, ...] | None:
    if type_proto.WhichOneof("value") != "tensor_type" \
            or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in type_proto.tensor_type.shape.dim)


def _constant_shape(node: onnx.NodeProto) -> tuple[int, ...]:
    if len(node.attribute) != 1:
        raise NotPlain("a Constant node without exactly one attribute")
    attr = node.attribute[0]
    if attr.name == "value" and attr.type == _A.TENSOR:
        return tuple(attr.t.dims)
    if attr.name in _SCALAR_CONSTANTS:
        return ()
    if attr.name in _VECTOR_CONSTANTS:
        return (len(attr.floats) + len(attr.ints),)
    raise NotPlain(f"a Constant node with {attr.name}")
