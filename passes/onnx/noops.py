"""Eval-mode no-ops a fold looks through: ``Identity`` and inference-mode ``Dropout``.

``Dropout`` is the identity on its data output when it is not in training mode: at opsets
7-11 always (no training attribute), at opset 12 and later when its ``training_mode`` input is
absent or a constant ``False``, at opsets 1-6 when ``is_test=1``. Its ``ratio`` does not
matter then. A fold leaves these nodes where they are and folds the BN through them: they
pass every value unchanged, so a BN before one equals the same BN after it.
"""

from __future__ import annotations

import numpy as np

from bnfold.lazy_ir import ir
from bnfold.passes.onnx.layers import is_default
from bnfold.passes.onnx.rules import Context


def is_noop(node: ir.Node, ctx: Context) -> bool:
    """Whether ``node`` passes its first input to its first output unchanged."""
    if not is_default(node):
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type != "Dropout":
        return False
    if ctx.opset <= 6:
        return node.attributes.get_int("is_test", 0) == 1
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return True
    training = ctx.consts.array(node.inputs[2])
    return not isinstance(training, str) and not bool(np.any(training))
