"""Forward fold: ``layer -> [layout ops] -> BN`` becomes ``layer' -> [layout ops]``.

The layer's output channel must land on the BN's channel axis (axis 1); which weight axis
holds it, the groups and the bias (scale) come from the layer table (:mod:`.layers`):

* Conv ``W[Cout, Cin/g, k..]``: channel axis 1 of the output, weight axis 0.
* ConvTranspose ``W[Cin, Cout/g, k..]``: channel axis 1, weight axis 1 grouped by ``group``.
* Gemm ``Y = alpha*A'B' + beta*C``: output axis 1 is a column of ``B'`` (weight axis 1 when
  ``transB=0``, 0 when ``transB=1``; ``transA`` does not matter). ``alpha`` stays; ``beta`` is
  folded into the new ``C`` (``C' = s*beta*C + t``) and set to 1.
* MatMul ``A @ W`` with constant 2-D ``W[K, N]`` (optionally followed by ``Add`` of a constant
  bias): feature axis is the output's last axis, weight axis 1.

Between the layer and the BN there may be ``Transpose``/``Reshape``/``Flatten``/``Squeeze``/
``Unsqueeze`` nodes with a single reader each: they move the feature axis (tracked through
known shapes; a reshape keeps it when its size and the product of the dims after it are
unchanged), and the fold is exact when it ends on axis 1. Per-channel pools and resamples
(:mod:`.channelwise`) keep the channel axis and pass the BN's affine map when their own
conditions hold. The math is
:func:`bnfold.algebra.fold_forward`; the fold is exact for every input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.algebra import Folded, fold_forward
from bnfold.errors import UnsafeFoldError
from bnfold.geometry import reshape_axis
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name, inference_params
from bnfold.passes.onnx.channelwise import channelwise_refusal, is_channelwise
from bnfold.passes.onnx.consts import data_uses, deferred, set_initializer
from bnfold.passes.onnx.edit import add_bias_after, remove_bn
from bnfold.passes.onnx.layers import LAYERS, is_default, layer_kind, reset_bias_scale
from bnfold.passes.onnx.noops import is_noop
from bnfold.passes.onnx.rules import (
    Context,
    Fold,
    constant,
    optional_bias,
    release,
    sole_reader,
)
from bnfold.passes.onnx.shapes import UNKNOWN
from bnfold.passes.onnx.sites import Site

LAYOUT_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


def forward_fold(site: Site, ctx: Context) -> Fold | str:
    """Plan folding ``site`` into the layer that produces its input (see module docstring)."""
    fold = layer_fold(site, ctx)
    if isinstance(fold, str):
        return fold
    return Fold(fold.into, fold.direction, lambda: (fold.apply(), remove(site, ctx)))


def remove(site: Site, ctx: Context) -> None:
    """Bypass and remove the site (its readers read its input)."""
    ctx.released.extend(remove_bn(site.nodes, site.current_x()))


def layer_fold(site: Site, ctx: Context, *, repeated: bool = False) -> Fold | str:
    """The rewrite of the layer before ``site`` that makes the site an identity
    (``repeated``: ``site.nodes[0]`` may read ``site.x`` more than once, as an off-axis
    concat of one value twice does: it still is the value's only reader)."""
    chain: list[ir.Node] = []
    value = site.x
    reader = site.nodes[0]
    shared = False
    while True:
        node = value.producer()
        if node is None:
            return f"its input {value.name!r} is a graph input or constant, not a layer output"
        why = sole_reader(value, display_name(node), reader,
                          repeated=repeated and value is site.x)
        shared = bool(why) and not chain and _only_bns_read(node, ctx)
        if why and not shared:
            return why
        if is_channelwise(node):
            why = channelwise_refusal(node, site.params, ctx)
            if why:
                return why
        if (is_default(node) and node.op_type in LAYOUT_OPS) \
                or is_noop(node, ctx) or is_channelwise(node):
            chain.insert(0, node)
            reader = node
            value = node.inputs[0]
            assert value is not None
            continue
        break
    layer = node
    if not is_default(layer):
        return f"its input comes from {display_name(layer)} ({layer.op_type}), not a layer"
    rule = _RULES.get(layer.op_type)
    if rule is None:
        return (f"its input comes from {display_name(layer)} ({layer.op_type}), "
                "not a Conv/ConvTranspose/Gemm/MatMul")
    fold = rule(site, layer, chain, ctx)
    if not shared or isinstance(fold, str):
        return fold
    return Fold(fold.into, fold.direction, lambda: (_copy_for(layer, reader, ctx), fold.apply()))


def _only_bns_read(layer: ir.Node, ctx: Context) -> bool:
    """A Conv/ConvTranspose/Gemm whose output only inference-mode BNs read (TorchScript
    merges identical layers that each had their own BN): each BN can fold into its own copy
    of the layer."""
    out = layer.outputs[0]
    kind = layer_kind(layer)
    return (kind is not None and kind.bias_index is not None and not out.is_graph_output()
            and all(u.node.op_type == "BatchNormalization" and is_default(u.node)
                    and u.idx == 0
                    and not isinstance(inference_params(u.node, ctx.opset, ctx.consts), str)
                    for u in data_uses(out)))


def _copy_for(layer: ir.Node, reader: ir.Node, ctx: Context) -> None:
    """Give every reader of ``layer`` but ``reader`` a copy of it, so ``reader`` is its only
    reader (the copy reads the same tensors; a fold then copies those it rewrites)."""
    copy = ir.Node(layer.domain, layer.op_type, list(layer.inputs),
                   list(layer.attributes.values()),
                   name=ctx.namer.fresh(f"{display_name(layer)}_copy"))
    out = layer.outputs[0]
    copy.outputs[0].name = ctx.namer.fresh(f"{out.name}_copy")
    copy.outputs[0].type, copy.outputs[0].shape = out.type, out.shape
    ctx.graph.insert_after(layer, copy)
    for user, index in list(out.uses()):
        if user is not reader:
            user.replace_input_with(index, copy.outputs[0])


def _map_axis(chain: list[ir.Node], value: ir.Value, axis: int, ctx: Context) -> int | str:
    """Where the feature ``axis`` of ``value`` lands after the layout ops in ``chain``."""
    for node in chain:
        out = node.outputs[0]
        dims_in, dims_out = ctx.dims(value), ctx.dims(out)
        if node.op_type == "Transpose":
            if dims_in is None:
                return f"the rank before {display_name(node)} is {UNKNOWN}"
            perm = node.attributes.get_ints("perm", None) or list(range(len(dims_in)))[::-1]
            axis = list(perm).index(axis)
        elif is_channelwise(node):  # (N, C, spatial...) in, the same rank out
            if axis != 1:
                return (f"{display_name(node)} ({node.op_type}) resamples axis {axis}, where "
                        "the layer's features are")
        elif node.op_type in LAYOUT_OPS:  # (no-ops keep every axis)
            if dims_in is None or dims_out is None:
                return f"the shape around {display_name(node)} is {UNKNOWN}"
            mapped = reshape_axis(dims_in, axis, dims_out)
            if mapped is None:
                return f"{display_name(node)} does not keep the layer's feature axis whole"
            axis = mapped
        value = out
    return axis


@dataclass(frozen=True)
class _Plan:
    """Where a forward fold reads and writes: weight on ``layer``, bias on ``bias_node``
    (``None``: add a bias after ``layer``), features on axis ``feature_axis`` of ``top``."""

    layer: ir.Node
    top: ir.Node
    feature_axis: int
    weight: np.ndarray
    out_axis: int
    groups: int = 1
    bias: np.ndarray | None = None
    bias_node: ir.Node | None = None
    bias_index: int = 2
    bias_scale: float = 1.0


def _finish(site: Site, chain: list[ir.Node], ctx: Context, plan: _Plan) -> Fold | str:
    """Check the axis, compute the fold, and return the rewrite."""
    layer = plan.layer
    axis = _map_axis(chain, plan.top.outputs[0], plan.feature_axis, ctx)
    if isinstance(axis, str):
        return axis
    if axis != site.axis:
        return (f"{site.what} normalizes axis {site.axis} but {display_name(layer)}'s output "
                f"features reach it on axis {axis}: the axes do not line up")
    params = site.params
    bias, out_axis, groups, scale = plan.bias, plan.out_axis, plan.groups, plan.bias_scale

    def fold(weight: np.ndarray) -> Folded:
        return fold_forward(weight, bias, params, out_axis=out_axis, groups=groups,
                            bias_scale=scale)

    try:
        folded = fold(plan.weight)
    except UnsafeFoldError as exc:
        return str(exc)
    weight = deferred(layer.inputs[1], folded.weight, lambda w: fold(w).weight)

    def apply() -> None:
        base = display_name(layer)
        if plan.bias_node is None:
            add_bias_after(layer, folded.bias, ctx.namer, f"{base}_bnfold_bias")
        else:
            release(ctx, plan.bias_node, plan.bias_index)
            set_initializer(ctx.graph, plan.bias_node, plan.bias_index, folded.bias,
                            ctx.namer, f"{base}_bnfold_bias")
        reset_bias_scale(layer)
        release(ctx, layer, 1)
        set_initializer(ctx.graph, layer, 1, weight, ctx.namer, f"{base}_bnfold_weight")

    return Fold(into=layer, direction="forward", apply=apply)


def _weighted(site: Site, layer: ir.Node, chain: list[ir.Node],
              ctx: Context) -> Fold | str:
    """Conv / ConvTranspose / Gemm: weight input 1, bias input 2, axes from the layer table."""
    kind = LAYERS[layer.op_type]
    weight = constant(ctx, layer.inputs[1] if len(layer.inputs) > 1 else None,
                      kind.weight_label, layer)
    if isinstance(weight, str):
        return weight
    index = kind.bias_index
    assert index is not None
    bias = optional_bias(ctx, layer, index)
    if isinstance(bias, str):
        return bias
    plan = _Plan(layer, layer, 1, weight, kind.out_axis(layer), kind.groups(layer), bias, layer,
                 index, kind.bias_scale(layer))
    return _finish(site, chain, ctx, plan)


def _matmul(site: Site, layer: ir.Node, chain: list[ir.Node],
            ctx: Context, bias_node: ir.Node | None = None, bias_index: int = 0,
            bias: np.ndarray | None = None) -> Fold | str:
    weight = constant(ctx, layer.inputs[1], "weight", layer)
    if isinstance(weight, str):
        if isinstance(constant(ctx, layer.inputs[0], "weight", layer), np.ndarray):
            return (f"{display_name(layer)} multiplies a constant on the left (W @ x): "
                    "its rows, not a weight's columns, give the output features (not handled)")
        return weight
    if weight.ndim != 2:
        return f"{display_name(layer)} weight has rank {weight.ndim}, not 2"
    rank = _matmul_rank(layer, ctx)
    if rank is None:
        return f"the rank of {display_name(layer)}'s output is {UNKNOWN}"
    # Through an Add the feature axis is still the last one (broadcasting aligns trailing
    # axes), but a bias of higher rank adds leading axes; the chain starts after the Add.
    top_rank = rank if bias is None else max(rank, bias.ndim)
    plan = _Plan(layer, bias_node or layer, top_rank - 1, weight, LAYERS["MatMul"].out_axis(layer),
                 1, bias, bias_node, bias_index)
    return _finish(site, chain, ctx, plan)


def _matmul_rank(layer: ir.Node, ctx: Context) -> int | None:
    out = ctx.dims(layer.outputs[0])
    if out is not None:
        return len(out)
    dims = ctx.dims(layer.inputs[0])
    return None if dims is None else max(len(dims), 1 if len(dims) == 1 else 2)


def _add(site: Site, layer: ir.Node, chain: list[ir.Node],
         ctx: Context) -> Fold | str:
    """``MatMul -> Add(constant bias) -> BN``."""
    for i in (0, 1):
        mm_out, other = layer.inputs[i], layer.inputs[1 - i]
        if mm_out is None or other is None:
            continue
        mm = mm_out.producer()
        if mm is None or mm.op_type != "MatMul" or not is_default(mm):
            continue
        why = sole_reader(mm_out, display_name(mm), layer)
        if why:
            return why
        bias = constant(ctx, other, "bias", layer)
        if isinstance(bias, str):
            return bias
        return _matmul(site, mm, chain, ctx, layer, 1 - i, bias)
    return f"its input comes from {display_name(layer)} (Add), not MatMul + constant bias"



_RULES = {"Conv": _weighted, "ConvTranspose": _weighted, "Gemm": _weighted, "MatMul": _matmul,
          "Add": _add}
