"""The zero conv bias torch's dynamo exporter computes (``optimize=False``), on the protobuf.

For a ``Conv`` or ``ConvTranspose`` module without a bias, ``torch.onnx.export(...,
dynamo=True, optimize=False)`` writes one computed from constants::

    bias = Expand(CastLike(c, x), s),   s = Shape(w, start, end)  or  Expand(Shape(w, ...), [1])

with ``c`` a ``Constant`` scalar (0), ``x`` a value of the layer's dtype (only its type is
read) and ``w`` the layer's weight (only its shape is read). The onnx-ir fold
(:class:`.consts.Constants`) evaluates that cone with ONNX's reference kernels: ``c`` cast to
``x``'s declared dtype (``x`` must have a static declared type), times ones of shape ``s``.
:func:`computed_bias` gives the same array to the fast path (:mod:`.direct`) with the same
expressions, or ``None`` for any other form (another op, attribute or dtype: the full path
then runs). Once the fold gives the layer a bias initializer, the fast path prunes what of the
cone nobody reads any more, as :func:`.edit.prune` does on the full path (a ``Constant``
shared by several cones goes with the last of them).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir

from bnfold.passes.onnx.consts import MIN_BUDGET
from bnfold.passes.onnx.layers import DEFAULT_DOMAINS
from bnfold.passes.onnx.proto_view import GraphView, NodeView, type_shape

_A = onnx.AttributeProto
#: The dtypes a computed bias may have (those the fast path folds).
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16)


def computed_bias(view: GraphView, layer: NodeView) -> np.ndarray | None:
    """The array the onnx-ir fold evaluates ``layer``'s computed bias to, when it is the
    dynamo zero-bias cone of the module docstring; else ``None``."""
    names = layer.input_names
    if layer.op_type not in ("Conv", "ConvTranspose") or len(names) != 3:
        return None
    weight, bias = names[1], names[2]
    expand = _producer(view, bias, "Expand")
    if expand is None or weight not in view.dims:
        return None
    fill, shape = view.input_names[expand]
    cast = _producer(view, fill, "CastLike")
    size = _bias_shape(view, shape, weight)
    if cast is None or size is None or not (size <= MIN_BUDGET
                                            or size <= math.prod(view.dims[weight])):
        return None  # (else the full path's element budget may refuse to evaluate it)
    scalar, like = view.input_names[cast]
    value = _constant(view, scalar)
    declared = view.declared.get(like)
    if value is None or value.size != 1 or value.dtype.kind != "f" or declared is None \
            or like in view.initializers or declared.WhichOneof("value") != "tensor_type":
        return None
    dims = type_shape(declared)
    code = declared.tensor_type.elem_type
    if dims is None or None in dims or code not in _FLOATS \
            or code != view.initializers[weight].data_type:
        return None
    filled = value.astype(onnx.helper.tensor_dtype_to_np_dtype(code))  # CastLike's kernel
    return filled * np.ones((size,), dtype=filled.dtype)  # Expand's kernel


def _bias_shape(view: GraphView, name: str, weight: str) -> int | None:
    """The one dim ``name`` holds: ``Shape(weight, start, end)`` giving one dim, or that
    expanded to shape ``[1]``; ``None`` otherwise."""
    index = _producer(view, name, "Expand")
    if index is not None:
        inner, ones = view.input_names[index]
        target = _constant(view, ones)
        if target is None or target.dtype != np.int64 or target.tolist() != [1]:
            return None
        return _bias_shape(view, inner, weight)
    index = _producer(view, name, "Shape", inputs=1, attributes=("start", "end"))
    if index is None or view.input_names[index] != [weight]:
        return None
    attrs = {a.name: a.i for a in view.nodes[index].attribute}
    dims = view.dims[weight][attrs.get("start", 0):attrs.get("end", len(view.dims[weight]))]
    return dims[0] if len(dims) == 1 else None


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
    """The array of the ``Constant`` node (a ``value`` tensor or ``value_ints``) that produces
    ``name``, read as onnx-ir reads it; else ``None``."""
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
    return None
