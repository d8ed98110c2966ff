"""Backward fold: ``BN -> layer`` becomes ``layer'`` reading the BN's input directly.

``layer(s*x + t) = layer'(x)`` with ``W' = W * s`` on the weight's input-channel axis and
``b' = b + W (*) t`` (:func:`bnfold.algebra.fold_backward`; the input-channel axis, groups and
exactness kind from the layer table, :mod:`.layers`). Exact cases, checked by
:func:`bnfold.algebra.backward_fold_refusal` on the layer's :class:`bnfold.geometry.ConvGeometry`:

* Gemm (``transA=0``, ``alpha = 1``, and ``beta = 1`` when ``C`` is present; ``C`` a vector;
  without ``C`` the shift becomes ``C`` and ``beta`` is set to 1)
  and MatMul on a rank-2 input with constant 2-D weight: always exact.
* Conv with zero pads (explicit, ``VALID``, or ``SAME_*`` with 1x1 kernels): exact; with
  zero padding > 0 only when the BN shift ``t`` is all zero.
* ``BN -> Pad(mode reflect/edge/wrap, spatial axes only) -> Conv``: the pad copies BN outputs,
  so ``pad(s*x+t) = s*pad(x)+t`` and the Pad's borders are exact; the Conv's own pads add
  zeros, so they follow the rule above.
* ConvTranspose: exact when ``t == 0``, or stride 1, no output padding and
  ``pads == dilation * (kernel - 1)`` on every side.
* ``BN -> P -> layer`` with ``P`` a per-channel pool, resample or slice
  (:mod:`.channelwise`, on its conditions): ``P(s*x + t) = s*P(x) + t``, then as above.
* ``BN -> Flatten/Reshape -> Gemm`` (eval no-ops around the Flatten/Reshape looked
  through; a global pool before it too): with ``R`` positions per channel, flattened
  feature ``f`` belongs to channel ``(f // R) % C`` whenever the row length ``K`` is a
  multiple of ``C * R``; the BN then is a per-feature affine map on the Gemm input
  (parameters repeated).
"""

from __future__ import annotations

import math

import numpy as np

from bnfold.algebra import (
    BNParams,
    Folded,
    backward_fold_refusal,
    fold_backward,
    spread_features,
)
from bnfold.errors import UnsafeFoldError
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import consumers_text, display_name
from bnfold.passes.onnx.channelwise import channelwise_refusal, is_channelwise
from bnfold.passes.onnx.consts import data_uses, deferred, set_initializer
from bnfold.passes.onnx.edit import add_bias_after
from bnfold.passes.onnx.forward import remove
from bnfold.passes.onnx.layers import (
    LAYERS,
    LayerKind,
    conv_geometry,
    is_default,
    layer_kind,
    reset_bias_scale,
)
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

_COPY_PAD_MODES = ("reflect", "edge", "wrap")


def backward_fold(site: Site, ctx: Context) -> Fold | str:
    """Plan folding ``site`` into the layer(s) that read its output."""
    if site.axis != 1:
        return (f"{site.what} scales axis {site.axis} of its input, not axis 1 that a layer "
                "reads as input channels")
    y = site.y
    readers = [] if y.is_graph_output() else data_uses(y)
    if len(readers) > 1:
        return _readers_fold(site, readers, ctx)
    fold = _single_fold(site, ctx)
    if isinstance(fold, str):
        return fold
    return Fold(fold.into, fold.direction, lambda: (fold.apply(), remove(site, ctx)))


def _single_fold(site: Site, ctx: Context) -> Fold | str:
    """The rewrite of the one layer that reads ``site`` (through no-ops, a copying Pad or a
    Flatten before a Gemm)."""
    y, params = site.y, site.params
    node, index = _past_noops(site.nodes[-1], ctx)
    if node is not None and index == 0 and is_channelwise(node):
        why = channelwise_refusal(node, params, ctx) or (
            None if site.axis == 1 else f"{display_name(node)} ({node.op_type}) keeps axis "
            f"1 whole, but {site.what} normalizes axis {site.axis}")
        if why:
            return why
        node, index = _past_noops(node, ctx)
    if node is None:
        return f"its output feeds {consumers_text(y)}, not a single Conv/Gemm/MatMul"
    if node.op_type == "Pad" and is_default(node) and index == 0:
        why = _copy_pad_refusal(node, ctx)
        if why:
            return why
        node, index = _next(node)
    elif node.op_type in ("Flatten", "Reshape") and is_default(node):
        flat = _flattened(site, node, ctx)
        if isinstance(flat, str):
            return flat
        params = flat
        node, index = _past_noops(node, ctx)
    if node is None or index != 0 or not is_default(node):
        return f"its output feeds {consumers_text(y)}, not the data input of a layer"
    return _layer(site, params, node, ctx)


def _layer(site: Site, params: BNParams, node: ir.Node, ctx: Context) -> Fold | str:
    kind = layer_kind(node)
    if kind is None:
        return f"its output feeds {display_name(node)} ({node.op_type}), not a foldable layer"
    if kind.exactness == "linear":
        return _dense(site, params, node, kind, ctx)
    return _conv(site, params, node, kind, ctx)


def _readers_fold(site: Site, readers: list, ctx: Context) -> Fold | str:
    """One output read by several layers: fold into each (weights shared with other readers
    are copied by :func:`set_initializer`), then remove the site once."""
    folds = []
    for node, index in readers:
        fold = _layer(site, site.params, node, ctx) if index == 0 \
            and is_default(node) else "it is not the layer's data input"
        if isinstance(fold, str):
            return (f"its output feeds {consumers_text(site.y)}; every reader must be a "
                    f"foldable layer, but for {display_name(node)}: {fold}")
        folds.append(fold)

    def apply() -> None:
        for fold in folds:
            fold.apply()
        remove(site, ctx)

    return Fold(folds[0].into, "backward", apply, [f.into for f in folds[1:]])


def _past_noops(node: ir.Node, ctx: Context) -> tuple[ir.Node | None, int]:
    """The sole reader of ``node``'s output past eval no-ops (:func:`_next` of each), and the
    input it reads."""
    reader, index = _next(node)
    while reader is not None and index == 0 and is_noop(reader, ctx):
        reader, index = _next(reader)
    return reader, index


def _next(node: ir.Node) -> tuple[ir.Node | None, int]:
    out = node.outputs[0]
    if out.is_graph_output() or len(out.uses()) != 1:
        return None, -1
    user, index = out.uses()[0]
    return user, index


def _copy_pad_refusal(pad: ir.Node, ctx: Context) -> str | None:
    mode = pad.attributes.get_string("mode", "constant")
    if mode not in _COPY_PAD_MODES:
        return f"{display_name(pad)} pads with mode {mode!r}: the BN shift would reach the border"
    if ctx.opset >= 11:
        pads = ctx.consts.array(pad.inputs[1]) if len(pad.inputs) > 1 and pad.inputs[1] \
            else None
        if len(pad.inputs) > 3 and pad.inputs[3] is not None:
            return f"{display_name(pad)} has an axes input (not handled)"
    else:
        pads = pad.attributes.get_ints("pads", None)
    if pads is None or isinstance(pads, str):
        return f"{display_name(pad)} pads are not constant"
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    half = len(pads) // 2
    if half < 2 or any(pads[i] or pads[half + i] for i in (0, 1)):
        return f"{display_name(pad)} pads the batch or channel axis"
    return sole_reader(pad.outputs[0], display_name(pad))


def _reshape_reader(flat: ir.Node, reader: ir.Node | None, index: int) -> str:
    """What reads the output of ``flat`` (past no-ops: ``reader`` at input ``index``), in
    words, for a reason naming what blocks a backward fold through it."""
    if reader is None:
        return f"feeds {consumers_text(flat.outputs[0])}, not a single reader"
    if index != 0:
        return f"feeds input {index} of {display_name(reader)} ({reader.op_type})"
    return f"feeds {display_name(reader)} ({reader.op_type}), not a Gemm"


def _flattened(site: Site, flat: ir.Node, ctx: Context) -> BNParams | str:
    """Per-feature BN parameters after ``flat`` (Flatten/Reshape) when it feeds a Gemm
    (through eval no-ops)."""
    gemm, index = _past_noops(flat, ctx)
    if gemm is None or gemm.op_type != "Gemm" or index != 0:
        return (f"{display_name(flat)} ({flat.op_type}) regroups the BN's channels and "
                f"{_reshape_reader(flat, gemm, index)}; a reshape is followed only where it "
                "flattens into a Gemm's input A")
    weight = ctx.consts.array(gemm.inputs[1]) if gemm.inputs[1] is not None else "missing"
    if isinstance(weight, str) or weight.ndim != 2:
        return f"{display_name(gemm)} weight is not a constant matrix"
    k = weight.shape[LAYERS["Gemm"].in_axis(gemm)]
    params = site.params
    c = params.channels
    dims = ctx.dims(flat.inputs[0])  # (the BN's, or a per-channel pool's before it)
    if dims is not None and len(dims) >= 2 and all(d is not None for d in dims[2:]):
        positions = math.prod(dims[2:])  # type: ignore[arg-type]
    elif flat.op_type == "Flatten" and flat.attributes.get_int("axis", 1) == 1 and k % c == 0:
        positions = k // c
    else:
        return f"the BN input shape before {display_name(flat)} is {UNKNOWN}"
    spread = spread_features(params, k, positions)
    if spread is None:
        return (f"{display_name(flat)} mixes channels across rows ({k} features, "
                f"{c} channels x {positions} positions)")
    return spread


def _conv(site: Site, params: BNParams, conv: ir.Node, kind: LayerKind, ctx: Context
          ) -> Fold | str:
    weight = constant(ctx, conv.inputs[1], "weight", conv)
    if isinstance(weight, str):
        return weight
    bias = optional_bias(ctx, conv, 2)
    if isinstance(bias, str):
        return bias
    geometry = conv_geometry(conv, list(weight.shape[2:]))
    groups = kind.groups(conv)
    axes = {"in_axis": kind.in_axis(conv), "out_axis": kind.out_axis(conv)}
    try:
        why = backward_fold_refusal(kind.exactness, params, geometry)
        if why:
            return why

        def fold(w: np.ndarray) -> Folded:
            return fold_backward(w, bias, params, groups=groups, **axes)

        folded = fold(weight)
    except UnsafeFoldError as exc:
        return str(exc)
    new_weight = deferred(conv.inputs[1], folded.weight, lambda w: fold(w).weight)

    def apply() -> None:
        _rewrite(conv, new_weight, ctx)
        release(ctx, conv, 2)
        set_initializer(ctx.graph, conv, 2, folded.bias, ctx.namer,
                        f"{display_name(conv)}_bnfold_bias")

    return Fold(into=conv, direction="backward", apply=apply)


def _dense(site: Site, params: BNParams, layer: ir.Node, kind: LayerKind, ctx: Context
           ) -> Fold | str:
    weight = constant(ctx, layer.inputs[1], "weight", layer)
    if isinstance(weight, str):
        return weight
    if weight.ndim != 2:
        return f"{display_name(layer)} weight has rank {weight.ndim}, not 2"
    attrs = layer.attributes
    bias_node, bias_index = layer, 2
    if layer.op_type == "Gemm":
        if attrs.get_int("transA", 0):
            return f"{display_name(layer)} has transA=1: the BN channels are not its features"
        has_c = len(layer.inputs) > 2 and layer.inputs[2] is not None
        if attrs.get_float("alpha", 1.0) != 1.0 or (has_c and attrs.get_float("beta", 1.0) != 1):
            return f"{display_name(layer)} has alpha or beta != 1 (backward fold not handled)"
        # Without C, beta multiplies nothing; the new C (the BN shift) is used with beta = 1.
    else:
        dims = ctx.dims(site.x)
        if dims is None:
            return f"the rank of {display_name(layer)}'s input is {UNKNOWN}"
        if len(dims) != 2:
            return (f"{display_name(layer)} input has rank {len(dims)}: the BN channel axis 1 "
                    "is not the axis it multiplies")
        bias_node, bias_index = _matmul_bias(layer, ctx)
    bias = None if bias_node is None else optional_bias(ctx, bias_node, bias_index)
    if isinstance(bias, str):
        return bias
    in_axis, out_axis = kind.in_axis(layer), kind.out_axis(layer)
    n_out = weight.shape[out_axis]
    if bias is not None and (bias.size not in (1, n_out) or bias.shape[-1:] not in ((1,), (n_out,))
                             or any(d != 1 for d in bias.shape[:-1])):
        return f"{display_name(layer)} bias of shape {bias.shape} is not a per-feature vector"
    def fold(w: np.ndarray) -> Folded:
        return fold_backward(w, bias, params, in_axis=in_axis, out_axis=out_axis)

    try:
        folded = fold(weight)
    except UnsafeFoldError as exc:
        return str(exc)
    new_weight = deferred(layer.inputs[1], folded.weight, lambda w: fold(w).weight)

    def apply() -> None:
        _rewrite(layer, new_weight, ctx)
        base = f"{display_name(layer)}_bnfold_bias"
        if bias_node is None:
            if np.any(folded.bias.astype(np.float64) != 0):
                add_bias_after(layer, folded.bias, ctx.namer, base)
            return
        release(ctx, bias_node, bias_index)
        set_initializer(ctx.graph, bias_node, bias_index, folded.bias, ctx.namer, base)
        reset_bias_scale(layer)

    return Fold(into=layer, direction="backward", apply=apply)


def _matmul_bias(mm: ir.Node, ctx: Context) -> tuple[ir.Node | None, int]:
    """The ``Add`` of a constant right after ``mm`` (and which input is the constant)."""
    user, _ = _next(mm)
    if user is None or user.op_type != "Add":
        return None, 0
    for i in (0, 1):
        other = user.inputs[1 - i]
        if (user.inputs[i] is mm.outputs[0] and other is not None
                and isinstance(ctx.consts.array(other), np.ndarray)):
            return user, 1 - i
    return None, 0



def _rewrite(layer: ir.Node, weight: np.ndarray | ir.TensorProtocol, ctx: Context) -> None:
    """Write the scaled weight."""
    release(ctx, layer, 1)
    set_initializer(ctx.graph, layer, 1, weight, ctx.namer, f"{display_name(layer)}_bnfold_weight")
