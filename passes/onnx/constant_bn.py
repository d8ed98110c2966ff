"""BNs whose input is a constant (weight standardization), evaluated once.

timm's ``StdConv2d`` (BiT, NFNet) standardizes its weight with a training-mode batch norm
over the weight itself: exported, a ``BatchNormalization`` (training mode, or inference mode
with statistics computed by ``ReduceMean`` nodes) whose input is a constant. Its value never
changes, so it is computed once in float64 (:func:`bnfold.algebra.evaluate_bn`: batch
statistics in training mode) and rounded once to its dtype into a new initializer that its
readers read; the layer after it then folds like any other. A BN whose statistics outputs are
read is left alone (removing it would remove them).
"""

from __future__ import annotations

from bnfold.algebra import evaluate_bn, round_to
from bnfold.errors import UnsafeFoldError
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name, params, statistics_read, training_reason
from bnfold.passes.onnx.consts import make_tensor
from bnfold.passes.onnx.edit import remove_bn
from bnfold.passes.onnx.rules import Context


def constant_bn(bn: ir.Node, ctx: Context) -> ir.Value | str | None:
    """Replace ``bn`` by its value if its input is constant; return the new initializer, a
    reason it stays, or ``None`` when its input is not constant (then it is a usual BN)."""
    x = bn.inputs[0]
    if x is None or not ctx.consts.is_constant(x):
        return None
    why = statistics_read(bn)
    if why:
        return why
    p = params(bn, ctx.opset, ctx.consts)
    value = ctx.consts.array(x)
    if isinstance(p, str) or isinstance(value, str):
        return p if isinstance(p, str) else f"its constant input {x.name!r} {value}"
    try:
        y = round_to(evaluate_bn(value, p, training=training_reason(bn, ctx.opset) is not None),
                     value.dtype)
    except UnsafeFoldError as exc:
        return str(exc)
    name = ctx.namer.fresh(f"{display_name(bn)}_value")
    tensor = make_tensor(y, name)
    result = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape),
                      type=ir.TensorType(tensor.dtype))
    ctx.graph.register_initializer(result)
    ctx.released.extend(remove_bn([bn], result))
    return result
