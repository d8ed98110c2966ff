"""The ONNX layer table: what the fold, insert and reparam passes know about each layer kind.

Each row answers, for one default-domain op, the questions every pass asks of a layer
``y = W (*) x + k*b``:

* Conv ``W[Co, Ci/g, k..]``: output channels on weight axis 0, input channels on 1, ``group``,
  bias input 2; a BN before it is exact as ``"conv"`` (zero pads, or a zero shift).
* ConvTranspose ``W[Ci, Co/g, k..]``: output axis 1 (grouped), input axis 0, ``group``, bias
  input 2; exactness ``"conv_transpose"``.
* Gemm ``alpha*A'B' + beta*C``: output axis 1 of ``B`` (0 with ``transB=1``), input the other,
  bias input 2 scaled by ``beta``; exactness ``"linear"``.
* MatMul ``A @ W``, ``W[K, N]``: output axis 1, input axis 0, the bias a following ``Add`` of
  a constant; exactness ``"linear"``.

The output-channel count is ``W.shape[out_axis]`` times ``groups`` when the grouped axis is 1
(ConvTranspose: output channel ``g * Co/g + j``). The exactness kind is what
:func:`bnfold.algebra.backward_fold_refusal` checks for a BN before the layer; every forward
fold is exact. Adding a layer kind is one row plus tests, e.g. a hypothetical 2-D weight op::

    "Dense": LayerKind("Dense", lambda n: 0, lambda n: 1, "linear"),
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bnfold.geometry import ConvGeometry
from bnfold.lazy_ir import ir

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default(node: ir.Node) -> bool:
    """The node is in the default ONNX domain (``""`` or ``"ai.onnx"``)."""
    return node.domain in DEFAULT_DOMAINS


@dataclass(frozen=True)
class LayerKind:
    """One row of the layer table (see the module docstring).

    ``out_axis`` / ``in_axis``: the weight axes of output / input channels, read off the node's
    attributes. ``grouped``: the node's ``group`` attribute splits the channels. ``bias_index``:
    the node input holding the bias, ``None`` when the bias is a following ``Add`` (MatMul).
    ``bias_scale_attr``: the attribute the layer multiplies its bias by (Gemm's ``beta``; a
    fold folds it into the new bias and sets it to 1). ``weight_label``:
    how reasons name the weight input.
    """

    op_type: str
    out_axis: Callable[[ir.Node], int]
    in_axis: Callable[[ir.Node], int]
    exactness: str
    grouped: bool = False
    bias_index: int | None = 2
    bias_scale_attr: str | None = None
    weight_label: str = "weight"

    def bias_scale(self, node: ir.Node) -> float:
        """What ``node`` multiplies its bias by (1 unless the kind has a scale attribute)."""
        attr = self.bias_scale_attr
        return 1.0 if attr is None else node.attributes.get_float(attr, 1.0)

    def groups(self, node: ir.Node) -> int:
        """The node's channel groups (1 for ungrouped kinds)."""
        return node.attributes.get_int("group", 1) if self.grouped else 1

    def channels(self, node: ir.Node, weight_shape: tuple[int, ...]) -> int:
        """Output channels of ``node`` with a weight of ``weight_shape``."""
        axis = self.out_axis(node)
        return weight_shape[axis] * (self.groups(node) if axis == 1 else 1)


def _trans_b(node: ir.Node) -> int:
    return 1 if node.attributes.get_int("transB", 0) else 0


LAYERS: dict[str, LayerKind] = {
    "Conv": LayerKind("Conv", lambda n: 0, lambda n: 1, "conv", grouped=True),
    "ConvTranspose": LayerKind("ConvTranspose", lambda n: 1, lambda n: 0, "conv_transpose",
                               grouped=True),
    "Gemm": LayerKind("Gemm", lambda n: 1 - _trans_b(n), _trans_b, "linear",
                      bias_scale_attr="beta",
                      weight_label="weight (B)"),
    "MatMul": LayerKind("MatMul", lambda n: 1, lambda n: 0, "linear", bias_index=None),
}


def reset_bias_scale(node: ir.Node) -> None:
    """After a fold wrote a bias with the scale folded in: set the kind's scale attribute
    (Gemm's ``beta``) to 1."""
    kind = layer_kind(node)
    if kind is not None and kind.bias_scale_attr is not None:
        node.attributes[kind.bias_scale_attr] = ir.AttrFloat32(kind.bias_scale_attr, 1.0)


def layer_kind(node: ir.Node | None) -> LayerKind | None:
    """The table row of ``node``, if it is a default-domain layer."""
    if node is None or not is_default(node):
        return None
    return LAYERS.get(node.op_type)


def conv_geometry(conv: ir.Node, kernel: list[int]) -> ConvGeometry:
    """The :class:`ConvGeometry` of an ONNX Conv / ConvTranspose with spatial ``kernel``:
    ``auto_pad`` ``VALID`` is no padding, ``SAME_*`` none with 1x1 kernels; a Conv's ``SAME_*``
    at stride 1 pads ``(k - 1) * d`` per axis whatever the input size (``SAME_UPPER`` the odd
    one at the end, ``SAME_LOWER`` at the start, by the ONNX spec), and otherwise the runtime
    picks the pads; ``output_shape`` makes ConvTranspose's output padding vary. ONNX pads
    with zeros (a copying ``Pad`` before the layer is a separate node)."""
    attrs, n = conv.attributes, len(kernel)
    pads = tuple(attrs.get_ints("pads", [0] * (2 * n)))
    auto_pad = attrs.get_string("auto_pad", "NOTSET")
    strides = tuple(attrs.get_ints("strides", [1] * n))
    dilations = tuple(attrs.get_ints("dilations", [1] * n))
    begin: tuple[int, ...] | None = pads[:n]
    end: tuple[int, ...] | None = pads[n:]
    if auto_pad == "VALID" or (auto_pad.startswith("SAME") and all(k == 1 for k in kernel)):
        begin = end = (0,) * n
    elif auto_pad.startswith("SAME") and conv.op_type == "Conv" and set(strides) == {1}:
        total = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
        begin = tuple((t + 1) // 2 if auto_pad == "SAME_LOWER" else t // 2 for t in total)
        end = tuple(t - b for t, b in zip(total, begin, strict=True))
    elif auto_pad.startswith("SAME"):
        begin = end = None
    output_padding = None if "output_shape" in attrs else tuple(
        attrs.get_ints("output_padding", [0] * n))
    return ConvGeometry(tuple(kernel), strides, dilations, begin, end, output_padding)
