"""Lowered Linears: core ATen's ``addmm`` / ``mm`` spellings of a Linear, read as one.

A program lowered with ``run_decompositions()`` writes ``nn.Linear`` (and ``F.linear``) on a
2-D input as ``addmm(b, x, W.T)``, or ``mm(x, W.T)`` without a bias, where ``W.T`` is
``aten.permute(W, [1, 0])`` (``aten.t``, ``aten.transpose``) of the weight. That is
``aten.linear(x, W, b)`` exactly: ATen computes a Linear of a 2-D input by that very ``addmm``
(``mm``) call. :func:`raise_lowered_linears` rewrites each such call (a bias of rank 1, no
``beta``/``alpha``) to ``aten.linear``, so the fold rules (:mod:`bnfold.passes.fx.fold`) see a
Linear, forward and backward, and a fold rewrites ``W`` itself, not a transposed copy. A
program lowered again (:mod:`bnfold.programs`) gets its ``permute`` and ``addmm`` back.
"""

from __future__ import annotations

import torch
from torch import fx

from bnfold.passes.fx.layer_table import LOWERED_LINEARS, WEIGHT_TRANSPOSES
from bnfold.passes.fx.sites import get_attr_value


def raise_lowered_linears(gm: fx.GraphModule) -> None:
    """Rewrite every lowered Linear of ``gm`` to ``aten.linear`` (the node keeps its name)."""
    for node in list(gm.graph.nodes):
        parts = _linear_parts(gm, node)
        if parts is None:
            continue
        x, transposed, weight, bias = parts
        node.target = torch.ops.aten.linear.default
        node.args = (x, weight) if bias is None else (x, weight, bias)
        if not transposed.users:
            gm.graph.erase_node(transposed)


def _linear_parts(gm: fx.GraphModule, node: fx.Node
                  ) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None] | None:
    """``(x, W.T node, W, b)`` of a lowered Linear at ``node``, or None for anything else."""
    if node.op != "call_function" or node.target not in LOWERED_LINEARS or node.kwargs:
        return None
    x_at, w_at, b_at = LOWERED_LINEARS[node.target]
    x, transposed = node.args[x_at], node.args[w_at]
    bias = None if b_at is None else node.args[b_at]
    if not (isinstance(x, fx.Node) and isinstance(transposed, fx.Node)
            and transposed.op == "call_function" and transposed.target in WEIGHT_TRANSPOSES
            and not transposed.kwargs and isinstance(transposed.args[0], fx.Node)
            and WEIGHT_TRANSPOSES[transposed.target](transposed.args[1:])):
        return None
    if bias is not None:
        value = get_attr_value(gm, bias)
        if value is None or value.dim() != 1:
            return None  # (a bias addmm broadcasts from another shape: no Linear's)
    return x, transposed, transposed.args[0], bias
