"""Following a layer's feature axis through pure data-movement ops to a BatchNorm.

(Per-channel ops, :mod:`.channelwise`, keep the axis, and the rank except a mean without
``keepdim``: the axis only has to lie before the dims they pool, resample or reduce.)

A BN folds into a layer only if every element the BN sees in channel ``c`` is an element of the
layer's output feature ``c``. Between the two, only ops that move data without mixing it are
allowed: transposes/permutes (the axis moves) and row-major reshapes (flatten, view, reshape,
squeeze, unsqueeze, ``reshape_as``...). A reshape keeps the feature axis whole exactly when some
output axis ``b`` has ``prod(out[:b]) == prod(in[:a])`` and ``out[b] == in[a]`` (row-major
linear indices are preserved, so the element ``(pre, c, post)`` lands at ``(pre, c, post)``).

Positions are tracked as ``(rank, axis)``. With recorded shapes each op has one answer; without
them only rank-determined ops (transpose, permute, flatten, unsqueeze) can be followed, and a
caller tries every rank the layer could produce (:func:`follow` returns ``None`` for ranks an op
rejects, and a reason string when the feature axis is lost or cannot be followed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from bnfold.geometry import reshape_axis
from bnfold.passes.fx.channelwise import channelwise_op, channelwise_rank, channelwise_span
from bnfold.passes.fx.noops import IDENTITY_OPS, noop_kind
from bnfold.passes.fx.sites import is_layer, node_arg
from bnfold.passes.fx.trace import shape_of

aten = torch.ops.aten
Position = tuple[int, int]  # (rank, feature axis)
Step = Position | str | None

_PERMUTE = {"transpose", "permute", "t", "movedim"}
_RESHAPE = {
    "flatten", "unflatten", "view", "reshape", "squeeze", "unsqueeze", "reshape_as", "view_as",
    "contiguous", "clone", "identity",
}
_FUNCTIONS: dict[Any, str] = {
    torch.transpose: "transpose", torch.permute: "permute", torch.t: "t", torch.movedim: "movedim",
    torch.flatten: "flatten", torch.unflatten: "unflatten", torch.reshape: "reshape",
    torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
    aten.transpose.int: "transpose", aten.permute.default: "permute", aten.t.default: "t",
    aten.movedim.int: "movedim", aten.flatten.using_ints: "flatten",
    aten.unflatten.int: "unflatten", aten.view.default: "view", aten.reshape.default: "reshape",
    aten._unsafe_view.default: "view", aten.squeeze.dim: "squeeze",
    aten.unsqueeze.default: "unsqueeze", aten.clone.default: "clone",
    aten.contiguous.default: "contiguous", aten.alias.default: "identity",
}
_MODULES: dict[type, str] = {nn.Flatten: "flatten", nn.Unflatten: "unflatten",
                             nn.Identity: "identity"}
# Uses of a tensor that read only its shape/dtype/device (they do not see the values).
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension"}
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_AS_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}
_AS_ATEN = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default,
            aten.type_as.default}


def chain_op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The data-movement or per-channel op (:mod:`.channelwise`) ``node`` performs on its
    first argument, or None."""
    channelwise = channelwise_op(gm, node)
    if channelwise is not None:
        return channelwise.name
    if node.op == "call_method" and node.target in _PERMUTE | _RESHAPE:
        return str(node.target)
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return _FUNCTIONS[node.target]
    if node.op == "call_module" and type(gm.get_submodule(str(node.target))) in _MODULES:
        return _MODULES[type(gm.get_submodule(str(node.target)))]
    return noop_kind(gm, node)


def shape_only_use(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads only the shape/dtype of ``node`` (never its values)."""
    if user.op == "call_method":
        if user.target in _SHAPE_METHODS:
            return True
        if user.target in _AS_METHODS:
            return user.args[0] is not node and node not in user.kwargs.values()
    if user.op == "call_function":
        if user.target is getattr:
            return len(user.args) > 1 and user.args[1] in _SHAPE_ATTRS
        if user.target in _AS_ATEN:  # (torch.export's reshape_as / view_as / expand_as)
            return user.args[0] is not node
        return user.target in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)
    return False


def value_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values."""
    return [u for u in node.users if not shape_only_use(u, node)]


def _ints(args: Sequence[Any]) -> list[int] | None:
    """Flatten ``view(2, 3)`` / ``view((2, 3))`` style arguments to ints (None if symbolic)."""
    flat: list[Any] = list(args[0]) if len(args) == 1 and isinstance(args[0], Sequence) else list(
        args)
    return flat if all(isinstance(v, int) for v in flat) else None


def flatten_dims(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any]:
    """``(start_dim, end_dim)`` of a flatten node: ``nn.Flatten`` module or call."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return module.start_dim, module.end_dim
    return node_arg(node, 1, "start_dim", 0), node_arg(node, 2, "end_dim", -1)


def permutation(gm: fx.GraphModule, node: fx.Node, op: str, rank: int) -> list[int] | None:
    """``perm`` such that output axis ``i`` is input axis ``perm[i]``; None if invalid."""
    try:
        if op == "t":
            if rank > 2:
                return None
            return list(range(rank))[::-1]
        if op == "transpose":
            d0, d1 = (node_arg(node, 1, "dim0", None), node_arg(node, 2, "dim1", None))
            if not all(isinstance(d, int) and -rank <= d < rank for d in (d0, d1)):
                return None
            perm = list(range(rank))
            i, j = d0 % rank, d1 % rank
            perm[i], perm[j] = perm[j], perm[i]
            return perm
        if op == "permute":
            dims = _ints(node.args[1:]) if len(node.args) > 1 else list(node.kwargs["dims"])
            if dims is None or not all(-rank <= d < rank for d in dims) or sorted(
                    d % rank for d in dims) != list(range(rank)):
                return None
            return [d % rank for d in dims]
        src, dst = node_arg(node, 1, "source", None), node_arg(node, 2, "destination", None)
        if not all(isinstance(d, int) and -rank <= d < rank for d in (src, dst)):
            return None
        order = [d for d in range(rank) if d != src % rank]
        order.insert(dst % rank, src % rank)
        return order
    except (TypeError, ZeroDivisionError, KeyError):
        return None


def _reshape_by_shapes(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
) -> Step:
    b = reshape_axis(in_shape, axis, out_shape)
    return "a reshape merges or splits the layer's feature axis" if b is None \
        else (len(out_shape), b)


def _reshape_by_rank(gm: fx.GraphModule, node: fx.Node, op: str, rank: int, axis: int) -> Step:
    """Follow rank-determined reshapes without shapes; None if ``rank`` is invalid for the op."""
    if op in IDENTITY_OPS:
        return (rank, axis)
    if op == "unsqueeze":
        d = node_arg(node, 1, "dim", None)
        if not isinstance(d, int) or not -rank - 1 <= d <= rank:
            return None
        d %= rank + 1
        return (rank + 1, axis + 1 if d <= axis else axis)
    if op == "flatten":
        start, end = flatten_dims(gm, node)
        if rank == 0 or not (-rank <= start < rank and -rank <= end < rank):
            return None
        start, end = start % rank, end % rank
        if start > end:
            return None
        if start <= axis <= end and start != end:
            return f"{node.name} flattens the layer's feature axis together with others"
        return (rank - (end - start), axis if axis < start else axis - (end - start))
    return f"{node.name} ({op}) needs recorded shapes to follow; pass example_inputs"


def _known(shape: tuple[int | None, ...] | None) -> bool:
    return shape is not None and None not in shape


def follow(gm: fx.GraphModule, chain: Sequence[fx.Node], rank: int, axis: int) -> Step:
    """Where the feature axis at ``(rank, axis)`` ends up after ``chain`` (first to last)."""
    pos: Position = (rank, axis)
    for node in chain:
        op = chain_op(gm, node)
        rank, axis = pos
        channelwise = channelwise_op(gm, node)
        if channelwise is not None:  # the rank stays; the trailing dims are resampled
            span = channelwise_span(gm, node, rank)
            if rank <= span or (channelwise.needs_nc and (rank < 3 or axis != 1)):
                return None
            if axis >= rank - span:
                return f"{node.name} ({op}) works along the layer's feature axis or one before it"
            out = channelwise_rank(gm, node, rank)  # (the dims a mean drops follow the axis)
            if out is None:
                return None
            pos = (out, axis)
            continue
        if op in _PERMUTE:
            perm = permutation(gm, node, str(op), rank)
            if perm is None:
                return None
            pos = (rank, perm.index(axis))
            continue
        source = chain_input(node)
        src = shape_of(source) if source is not None else None
        dst = shape_of(node)
        if _known(src) and _known(dst) and len(src) == rank:
            step = _reshape_by_shapes(src, dst, axis)
            if isinstance(step, str):
                return f"{node.name} ({op}) merges or splits the layer's feature axis"
        else:
            step = _reshape_by_rank(gm, node, str(op), rank, axis)
        if not isinstance(step, tuple):
            return step
        pos = step
    return pos


#: The most ops a fold looks through between a layer and its BN.
MAX_CHAIN = 16


def to_layer(gm: fx.GraphModule, node: fx.Node, limit: int = MAX_CHAIN
             ) -> tuple[fx.Node, list[fx.Node]]:
    """Walk from ``node`` back through data-movement and per-channel ops (:func:`chain_op`,
    at most ``limit``) to the conv/linear feeding them: ``(that layer, or the node the walk
    stopped at; the ops between, first to last)``. A BN reading the end of the chain is a BN
    of the layer's output passed through them (checked by :func:`follow` and
    :func:`bnfold.passes.fx.channelwise.channelwise_refusal`)."""
    chain: list[fx.Node] = []
    while not is_layer(gm, node) and chain_op(gm, node) and len(chain) < limit:
        source = chain_input(node)
        if source is None:
            break
        chain.insert(0, node)
        node = source
    return node, chain


def shared_on_path(label: str, path: Sequence[fx.Node], reader: fx.Node) -> str | None:
    """Why rewriting the layer at ``path[0]`` would change another reader: some node of
    ``path`` (the layer, then the chain ops after it) is read by a node other than the next
    one (``reader`` after the last); ``label`` names the layer. None: none is."""
    for cur, nxt in zip(path, [*path[1:], reader], strict=True):
        others = [u.name for u in value_users(cur) if u is not nxt]
        if others:
            what = f"{label} output" if cur is path[0] else \
                f"{cur.name} (between {label} and the BN)"
            return f"{what} also feeds {', '.join(others)}"
    return None


def chain_input(node: fx.Node) -> fx.Node | None:
    """The tensor a chain op moves (its first argument), if it is a graph node."""
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None

