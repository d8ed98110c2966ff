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

import itertools
import operator
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx

from bnfold.passes.onnx.consts import TYPE_ONLY_INPUTS
from bnfold.passes.onnx.layers import DEFAULT_DOMAINS

_A = onnx.AttributeProto
_SUBGRAPHS = (_A.GRAPH, _A.GRAPHS)
_SCALAR_CONSTANTS = {"value_float": (), "value_int": ()}
_VECTOR_CONSTANTS = ("value_floats", "value_ints")


class NotPlain(Exception):
    """The graph is not one the fast path models exactly: take the full path."""


class Attrs:
    """A node's attributes read like ``ir.Node.attributes`` (``get_int`` ...), indexed by name
    on first use."""

    __slots__ = ("_attrs", "_by_name")

    def __init__(self, attrs: Iterable[onnx.AttributeProto]) -> None:
        self._attrs = attrs
        self._by_name: dict[str, onnx.AttributeProto] | None = None

    def _get(self, name: str, kind: int) -> onnx.AttributeProto | None:
        if self._by_name is None:
            self._by_name = {a.name: a for a in self._attrs}
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
    initializers). It refers to its graph weakly, as :class:`NodeView` does."""

    __slots__ = ("_graph", "name")

    def __init__(self, name: str, graph: weakref.ReferenceType[GraphView]) -> None:
        self.name, self._graph = name, graph

    def producer(self) -> NodeView | None:
        graph = self._graph()
        assert graph is not None  # (views live only while their graph's fold runs)
        index = graph.producer.get(self.name)
        return None if index is None else graph.view(index)


class NodeView:
    """One node, with the names of its inputs and outputs as they stand after the fast
    path's edits so far (``input_names`` / ``output_names``: the graph's own lists,
    :attr:`GraphView.input_names`, which the fast path edits and writes back; ``inputs`` /
    ``outputs`` are made again when those names have changed). Views refer to their graph
    weakly: a graph that caches its views is then no reference cycle, and is freed as soon as
    its fold is done rather than by the cyclic collector (a large graph's hundreds of
    thousands of lists, tuples and views made one collection cost about a tenth of its fold)."""

    __slots__ = (
        "_graph",
        "_inputs",
        "_outputs",
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
        self.proto, self.index, self._graph = proto, index, graph.ref
        self.op_type, self.domain = graph.op_types[index], graph.domains[index]
        self.name = proto.name
        self.input_names = graph.input_names[index]
        self.output_names = graph.output_names[index]
        self.attributes = Attrs(proto.attribute)
        #: the views of the inputs and outputs, with the names they were made for
        self._inputs: tuple[list[str], list[ValueView | None]] | None = None
        self._outputs: tuple[list[str], list[ValueView | None]] | None = None

    @property
    def inputs(self) -> list[ValueView | None]:
        if self._inputs is None or self._inputs[0] != self.input_names:
            self._inputs = (self.input_names.copy(), self._values(self.input_names))
        return self._inputs[1]

    @property
    def outputs(self) -> list[ValueView | None]:
        if self._outputs is None or self._outputs[0] != self.output_names:
            self._outputs = (self.output_names.copy(), self._values(self.output_names))
        return self._outputs[1]

    def _values(self, names: list[str]) -> list[ValueView | None]:
        return [ValueView(n, self._graph) if n else None for n in names]

    @property
    def metadata_props(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}


class _Reads:
    """Every input slot of a graph's nodes, flattened: ``names``, ``node`` (the reading node of
    each), ``start`` and ``end`` (each node's slots are ``start:end``)."""

    def __init__(self, input_names: list[list[str]]) -> None:
        counts = np.fromiter(map(len, input_names), np.int64, len(input_names))
        self.names = list(itertools.chain.from_iterable(input_names))
        self.node = np.repeat(np.arange(len(input_names)), counts)
        self.end = np.cumsum(counts)
        self.start = self.end - counts


class GraphView:
    """Producers, readers, initializers, declared shapes and the possibly-constant values of
    one graph without subgraphs (:class:`NotPlain` otherwise), from one pass over it.

    Per node index it keeps the op type, domain and (edited) input and output names as plain
    lists, and ``by_op``: the default-domain nodes of each op type, in graph order; a
    :class:`NodeView` is built only for the nodes a rule reads."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        #: what the views hold of their graph
        self.ref = weakref.ref(self)
        self.nodes = list(graph.node)
        tensors = list(graph.initializer)
        self.initializers = {t.name: t for t in tensors}
        if len(self.initializers) != len(tensors):
            raise NotPlain("an initializer name is used twice")
        #: initializer name -> its dims
        self.dims = {name: tuple(t.dims) for name, t in self.initializers.items()}
        self.inputs = {v.name for v in graph.input}
        self.outputs = {v.name for v in graph.output}
        if any(node.attribute and any(a.type in _SUBGRAPHS for a in node.attribute)
               for node in self.nodes):
            raise NotPlain("a node has a subgraph")
        self.op_types = [n.op_type for n in self.nodes]
        self.domains = [n.domain for n in self.nodes]
        self.input_names = [n.input[:] for n in self.nodes]
        self.output_names = [n.output[:] for n in self.nodes]
        self.by_op = self._default_nodes()
        self.producer = self._producers()
        #: every name a node reads or writes, graph inputs and initializers (the original
        #: graph's: edits do not change it)
        self.known = self.inputs | self.initializers.keys() | self.producer.keys()
        flat = _Reads(self.input_names)
        self._check_order(flat)
        #: name -> [(node index, input index)], every reader of every value
        self.readers = self._readers()
        self.constant = self._constants(flat)  # a superset of what consts.Constants finds
        self._views: dict[int, NodeView] = {}
        #: name -> its declared type (graph inputs, outputs, value_info)
        self.declared = self._declared_types()

    def _default_nodes(self) -> dict[str, list[int]]:
        """The default-domain nodes of each op type, in graph order."""
        by_op: dict[str, list[int]] = {}
        for index, (op, domain) in enumerate(zip(self.op_types, self.domains, strict=True)):
            if domain in DEFAULT_DOMAINS:
                by_op.setdefault(op, []).append(index)
        return by_op

    def _producers(self) -> dict[str, int]:
        """The node that produces each node output; :class:`NotPlain` if a name is produced
        twice (by two nodes, or a node and a graph input or initializer)."""
        outs = self.output_names
        flat = list(itertools.chain.from_iterable(outs))
        producer = dict(zip(flat, itertools.chain.from_iterable(
            map(itertools.repeat, range(len(outs)), map(len, outs))), strict=True))
        producer.pop("", None)
        if len(producer) != len(flat) - flat.count("") or not producer.keys().isdisjoint(
                self.inputs | self.initializers.keys()):
            raise NotPlain("a name is produced twice")
        return producer

    def _check_order(self, flat: _Reads) -> None:
        """:class:`NotPlain` if a node reads a value that is neither a graph input, an
        initializer nor the output of an earlier node."""
        produced_at = dict.fromkeys(self.inputs | self.initializers.keys(), -1)
        produced_at.update(self.producer)
        produced_at[""] = -1  # (an omitted optional input)
        at = np.fromiter(map(produced_at.get, flat.names, itertools.repeat(len(self.nodes))),
                         np.int64, len(flat.names))
        if (at >= flat.node).any():
            raise NotPlain("a value is read before it is produced")

    def _readers(self) -> dict[str, list[tuple[int, int]]]:
        readers: dict[str, list[tuple[int, int]]] = {}
        for index, names in enumerate(self.input_names):
            for i, name in enumerate(names):
                found = readers.get(name)
                if found is None:
                    readers[name] = [(index, i)]
                else:
                    found.append((index, i))
        readers.pop("", None)
        return readers

    def _constants(self, flat: _Reads) -> set[str]:
        """The initializers and, transitively, the outputs of default-domain nodes whose every
        input is one of them (type-only inputs aside): a worklist from the nodes whose inputs
        are all initializers, the same set as one pass in graph order (readers come later)."""
        constant = set(self.initializers)
        ready = np.fromiter(map(constant.__contains__, flat.names), bool, len(flat.names))
        ready |= np.fromiter(map(operator.not_, flat.names), bool, len(flat.names))
        type_only = {(index, i) for op, places in TYPE_ONLY_INPUTS.items()
                     for index in self.by_op.get(op, ()) for i in places}
        for index, i in type_only:
            if i < len(self.input_names[index]):
                ready[flat.start[index] + i] = True
        not_ready = np.concatenate(([0], np.cumsum(~ready)))
        pending = not_ready[flat.end] - not_ready[flat.start]  # per node
        default = np.fromiter(map(DEFAULT_DOMAINS.__contains__, self.domains), bool,
                              len(self.domains))
        todo = np.flatnonzero(default & (pending == 0)).tolist()
        count, is_default = pending.tolist(), default.tolist()
        while todo:
            for name in self.output_names[todo.pop()]:
                if not name:
                    continue
                constant.add(name)
                for reader, i in self.readers.get(name, ()):
                    if (reader, i) in type_only:
                        continue
                    count[reader] -= 1
                    if count[reader] == 0 and is_default[reader]:
                        todo.append(reader)
        return constant

    def view(self, index: int) -> NodeView:
        """The (one, shared) :class:`NodeView` of node ``index``."""
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = NodeView(self.nodes[index], index, self)
        return view

    def data_readers(self, name: str) -> list[tuple[int, int]]:
        """Readers of ``name``'s data (as :func:`.consts.data_uses`: a default-domain
        ``Shape``/``Size``/``CastLike`` reads only the dtype or shape of some inputs)."""
        return [(n, i) for n, i in self.readers.get(name, [])
                if self.domains[n] not in DEFAULT_DOMAINS
                or i not in TYPE_ONLY_INPUTS.get(self.op_types[n], ())]

    def _declared_types(self) -> dict[str, onnx.TypeProto]:
        """Each declared name's type (its shape read when asked for, :meth:`shape`);
        :class:`NotPlain` if a name is declared with two shapes or element types."""
        types: dict[str, onnx.TypeProto] = {}
        g = self.graph
        for info in (*g.input, *g.output, *g.value_info):
            declared = info.type
            first = types.setdefault(info.name, declared)
            if first is not declared and (
                    type_shape(first) != type_shape(declared)
                    or first.tensor_type.elem_type != declared.tensor_type.elem_type):
                raise NotPlain(f"{info.name!r} is declared with two types")
        return types

    def _default_constant(self, name: str) -> onnx.NodeProto | None:
        """The default-domain ``Constant`` node that produces ``name``, if one does."""
        index = self.producer.get(name)
        if index is None or self.op_types[index] != "Constant" \
                or self.domains[index] not in DEFAULT_DOMAINS:
            return None
        return self.nodes[index]

    def constant_tensor(self, name: str) -> onnx.TensorProto | None:
        """The tensor of the default-domain ``Constant`` node (``value`` attribute, stored
        inline) that produces ``name``, if one does."""
        node = self._default_constant(name)
        if node is None or len(node.attribute) != 1 or node.attribute[0].name != "value" \
                or node.attribute[0].type != _A.TENSOR \
                or node.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return node.attribute[0].t

    def shape(self, value: ValueView | None) -> tuple[int | None, ...] | None:
        """Static dims of ``value`` as :func:`.validity._shape` reads them: a constant's, else
        the declared ones (``None`` for a symbolic dim)."""
        if value is None:
            return None
        dims = self.dims.get(value.name)
        if dims is not None:
            return dims
        node = self._default_constant(value.name)
        if node is not None:
            return _constant_shape(node)
        declared = self.declared.get(value.name)
        return None if declared is None else type_shape(declared)


def type_shape(type_proto: onnx.TypeProto) -> tuple[int | None, ...] | None:
    """A tensor type's dims (``None`` for a symbolic one); ``None`` without a shape."""
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
