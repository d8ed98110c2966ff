"""Constant sub-expressions of an FX graph: nodes computed only from the model's tensors.

A node is constant when it is a ``get_attr`` of a tensor, or a pure op from a fixed list
(arithmetic, ``rsqrt``/``sqrt``, reshapes, ``F.batch_norm``...) whose tensor arguments are all
constant. :meth:`Constants.value` evaluates one in float64 (floating tensors are converted
first), so a chain like FrozenBatchNorm2d's ``w * (var + eps).rsqrt()`` is computed once, in
float64, and rounded once by whoever writes the result.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from bnfold.passes.fx.sites import fetch

_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.rsqrt, torch.sqrt,
    torch.reciprocal, torch.neg, torch.pow, torch.reshape, torch.flatten, torch.unsqueeze,
    torch.squeeze, torch.transpose, torch.permute, F.batch_norm, getattr,
}
_METHODS = {
    "add", "sub", "mul", "div", "rsqrt", "sqrt", "reciprocal", "neg", "pow", "reshape", "view",
    "unsqueeze", "squeeze", "flatten", "expand", "expand_as", "reshape_as", "view_as",
    "contiguous", "clone", "detach", "size", "dim", "transpose", "permute",
}


class NotConstant(Exception):
    """A constant-looking node whose evaluation failed (it is then treated as computed)."""


class Constants:
    """Which nodes of ``gm`` are constant, and their float64 values (both memoized)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._constant: dict[fx.Node, bool] = {}
        self._values: dict[fx.Node, Any] = {}

    def is_constant(self, node: Any) -> bool:
        """True for a node computed only from the model's tensors and literals."""
        if not isinstance(node, fx.Node):
            return True
        if node not in self._constant:
            self._constant[node] = self._check(node)
        return self._constant[node]

    def _check(self, node: fx.Node) -> bool:
        if node.op == "get_attr":
            try:
                fetch(self.gm, node)
            except (AttributeError, AssertionError):
                return False
            return True
        pure = (node.op == "call_function" and node.target in _FUNCTIONS) or (
            node.op == "call_method" and node.target in _METHODS)
        # a dtype argument (``view(torch.int32)``) would reinterpret float64 bits differently
        typed = any(isinstance(a, torch.dtype) for a in (*node.args, *node.kwargs.values()))
        return pure and not typed and all(self.is_constant(a) for a in node.all_input_nodes)

    def value(self, node: Any) -> Any:
        """The float64 value of a constant node (literals as they are); raises
        :class:`NotConstant` when an op of it fails on the float64 values."""
        if not isinstance(node, fx.Node):
            return node
        if node not in self._values:
            self._values[node] = self._evaluate(node)
        return self._values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        assert self.is_constant(node), node
        if node.op == "get_attr":
            t = fetch(self.gm, node).detach()
            return t.double() if t.is_floating_point() else t
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                return node.target(*args, **kwargs)  # type: ignore[operator]
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            self._constant[node] = False
            raise NotConstant(f"{node.name} cannot be evaluated: {exc}") from exc

    def dtype(self, node: fx.Node) -> torch.dtype | None:
        """The floating dtype the model's tensors under ``node`` have (None: no float one)."""
        for root in roots(node):
            t = fetch(self.gm, root)
            if t.is_floating_point():
                return t.dtype
        return None

    def erase_unused(self, node: Any) -> None:
        """Erase ``node`` and the constant nodes only it read, once nothing reads them
        (``get_attr`` nodes are left to the fold's cleanup, which also drops the tensors)."""
        if isinstance(node, fx.Node) and node.op != "get_attr" and self.is_constant(node) \
                and not node.users:
            inputs = node.all_input_nodes
            node.graph.erase_node(node)
            for arg in inputs:
                self.erase_unused(arg)


def roots(*operands: Any) -> list[fx.Node]:
    """The ``get_attr`` nodes ``operands`` read, nearest first."""
    seen = [a for a in operands if isinstance(a, fx.Node)]
    found: list[fx.Node] = []
    while seen:
        cur = seen.pop(0)
        if cur.op == "get_attr" and cur not in found:
            found.append(cur)
        seen.extend(cur.all_input_nodes)
    return found


def owner_label(node: fx.Node, operands: list[Any]) -> str:
    """``"<module> (<node>)"``: the module whose forward made ``node`` (``nn_module_stack``),
    else the module owning the first model tensor ``operands`` read."""
    stack = node.meta.get("nn_module_stack") or {}
    found = roots(*operands)
    owner = str(list(stack.values())[-1][0]) if stack else (
        str(found[0].target).rpartition(".")[0] if found else "")
    return f"{owner} ({node.name})" if owner else node.name
