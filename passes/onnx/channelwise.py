"""ONNX ops that act on each channel alone, which a per-channel affine map passes through.

The ONNX side of :mod:`bnfold.passes.fx.channelwise`: ``P(s*y + t) = s*P(y) + t`` per channel
for an average or a resample whose weights sum to one, and for a max where ``s >= 0``, so
``layer -> P -> BN`` folds into the layer exactly. Every op here reads ``(N, C, spatial...)``
and keeps channel axis 1:

* ``AveragePool``: with no padding (no ``pads``, ``auto_pad`` ``NOTSET``/``VALID``) and no
  ``ceil_mode``, or with ``count_include_pad=0`` (padding counted in the average would scale
  the shift at the borders); ``GlobalAveragePool``;
* ``MaxPool`` (its ``Indices`` output unread), ``GlobalMaxPool``: when ``s >= 0`` everywhere;
* ``Resize`` / ``Upsample``: every mode but ``tf_crop_and_resize`` (which fills with a
  constant outside the crop) and without ``axes``, when the channel count stays (a scale of 1
  on the channel axis samples each channel itself);
* ``Slice`` with constant ``axes`` that leave the channel axis out (TCN's ``Chomp1d``), and
  ``ReduceMean`` over such axes (a global average pool, as dynamo exports it).
"""

from __future__ import annotations

import numpy as np

from bnfold.algebra import BNParams
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name
from bnfold.passes.onnx.layers import is_default
from bnfold.passes.onnx.rules import Context
from bnfold.passes.onnx.shapes import UNKNOWN

CHANNELWISE_OPS = ("AveragePool", "GlobalAveragePool", "MaxPool", "GlobalMaxPool", "Resize",
                   "Upsample", "Slice", "ReduceMean")


def is_channelwise(node: ir.Node) -> bool:
    """Whether ``node`` is one of :data:`CHANNELWISE_OPS` (default domain)."""
    return is_default(node) and node.op_type in CHANNELWISE_OPS


def channelwise_refusal(node: ir.Node, params: BNParams, ctx: Context) -> str | None:
    """Why the affine map of ``params`` does not pass through ``node`` exactly, or None."""
    name, attrs = f"{display_name(node)} ({node.op_type})", node.attributes
    if node.op_type == "AveragePool":
        padded = attrs.get_string("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") or any(
            attrs.get_ints("pads", ()) or ()) or attrs.get_int("ceil_mode", 0)
        if padded and attrs.get_int("count_include_pad", 0):
            return (f"{name} counts its padding in the average (count_include_pad=1): the "
                    "shift would be scaled at the borders")
    if node.op_type in ("MaxPool", "GlobalMaxPool"):
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return f"{name} also returns indices, which are read"
        if bool(np.any(params.scale_shift()[0] < 0)):
            return (f"{name} takes a maximum, which a negative scale of the BN turns into a "
                    "minimum")
    if node.op_type in ("Slice", "ReduceMean"):
        axes = _axes(node, ctx)
        rank = ctx.dims(node.inputs[0])
        if axes is None or rank is None:
            return f"{name}: which axes it works on is {UNKNOWN}"
        reduced = {int(a) % len(rank) for a in np.asarray(axes).reshape(-1)}
        if 1 in reduced:
            return f"{name} works along the channel axis"
        if 0 in reduced and node.op_type == "ReduceMean" and not attrs.get_int("keepdims", 1):
            return f"{name} drops the batch axis, which moves the channel axis"
    if node.op_type in ("Resize", "Upsample"):
        if attrs.get_string("coordinate_transformation_mode", "") == "tf_crop_and_resize" \
                or "axes" in attrs:
            return f"{name} crops or resizes chosen axes, not a plain resample"
        dims_in, dims_out = ctx.dims(node.inputs[0]), ctx.dims(node.outputs[0])
        if dims_in is None or len(dims_in) < 3 or dims_in[1] is None:
            return f"{name}: whether it keeps the channel count is {UNKNOWN}"
        channels = dims_out[1] if dims_out is not None and len(dims_out) == len(dims_in) \
            else None
        if channels is None:
            channels = _resized_channels(node, dims_in[1], ctx)
        if channels is None:
            return f"{name}: whether it keeps the channel count is {UNKNOWN}"
        if channels != dims_in[1]:
            return f"{name} resizes the channel axis"
    return None


def _axes(node: ir.Node, ctx: Context) -> object | None:
    """The constant ``axes`` of a Slice (input 3) or ReduceMean (attribute, or input 1 from
    opset 18), else None (absent: a Slice then slices every axis, a mean reduces all)."""
    if node.op_type == "ReduceMean" and "axes" in node.attributes:
        return node.attributes.get_ints("axes")
    index = 3 if node.op_type == "Slice" else 1
    value = node.inputs[index] if len(node.inputs) > index else None
    axes = None if value is None else ctx.consts.array(value)
    return None if isinstance(axes, str) else axes


def _resized_channels(node: ir.Node, channels: int, ctx: Context) -> int | None:
    """The channel count a Resize gives, from its constant ``scales`` or ``sizes`` (when no
    shape is known for its output), else None."""
    for index in (3, 2):  # sizes, then scales
        value = node.inputs[index] if len(node.inputs) > index else None
        array = None if value is None or not value.name else ctx.consts.array(value)
        if array is None or isinstance(array, str) or np.asarray(array).size < 2:
            continue
        array = np.asarray(array).reshape(-1)
        return int(array[1]) if index == 3 else int(np.floor(channels * float(array[1])))
    return None
