"""ONNX ops that act on each channel alone, which a per-channel affine map passes through.

The ONNX side of :mod:`bnfold.passes.fx.channelwise`: ``P(s*y + t) = s*P(y) + t`` per channel
for an average or a resample whose weights sum to one, and for a max where ``s >= 0``, so
``layer -> P -> BN`` folds into the layer exactly. Every op here reads ``(N, C, spatial...)``
and keeps channel axis 1:

* ``AveragePool``: with no padding (no ``pads``, ``auto_pad`` ``NOTSET``/``VALID``), or with
  ``count_include_pad=0`` (padding counted in the average would scale the shift at the
  borders); with ``ceil_mode`` and ``count_include_pad=1`` only where the last window runs at
  most 1 element past the input (:func:`_counted_padding`); ``GlobalAveragePool``;
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
    if node.op_type == "AveragePool" and attrs.get_int("count_include_pad", 0):
        why = _counted_padding(node, ctx)
        if why:
            return f"{name} {why}"
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


def _counted_padding(node: ir.Node, ctx: Context) -> str | None:
    """Why an ``AveragePool`` with ``count_include_pad=1`` averages over elements that are not
    its input's (so ``avg(s*y + t) != s*avg(y) + t`` at the borders), or None.

    Padding (``pads``, ``auto_pad`` ``SAME_*``) is counted: the shift would be scaled. With
    every pad 0, ``ceil_mode``'s last window may run past the input's end; ONNX Runtime (every
    opset) and torch average it over the input's elements only (the weights sum to one:
    exact), but onnx's reference evaluator puts half of an overrun of 2 or more before the
    input and counts it, so an overrun is taken only where it is at most 1 on every axis.
    """
    attrs = node.attributes
    if attrs.get_string("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER") or any(
            attrs.get_ints("pads", ()) or ()):
        return ("counts its padding in the average (count_include_pad=1): the shift would "
                "be scaled at the borders")
    if not attrs.get_int("ceil_mode", 0):
        return None
    dims = ctx.dims(node.inputs[0])
    kernel = attrs.get_ints("kernel_shape", ())
    if dims is None or any(d is None for d in dims[2:]) or len(dims) - 2 != len(kernel):
        return f"rounds its output size up (ceil_mode=1) and its input's size is {UNKNOWN}"
    strides = attrs.get_ints("strides", ()) or [1] * len(kernel)
    dilations = attrs.get_ints("dilations", ()) or [1] * len(kernel)
    for size, k, s, d in zip(dims[2:], kernel, strides, dilations, strict=True):
        span = (k - 1) * d + 1
        last = -(-(size - span) // s) * s  # start of the last window (ceil_mode)
        if last >= size:  # a window starting past the end is dropped
            last -= s
        if last + span - size > 1:
            return (f"rounds its output size up (ceil_mode=1) with count_include_pad=1 and its "
                    f"last window runs {last + span - size} elements past the input's end, "
                    "which runtimes do not average alike")
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
