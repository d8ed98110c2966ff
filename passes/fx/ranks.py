"""Which ranks each tensor of an FX graph can have, read from the graph alone (no shapes).

Without ``example_inputs`` a fold whose correctness depends on the rank (``Linear`` then
``BatchNorm1d``: the BN's channel is the Linear's feature axis at rank 2, the sequence axis at
rank 3) needs to know which ranks can reach it. Each op of a known kind states how its output
rank follows from its first input's rank, and which input ranks it accepts (any other rank
raises in torch): layers and BNs keep the rank and accept only their ranks (``Conv2d``: 3 or 4,
``BatchNorm1d``: 2 or 3), elementwise activations keep it, ``transpose(1, 2)`` needs rank >= 3,
``flatten``/``unsqueeze``/``unflatten`` and ``view``/``reshape`` with explicit sizes change it
by a known amount. Constraints travel both ways until nothing changes: in
``Linear -> BN1d -> Linear -> transpose(1, 2)`` the transpose proves that the first BN sees
rank 3.

The result is sound, never complete: a rank is removed only where the op would raise on it, and
an op of unknown kind constrains nothing. Ranks are ``0..MAX_RANK``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.passes.fx.axes import chain_input, chain_op, flatten_dims, node_arg, permutation
from bnfold.passes.fx.channelwise import channelwise_op, channelwise_rank
from bnfold.passes.fx.noops import IDENTITY_OPS
from bnfold.passes.fx.sites import MAX_RANK, batchnorm_rule, is_batchnorm, is_layer, layer_site

Ranks = frozenset[int]
RankMap = Callable[[int], "int | None"]  # input rank -> output rank, None where the op raises
ANY: Ranks = frozenset(range(MAX_RANK + 1))

_SAME_RANK_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Dropout,
    nn.AlphaDropout, nn.Identity,
)
_SAME_RANK_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.mish, F.softplus,
    F.dropout, torch.neg, torch.abs, torch.exp,
}
_SAME_RANK_METHODS = {"relu", "sigmoid", "tanh", "neg", "abs", "exp", "float", "half",
                      "double", "bfloat16", "contiguous", "clone", "detach"}
_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
               torch.sub, torch.mul, torch.div}


def possible_ranks(gm: fx.GraphModule) -> dict[fx.Node, Ranks]:
    """For every node, the ranks its output can have when the graph runs without raising."""
    edges = [(src, node, fn) for node in gm.graph.nodes
             if (found := _edge(gm, node)) is not None for src, fn in [found]]
    ranks = dict.fromkeys(gm.graph.nodes, ANY)
    changed = True
    while changed:  # sweep forward then backward: a constraint crosses the graph in one sweep
        changed = False
        for src, dst, fn in [*edges, *reversed(edges)]:
            pairs = [(r, out) for r in ranks[src] if (out := fn(r)) is not None
                     and out in ranks[dst]]
            new = frozenset(r for r, _ in pairs), frozenset(out for _, out in pairs)
            if new != (ranks[src], ranks[dst]):
                ranks[src], ranks[dst] = new
                changed = True
    return ranks


def _edge(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, RankMap] | None:
    """``(first input, rank map)`` for an op whose rank behaviour is known, else None."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    src = chain_input(node)
    if src is None:
        return None
    if is_batchnorm(gm, node):
        rule = batchnorm_rule(gm, node)
        return None if rule is None else (src, lambda r: r if rule(r) is not None else None)
    if is_layer(gm, node):
        site = layer_site(gm, node)
        if isinstance(site, str):
            return None
        accepted = frozenset(site.ranks())
        return src, lambda r: r if r in accepted else None
    if _same_rank(gm, node):
        return src, lambda r: r
    channelwise = channelwise_op(gm, node)
    if channelwise is not None:  # a resample reads (N, C, ...); a pool also (C, spatial...)
        low = 3 if channelwise.needs_nc else (channelwise.spatial or 0) + 1
        return src, lambda r: channelwise_rank(gm, node, r) if r >= low else None
    op = chain_op(gm, node)
    return None if op is None else _movement(gm, node, str(op), src)


def _same_rank(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) in _SAME_RANK_MODULES
    if node.op == "call_method":
        return node.target in _SAME_RANK_METHODS
    if node.target in _SAME_RANK_FUNCTIONS:
        return True
    # x + 1.0, 2 * x: a Python scalar broadcasts without changing the rank
    return node.target in _SCALAR_OPS and len(node.args) == 2 and not node.kwargs and sum(
        isinstance(a, fx.Node) for a in node.args) == 1 and all(
        isinstance(a, (fx.Node, int, float)) for a in node.args)


def _movement(gm: fx.GraphModule, node: fx.Node, op: str, src: fx.Node) -> tuple[
        fx.Node, RankMap] | None:
    """Rank maps of the data-movement ops of :mod:`bnfold.passes.fx.axes`."""
    if op in ("transpose", "permute", "t", "movedim"):
        return src, lambda r: r if r == 0 or permutation(gm, node, op, r) is not None else None
    if op in IDENTITY_OPS:
        return src, lambda r: r
    if op == "unsqueeze":
        d = node_arg(node, 1, "dim")
        if not isinstance(d, int):
            return None
        return src, lambda r: r + 1 if -r - 1 <= d <= r else None
    if op == "flatten":
        start, end = flatten_dims(gm, node)
        if not (isinstance(start, int) and isinstance(end, int)):
            return None
        return src, lambda r: _flattened(r, start, end)
    if op in ("view", "reshape"):
        sizes = _sizes(node)
        if sizes is None:
            return None
        rank = len(sizes)
        return src, lambda _: rank
    return None


def _flattened(rank: int, start: int, end: int) -> int | None:
    """Output rank of ``flatten(start, end)`` on ``rank`` (0-d tensors flatten to 1-d)."""
    if rank == 0:
        return 1 if start in (0, -1) and end in (0, -1) else None
    if not (-rank <= start < rank and -rank <= end < rank) or start % rank > end % rank:
        return None
    return rank - (end % rank - start % rank)


def _sizes(node: fx.Node) -> tuple[object, ...] | None:
    """The size arguments of ``view``/``reshape`` when their count (the rank) is written out."""
    rest = list(node.args[1:]) or ([node.kwargs["shape"]] if "shape" in node.kwargs else [])
    if len(rest) == 1:
        if isinstance(rest[0], (tuple, list)):
            return tuple(rest[0])
        # one int is rank 1; one node may be a whole size (x.shape) or one int: unknown
        return (rest[0],) if isinstance(rest[0], int) else None
    return tuple(rest) or None
