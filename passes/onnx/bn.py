"""Reading one ONNX ``BatchNormalization`` node: is it in inference mode, and its parameters.

Inference-mode BN (every opset) computes ``Y = scale * (X - mean) / sqrt(var + epsilon) + B``
per channel (axis 1 of ``X``), which :class:`bnfold.algebra.BNParams` represents. A BN is
*not* an inference-mode affine map, and is never folded, when:

* opset >= 14 and ``training_mode=1`` (statistics come from the batch);
* opset <= 6 and ``is_test=0`` (the default there: the same, in the old spelling);
* opsets 7-13 and the node declares any statistics output (mean, var, saved_mean,
  saved_var), even one nothing reads: by the spec that is training mode (ONNX Runtime then
  computes ``Y`` from the batch statistics);
* any output beyond ``Y`` (running/saved mean and variance) is read by a node or the graph.

Opsets 1-8 have ``spatial``; ``spatial=0`` gives per-activation parameters of shape
``[C, D1, ...]``. They fold exactly when every channel's values are equal across positions
(reduced with :func:`bnfold.algebra.per_channel`), and are refused otherwise.
"""

from __future__ import annotations

import numpy as np

from bnfold.algebra import BNParams, per_channel
from bnfold.errors import BadInputError
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.consts import Constants, data_uses

_PARAM_NAMES = ("scale", "B", "mean", "var")


def display_name(node: ir.Node) -> str:
    """A node's name, or ``OpType(first output)`` when the exporter left it unnamed."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}({out})"


def consumers_text(value: ir.Value, but: ir.Node | None = None) -> str:
    """Who else reads ``value``, in words: ``"Add_1, Relu_2 and the graph output"``."""
    names = sorted({display_name(u.node) for u in data_uses(value) if u.node is not but})
    if value.is_graph_output():
        names.append("the graph output")
    return ", ".join(names) if names else "nothing"


def inference_params(bn: ir.Node, opset: int, consts: Constants) -> BNParams | str:
    """The BN's :class:`BNParams`, or why it is not a foldable inference-mode BN."""
    why = training_reason(bn, opset) or statistics_read(bn)
    return why if why else params(bn, opset, consts)


def training_reason(bn: ir.Node, opset: int) -> str | None:
    """Why ``bn`` is in training mode (statistics from each batch), or ``None``."""
    attrs = bn.attributes
    if opset >= 14 and attrs.get_int("training_mode", 0) == 1:
        return "training_mode=1: statistics come from each batch, not foldable"
    if opset <= 6 and attrs.get_int("is_test", 0) == 0:
        return f"is_test=0 (opset {opset} training mode): statistics come from each batch"
    if not 7 <= opset <= 13:
        return None
    declared = [out.name for out in bn.outputs[1:] if out is not None and out.name]
    if declared:
        return (f"training mode by the ONNX spec: at opset {opset} a BatchNormalization that "
                f"declares statistics outputs ({', '.join(map(repr, declared))}) computes Y "
                "from each batch's statistics, not foldable")
    return None


def statistics_read(bn: ir.Node) -> str | None:
    """Why removing ``bn`` would remove a statistics output someone reads, or ``None``."""
    for out in bn.outputs[1:]:
        if out is not None and (out.uses() or out.is_graph_output()):
            return (f"its statistics output {out.name!r} is read by {consumers_text(out)}; "
                    "removing the BN would remove it")
    return None


def params(bn: ir.Node, opset: int, consts: Constants) -> BNParams | str:
    """The BN's constant parameters (whatever its mode), or why they are not constant."""
    attrs = bn.attributes
    arrays = []
    for name, value in zip(_PARAM_NAMES, bn.inputs[1:5], strict=False):
        if value is None:
            return f"BN {name} is missing"
        arr = consts.array(value)
        if isinstance(arr, str):
            return f"BN {name} {value.name!r} {arr}"
        kind = np.asarray(arr).dtype
        if kind.kind in "biucOSU":  # (not a float: an invalid model)
            raise BadInputError(
                f"invalid model: BatchNormalization {display_name(bn)!r} has a {name} of "
                f"type {'string' if kind.kind in 'OSU' else kind}; ONNX needs a float tensor")
        arrays.append(arr)
    if len(arrays) != 4:
        return "BN has fewer than five inputs"
    if opset <= 8 and attrs.get_int("spatial", 1) == 0:
        reduced = [per_channel(a, 0) for a in arrays]
        if any(r is None for r in reduced):
            return ("spatial=0 with per-activation parameters that differ across positions: "
                    "not a per-channel affine map")
        arrays = reduced  # type: ignore[assignment]
    scale, bias, mean, var = (a if a.ndim == 1 else a.reshape(-1)
                              for a in map(np.asarray, arrays))
    return BNParams(mean=mean, var=var, eps=attrs.get_float("epsilon", 1e-5),
                    gamma=scale, beta=bias)
