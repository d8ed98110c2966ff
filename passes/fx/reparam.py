"""Merge parallel Conv(+BN) branches of a torch.fx graph into one conv (re-parameterization).

A block is a sum (``+``, ``torch.add``, ``Tensor.add``, ``aten.add.Tensor``, chained) whose
summands each read one tensor ``x``: ``BN(conv(x))``, ``conv(x)``, ``BN(x)``, ``x * c`` (``c`` a
constant attribute, a scalar or one value per channel) or ``x`` itself, plus Python numbers (a
bias, :func:`bnfold.branches.constant_branch`). Every block with at least two summands on one
tensor, one of them a conv, is either merged (the math and its
exactness conditions are :mod:`bnfold.branches`; this module only matches the graph and writes
the result) or kept with the reason: branches reading different tensors, a branch output with
another reader, anything :func:`bnfold.branches.merge_refusal` refuses. A merged block becomes
one conv module (named after its largest-kernel conv) on ``x``; the BNs it absorbed are
reported ``folded`` into it. The remaining BNs are then folded by :mod:`.fold`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold import branches as br
from bnfold.arguments import check_flags
from bnfold.branches import AffineBranch, Branch, ConvBranch, Summand
from bnfold.passes.fx.axes import node_arg, value_users
from bnfold.passes.fx.fold import fold_fx
from bnfold.passes.fx.hooks import carry_model_hooks, forget_holdings
from bnfold.passes.fx.layer_table import layer_kind
from bnfold.passes.fx.ranks import possible_ranks
from bnfold.passes.fx.sites import (
    BatchNormSite,
    LayerSite,
    batchnorm_rule,
    batchnorm_site,
    bn_label,
    fetch,
    is_batchnorm,
    is_layer,
    layer_site,
    to_numpy,
    to_torch,
)
from bnfold.passes.fx.trace import open_model, shape_of
from bnfold.report import PassResult, Report

aten = torch.ops.aten
_ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
_NO_OPS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MULS = {operator.mul, torch.mul, aten.mul.Tensor}


def reparameterize_fx(
    model: nn.Module, example_inputs: Any = None, *, inplace: bool = False
) -> PassResult:
    """Merge every exactly mergeable branch block of ``model``, then fold the remaining BNs.

    Arguments and copying as :func:`bnfold.passes.fx.fold.fold_fx`. Returns ``(GraphModule,
    Report)``: one ``merged`` entry per merged block (``into`` the new conv, ``branches`` how
    many), a ``kept`` entry per block left as it was (with the reason), a ``folded`` entry for
    each BN a merge absorbed, and the fold pass's entries for every other BN.
    """
    check_flags(inplace=inplace)
    gm, how, args = open_model(model, example_inputs, inplace=inplace)
    forget_holdings(gm)  # (the fold below forgets it again when done)
    report = Report("reparameterize")
    carry_model_hooks(model, gm, how, report.notes)
    skipped = _drop_no_ops(gm)
    if skipped:
        report.notes.append(f"removed {skipped} no-op module call(s) (nn.Identity, eval-mode "
                            "dropout) so the branches around them could be matched")
    merger = _Merger(gm, shapes=args is not None)
    for root in [n for n in gm.graph.nodes if _is_add(n) and not _inner_add(n)]:
        merger.block(root, report)
    merger.cleanup()
    exported = how.startswith("torch.export")  # shapes already in node.meta; no eval() there
    gm, folded = fold_fx(gm, None if exported else args, inplace=True)
    report.entries.extend(folded.entries)
    report.notes.extend(folded.notes if not exported else [f"traced with {how}"])
    return PassResult(gm, report)


def _drop_no_ops(gm: fx.GraphModule) -> int:
    """Remove calls of ``nn.Identity`` and eval-mode dropout modules (exact: they return their
    input), which timm puts between a block's branches and its sum (``drop_path``, ``attn``,
    a BN's ``act``); return how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _NO_OPS) and not (module.training and not isinstance(
                module, nn.Identity)) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return count


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "add" and len(node.args) == 2 and not node.kwargs
    return (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2
            and node.kwargs.get("alpha", 1) == 1)


def _inner_add(node: fx.Node) -> bool:
    """True when ``node``'s only reader is another add (it is part of that add's sum)."""
    users = list(node.users)
    return len(users) == 1 and _is_add(users[0])


class _Merger:
    """Finds the blocks, plans each with :func:`bnfold.branches.merge`, and rewrites it."""

    def __init__(self, gm: fx.GraphModule, *, shapes: bool) -> None:
        self.gm, self.graph = gm, gm.graph
        self.ranks = None if shapes else possible_ranks(gm)
        self.labels = {n: bn_label(gm, n) for n in gm.graph.nodes if is_batchnorm(gm, n)}
        self.erased_modules: set[str] = set()

    # -- matching ---------------------------------------------------------------------------

    def block(self, root: fx.Node, report: Report) -> None:
        """Merge the sum rooted at ``root`` if it is a branch block; report it either way."""
        summed = self._summands(root)
        if summed is None:
            return
        nodes, constants = summed
        tree = set(self._tree(root))
        leaves = [self._leaf(s, tree) for s in nodes]
        shared = br.shared_input(leaves)
        if shared is None:
            return
        label = self._block_label(root, [b for lf in leaves for b in lf.options.values()])
        merged = br.plan_block(
            leaves, shared, shared.name,
            lambda branches: self._axis_refusal(shared, branches, leaves), constants)
        if isinstance(merged, str):
            report.add(label, "kept", reason=f"not merged: {merged}", branches=len(leaves))
            return
        into = self._rewrite(root, shared, merged, leaves)
        report.add(label, "merged", into=into, branches=len(leaves),
                   summands=[str(lf.options[shared].name) for lf in leaves]  # type: ignore
                   + [name for name, _ in constants])
        for bn in br.absorbed(leaves, shared):
            report.add(self.labels[bn], "folded", into=into, direction="branch merge", block=label)

    def _summands(self, root: fx.Node
                  ) -> tuple[list[fx.Node], list[tuple[str, np.ndarray]]] | None:
        """The tensors summed by the add tree at ``root`` and its Python number summands
        (name, array: a bias, :func:`bnfold.branches.constant_branch`); None if a summand is
        another kind of constant."""
        out: list[fx.Node] = []
        constants: list[tuple[str, np.ndarray]] = []
        stack: list[Any] = [root]
        while stack:
            item = stack.pop()
            if isinstance(item, fx.Node) and (item is root or (_is_add(item) and
                                                                _inner_add(item))):
                stack.extend(reversed(item.args))
            elif isinstance(item, fx.Node):
                out.append(item)
            elif isinstance(item, (int, float)):
                constants.append((repr(item), np.asarray(float(item))))
            else:
                return None
        return out, constants

    def _leaf(self, node: fx.Node, tree: set[fx.Node]) -> Summand:
        leaf = Summand(node.name, {}, others=[u.name for u in value_users(node)
                                              if u not in tree])
        leaf.add(node, AffineBranch(node.name))
        bn = node.args[0] if node.target is operator.getitem and isinstance(
            node.args[0], fx.Node) and is_batchnorm(self.gm, node.args[0]) else node
        if is_batchnorm(self.gm, bn):
            self._bn_leaf(leaf, node, bn)
        elif is_layer(self.gm, node):
            self._conv_option(leaf, node, None, [node])
        elif node.op in ("call_function", "call_method") and (
                node.target in _MULS or node.target == "mul") and len(node.args) == 2:
            self._scale_option(leaf, node)
        return leaf

    def _bn_leaf(self, leaf: Summand, node: fx.Node, bn: fx.Node) -> None:
        site = batchnorm_site(self.gm, bn)
        x = bn.args[0] if bn.args else bn.kwargs.get("input")
        assert isinstance(x, fx.Node)
        chain = [node] if node is not bn else []
        label = self.labels[bn]
        if isinstance(site, str):
            leaf.add(x, f"{label}: {site}")
            conv_input = x.args[0] if is_layer(self.gm, x) and x.args else None
            if isinstance(conv_input, fx.Node):  # (a conv's branch: the block says why too)
                leaf.add(conv_input, f"{label}: {site}")
            return
        leaf.add(x, AffineBranch(label, bn=site.params), [*chain, bn], [bn])
        if is_layer(self.gm, x):
            self._conv_option(leaf, x, site, [*chain, bn, x])

    def _conv_option(self, leaf: Summand, conv: fx.Node, bn: BatchNormSite | None,
                     erase: list[fx.Node]) -> None:
        layer = layer_site(self.gm, conv)
        x = conv.args[0] if conv.args else conv.kwargs.get("input")
        if not isinstance(x, fx.Node):
            return
        if isinstance(layer, str) or layer.kind != "conv":
            what = layer if isinstance(layer, str) else f"{layer.label} is a {layer.kind}"
            leaf.add(x, f"{what}, not a conv")
            return
        readers = [u.name for u in value_users(conv) if u not in erase]
        if bn is not None and readers:
            leaf.add(x, f"{layer.label} output also feeds {', '.join(readers)}")
            return
        leaf.add(x, ConvBranch(
            layer.label, to_numpy(layer.weight),
            None if layer.bias is None else to_numpy(layer.bias), layer.stride,
            _pads(conv, self.gm, layer), layer.dilation, layer.groups, layer.padding_mode,
            None if bn is None else bn.params), erase, [] if bn is None else [bn.node])

    def _scale_option(self, leaf: Summand, node: fx.Node) -> None:
        a, b = node.args
        for x, c in ((a, b), (b, a)):
            if not isinstance(x, fx.Node):
                continue
            if isinstance(c, (int, float)):
                leaf.add(x, AffineBranch(node.name, scale=np.array(float(c))), [node])
            elif isinstance(c, fx.Node) and c.op == "get_attr":
                leaf.add(x, AffineBranch(node.name, scale=to_numpy(fetch(self.gm, c))), [node])

    def _axis_refusal(self, x: fx.Node, branches: Sequence[Branch],
                      leaves: Sequence[Summand]) -> str | None:
        """Each BN or scale branch must act on the convs' channel axis at every rank ``x`` can
        have (dim 1 batched, dim 0 unbatched)."""
        n = next(b.weight.ndim - 2 for b in branches if isinstance(b, ConvBranch))
        shape = shape_of(x)
        ranks = [len(shape)] if shape is not None else sorted(
            (self.ranks or {}).get(x, frozenset({n + 1, n + 2})) & {n + 1, n + 2})
        for lf in leaves:
            option = lf.options[x]
            if not isinstance(option, AffineBranch) or not lf.erase[x]:
                continue
            node = lf.absorbed[x][0] if lf.absorbed[x] else lf.erase[x][0]
            for rank in ranks:
                got = self._affine_axis(node, rank)
                if got is not None and got != rank - n - 1:
                    where = "" if shape is not None else " (pass example_inputs to prove it)"
                    return (f"{option.name} scales dim {got} of its input at rank {rank}, the "
                            f"convs' channels are on dim {rank - n - 1}{where}")
        return None

    def _affine_axis(self, node: fx.Node, rank: int) -> int | None:
        """The input dim a BN or scale summand acts on per channel (None: all dims alike or the
        op rejects this rank; -1: no single dim)."""
        if is_batchnorm(self.gm, node):
            rule = batchnorm_rule(self.gm, node)
            return -1 if rule is None else rule(rank)
        for c in node.args:
            if isinstance(c, fx.Node) and c.op == "get_attr":
                dims = tuple(fetch(self.gm, c).shape)
                big = [i for i, d in enumerate(dims) if d != 1]
                if len(dims) > rank or len(big) > 1:
                    return -1
                return rank - len(dims) + big[0] if big else None
        return None

    # -- rewriting --------------------------------------------------------------------------

    @staticmethod
    def _block_label(root: fx.Node, convs: Sequence[Branch | str]) -> str:
        """``"<common module path of the convs> (<add node>)"``."""
        names = [str(b.name).split(" ")[0].split(".") for b in convs
                 if isinstance(b, ConvBranch)]
        prefix: list[str] = []
        for parts in zip(*names, strict=False):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        if names and len(prefix) == min(len(p) for p in names):
            prefix = prefix[:-1]
        return f"{'.'.join(prefix)} ({root.name})" if prefix else root.name

    def _rewrite(self, root: fx.Node, x: fx.Node, merged: br.MergedConv,
                 leaves: Sequence[Summand]) -> str:
        conv_node = next(lf.erase[x][-1] for lf in leaves if isinstance(
            b := lf.options[x], ConvBranch) and b.name == merged.base)
        layer = layer_site(self.gm, conv_node)
        assert isinstance(layer, LayerSite)
        target = self._module_slot(conv_node, layer)
        n = merged.weight.ndim - 2
        pad_first = not merged.symmetric  # (a conv pads both sides of an axis alike)
        module = layer_kind("conv", n).module(
            merged.weight.shape[1] * merged.groups, merged.weight.shape[0],
            merged.weight.shape[2:], merged.stride,
            0 if pad_first else tuple(b for b, _ in merged.pads), merged.dilation,
            merged.groups, True, "zeros" if pad_first else merged.padding_mode,
            device="meta")  # (no random init of tensors replaced just below)
        module.weight = nn.Parameter(to_torch(merged.weight, layer.weight),
                                     requires_grad=layer.weight.requires_grad)
        module.bias = nn.Parameter(to_torch(merged.bias, layer.weight),
                                   requires_grad=layer.weight.requires_grad)
        owner, _, leaf = target.rpartition(".")
        setattr(self.gm.get_submodule(owner) if owner else self.gm, leaf, module)
        anchor = x if x.op != "placeholder" else [
            n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(anchor):  # before every reader of a branch
            new = self.graph.call_module(target, (x,))
        if pad_first:
            with self.graph.inserting_after(anchor):
                flat = [p for pair in reversed(merged.pads) for p in pair]
                mode = "constant" if merged.padding_mode == "zeros" else merged.padding_mode
                new.args = (self.graph.call_function(F.pad, (x, flat), {"mode": mode}),)
        new.meta.update({k: v for k, v in root.meta.items() if k in ("val", "tensor_meta")})
        root.replace_all_uses_with(new)
        doomed = {*self._tree(root), *(n for lf in leaves for n in lf.erase[x])}
        for node in doomed:  # shape checks on a branch (timm asserts ndim) read the same shape
            for user in [u for u in node.users if u not in doomed]:
                user.replace_input_with(node, new)
        for node in reversed(list(self.graph.nodes)):
            if node in doomed and not node.users:
                if node.op == "call_module" and node.target != target:
                    self.erased_modules.add(str(node.target))
                attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
                self.graph.erase_node(node)
                for a in attrs:
                    if not a.users:
                        self.graph.erase_node(a)
        return target

    def _tree(self, root: fx.Node) -> list[fx.Node]:
        out, stack = [], [root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(a for a in node.args if isinstance(a, fx.Node) and _is_add(a)
                         and _inner_add(a))
        return out

    def _module_slot(self, conv: fx.Node, layer: LayerSite) -> str:
        """Where the merged conv module goes: the largest conv's own path when nothing else
        calls it, else a fresh ``<path>_merged``."""
        if conv.op == "call_module":
            path = str(conv.target)
            others = [n for n in self.graph.nodes if n is not conv and (
                (n.op == "call_module" and n.target == path)
                or (n.op == "get_attr" and str(n.target).startswith(path + ".")))]
            if not others:
                return path
        else:  # functional: next to the module owning its weight ("block.conv (conv2d)")
            path = layer.label.split(" (")[0] if " (" in layer.label else conv.name
        owner, _, leaf = path.rpartition(".")
        try:
            holder = self.gm.get_submodule(owner) if owner else self.gm
        except AttributeError:
            owner, leaf, holder = "", "".join(c if c.isalnum() else "_" for c in path), self.gm
        name, i = f"{leaf}_merged", 1
        while hasattr(holder, name):
            name, i = f"{leaf}_merged_{i}", i + 1
        return f"{owner}.{name}" if owner else name

    def cleanup(self) -> None:
        """Drop the modules of erased branches that nothing calls any more; regenerate code."""
        refs = {str(n.target) for n in self.graph.nodes if n.op in ("call_module", "get_attr")}
        for path in sorted(self.erased_modules, key=len, reverse=True):
            if not any(r == path or r.startswith(path + ".") for r in refs):
                self.gm.delete_submodule(path)
        self.graph.lint()
        self.gm.recompile()


def _pads(conv: fx.Node, gm: fx.GraphModule, layer: LayerSite) -> tuple[tuple[int, int], ...]:
    """Per-side padding of a conv call (``'same'``: torch puts the odd pixel at the end)."""
    if conv.op == "call_module":
        padding: Any = gm.get_submodule(str(conv.target)).padding
    else:
        padding = node_arg(conv, 4, "padding", 0)
    n = layer.spatial
    if padding == "valid":
        return ((0, 0),) * n
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.weight.shape[2:], strict=True)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in layer.padding)
