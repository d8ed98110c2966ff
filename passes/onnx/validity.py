"""Refuse an invalid ONNX model before any fold is planned, with one line naming the node.

The fold rules assume what the ONNX spec requires of the nodes they read; a model that breaks
it is refused (:class:`bnfold.errors.BadInputError`), not "repaired" by numpy broadcasting nor
crashed on. Only shapes are read (declared, or those of constant tensors), never tensor data,
so external weights stay unread:

* ``BatchNormalization``: ``scale``, ``B``, ``mean`` and ``var`` are 1-D tensors of one value
  per channel (``spatial=0`` at opsets <= 8: one row per channel), the same count for all
  four, equal to ``X``'s channel dim (axis 1) when that is known, from its declared shape or
  from the output channels of the Conv that produces it (their element type, which needs the
  data's type, is checked where they are read: :func:`.bn.params`);
* ``Conv`` / ``ConvTranspose``: a weight of rank >= 3, a ``group`` >= 1 that divides its
  channel axis, a bias (if any) of one value per output channel, and ``kernel_shape``,
  ``strides``, ``dilations``, ``output_padding``, ``output_shape`` of one entry per spatial
  dim of the weight, ``pads`` of two, a ``kernel_shape`` that is the weight's;
* ``Gemm``: ``A`` and ``B`` of rank 2, ``C`` of rank <= 2;
* ``Transpose``: ``perm`` a permutation of ``0 .. rank-1``;
* any node: every input it reads is defined (by a node, a graph input or an initializer of
  its graph or an enclosing one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bnfold.errors import BadInputError
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name
from bnfold.passes.onnx.consts import const_tensor
from bnfold.passes.onnx.graphs import model_graphs
from bnfold.passes.onnx.layers import is_default

_BN_PARAMS = ("scale", "B", "mean", "var")


#: Static dims of a value (``None`` for symbolic ones; ``None`` when its rank is unknown).
ShapeOf = Callable[[Any], "tuple[int | None, ...] | None"]
#: The op types :func:`node_problem` checks.
CHECKED_OPS = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "Transpose")


def check_graphs(model: ir.Model, *, graphs: list[ir.Graph] | None = None) -> None:
    """Raise :class:`BadInputError` for the first node of ``model`` that breaks the spec
    (``graphs``: its graphs, :func:`~.graphs.model_graphs`, when already listed)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    for graph in model_graphs(model) if graphs is None else graphs:
        for node in graph:
            problem = _undefined_input(node)
            if not problem and not is_default(node):
                continue
            problem = problem or node_problem(node, opset, _shape)
            if problem:
                raise BadInputError(f"invalid model: {node.op_type} {display_name(node)!r} "
                                    f"{problem}")


def _undefined_input(node: ir.Node) -> str | None:
    """An input of ``node`` that nothing defines: no node, graph input or initializer of its
    graph or an enclosing one (onnx-ir makes such a name a value of its own, with a warning)."""
    for value in node.inputs:
        if value is not None and value.producer() is None and not value.is_graph_input() \
                and not value.is_initializer():
            return f"reads {value.name!r}, which no node, graph input or initializer defines"
    return None


def node_problem(node: Any, opset: int, shape: ShapeOf) -> str | None:
    """What about default-domain ``node`` breaks the spec, or ``None``. ``node`` is an
    ``ir.Node`` or anything with its ``op_type``/``inputs``/``attributes`` (inputs'
    ``producer()``); ``shape`` reads a value's static dims."""
    check = _CHECKS.get(node.op_type)
    return check(node, opset, shape) if check else None


def _shape(value: ir.Value | None) -> tuple[int | None, ...] | None:
    """Static dims of ``value`` (``None`` for symbolic ones), from a constant or declared."""
    if value is None:
        return None
    tensor = const_tensor(value)
    if type(tensor) is ir.serde.TensorProtoTensor:  # (isinstance: a slow protocol check)
        return tuple(tensor.raw.dims)  # all static (``.shape`` would build an ir.Shape)
    shape = tensor.shape if tensor is not None else value.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def _batch_norm(node: Any, opset: int, shape_of: ShapeOf) -> str | None:
    per_row = opset <= 8 and node.attributes.get_int("spatial", 1) == 0
    counts: dict[str, int] = {}
    inputs = node.inputs
    for name, value in zip(_BN_PARAMS, inputs[1:5], strict=False):
        shape = shape_of(value)
        if shape is None or None in shape:
            continue
        if per_row:
            if shape:
                counts[name] = shape[0]  # type: ignore[assignment]
        else:
            size = 1
            for d in shape:
                size *= d  # type: ignore[operator]
            counts[name] = size
            if len(shape) != 1:
                return (f"has a {name} of shape {list(shape)}; ONNX needs a 1-D tensor, one "
                        "value per channel")
    channels = _channels(inputs[0], shape_of)
    if channels is not None:
        wrong = {k: n for k, n in counts.items() if n != channels}
        if wrong:
            what = ", ".join(f"{k} has {n}" for k, n in wrong.items())
            return (f"normalizes {channels} channels but {what} value(s) (ONNX needs one per "
                    "channel)")
    if len(set(counts.values())) > 1:
        what = ", ".join(f"{k} {n}" for k, n in counts.items())
        return f"has parameters of different lengths ({what}); ONNX needs one value per channel"
    return None


def _channels(x: Any, shape_of: ShapeOf) -> int | None:
    """The channel count (axis 1) of ``x``, if its shape or a producing Conv tells."""
    shape = shape_of(x)
    if shape is not None and len(shape) > 1 and shape[1] is not None:
        return shape[1]
    node = x.producer() if x is not None else None
    if node is None or not is_default(node):
        return None
    inputs = node.inputs  # (read once: a fast-path node view makes it on each read)
    if len(inputs) < 2:
        return None
    weight = shape_of(inputs[1])
    if node.op_type == "Conv" and weight and len(weight) >= 3:
        return weight[0]
    if node.op_type == "ConvTranspose" and weight and len(weight) >= 3 and weight[1] is not None:
        return weight[1] * node.attributes.get_int("group", 1)
    return None


def _conv(node: Any, opset: int, shape_of: ShapeOf) -> str | None:
    group = node.attributes.get_int("group", 1)
    if group < 1:
        return f"has group={group}; it must be at least 1"
    inputs = node.inputs
    weight = shape_of(inputs[1] if len(inputs) > 1 else None)
    if weight is None:
        return None
    if len(weight) < 3:
        return (f"has a weight of shape {list(weight)}; a {node.op_type} weight has rank >= 3 "
                "(channels, channels per group, kernel...)")
    if weight[0] is not None and weight[0] % group:  # Cout (Conv) or Cin (ConvTranspose)
        return f"has group={group}, which does not divide its weight's {weight[0]} channels"
    spatial = len(weight) - 2
    for attr, n in (("kernel_shape", spatial), ("strides", spatial), ("dilations", spatial),
                    ("output_padding", spatial), ("output_shape", spatial),
                    ("pads", 2 * spatial)):
        values = node.attributes.get_ints(attr, None)
        if values is not None and len(values) != n:
            return (f"has {attr}={list(values)} for a weight of {spatial} spatial dim(s); "
                    f"ONNX needs {n} value(s)")
    kernel = node.attributes.get_ints("kernel_shape", None)
    if kernel is not None and any(k != d for k, d in zip(kernel, weight[2:], strict=True)
                                  if d is not None):
        return f"has kernel_shape={list(kernel)} for a weight of kernel {list(weight[2:])}"
    bias = shape_of(inputs[2] if len(inputs) > 2 else None)
    channels = weight[0] if node.op_type == "Conv" else (
        None if weight[1] is None else weight[1] * group)
    if bias is not None and channels is not None and (
            len(bias) != 1 or bias[0] not in (None, channels)):
        return (f"has a bias of shape {list(bias)} for {channels} output channels (ONNX needs "
                "a 1-D bias, one value per channel)")
    return None


def _gemm(node: Any, opset: int, shape_of: ShapeOf) -> str | None:
    for name, value, ranks in zip(("A", "B", "C"), node.inputs, ((2,), (2,), (0, 1, 2)),
                                  strict=False):
        shape = shape_of(value)
        if shape is not None and len(shape) not in ranks:
            return (f"has a {name} of shape {list(shape)}; Gemm's A and B are matrices and its "
                    "C has rank <= 2")
    return None


def _transpose(node: Any, opset: int, shape_of: ShapeOf) -> str | None:
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        return None
    rank = shape_of(node.inputs[0])
    n = len(perm) if rank is None else len(rank)
    if sorted(perm) != list(range(n)):
        return f"has perm={list(perm)}, not a permutation of the axes 0..{n - 1}"
    return None


_CHECKS = {"BatchNormalization": _batch_norm, "Conv": _conv, "ConvTranspose": _conv,
           "Gemm": _gemm, "Transpose": _transpose}
