"""Rank dispatch: a fold exact only at some input ranks, without breaking the others.

Without ``example_inputs`` the graph may leave a layer's input rank open (``Linear ->
BatchNorm1d``: at rank 2 the BN normalizes the Linear's features and folds exactly; at rank 3
it normalizes ``L`` and does not). Such a fold is installed as two :class:`RankDispatch`
modules at the same call sites: the layer becomes ``folded layer if x.dim() in ranks else
original layer`` and the BN ``identity if x.dim() in bn_ranks else original BN``, where
``bn_ranks`` are the BN-input ranks the proven layer ranks lead to (the data movement in
between changes the rank by a fixed amount, so the two conditions select the same inputs).
Every input the original accepted runs, with the original's result: folded where that is
exact, the original layer and BN anywhere else. ``torch.export``/``torch.onnx`` see a static
rank and keep one branch.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import fx, nn

from bnfold.passes.fx.constants import Constants
from bnfold.passes.fx.sites import module_calls


class RankDispatch(nn.Module):
    """``folded(x)`` when ``x.dim()`` is in ``ranks``, else ``original(x)``."""

    def __init__(self, ranks: tuple[int, ...], folded: nn.Module, original: nn.Module) -> None:
        super().__init__()
        self.ranks = tuple(ranks)
        self.folded = folded
        self.original = original

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        branch = self.folded if x.dim() in self.ranks else self.original
        return branch(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}"


def install(gm: fx.GraphModule, target: str, ranks: tuple[int, ...], folded: nn.Module,
            original: nn.Module) -> None:
    """Put a :class:`RankDispatch` of ``folded``/``original`` at submodule path ``target``."""
    parent, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    setattr(owner, leaf, RankDispatch(ranks, folded, original))


def dispatch_refusal(layers: list[fx.Node], site_nodes: list[fx.Node], source: fx.Node,
                     consts: Constants) -> str | None:
    """Why the fold of the BN made of ``site_nodes`` (reading ``source``) into ``layers``
    cannot be rank-dispatched (None: it can). Module calls are dispatched where they are;
    functions and affine chains are cut out of the graph, which needs every other input
    to be a constant; a BN module called at several places cannot be switched for one."""
    bn = site_nodes[0]
    if bn.op == "call_module" and len(site_nodes) == 1:
        calls = module_calls(bn.graph, str(bn.target))
        if len(calls) > 1:
            return f"BN module {bn.target} is called {len(calls)} times"
    pieces: list[tuple[list[fx.Node], fx.Node | None]] = [
        ([n], n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None)
        for n in layers if n.op != "call_module"]
    if bn.op != "call_module":
        pieces.append((site_nodes, source))
    for nodes, start in pieces:
        if start is None or not all(consts.is_constant(a) for n in nodes
                                    for a in n.all_input_nodes if a is not start
                                    and a not in nodes):
            return f"{nodes[0].name} reads other computed tensors"
    return None


def extract(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node) -> fx.GraphModule:
    """``nodes`` (a path from ``source``, with the constants they read) as a GraphModule of
    one input; tensors and modules are shared with ``gm``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}

    def copy_node(node: fx.Node) -> fx.Node:
        if node not in env:
            for arg in node.all_input_nodes:
                copy_node(arg)
            env[node] = graph.node_copy(node, lambda a: env[a])
        return env[node]

    for node in nodes:
        copy_node(node)
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph, "RankDispatchBranch")


def replace(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, name: str,
            module: nn.Module) -> fx.Node:
    """Put ``module`` (registered on ``gm`` as a fresh ``name``) in place of the path
    ``nodes`` read from ``source``; return the new call. The path's nodes are erased (its
    constants are left to the caller's cleanup)."""
    target, i = name, 1
    while hasattr(gm, target):
        target, i = f"{name}_{i}", i + 1
    gm.add_module(target, module)
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(target, (source,))
    nodes[-1].replace_all_uses_with(call)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return call


def originals(gm: fx.GraphModule, layers: list[fx.Node]) -> list[tuple[fx.Node, nn.Module]]:
    """Unfolded copies of the layers at ``layers`` (modules, or functions cut out of the
    graph), taken before a fold writes them, for the ranks the fold is not exact at."""
    out = []
    for node in layers:
        if node.op == "call_module":
            out.append((node, copy.deepcopy(gm.get_submodule(str(node.target)))))
        else:
            out.append((node, copy.deepcopy(extract(gm, [node], _source(node)))))
    return out


def dispatch_fold(gm: fx.GraphModule, consts: Constants,
                  layers: list[tuple[fx.Node, nn.Module]], ranks: tuple[int, ...],
                  bn_nodes: list[fx.Node], source: fx.Node, bn_ranks: tuple[int, ...]) -> None:
    """Rank-dispatch a written fold: each layer runs folded at ``ranks`` and as its
    :func:`originals` copy otherwise; the BN (``bn_nodes`` reading ``source``) is skipped at
    ``bn_ranks`` and runs otherwise. Module calls are switched in place, functions and affine
    chains cut out into modules."""
    for node, original in layers:
        if node.op == "call_module":
            target = str(node.target)
            install(gm, target, ranks, gm.get_submodule(target), original)
            continue
        start = _source(node)
        call = replace(gm, [node], start, f"{node.name}_dispatch",
                       RankDispatch(ranks, extract(gm, [node], start), original))
        source = call if node is source else source
    if bn_nodes[0].op == "call_module" and len(bn_nodes) == 1:
        bn = str(bn_nodes[0].target)
        install(gm, bn, bn_ranks, nn.Identity(), gm.get_submodule(bn))
        return
    operands = [a for n in bn_nodes for a in n.all_input_nodes]
    original_bn = extract(gm, bn_nodes, source)
    replace(gm, bn_nodes, source, f"{bn_nodes[0].name}_dispatch",
            RankDispatch(bn_ranks, nn.Identity(), original_bn))
    for a in operands:
        consts.erase_unused(a)


def _source(node: fx.Node) -> fx.Node:
    """The tensor a layer call reads (its first argument)."""
    first = node.args[0]
    assert isinstance(first, fx.Node)
    return first
