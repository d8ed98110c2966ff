"""Eval-mode no-ops a fold looks through: dropout in eval, identity, ``contiguous``, ``clone``,
and casts to the dtype the tensor already has.

Each returns its input's values unchanged (dropout: only when not training — ``nn.Dropout``
modules in eval mode, ``F.dropout(..., training=False)``), so ``BN(noop(y)) = noop(BN(y))``
and a BN folds through them forward (layer -> no-ops -> BN) and backward (BN -> no-ops ->
layer) exactly. A cast is a no-op only when the dtype does not change: :func:`cast_dtype`
gives the target dtype, which the fold rules compare with the layer's (forward) or with the
recorded dtype of the cast's input (backward); anything else keeps the BN with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.passes.fx.trace import shape_of

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
# functional dropout -> index of its ``training`` argument (counting the tensor as 0)
_DROPOUT_FUNCTIONS = {F.dropout: 2, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2,
                      F.alpha_dropout: 2, F.feature_alpha_dropout: 2, torch.dropout: 2,
                      **{getattr(torch.ops.aten, op).default: 2 for op in (  # torch.export
                          "dropout", "feature_dropout", "alpha_dropout",
                          "feature_alpha_dropout")}}
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}
IDENTITY_OPS = ("identity", "contiguous", "clone", "to")


def noop_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"identity"`` for eval-mode dropout, ``"to"`` for a plain dtype cast, else None."""
    if dropout_training(gm, node) is False:
        return "identity"
    if node.op == "call_method" and cast_dtype(node) is not None:
        return "to"
    return None


def dropout_training(gm: fx.GraphModule, node: fx.Node) -> bool | None:
    """Whether the dropout at ``node`` may be in training mode (it then zeroes random
    elements: no no-op); None when ``node`` is no dropout."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return module.training if isinstance(module, _DROPOUT_MODULES) else None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        index = _DROPOUT_FUNCTIONS[node.target]
        training = node.args[index] if len(node.args) > index else node.kwargs.get(
            "training", node.kwargs.get("train", True))
        return training is not False
    return None


def cast_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype a ``.to(dtype)`` / ``.float()``-style cast node converts to, else None
    (casts that also move devices, copy or change memory format are not plain casts)."""
    if node.op != "call_method":
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return _CAST_METHODS[str(node.target)]
    if node.target != "to":
        return None
    rest: list[Any] = [*node.args[1:], *node.kwargs.values()]
    if set(node.kwargs) - {"dtype"} or len(rest) != 1 or not isinstance(rest[0], torch.dtype):
        return None
    return rest[0]


def cast_refusal(node: fx.Node, dtype: torch.dtype | None) -> str | None:
    """Why the cast at ``node`` is not a no-op for a tensor of ``dtype`` (None: it is).

    ``dtype`` None means: use the recorded dtype of the cast's input, if any."""
    target = cast_dtype(node)
    if target is None:
        return None
    if dtype is None:
        source = node.args[0]
        known = isinstance(source, fx.Node) and shape_of(source) is not None  # (may run shapes)
        meta = source.meta.get("tensor_meta") if known else None
        val = source.meta.get("val") if known else None
        dtype = getattr(meta, "dtype", None) or getattr(val, "dtype", None)
        if dtype is None:
            return f"{node.name} casts to {target}; without example_inputs its input's dtype " \
                   "is unknown, so it may not be a no-op"
    if dtype != target:
        return f"{node.name} casts the {dtype} tensor to {target}: not a no-op"
    return None
