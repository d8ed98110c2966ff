"""Reading constant tensors out of an onnx-ir graph, and writing folded ones back.

A value is constant when it is an initializer, the output of a ``Constant`` node, or the
output of a *constant subgraph*: default-domain nodes (no control flow, nothing random) whose
inputs are constants. torch's dynamo exporter with ``optimize=False`` builds a zero conv bias
as ``Expand(CastLike(0, x), Shape(weight)[0:1])``: ``CastLike``'s target and the input of
``Shape``/``Size`` contribute only their dtype or static shape, so they are never walked for
values (the activation ``x`` and its ancestry cost nothing).

:class:`Constants` decides which nodes are constant once per model, in one pass over it
(linear in its size), and evaluates a value's cone of constant nodes node by node with ONNX's
reference kernels, on copies: the user's graph is never restructured. Before each node runs,
its result size is computed from its inputs' shapes; a node whose result would exceed the
*element budget* (by default the largest tensor the model stores, at least
:data:`MIN_BUDGET`) is not run, so an ``Expand(0, [2**28])`` bias is reported, never
materialized.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from bnfold.errors import BadInputError, first_line
from bnfold.io.fileio import release_mapping
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.graphs import model_graphs
from bnfold.passes.onnx.layers import is_default

#: At most this many nodes are evaluated for one constant (a bias or BN parameter cone).
MAX_CONE_NODES = 64
#: The element budget is never below this (small models still evaluate small cones).
MIN_BUDGET = 4096
#: Why a tensor listed among the graph inputs (IR version >= 4) is not folded.
OVERRIDABLE = ("is a graph input (callers may override it; to fold it, take it off the graph "
               "inputs: bnfold fold --freeze-initializer-inputs, or export with "
               "keep_initializers_as_inputs=False)")
#: Why a graph input without an initializer is not folded.
RUNTIME_INPUT = "is a graph input without an initializer: its value is only known at run time"
#: Inputs that contribute only their dtype or static shape, never their data.
TYPE_ONLY_INPUTS = {"CastLike": (1,), "Shape": (0,), "Size": (0,)}
_NOT_CONSTANT_OPS = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
                     "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
#: Ops whose result has no more elements than their largest input.
_NOT_GROWING = {
    "Abs", "Neg", "Sqrt", "Reciprocal", "Exp", "Log", "Relu", "Sigmoid", "Tanh", "Floor",
    "Ceil", "Round", "Sign", "Erf", "Softplus", "Cast", "CastLike", "Identity", "Reshape",
    "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Slice", "Shape", "Size", "Clip", "Not",
    "Split", "Softmax", "BatchNormalization", "LpNormalization",
}
#: Reductions: at most one element per input position, a reduced empty axis giving one.
_REDUCING = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
             "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
#: Ops whose inputs broadcast (numpy rules) to the result shape.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where",
                 "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or",
                 "Xor", "Mod"}


def graph_input_reason(value: ir.Value) -> str | None:
    """Why a graph input cannot be folded (``None`` if ``value`` is not one)."""
    if not value.is_graph_input():
        return None
    return OVERRIDABLE if value.const_value is not None else RUNTIME_INPUT


class Constants:
    """Which values of one model are constant, and their arrays, under an element budget."""

    def __init__(self, model: ir.Model, max_elements: int | None = None, *,
                 graphs: list[ir.Graph] | None = None) -> None:
        """``graphs``: ``model``'s graphs (:func:`~.graphs.model_graphs`), when already listed.
        Each graph is visited in node order, the main graph first: a node is constant when
        its inputs are, and a subgraph reads only values of the graphs around it."""
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self._nodes: set[ir.Node] = set()
        self._known: dict[ir.Value, np.ndarray] = {}
        largest = MIN_BUDGET
        for graph in model_graphs(model) if graphs is None else graphs:
            for v in graph.initializers.data.values():  # (a UserDict's plain dict)
                largest = max(largest, _static_size(v.shape))
            for node in graph:
                if node.op_type == "Constant":
                    largest = max(largest, _static_size(node.outputs[0].shape))
                if self._computable(node):
                    self._nodes.add(node)
        self.budget = largest if max_elements is None else max_elements

    def _computable(self, node: ir.Node) -> bool:
        if not is_default(node) or node.op_type in _NOT_CONSTANT_OPS:
            return False
        type_only = TYPE_ONLY_INPUTS.get(node.op_type, ())
        for i, v in enumerate(node.inputs):
            if v is not None and not self.is_constant(v) \
                    and not (i in type_only and _static_type(v)):
                return False
        return True

    def is_constant(self, value: ir.Value) -> bool:
        """Whether ``value`` is computed from constants only (nothing is evaluated)."""
        if value.is_graph_input():
            return False
        node = value.producer()
        return (node is not None and node in self._nodes) or const_tensor(value) is not None

    def array(self, value: ir.Value) -> np.ndarray | str:
        """The numpy value of ``value``, or why it has none (a phrase: "is not a constant")."""
        why = graph_input_reason(value)
        if why:
            return why
        tensor = const_tensor(value)
        if tensor is not None:
            return _numpy(tensor, value)
        if value in self._known:
            return self._known[value]
        cone = self._cone(value)
        if isinstance(cone, str):
            return cone
        out = self._evaluate(cone, value)
        if isinstance(out, np.ndarray):
            self._known[value] = out
        return out

    def _cone(self, value: ir.Value) -> list[ir.Node] | str:
        """The constant nodes computing ``value``, in topological order."""
        node = value.producer()
        if node is None or node not in self._nodes:
            return "is not a constant"
        order: list[ir.Node] = []
        seen: set[ir.Node] = set()
        stack: list[tuple[ir.Node, bool]] = [(node, False)]
        while stack:  # depth-first, post-order: every node after the nodes it reads
            current, expanded = stack.pop()
            if expanded:
                order.append(current)
                continue
            if current in seen:
                continue
            seen.add(current)
            if len(seen) > MAX_CONE_NODES:
                return f"is computed by more than {MAX_CONE_NODES} constant nodes"
            stack.append((current, True))
            for inp in self._value_inputs(current):
                producer = inp.producer()
                if producer is not None and producer not in seen \
                        and const_tensor(inp) is None:
                    stack.append((producer, False))
        return order

    @staticmethod
    def _value_inputs(node: ir.Node) -> list[ir.Value]:
        type_only = TYPE_ONLY_INPUTS.get(node.op_type, ())
        return [v for i, v in enumerate(node.inputs)
                if v is not None and (i not in type_only or not _static_type(v))]

    def _evaluate(self, cone: list[ir.Node], value: ir.Value) -> np.ndarray | str:
        results: dict[ir.Value, np.ndarray] = {}
        for node in cone:
            args = [None if v is None else results[v] if v in results
                    else self._leaf(node, i, v) for i, v in enumerate(node.inputs)]
            size = _result_elements(node, args)
            if size is None:
                return (f"is computed by {node.op_type}, whose result size bnfold cannot "
                        "bound before running it")
            if size > self.budget:
                return (f"is computed by {node.op_type} with {size} elements, over the "
                        f"constant-evaluation budget of {self.budget} (max_const_elements)")
            outputs = _run(node, args, node.version or self.opset)
            if outputs is None:
                return f"is computed by {node.op_type}, which bnfold cannot evaluate"
            results.update(zip(node.outputs, outputs, strict=False))
        return results[value]

    def _leaf(self, node: ir.Node, index: int, value: ir.Value) -> np.ndarray:
        """A cone input: its array, or for a dtype/shape-only input a zero-stride stand-in
        of its type (nothing read, nothing allocated)."""
        if index in TYPE_ONLY_INPUTS.get(node.op_type, ()) and _static_type(value):
            assert value.dtype is not None and value.shape is not None
            return np.broadcast_to(np.zeros((), value.dtype.numpy()), tuple(value.shape.numpy()))
        if value in self._known:
            return self._known[value]
        tensor = const_tensor(value)
        assert tensor is not None
        return _numpy(tensor, value)


def _numpy(tensor: ir.TensorProtocol, value: ir.Value) -> np.ndarray:
    """``tensor``'s array; :class:`BadInputError` if its stored data does not fill its shape
    (an invalid model)."""
    try:
        return tensor.numpy()
    except ValueError as exc:
        raise BadInputError(f"invalid model: tensor {value.name!r} cannot be read "
                            f"({first_line(exc)})") from exc


def _static_size(shape: ir.Shape | None) -> int:
    """The element count of a static ``shape``; 0 when it is unknown or symbolic."""
    if shape is None:
        return 0
    size = 1
    for d in shape:
        if not isinstance(d, int):
            return 0
        size *= d
    return size


def _static_type(value: ir.Value) -> bool:
    shape = value.shape
    return value.dtype is not None and shape is not None and shape.is_static()


def _result_elements(node: ir.Node, args: list[np.ndarray | None]) -> int | None:
    """How many elements ``node`` produces from ``args`` (an upper bound), or ``None``."""
    op = node.op_type
    if op in ("Shape", "Size"):
        return max(1, args[0].ndim)
    type_only = TYPE_ONLY_INPUTS.get(op, ())
    arrays = [a for i, a in enumerate(args) if a is not None and i not in type_only]
    try:
        if op in _NOT_GROWING:
            return max([int(np.prod(a.shape, dtype=object)) for a in arrays] + [1])
        if op in _REDUCING:
            return math.prod(max(int(d), 1) for d in args[0].shape)
        if op == "Concat":
            return sum(int(a.size) for a in arrays)
        if op in _BROADCASTING:
            return math.prod(np.broadcast_shapes(*(a.shape for a in arrays)))
        if op == "Expand":
            return math.prod(np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1])))
        if op == "ConstantOfShape":
            return math.prod(int(d) for d in args[0].reshape(-1))
        if op == "Tile":
            return math.prod(int(d) * int(r) for d, r in zip(args[0].shape, args[1],
                                                                strict=True))
        if op == "Range":
            start, limit, delta = (float(a) for a in args)
            return max(0, math.ceil((limit - start) / delta))
        if op == "Gather":
            return int(args[0].size) * max(1, int(args[1].size))
        if op == "MatMul":  # numpy's: [..., n, k] @ [..., k, m] -> [..., n, m], 1-D operands
            a, b = args[0].shape, args[1].shape
            if not a or not b:
                return None
            rows, cols = (a[-2] if len(a) > 1 else 1), (b[-1] if len(b) > 1 else 1)
            return math.prod(np.broadcast_shapes(a[:-2], b[:-2])) * rows * cols
    except (ValueError, TypeError, ZeroDivisionError, IndexError):
        return None
    return None


def _run(node: ir.Node, args: list[np.ndarray | None], version: int
         ) -> list[np.ndarray] | None:
    """Run ``node`` on ``args`` with ONNX's reference kernel at opset ``version`` (what the
    kernel's ``eval`` does, with the kernel built once per op, opset and attributes)."""
    try:
        attrs = {name: ir.serde.serialize_tensor(a.value) if a.type == ir.AttributeType.TENSOR
                 else a.value for name, a in node.attributes.items()}
        res = _kernel(node.op_type, version, len(args), attrs).run(*args)
        out = res[0] if len(res) == 1 else res
    except Exception:  # an op or attribute the reference kernels cannot run
        return None
    return [np.asarray(o) for o in (out if isinstance(out, (tuple, list)) else (out,))]


def _kernel(op_type: str, version: int, n_inputs: int, attrs: dict[str, Any]) -> Any:
    """The reference kernel for ``op_type`` at ``version`` with ``attrs``. Building one makes
    and checks a NodeProto, which costs more than running it on a cone's small tensors, so a
    kernel whose attributes are all hashable (every one but tensors and lists) is built once
    per process and reused: a kernel keeps no state between runs."""
    key = tuple((name, type(value), value) for name, value in sorted(attrs.items()))
    try:
        return _cached_kernel(op_type, version, n_inputs, key)
    except TypeError:  # an unhashable attribute: build this one afresh
        return _new_kernel(op_type, version, n_inputs, attrs)


@functools.lru_cache(maxsize=256)
def _cached_kernel(op_type: str, version: int, n_inputs: int,
                   key: tuple[tuple[str, type, Any], ...]) -> Any:
    return _new_kernel(op_type, version, n_inputs, {name: value for name, _, value in key})


def _new_kernel(op_type: str, version: int, n_inputs: int, attrs: dict[str, Any]) -> Any:
    from onnx.reference.ops import load_op  # deferred: only constant cones need it

    return load_op("", op_type, version).create(n_inputs, **attrs)


def const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """Like ``ir.convenience.get_const_tensor``, but never renames a ``Constant`` node's tensor
    (that tensor may wrap the caller's own ModelProto, which must stay untouched)."""
    tensor = value.const_value
    if tensor is not None:
        return tensor
    node = value.producer()
    if node is None or node.op_type != "Constant":
        return None  # neither an initializer nor a Constant node's output
    attr = node.attributes.get("value")
    if attr is not None and not attr.is_ref():
        if attr.type is ir.AttributeType.TENSOR and type(attr.value) is ir.serde.TensorProtoTensor:
            return attr.value  # what ``as_tensor()`` returns, without its protocol check
        return attr.as_tensor()  # (whose ``isinstance`` reads every tensor property: ~0.1 ms)
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node: not a constant we can use
        return None


def data_uses(value: ir.Value) -> list[Any]:
    """Uses of ``value`` that read its data (``CastLike``/``Shape`` only read dtype/shape,
    which a fold never changes)."""
    return [u for u in value.uses()
            if u.idx not in TYPE_ONLY_INPUTS.get(u.node.op_type, ())
            or not is_default(u.node)]


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

    def __init__(self, model: ir.Model | None = None, used: Iterable[str] = (), *,
                 graphs: list[ir.Graph] | None = None) -> None:
        """Names taken: every name of ``model`` (inputs, outputs, initializers, node outputs
        and node names, in every graph; ``graphs``: its graphs, when already listed) and
        ``used``."""
        taken: set[str | None] = set(used)
        if graphs is None:
            graphs = model_graphs(model) if model is not None else []
        for graph in graphs:
            taken.update(v.name for v in graph.inputs)
            taken.update(v.name for v in graph.outputs)
            taken.update(graph.initializers.data)
            for node in graph:
                taken.add(node.name)
                taken.update(v.name for v in node.outputs)
        taken.discard(None)
        taken.discard("")
        self._used: set[str] = taken  # type: ignore[assignment]

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
