"""Constant fills torch's dynamo exporter computes (``optimize=False``), on the protobuf.

``torch.onnx.export(..., dynamo=True, optimize=False)`` writes a per-channel constant it
knows the value of as a computation rather than a tensor::

    fill = Expand(CastLike(c, like), s),   s = Shape(t, start, end)  or  Expand(that, [1])

with ``c`` a ``Constant`` scalar, ``like`` a value whose dtype the fill takes (only its type
is read) and ``t`` a value whose shape gives the length (only its shape is read): the zero
bias of a ``Conv``/``ConvTranspose`` without one (``c`` = 0, ``t`` its weight) and the scale
(1) and B (0) of a ``BatchNorm`` without affine parameters (``t`` its input). The onnx-ir fold
(:class:`.consts.Constants`) evaluates such a cone with ONNX's reference kernels when
``like`` and ``t`` have static types: ``c`` cast to ``like``'s dtype, times ones of shape
``s``. :func:`computed_fill` gives the fast path (:mod:`.direct`) that same array with the
same expressions, or ``None`` for any other form (another op, attribute, dtype, a type that
is not static: the full path then runs). Once the fold no longer reads the fill, the fast
path prunes what of the cone nobody reads any more, as :func:`.edit.prune` does on the full
path (a ``Constant`` shared by several cones goes with the last of them).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.lazy_ir import ir
from bnfold.passes.onnx.layers import DEFAULT_DOMAINS
from bnfold.passes.onnx.proto_view import GraphView, type_shape

_A = onnx.AttributeProto
#: The dtypes a fill may have (those the fast path folds).
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16)


def computed_fill(view: GraphView, name: str, limit: int) -> np.ndarray | None:
    """The array the onnx-ir fold evaluates ``name`` to, when it is a fill of the module
    docstring none of whose nodes gives more than ``limit`` elements (no more than the full
    path's element budget: the fill's length, and the rank of ``t`` that ``Shape`` gives
    before slicing, as :func:`.consts._result_elements` counts it); else ``None``."""
    expand = _producer(view, name, "Expand")
    if expand is None:
        return None
    fill, shape = view.input_names[expand]
    cast = _producer(view, fill, "CastLike")
    length = _length(view, shape)
    if cast is None or length is None or max(length) > limit:
        return None
    size = length[0]
    scalar, like = view.input_names[cast]
    value = _constant(view, scalar)
    declared = view.declared.get(like)
    if value is None or value.size != 1 or value.dtype.kind != "f" or declared is None \
            or like in view.initializers or _static_dims(view, like) is None:
        return None
    code = declared.tensor_type.elem_type
    if code not in _FLOATS:
        return None
    filled = value.astype(onnx.helper.tensor_dtype_to_np_dtype(code))  # CastLike's kernel
    return filled * np.ones((size,), dtype=filled.dtype)  # Expand's kernel


def _length(view: GraphView, name: str) -> tuple[int, int] | None:
    """``(the one dim name holds, the rank of t)``: ``name`` is ``Shape(t, start, end)``
    giving one dim of a value ``t`` of static shape, or that expanded to shape ``[1]``;
    ``None`` otherwise."""
    index = _producer(view, name, "Expand")
    if index is not None:
        inner, ones = view.input_names[index]
        target = _constant(view, ones)
        if target is None or target.dtype != np.int64 or target.tolist() != [1]:
            return None
        return _length(view, inner)
    index = _producer(view, name, "Shape", inputs=1, attributes=("start", "end"))
    dims = None if index is None else _static_dims(view, view.input_names[index][0])
    if index is None or dims is None:
        return None
    attrs = {a.name: a.i for a in view.nodes[index].attribute}
    picked = dims[attrs.get("start", 0):attrs.get("end", len(dims))]
    return (picked[0], len(dims)) if len(picked) == 1 else None


def _static_dims(view: GraphView, name: str) -> tuple[int, ...] | None:
    """The dims of an initializer, or of a value declared as a tensor of static shape and
    known dtype (what the full path needs of an input it reads only the type of); ``None``
    for an initializer that is also a graph input (its declaration may say otherwise)."""
    if name in view.initializers:
        return None if name in view.inputs else view.dims[name]
    declared = view.declared.get(name)
    if declared is None or declared.WhichOneof("value") != "tensor_type" \
            or not declared.tensor_type.elem_type:
        return None
    dims = type_shape(declared)
    return None if dims is None or None in dims else dims  # type: ignore[return-value]


def _producer(view: GraphView, name: str, op: str, *, inputs: int = 2,
              attributes: tuple[str, ...] = ()) -> int | None:
    """The index of the default-domain ``op`` node with ``inputs`` inputs and only INT
    ``attributes`` that produces ``name`` as its one output; else ``None``."""
    index = view.producer.get(name)
    if index is None or view.op_types[index] != op or view.domains[index] not in DEFAULT_DOMAINS:
        return None
    node = view.nodes[index]
    if len(view.input_names[index]) != inputs or not all(view.input_names[index]) \
            or view.output_names[index] != [name]:
        return None
    if any(a.name not in attributes or a.type != _A.INT for a in node.attribute):
        return None
    return index


def _constant(view: GraphView, name: str) -> np.ndarray | None:
    """The array of the ``Constant`` node (a ``value`` tensor, ``value_ints`` or
    ``value_floats``) that produces ``name``, read as onnx-ir reads it; else ``None``."""
    index = view.producer.get(name)
    if index is None or view.op_types[index] != "Constant" \
            or view.domains[index] not in DEFAULT_DOMAINS or view.output_names[index] != [name]:
        return None
    tensor = view.constant_tensor(name)
    if tensor is not None:
        try:
            return ir.serde.TensorProtoTensor(tensor).numpy()
        except ValueError:
            return None
    attrs = view.nodes[index].attribute
    if len(attrs) == 1 and attrs[0].name == "value_ints" and attrs[0].type == _A.INTS:
        return np.array(attrs[0].ints, dtype=np.int64)
    if len(attrs) == 1 and attrs[0].name == "value_floats" and attrs[0].type == _A.FLOATS:
        return np.array(attrs[0].floats, dtype=np.float32)
    return None
