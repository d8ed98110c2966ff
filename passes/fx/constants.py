"""Constant sub-expressions of an FX graph: nodes computed only from the model's tensors.

A node is constant when it is a ``get_attr`` of a tensor that no op of the graph writes, or a
pure op whose tensor arguments are all constant: one from a fixed list (arithmetic,
``rsqrt``/``sqrt``, reshapes, ``F.batch_norm``...), or, in graphs from ``torch.export``, any
ATen overload that neither mutates nor aliases-and-writes, draws no random numbers, allocates
no uninitialized memory (``empty*``) and, by the shape ``torch.export`` recorded for it
(``meta["val"]``), produces no more elements than its largest operand or
:data:`MIN_ELEMENTS` (so ``aten._weight_norm``, spectral norm's ``mv``/``vdot``/``div``: a
weight computed at each call from the model's tensors). :meth:`Constants.value` evaluates one
in float64 (floating tensors are converted first), so a chain like FrozenBatchNorm2d's
``w * (var + eps).rsqrt()`` is computed once, in float64, and rounded once by whoever writes
the result.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.nn.modules.batchnorm import _NormBase

from bnfold.passes.fx.sites import fetch, module_stack_path, node_arg, updated_statistics

aten = torch.ops.aten

_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.rsqrt, torch.sqrt,
    torch.reciprocal, torch.neg, torch.pow, torch.reshape, torch.flatten, torch.unsqueeze,
    torch.squeeze, torch.transpose, torch.permute, F.batch_norm, getattr, torch.mean,
    torch.sum, torch.var, torch.std, torch.norm, torch.abs, torch.exp, torch.clamp,
    torch.linalg.vector_norm, F.normalize,
}
_METHODS = {
    "add", "sub", "mul", "div", "rsqrt", "sqrt", "reciprocal", "neg", "pow", "reshape", "view",
    "unsqueeze", "squeeze", "flatten", "expand", "expand_as", "reshape_as", "view_as",
    "contiguous", "clone", "detach", "size", "dim", "transpose", "permute", "mean", "sum",
    "var", "std", "norm", "abs", "exp", "clamp", "clamp_min", "square",
}


#: An ATen op's result may always hold this many elements, whatever its operands' sizes.
MIN_ELEMENTS = 4096
# Ops whose result may share memory with their first argument (a write into it is a write
# into the argument): views, splits into views, ``getattr(w, "data")``...
_ALIASING_FUNCTIONS = {getattr, operator.getitem, torch.reshape, torch.flatten, torch.squeeze,
                       torch.unsqueeze, torch.transpose, torch.permute, torch.narrow,
                       torch.select, torch.chunk, torch.split, torch.tensor_split, torch.unbind,
                       torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims,
                       torch.diagonal, torch.as_strided, torch.t, torch.unflatten, torch.detach,
                       torch.view_as_real, torch.view_as_complex}
_ALIASING_METHODS = {"view", "reshape", "flatten", "unflatten", "expand", "expand_as",
                     "reshape_as", "view_as", "squeeze", "unsqueeze", "transpose", "permute",
                     "contiguous", "detach", "narrow", "select", "chunk", "split",
                     "split_with_sizes", "tensor_split", "unbind", "movedim", "moveaxis",
                     "swapaxes", "swapdims", "diagonal", "as_strided", "t", "unfold", "real",
                     "imag"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ipow, operator.setitem}


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
            return not self.written(str(node.target))
        pure = (node.op == "call_function" and node.target in _FUNCTIONS) or (
            node.op == "call_method" and node.target in _METHODS) or self._pure_aten(node)
        # a dtype argument (``view(torch.int32)``) would reinterpret float64 bits differently
        typed = any(isinstance(a, torch.dtype) for a in (*node.args, *node.kwargs.values()))
        return pure and not typed and all(self.is_constant(a) for a in node.all_input_nodes) \
            and not _written(self.gm, [node])

    def written(self, path: str) -> bool:
        """True when an op of the graph may write into the model tensor at ``path``
        (``conv.weight``), directly or through a view of it, or into memory it shares (one
        tensor held by two modules): a written tensor read by ``get_attr``, or the running
        statistics of a norm module called in training mode."""
        if _written(self.gm, self.gm.graph.find_nodes(op="get_attr", target=path)):
            return True
        storage = _storage(_tensor_at(self.gm, path))
        return storage is not None and storage in self._written_storages

    @functools.cached_property
    def _written_storages(self) -> set[int]:
        """The memory (storage addresses) of every model tensor the graph writes."""
        found: set[Any] = set()
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and _written(self.gm, [node]):
                found.add(_storage(_tensor_at(self.gm, str(node.target))))
            elif node.op == "call_module":
                module = self.gm.get_submodule(str(node.target))
                if isinstance(module, _NormBase) and module.training \
                        and module.track_running_stats:
                    found.update(_storage(t) for t in (module.running_mean, module.running_var,
                                                       module.num_batches_tracked))
        found.discard(None)
        return found

    def _pure_aten(self, node: fx.Node) -> bool:
        """An ATen overload with no side effect whose recorded result is not larger than its
        largest operand (or :data:`MIN_ELEMENTS`)."""
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) \
                or op._schema.is_mutable or "empty" in op._schema.name \
                or torch.Tag.nondeterministic_seeded in op.tags:
            return False
        if torch.Tag.maybe_aliasing_or_mutating in op.tags and not (
                op is aten.batch_norm.default and node.args[3:5] == (None, None)):
            return False  # (a batch_norm without running statistics updates nothing)
        result = node.meta.get("val")
        if not isinstance(result, torch.Tensor):
            return False
        sizes = [MIN_ELEMENTS]
        for arg in node.all_input_nodes:
            value = fetch(self.gm, arg) if arg.op == "get_attr" else arg.meta.get("val")
            if isinstance(value, torch.Tensor):
                sizes.append(value.numel())
        return result.numel() <= max(sizes)

    def rounded(self, node: fx.Node) -> torch.Tensor | None:
        """A constant floating node's float64 value rounded once to the dtype of the model
        tensors it reads (None: not constant, not evaluable, or not such a tensor)."""
        if not self.is_constant(node):
            return None
        try:
            value = self.value(node)
        except NotConstant:
            return None
        dtype = self.dtype(node)
        if not isinstance(value, torch.Tensor) or dtype is None or not value.is_floating_point():
            return None
        return value.to(dtype)

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


@contextlib.contextmanager
def state_kept(gm: fx.GraphModule) -> Iterator[None]:
    """Put back, after the block, every model tensor an op of ``gm``'s graph may write in
    place (:meth:`Constants.written`): a pass that runs the graph (the shape pass on the
    example inputs, an export) leaves the state it found (a buffer the forward advances would
    be one call ahead). Only those tensors are copied."""
    consts = Constants(gm)
    saved = {}
    for path in {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}:
        owner, _, leaf = path.rpartition(".")
        value = getattr(gm.get_submodule(owner) if owner else gm, leaf, None)
        if isinstance(value, torch.Tensor) and consts.written(path):
            saved[path] = (value, value.detach().clone())
    try:
        yield
    finally:
        with torch.no_grad():
            for value, copy in saved.values():
                value.copy_(copy)


def _tensor_at(gm: fx.GraphModule, path: str) -> Any:
    """The attribute at ``path`` (``bn.running_mean``), or ``None``."""
    owner, _, leaf = path.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, leaf, None)
    except AttributeError:
        return None


def _storage(tensor: Any) -> int | None:
    """The address of ``tensor``'s memory (``None``: not a tensor, or none to compare)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return None
    return tensor.untyped_storage().data_ptr() or None


def _written(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """True when an op may write into the tensor of ``nodes`` (one value, or every read of one
    model tensor), directly or through a view of it (``w.data``, ``w.view(...)``)."""
    seen, todo = set(nodes), list(nodes)
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if _writes_into(gm, user, cur):
                return True
            if _aliases(user, cur) and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def alias_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The tensor whose memory ``node``'s result may share: its first argument when ``node``
    is a view of it or writes into it in place (``x.mul_(a)`` returns ``x``); else None."""
    source = node.args[0] if node.args else None
    if isinstance(source, fx.Node) and (_aliases(node, source)
                                        or _writes_into(gm, node, source)):
        return source
    return None


def _aliases(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user``'s result may share memory with ``node``, its first argument."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target in _ALIASING_METHODS
    if isinstance(user.target, torch._ops.OpOverload):
        return returns_alias(user.target)
    return user.op == "call_function" and user.target in _ALIASING_FUNCTIONS


def returns_alias(op: torch._ops.OpOverload) -> bool:
    """Whether the ATen op ``op`` may return (a view of) an argument, by its schema."""
    return any(r.alias_info is not None for r in op._schema.returns)


@functools.cache
def _inplace_position(target: Any) -> int | None:
    """Where a Python function's ``inplace`` parameter sits (``F.relu(x, True)``), or None."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _writes_into(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` may write into ``node``'s tensor: as its ``out=``, as an ATen
    argument its schema marks written, as the running statistics of a functional norm that
    updates them (``F.batch_norm(training=True)``, ``F.instance_norm``), or as the first
    argument of an in-place method, function, operator or module (``inplace=True``, by
    keyword or in its place: ``F.leaky_relu(x, 0.5, True)``)."""
    target = user.target
    if user.kwargs.get("out") is node:
        return True
    updated = updated_statistics(user)  # (F.batch_norm(training=True), F.instance_norm)
    if updated is not None:
        return node in updated
    if isinstance(target, torch._ops.OpOverload):
        return any(arg.alias_info is not None and arg.alias_info.is_write and (
            user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)) is node
            for i, arg in enumerate(target._schema.arguments))
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_module":
        return getattr(gm.get_submodule(str(target)), "inplace", False) is True
    if user.op == "call_method":
        return str(target).endswith("_")
    if user.op != "call_function":
        return False
    try:
        at = _inplace_position(target)
    except TypeError:  # (an unhashable callable)
        at = None
    return target in _INPLACE_OPERATORS or node_arg(user, at if at is not None else len(
        user.args), "inplace") is True or getattr(target, "__name__", "").endswith("_")


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
    found = roots(*operands)
    owner = module_stack_path(node) or (
        str(found[0].target).rpartition(".")[0] if found else "")
    return f"{owner} ({node.name})" if owner else node.name
