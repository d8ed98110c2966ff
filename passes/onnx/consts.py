"""Reading constant tensors out of an onnx-ir graph, and writing folded ones back.

A value is constant when it is an initializer, the output of a ``Constant`` node, or the
output of a *small constant subgraph*: a cone of at most :data:`MAX_CONE_NODES` nodes whose
leaves are constants (torch's dynamo exporter with ``optimize=False`` builds a zero conv bias
as ``Expand(CastLike(0, x), Shape(weight))``). Such cones are evaluated with onnxscript's
constant folder restricted to the cone (``should_fold``), on a detached copy of the cone, so
the user's graph is never restructured; only the layers a fold rewrites read the result.
``CastLike`` and ``Shape`` may read a non-constant value for its dtype or static shape only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from bnfold.fileio import release_mapping

MAX_CONE_NODES = 32
#: Why a tensor listed among the graph inputs (IR version >= 4) is not folded.
OVERRIDABLE = ("is a graph input (callers may override it; to fold it, take it off the graph "
               "inputs, e.g. export with keep_initializers_as_inputs=False)")
_TYPE_ONLY_INPUTS = {"CastLike": (1,), "Shape": (0,)}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of ``value`` if it is constant (see module docstring), else ``None``."""
    if value is None:
        return None
    tensor = const_tensor(value)
    if tensor is None:
        tensor = _evaluate_cone(value)
    return None if tensor is None else tensor.numpy()


def const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """Like ``ir.convenience.get_const_tensor``, but never renames a ``Constant`` node's tensor
    (that tensor may wrap the caller's own ModelProto, which must stay untouched)."""
    node = value.producer()
    if value.const_value is None and node is not None and node.op_type == "Constant":
        attr = node.attributes.get("value")
        if attr is not None and not attr.is_ref():
            return attr.as_tensor()
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node: not a constant we can use
        return None


def data_uses(value: ir.Value) -> list[Any]:
    """Uses of ``value`` that read its data (``CastLike``/``Shape`` only read dtype/shape,
    which a fold never changes)."""
    return [u for u in value.uses()
            if u.idx not in _TYPE_ONLY_INPUTS.get(u.node.op_type, ())
            or u.node.domain not in ("", "ai.onnx")]


def _cone(value: ir.Value) -> list[ir.Node] | None:
    """Nodes (topologically ordered) that compute ``value`` from constants, or ``None``.

    The search stops after :data:`MAX_CONE_NODES` nodes, so a value computed from the graph's
    inputs costs a bounded walk, never one over the whole graph.
    """
    order: list[ir.Node] = []
    seen: set[int] = set()
    visited = 0

    def visit(v: ir.Value, type_only: bool) -> bool:
        nonlocal visited
        if const_tensor(v) is not None and not v.is_graph_input():
            return True
        node = v.producer()
        if (node is None or node.domain not in ("", "ai.onnx")
                or node.op_type in ("If", "Loop", "Scan")):
            return type_only and _static_type(v)
        if id(node) in seen:
            return True
        visited += 1
        if visited > MAX_CONE_NODES:
            return type_only and _static_type(v)
        skip = _TYPE_ONLY_INPUTS.get(node.op_type, ())
        for i, inp in enumerate(node.inputs):
            if inp is not None and not visit(inp, i in skip):
                return type_only and _static_type(v)
        seen.add(id(node))
        order.append(node)
        return True

    if not visit(value, False) or not order:
        return None
    return order


def _static_type(value: ir.Value) -> bool:
    shape = value.shape
    return value.dtype is not None and shape is not None and shape.is_static()


def _evaluate_cone(value: ir.Value) -> ir.TensorProtocol | None:
    """Evaluate the small constant cone of ``value`` on a detached copy, with onnxscript."""
    nodes = _cone(value)
    if nodes is None:
        return None
    graph = value.graph
    opset = graph.opset_imports.get("", None) if graph is not None else None
    if opset is None:
        return None
    mapping: dict[ir.Value, ir.Value] = {}

    def copy(v: ir.Value | None) -> ir.Value | None:
        if v is None:
            return None
        if v not in mapping:
            const = const_tensor(v)
            if const is None:  # a value read only for its type: give a placeholder of it
                shape = v.shape
                assert shape is not None and v.dtype is not None
                const = ir.Tensor(np.zeros(shape.numpy(), dtype=v.dtype.numpy()))
            mapping[v] = ir.Value(name=f"c{len(mapping)}", const_value=const,
                                  shape=ir.Shape(const.shape), type=ir.TensorType(const.dtype))
        return mapping[v]

    new_nodes = []
    for node in nodes:
        inputs = [copy(i) for i in node.inputs]
        new = ir.Node(node.domain, node.op_type, inputs, node.attributes.values(),
                      num_outputs=len(node.outputs), version=node.version)
        for old, out in zip(node.outputs, new.outputs, strict=True):
            mapping[old] = out
        new_nodes.append(new)
    consts = [v for v in mapping.values() if v.producer() is None]
    target = mapping[value]
    cone = ir.Graph([], [target], nodes=new_nodes, initializers=consts,
                    opset_imports={"": opset})
    from onnxscript.optimizer import fold_constants  # slow import; rarely needed

    try:
        fold_constants(ir.Model(cone, ir_version=10), should_fold=lambda _n: True)
    except Exception:  # an op the evaluator cannot run: treat as not constant
        return None
    out = cone.outputs[0]
    return const_tensor(out)


def make_tensor(array: np.ndarray | ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    """An onnx-ir tensor holding ``array`` (any float dtype, bfloat16 included)."""
    if isinstance(array, np.ndarray):
        return ir.Tensor(np.ascontiguousarray(array), name=name)
    array.name = name
    return array


def deferred(source: ir.Value | None, array: np.ndarray,
             recompute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | ir.LazyTensor:
    """What to store for a folded weight computed from ``source``.

    In-memory sources give ``array`` itself. An external-data source gives an
    ``ir.LazyTensor`` that recomputes ``recompute(source array)`` when the model is saved (the
    fold already ran once, so it is known to succeed), and the source's memory map is
    released: a large model never holds all folded weights, or all its pages, at once.
    """
    ext = None if source is None else source.const_value
    if not isinstance(ext, ir.ExternalTensor):
        return array
    # A fresh handle on the same bytes: the current one (and its mapped pages) can then be
    # dropped as soon as the fold's own arrays are.
    src = ir.ExternalTensor(ext.location, ext.offset, ext.length, ext.dtype, shape=ext.shape,
                            name=ext.name, base_dir=ext.base_dir)

    def compute() -> ir.Tensor:
        try:
            return ir.Tensor(recompute(src.numpy()))
        finally:
            release_mapping(src)

    return ir.LazyTensor(compute, dtype=ir.DataType.from_numpy(array.dtype),
                         shape=ir.Shape(array.shape))


class Namer:
    """Deterministic unique names: ``base``, then ``base_1``, ``base_2``... as needed."""

    def __init__(self, model: ir.Model) -> None:
        self._used: set[str] = set()
        for graph in model.graphs():
            self._used.update(v.name for v in graph.inputs if v.name)
            self._used.update(v.name for v in graph.outputs if v.name)
            self._used.update(graph.initializers)
            for node in graph:
                self._used.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self._used.add(node.name)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


def set_initializer(graph: ir.Graph, node: ir.Node, index: int,
                    array: np.ndarray | ir.TensorProtocol, namer: Namer, base: str) -> None:
    """Make input ``index`` of ``node`` read ``array``.

    The tensor replaces the current initializer in place when ``node`` is its only reader of
    data (``Shape``/``CastLike`` read only its unchanged shape and dtype) and no caller can
    override it; otherwise a new initializer with a fresh name is created, so every other
    reader keeps the original.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if (
        old is not None
        and old.is_initializer()
        and old.graph is graph
        and len(data_uses(old)) == 1
        and not old.is_graph_input()
        and not old.is_graph_output()
    ):
        previous = old.const_value
        old.const_value = make_tensor(array, old.name or base)
        old.type = ir.TensorType(old.const_value.dtype)
        old.shape = ir.Shape(old.const_value.shape)
        release_mapping(previous)
        return
    name = namer.fresh(base)
    tensor = make_tensor(array, name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape),
                     type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
