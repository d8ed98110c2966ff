"""Merge parallel Conv(+BN) branches of an ONNX graph into one Conv (re-parameterization).

A block is an ``Add`` or ``Sum`` (or a chain of them whose intermediate sums have no other
reader) whose summands each read one tensor ``x``: ``BatchNormalization(Conv(x))``,
``Conv(x)``, ``BatchNormalization(x)``, ``Mul(x, c)`` (``c`` a constant scalar or one value per
channel) or ``x`` itself; a constant summand is a bias (:func:`bnfold.branches.constant_branch`).
Every block with at least two summands on one tensor, one of them a Conv, is merged into one
``Conv`` (named as its largest-kernel Conv; the math and its exactness conditions are
:mod:`bnfold.branches`) or kept with the reason. The sum's output keeps its name, so graph
outputs and later readers are unchanged. The remaining BNs are then folded by :mod:`.fold`.
ONNX Conv inputs always have the batch axis, so channels are always axis 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from bnfold import branches as br
from bnfold.arguments import check_flags, check_path
from bnfold.branches import AffineBranch, Branch, ConvBranch, Summand
from bnfold.gc_pause import gc_paused
from bnfold.io.external_data import bind_external_data
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name, inference_params
from bnfold.passes.onnx.consts import Constants, Namer, data_uses, make_tensor
from bnfold.passes.onnx.edit import prune
from bnfold.passes.onnx.fold import _fold, _working_copy, initializer_inputs_as_constants
from bnfold.passes.onnx.layers import DEFAULT_DOMAINS, LAYERS, conv_geometry, is_default
from bnfold.passes.onnx.noops import is_noop
from bnfold.passes.onnx.rules import Context, conv_tensors
from bnfold.passes.onnx.shapes import Shapes
from bnfold.report import PassResult, Report


def reparameterize_onnx(model: Any, *, inplace: bool = False,
                        base_dir: str | os.PathLike[str] | None = None) -> PassResult:
    """Merge every exactly mergeable branch block of ``model``, then fold the remaining BNs.

    ``model`` and the returned model's type as :func:`bnfold.passes.onnx.fold.fold_onnx` (a
    ModelProto in gives a new ModelProto; an ``onnx_ir.Model`` is cloned unless ``inplace``; a
    path gives a lazily loaded ``onnx_ir.Model``); so is ``base_dir``, the folder an in-memory
    model's external tensors lie in (:func:`bnfold.io.external_data.bind_external_data`: without
    it such a model is refused, and no location may lead out of it). The report has one
    ``merged`` entry per block (``into`` the new Conv), ``kept`` entries for blocks left as they
    were (with the reason), a ``folded`` entry per absorbed BN and the fold pass's entries for
    the others.
    """
    check_flags(inplace=inplace)
    check_path(base_dir, "base_dir", optional=True)
    with gc_paused():
        ir_model, as_proto = _working_copy(model, inplace)
        bind_external_data(ir_model, base_dir)
        report = _reparameterize(ir_model, "reparameterize_onnx")
        out = ir.serde.serialize_model(ir_model) if as_proto else ir_model
    return PassResult(out, report)


def inspect_branches(model: Any, *, base_dir: str | os.PathLike[str] | None = None
                     ) -> Report:
    """The branch blocks :func:`reparameterize_onnx` would merge (into what, how many
    branches) or keep (and why): a dry run on a copy, one entry per block, no BN entries.
    ``base_dir`` as for :func:`reparameterize_onnx`. A protobuf without a default-domain
    ``Add`` or ``Sum`` has no block: that is told without onnx-ir."""
    check_path(base_dir, "base_dir", optional=True)
    if isinstance(model, (onnx.ModelProto, SplitProto)) and not _has_add(
            (model.proto if isinstance(model, SplitProto) else model).graph):
        return Report("inspect_branches", dry_run=True)
    with gc_paused():
        ir_model, _ = _working_copy(model, inplace=False, views=True)  # (a report: no view escapes)
        bind_external_data(ir_model, base_dir)
        report = _reparameterize(ir_model, "inspect_branches", fold=False)
    report.entries = [e for e in report.entries if "branches" in e.details]
    report.dry_run = True
    return report


def _reparameterize(model: ir.Model, name: str, *, fold: bool = True) -> Report:
    """Merge the blocks of ``model``, in place, then (``fold``) fold the BNs left; an IR < 4
    model's initializer inputs are constants to both, as to :func:`.fold.fold_onnx`."""
    report = Report(name)
    with initializer_inputs_as_constants(model, report):
        namer, shapes, consts = Namer(model), Shapes(model), Constants(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        for graph in list(model.graphs()) if opset is not None else []:
            for node in [n for n in graph if _is_add(n) and not _inner_add(n)]:
                _Block(Context(graph, opset, namer, shapes, consts)).run(node, report)
        if fold:
            folded = _fold(model, name, backward=True, max_const_elements=None)
            report.entries.extend(folded.entries)
            report.notes.extend(folded.notes)
    return report


def _has_add(graph: onnx.GraphProto) -> bool:
    """A default-domain ``Add`` or ``Sum`` is in ``graph`` or one of its subgraphs."""
    return any((node.op_type in ("Add", "Sum") and node.domain in DEFAULT_DOMAINS) or any(
        _has_add(sub) for attr in node.attribute for sub in (*attr.graphs, attr.g))
        for node in graph.node)


def _is_add(node: ir.Node) -> bool:
    """``node`` sums its inputs: an ``Add`` of two, or a ``Sum`` (of any number: the same
    linear combination, broadcast alike)."""
    if not is_default(node):
        return False
    return (node.op_type == "Add" and len(node.inputs) == 2) or node.op_type == "Sum"


def _inner_add(node: ir.Node) -> bool:
    out = node.outputs[0]
    uses = data_uses(out)
    return len(uses) == 1 and not out.is_graph_output() and _is_add(uses[0].node)


def _tree(root: ir.Node) -> list[ir.Node]:
    """The add nodes of the sum at ``root``."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        for v in node.inputs:
            p = None if v is None else v.producer()
            if p is not None and _is_add(p) and _inner_add(p):
                stack.append(p)
    return out


@dataclass
class _Block:
    ctx: Context

    @property
    def graph(self) -> ir.Graph:
        return self.ctx.graph

    @property
    def namer(self) -> Namer:
        return self.ctx.namer

    def _array(self, value: ir.Value) -> np.ndarray | None:
        """``value``'s constant array, or ``None`` when it is not a constant."""
        arr = self.ctx.consts.array(value)
        return None if isinstance(arr, str) else arr

    def run(self, root: ir.Node, report: Report) -> None:
        tree = _tree(root)
        summands = [v for n in tree for v in n.inputs
                    if v is not None and (v.producer() not in tree)]
        if any(v is None for n in tree for v in n.inputs):
            return
        leaves, values, constants = [], [], []
        for v in summands:
            arr = self._constant(v)
            if arr is None:
                leaves.append(self._leaf(v, set(tree)))
                values.append(v)
            else:  # (a bias add after the sum, timm's ``0 + identity``: see constant_branch)
                constants.append((str(v.name), arr))
        shared = br.shared_input(leaves)
        if shared is None:
            return
        label = display_name(root)
        merged = br.plan_block(leaves, shared, str(shared.name), _scale_refusal, constants,
                               self._sum_dims(values, leaves, shared) if constants else None)
        if isinstance(merged, str):
            report.add(label, "kept", reason=f"not merged: {merged}", branches=len(leaves))
            return
        into = self._rewrite(root, tree, shared, merged, leaves)
        report.add(label, "merged", into=into, branches=len(leaves),
                   summands=[str(lf.options[shared].name) for lf in leaves]  # type: ignore
                   + [name for name, _ in constants])
        for bn in br.absorbed(leaves, shared):
            report.add(display_name(bn), "folded", into=into, direction="branch merge", block=label)

    def _constant(self, v: ir.Value) -> np.ndarray | None:
        """The array of a constant summand (``None``: a branch, or a value not constant)."""
        producer = v.producer()
        if v.is_graph_input() or (producer is not None and producer.op_type in (
                "Conv", "BatchNormalization", "Mul")):
            return None
        return self._array(v)

    def _sum_dims(self, values: Sequence[ir.Value], leaves: Sequence[Summand], x: ir.Value
                  ) -> list[int | None] | None:
        """The dims of the branches' sum as far as known: a branch summand's (in a block that
        merges every branch has the sum's shape), else a conv branch's rank, no dim known."""
        for v in values:
            dims = self.ctx.dims(v)
            if dims is not None:
                return dims
        rank = next((b.weight.ndim for lf in leaves
                     if isinstance(b := lf.options.get(x), ConvBranch)), None)
        return None if rank is None else [None] * rank

    def _leaf(self, v: ir.Value, tree: set[ir.Node]) -> Summand:
        """The summand ``v`` as a branch of each tensor it could be one of. Eval-mode no-ops
        (``Identity``, inference ``Dropout``) between a branch and the sum pass it unchanged,
        so they are looked through, and removed with the branch; ``others`` names the readers
        outside the sum of ``v`` and of every value up the no-ops."""
        u, noops = self._through_noops(v)
        values = [v, *(n.inputs[0] for n in noops), *(o for n in noops for o in n.outputs[1:])]
        inside = {*tree, *noops}
        others = sorted({display_name(use.node) for val in values for use in data_uses(val)
                         if use.node not in inside})
        leaf = Summand(str(v.name), {}, others=others + (
            ["the graph output"] if any(val.is_graph_output() for val in values) else []))
        leaf.add(v, AffineBranch(str(v.name)))
        if noops:
            leaf.add(u, AffineBranch(str(u.name)))
        self._options(leaf, u)
        for nodes in leaf.erase.values():
            if nodes:  # (an identity option erases nothing: unread no-ops are pruned)
                nodes[:0] = noops
        return leaf

    def _through_noops(self, v: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
        """The value ``v`` passes on unchanged through eval-mode no-ops, and those nodes."""
        noops: list[ir.Node] = []
        node = v.producer()
        while node is not None and is_noop(node, self.ctx) and node.inputs \
                and node.inputs[0] is not None:
            noops.append(node)
            v = node.inputs[0]
            node = v.producer()
        return v, noops

    def _options(self, leaf: Summand, v: ir.Value) -> None:
        """The branches ``v``'s producer makes it: of the BN's, conv's or Mul's input."""
        node = v.producer()
        if node is None or not is_default(node):
            return
        if node.op_type == "BatchNormalization":
            x = node.inputs[0]
            assert x is not None
            params = inference_params(node, self.ctx.opset, self.ctx.consts)
            if isinstance(params, str):
                leaf.add(x, f"{display_name(node)}: {params}")
                conv = x.producer()  # (a conv's branch: the block says why too)
                if conv is not None and conv.op_type == "Conv" and conv.inputs[0] is not None:
                    leaf.add(conv.inputs[0], f"{display_name(node)}: {params}")
                return
            leaf.add(x, AffineBranch(display_name(node), bn=params), [node], [node])
            conv = x.producer()
            if conv is not None and conv.op_type == "Conv" and is_default(conv):
                self._conv_option(leaf, conv, node, params)
        elif node.op_type == "Conv":
            self._conv_option(leaf, node, None, None)
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            for x, c in (node.inputs, node.inputs[::-1]):
                arr = None if c is None or c.is_graph_input() else self._array(c)
                if x is not None and arr is not None:
                    leaf.add(x, AffineBranch(display_name(node), scale=arr), [node])

    def _conv_option(self, leaf: Summand, conv: ir.Node, bn: ir.Node | None, params: Any
                     ) -> None:
        x = conv.inputs[0]
        if x is None:
            return
        if bn is not None:
            readers = [u.node for u in data_uses(conv.outputs[0]) if u.node is not bn]
            if readers or conv.outputs[0].is_graph_output():
                names = sorted({display_name(n) for n in readers}) + (
                    ["the graph output"] if conv.outputs[0].is_graph_output() else [])
                leaf.add(x, f"{display_name(conv)} output also feeds {', '.join(names)}")
                return
        branch = _conv_branch(self.ctx, conv, params)
        pad = x.producer()
        if pad is not None and pad.op_type == "Pad" and is_default(pad) and pad.inputs \
                and pad.inputs[0] is not None:  # (a reflect/replicate/circular conv's export)
            leaf.add(pad.inputs[0], f"{display_name(conv)} reads it through "
                     f"{display_name(pad)} (a Pad node: branch merging does not look through "
                     "it)")
        if isinstance(branch, str):
            leaf.add(x, branch)
        else:
            leaf.add(x, branch, [n for n in (bn, conv) if n is not None],
                     [bn] if bn is not None else [])

    def _rewrite(self, root: ir.Node, tree: Sequence[ir.Node], x: ir.Value,
                 merged: br.MergedConv, leaves: Sequence[Summand]) -> str:
        base = next(n for lf in leaves for n in lf.erase[x]
                    if n.op_type == "Conv" and display_name(n) == merged.base)
        tensors = []
        for what, array in (("weight", merged.weight), ("bias", merged.bias)):
            name = self.namer.fresh(f"{merged.base}_merged_{what}")
            tensor = make_tensor(array, name)
            value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape),
                             type=ir.TensorType(tensor.dtype))
            self.graph.register_initializer(value)
            tensors.append(value)
        attrs = [ir.AttrInt64s("kernel_shape", list(merged.weight.shape[2:])),
                 ir.AttrInt64s("pads", [b for b, _ in merged.pads] + [e for _, e in merged.pads]),
                 ir.AttrInt64s("strides", list(merged.stride)),
                 ir.AttrInt64s("dilations", list(merged.dilation)),
                 ir.AttrInt64("group", merged.groups)]
        name = base.name or self.namer.fresh(f"{merged.base}_merged")
        conv = ir.Node("", "Conv", [x, *tensors], attrs, name=name)
        out, y = conv.outputs[0], root.outputs[0]
        out.type, out.shape = y.type, y.shape
        self.graph.insert_before(root, conv)
        y.replace_all_uses_with(out, replace_graph_outputs=True)
        doomed = list(tree) + [n for lf in leaves for n in lf.erase[x]]
        released = [v for node in doomed for v in node.inputs if v is not None and v is not x]
        base.name = None  # its name passes to the merged conv
        order = {node: i for i, node in enumerate(self.graph)}
        self.graph.remove(sorted(set(doomed), key=order.__getitem__), safe=True)
        original = y.name
        y.name = self.namer.fresh(f"{original}_unmerged")
        out.name = original
        prune(released)
        return name


def _conv_branch(ctx: Context, conv: ir.Node, params: Any) -> ConvBranch | str:
    """The conv's :class:`ConvBranch`, or why it cannot be merged."""
    tensors = conv_tensors(ctx, conv)
    if isinstance(tensors, str):
        return tensors
    weight, bias = tensors
    if bias is not None and not np.any(bias):
        bias = None  # a zero bias of any shape (torch's 3-D export writes [Cout, 2]) adds nothing
    if bias is not None and bias.shape != weight.shape[:1]:
        return f"{display_name(conv)} bias has shape {list(bias.shape)}, not [{weight.shape[0]}]"
    g = conv_geometry(conv, list(weight.shape[2:]))
    if g.pads_begin is None or g.pads_end is None:
        auto = conv.attributes.get_string("auto_pad", "NOTSET")
        return (f"{display_name(conv)} has auto_pad={auto} at stride {list(g.stride)} (pads "
                "depend on the input size)")
    return ConvBranch(
        display_name(conv), weight, bias, g.stride, tuple(zip(g.pads_begin, g.pads_end,
                                                             strict=True)),
        g.dilation, LAYERS["Conv"].groups(conv), g.padding_mode, params)


def _scale_refusal(branches: Sequence[Branch]) -> str | None:
    """A ``Mul`` branch's constant must hold one value per channel (axis 1 of the Conv input,
    whose rank is the Conv weight's) or one value in all."""
    rank = next(b.weight.ndim for b in branches if isinstance(b, ConvBranch))
    for b in branches:
        if not isinstance(b, AffineBranch) or b.scale is None:
            continue
        dims = np.shape(b.scale)
        big = [i for i, d in enumerate(dims) if d != 1]
        if len(dims) > rank or len(big) > 1 or (big and len(dims) - big[0] != rank - 1):
            return (f"{b.name} multiplies by a constant of shape {list(dims)}, not one value "
                    "per channel")
    return None
