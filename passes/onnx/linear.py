"""Forward folds through linear structure: a BN after a sum or a channel concat of layers.

* ``BN(y1 + ... + yn)`` (one ``Add``, or a tree of ``Add``/``Sub`` read only by each other:
  ``(y1 + y2) - y3``) with each ``yi`` a layer output read only by its node (same shape as
  the sum, so nothing broadcasts): ``BN(y1 + ... + yn) = (s*y1 + t) + s*y2 + ... + s*yn``
  (:func:`bnfold.algebra.split_sum`), a subtracted ``yi`` alike: every summand's layer is
  scaled, the shift goes into the leftmost one's bias (no subtraction negates it). Exact for
  every input.
* ``BN(Concat(y1, ..., yn))`` on the BN's channel axis: the BN acts on each input's channel
  slice independently, ``BN(cat(y1, y2)) = cat(BN[:c1](y1), BN[c1:](y2))``
  (:func:`bnfold.algebra.slice_bn`), so each slice folds into its layer (forward rules of
  :mod:`.forward`). When exactly one input is not a foldable layer, the others fold and a
  ``BatchNormalization`` over that input's slice only is left in its place (smaller than the
  whole BN); with more such inputs the whole BN is kept, with the reason (naming the first
  two: the plans of the inputs after them are not made, which in a DenseNet, where each
  concat reads every earlier layer of its block, would make the cost quadratic).

* ``BN(Concat(y1, ..., yn))`` on another axis (batch, spatial): each ``yi`` holds every
  channel and its layer takes the whole BN (:func:`_off_axis_concat`).

Between the sum or concat and the BN there may be eval-mode no-ops (:mod:`.noops`).
"""

from __future__ import annotations

import numpy as np

from bnfold.algebra import BNParams, round_to, slice_bn, split_sum
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name
from bnfold.passes.onnx.consts import make_tensor
from bnfold.passes.onnx.forward import layer_fold, remove
from bnfold.passes.onnx.layers import is_default
from bnfold.passes.onnx.noops import is_noop
from bnfold.passes.onnx.rules import Context, Fold, sole_reader
from bnfold.passes.onnx.shapes import UNKNOWN
from bnfold.passes.onnx.sites import Site

_SUMS = ("Add", "Sub")


def structure_fold(site: Site, ctx: Context) -> Fold | str | None:
    """Plan a split fold of ``site``; ``None`` when its input is not a sum or concat."""
    value, reader = site.x, site.nodes[0]
    node = value.producer()
    while node is not None and is_noop(node, ctx) and not sole_reader(value, "", reader):
        reader, value = node, node.inputs[0]
        assert value is not None
        node = value.producer()
    if node is None or not is_default(node) \
            or node.op_type not in ("Add", "Sub", "Concat"):
        return None
    if node.op_type in _SUMS and any(v is None or ctx.consts.is_constant(v)
                                     for v in node.inputs):
        return None  # a layer's bias (the forward rules' case), not a sum of layers
    why = sole_reader(value, display_name(node), reader)
    if why:
        return why
    if node.op_type in _SUMS:
        return _sum(site, node, ctx)
    return _concat(site, node, ctx)


def _sum(site: Site, add: ir.Node, ctx: Context) -> Fold | str:
    out = ctx.dims(add.outputs[0])
    summands = _summands(add, ctx)
    folds = []
    for (reader, index, v), params in zip(summands, split_sum(site.params, len(summands)),
                                          strict=True):
        if out is None or ctx.dims(v) != out:
            return (f"its input is the sum {display_name(add)}, whose summand {v.name!r} "
                    f"does not have the sum's (known) shape")
        fold = layer_fold(Site([reader], v, params, site.kind, site.axis, index), ctx)
        if isinstance(fold, str):
            return f"its input is the sum {display_name(add)}; for summand {v.name!r}: {fold}"
        folds.append(fold)

    def apply() -> None:
        for fold in folds:
            fold.apply()
        remove(site, ctx)

    return Fold(folds[0].into, "forward", apply, [f.into for f in folds[1:]])


def _summands(add: ir.Node, ctx: Context) -> list[tuple[ir.Node, int, ir.Value]]:
    """The summands of the tree of ``Add``/``Sub`` nodes under ``add`` (``(a + b) + c``, as
    exporters write a sum of three): ``(reader, input index, value)`` for each, leftmost
    first (no subtraction negates it: it takes the shift), an input that is itself an
    ``Add``/``Sub`` of no constant, read by this one only, taken apart."""
    summands: list[tuple[ir.Node, int, ir.Value]] = []
    stack = [(add, iter(enumerate(add.inputs)))]
    while stack:
        node, inputs = stack[-1]
        step = next(inputs, None)
        if step is None:
            stack.pop()
            continue
        index, value = step
        assert value is not None  # (structure_fold: no input of a sum is missing)
        inner = value.producer()
        if inner is not None and is_default(inner) and inner.op_type in _SUMS \
                and not sole_reader(value, "", node) and all(
                    v is not None and not ctx.consts.is_constant(v) for v in inner.inputs):
            stack.append((inner, iter(enumerate(inner.inputs))))
        else:
            summands.append((node, index, value))
    return summands


def _concat(site: Site, concat: ir.Node, ctx: Context) -> Fold | str:
    out = ctx.dims(concat.outputs[0])
    if out is None:
        return f"the rank of {display_name(concat)}'s output is {UNKNOWN}"
    axis = concat.attributes.get_int("axis", 0) % len(out)
    if axis != site.axis:
        return _off_axis_concat(site, concat, axis, ctx)
    folds: list[Fold] = []
    kept: list[tuple[int, BNParams, str]] = []
    start = 0
    for i, v in enumerate(concat.inputs):
        dims = None if v is None else ctx.dims(v)
        if v is None or dims is None or dims[axis] is None:
            return f"the channel count of an input of {display_name(concat)} is {UNKNOWN}"
        params = slice_bn(site.params, start, start + dims[axis])
        start += dims[axis]
        fold = layer_fold(Site([concat], v, params, site.kind, site.axis, i), ctx)
        if isinstance(fold, str):
            kept.append((i, params, f"{v.name!r}: {fold}"))
            if len(kept) == 2:  # the BN stays whole: the other inputs need no plan
                break
        else:
            folds.append(fold)
    if len(kept) < 2 and start != site.params.channels:
        return (f"{display_name(concat)} concatenates {start} channels but {site.what} has "
                f"{site.params.channels}")
    if len(kept) > 1 or not folds:
        why = "; ".join(k[2] for k in kept)
        count = "2 or more" if len(kept) == 2 and kept[1][0] < len(concat.inputs) - 1 \
            else str(len(kept))
        return (f"its input is the concat {display_name(concat)} of which {count} inputs "
                f"are not foldable layers ({why}); BNs over their slices would not be fewer "
                "than the whole BN, kept whole")
    name = site.name
    # the BN's own parameter type; else the concat's element type, which ONNX's Concat
    # shares among its inputs: a folded layer's weight has it when no value declares it
    dtype = np.asarray(site.params.mean).dtype if site.kind == "BatchNormalization" else next(
        (v.dtype.numpy() for v in (*concat.inputs, *concat.outputs, *(
            f.into.inputs[1] for f in folds if len(f.into.inputs) > 1))
         if v is not None and v.dtype is not None), None)
    if kept and dtype is None:
        return (f"its input is the concat {display_name(concat)} of which input "
                f"{kept[0][2]}; a BN over that slice needs the concat's element type, which "
                f"is {UNKNOWN}")

    def apply() -> None:
        for fold in folds:
            fold.apply()
        if kept:
            index, params, _ = kept[0]
            assert dtype is not None
            _insert_slice_bn(concat, index, params, name, dtype, ctx)
        remove(site, ctx)

    reason = None
    if kept:
        reason = (f"split over {display_name(concat)}: its other channels folded into "
                  f"{', '.join(display_name(f.into) for f in folds)}; kept as a smaller "
                  f"BatchNormalization over the channels of input {kept[0][2]}")
    return Fold(folds[0].into, "forward", apply, [f.into for f in folds[1:]], kept=reason)


def _off_axis_concat(site: Site, concat: ir.Node, axis: int, ctx: Context) -> Fold | str:
    """Fold a BN over ``concat`` along a non-channel ``axis`` (a batch of siamese branches, a
    spatial concat): every input holds all channels, ``BN(cat(y1, y2)) = cat(BN(y1), BN(y2))``
    with the whole ``s, t`` each, so each distinct input's layer takes them all (an input read
    twice folds once). Exact for every input; kept whole unless every input folds."""
    folds: list[Fold] = []
    seen: list[ir.Value] = []
    for i, v in enumerate(concat.inputs):
        if v is None or any(v is u for u in seen):
            continue
        seen.append(v)
        repeated = sum(u is v for u in concat.inputs) > 1
        fold = layer_fold(Site([concat], v, site.params, site.kind, site.axis, i), ctx,
                          repeated=repeated)
        if isinstance(fold, str):
            return (f"its input is {display_name(concat)} on axis {axis} (not the channel "
                    f"axis {site.axis}: each input takes the whole BN), whose input "
                    f"{v.name!r} does not fold: {fold}")
        folds.append(fold)
    if not folds:
        return f"{display_name(concat)} has no input"

    def apply() -> None:
        for fold in folds:
            fold.apply()
        remove(site, ctx)

    return Fold(folds[0].into, "forward", apply, [f.into for f in folds[1:]])


def _insert_slice_bn(concat: ir.Node, index: int, params: BNParams, name: str,
                     dtype: np.dtype, ctx: Context) -> None:
    """Put ``BatchNormalization(params)`` (named ``name``, parameters in ``dtype``: the BN's
    own, else the concat's element type) on ``concat``'s input ``index``."""
    x = concat.inputs[index]
    assert x is not None
    inputs = [x]
    gamma = np.ones(params.channels) if params.gamma is None else params.gamma
    beta = np.zeros(params.channels) if params.beta is None else params.beta
    for part, arr in (("scale", gamma), ("B", beta), ("mean", params.mean),
                      ("var", params.var)):
        label = ctx.namer.fresh(f"{name}_slice_{part}")
        tensor = make_tensor(round_to(np.asarray(arr, np.float64), dtype), label)
        value = ir.Value(name=label, const_value=tensor, shape=ir.Shape(tensor.shape),
                         type=ir.TensorType(tensor.dtype))
        ctx.graph.register_initializer(value)
        inputs.append(value)
    attrs = [ir.AttrFloat32("epsilon", params.eps)]
    if ctx.opset <= 6:
        attrs.append(ir.AttrInt64("is_test", 1))
    bn = ir.Node("", "BatchNormalization", inputs, attrs, name=name)
    out = bn.outputs[0]
    out.name = ctx.namer.fresh(f"{x.name}_bn")
    out.type, out.shape = x.type, x.shape
    ctx.graph.insert_before(concat, bn)
    concat.replace_input_with(index, out)
