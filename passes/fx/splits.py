"""A BN after a channel concat or a sum of layer outputs: split it over the layers.

* ``BN(cat([y1, y2, ...], dim=channel))``: a BN acts on each channel alone, so it is the
  concat of the BN's per-input slices, ``cat([BN[:c1](y1), BN[c1:c1+c2](y2), ...])``
  (:func:`bnfold.algebra.slice_bn`). Each input that is a foldable layer read only by the
  concat takes its slice (a forward fold); exactly one other input keeps a BN over its slice
  only (smaller than the whole BN); with several such inputs the whole BN is kept, since
  one BN per slice would not be smaller.
* ``BN(y1 + y2 + ...)`` with every summand a layer read only by the sum:
  ``s * (y1 + y2) + t = (s * y1 + t) + s * y2`` (:func:`bnfold.algebra.split_sum`): every
  layer is scaled, the first also takes the shift. Differences split alike,
  ``s * (y1 - y2) + t = (s * y1 + t) - s * y2``: the shift goes to the leftmost summand.

Both are exact whenever the layers' channel axis is the BN's (and, for a concat, the concat's
axis); the rules check it like the forward fold does. An input may reach its layer through
the ops the forward fold looks through (FPN's ``lateral + interpolate(top)``, a concat of
a conv and an average pool of a conv): a per-channel op ``P`` that passes ``s*y + t``
(:mod:`.channelwise`) passes ``s*y`` too, so ``s*(y1 + P(y2)) + t = (s*y1 + t) +
P(s*y2)``. A BN-like affine chain splits the same way, except that a slice of it is never
written as a kept BN (its constants are float64). This module only matches and plans; the
fold pass writes the plan (:mod:`bnfold.passes.fx.fold`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from bnfold.algebra import BNParams, Folded, fold_forward, slice_bn, split_sum
from bnfold.passes.fx.axes import node_arg, shared_on_path, to_layer, value_users
from bnfold.passes.fx.sites import BatchNormSite, LayerSite, is_layer, layer_site, to_numpy
from bnfold.passes.fx.trace import shape_of

aten = torch.ops.aten
_CATS = {torch.cat, torch.concat, torch.concatenate, aten.cat.default}
# ``a - b`` splits like ``a + b``: ``s*(a - b) + t = (s*a + t) - s*b``, the shift going to the
# leftmost summand, which no subtraction negates
_SUMS = {operator.add, torch.add, aten.add.Tensor, operator.sub, torch.sub, aten.sub.Tensor,
         aten.add_.Tensor, aten.sub_.Tensor}  # (in place: timm's ``y += branch`` in a program)
_SUM_METHODS = {"add", "sub"}

# (layer, the ops from it to the split) -> why the BN does not pass back through them onto
# the layer's channel axis (None: it does at every rank)
AxisCheck = Callable[[LayerSite, list[fx.Node]], "str | None"]


@dataclass
class SplitPlan:
    """Folds for each layer of a concat or sum, and the one input that keeps a BN slice."""

    kind: str  # "concat" | "add"
    folds: list[tuple[LayerSite, Folded]] = field(default_factory=list)
    # the input that keeps a BN slice: node, its BN, channel start and stop, why
    kept: tuple[fx.Node, BNParams, int, int, str] | None = None


def is_split_point(node: fx.Node) -> bool:
    """True for a concat or a two-operand sum or difference (``a + b``, ``torch.add``,
    ``a.sub(b)``, ``aten.add.Tensor``...)."""
    if node.op == "call_function" and node.target in _CATS:
        return True
    return _is_add(node)


def _is_add(node: fx.Node) -> bool:
    plain = (node.op == "call_function" and node.target in _SUMS) or (
        node.op == "call_method" and node.target in _SUM_METHODS)
    return plain and not node.kwargs and len(node.args) == 2 and all(
        isinstance(a, fx.Node) for a in node.args)


def plan_split(gm: fx.GraphModule, site: BatchNormSite, point: fx.Node, ranks: set[int],
               axis_check: AxisCheck) -> SplitPlan | str:
    """Plan the split of the BN at ``site`` over the concat or sum ``point``, or say why not.

    ``ranks`` are the ranks ``point`` can have (one with recorded shapes).
    """
    others = [u.name for u in value_users(point) if u is not site.node]
    if others:
        return f"{point.name} also feeds {', '.join(others)}"
    if _is_add(point):
        return _plan_add(gm, site, point, axis_check)
    return _plan_concat(gm, site, point, ranks, axis_check)


def _foldable(gm: fx.GraphModule, node: fx.Node, reader: fx.Node,
              axis_check: AxisCheck) -> LayerSite | str:
    """The layer feeding ``node`` (directly, or through the data-movement and per-channel
    ops the forward fold looks through, :func:`to_layer`) when it can take a share of the
    BN, else why not."""
    x, chain = to_layer(gm, node)
    if not is_layer(gm, x):
        through = f" (before {', '.join(c.name for c in chain)})" if chain else ""
        return f"{x.name} is not a conv/linear{through}"
    path = [x, *chain]
    if x.op == "call_module":  # (checked first: a module's label is its path)
        shared = shared_on_path(str(x.target), path, reader)
        if shared:
            return shared
    layer = layer_site(gm, x)
    if isinstance(layer, str):
        return layer
    shared = shared_on_path(layer.label, path, reader)
    if shared:
        return shared
    if sum(a is node for a in _operands(reader)) != 1:
        return f"{node.name} is read twice by {reader.name}" if chain else \
            f"{layer.label} output is read twice by {reader.name}"
    return axis_check(layer, chain) or layer


def _operands(node: fx.Node) -> list[fx.Node]:
    if _is_add(node):
        return list(node.args)  # type: ignore[arg-type]
    tensors = node_arg(node, 0, "tensors")
    return [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) \
        else []


def _plan_add(gm: fx.GraphModule, site: BatchNormSite, add: fx.Node,
              axis_check: AxisCheck) -> SplitPlan | str:
    summands = _summands(add)
    layers = []
    for node, reader in summands:
        broadcast = _rank_change(node, add)
        if broadcast:
            return f"its input is the sum {add.name}, and summand {broadcast}"
        layer = _foldable(gm, node, reader, axis_check)
        if isinstance(layer, str):
            return f"its input is the sum {add.name}, and summand {layer}"
        layers.append(layer)
    plan = SplitPlan("add")
    for layer, part in zip(layers, split_sum(site.params, len(layers)), strict=True):
        plan.folds.append((layer, _fold(layer, part)))
    return plan


def _rank_change(node: fx.Node, add: fx.Node) -> str | None:
    """Why summand ``node`` of the sum ``add`` is not aligned with it axis for axis: it has
    another rank (broadcasting lines up the last dims, so its channel axis is not the sum's).
    Unknown shapes (no example inputs) are left to the rank checks of the fold."""
    mine, sums = shape_of(node), shape_of(add)
    if mine is None or sums is None or len(mine) == len(sums):
        return None
    return (f"{node.name} has rank {len(mine)} and the sum rank {len(sums)}: broadcast, its "
            "channel axis is not the sum's")


def _summands(add: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """``(summand, the add reading it)``, through nested adds read only by the next; the
    leftmost first (the one summand no subtraction negates, which takes the shift)."""
    out = []
    for arg in _operands(add):
        if _is_add(arg) and len(arg.users) == 1:
            out.extend(_summands(arg))
        else:
            out.append((arg, add))
    return out


def _plan_concat(gm: fx.GraphModule, site: BatchNormSite, cat: fx.Node, ranks: set[int],
                 axis_check: AxisCheck) -> SplitPlan | str:
    inputs = _operands(cat)
    dim = node_arg(cat, 1, "dim", 0)
    if not inputs or len(inputs) != len(node_arg(cat, 0, "tensors")) or not isinstance(dim, int):
        return f"its input is the concat {cat.name}, whose inputs or axis are not plain"
    bad = [r for r in ranks if site.channel_axis(r) is not None
           and site.channel_axis(r) != dim % max(r, 1)]
    if bad or not ranks:
        return f"its input is the concat {cat.name} along dim {dim}, not the BN's channel " \
               "axis" if ranks else f"the rank of the concat {cat.name} is unknown"
    layers = [_foldable(gm, node, cat, axis_check) for node in inputs]
    sizes = [_channels(node, layer, dim) for node, layer in zip(inputs, layers, strict=True)]
    rest = [i for i, layer in enumerate(layers) if isinstance(layer, str)]
    if len(rest) == len(inputs):
        return f"its input is the concat {cat.name}, and no input of it is a foldable " \
               f"layer ({layers[0]})"
    if len(rest) > 1:
        return f"its input is the concat {cat.name}, and {len(rest)} of its inputs are not " \
               f"foldable layers ({'; '.join(str(layers[i]) for i in rest)}): a BN for each " \
               "of their slices would not be smaller than the one BN"
    if rest and sizes[rest[0]] is None:
        known = [s for i, s in enumerate(sizes) if i != rest[0]]
        sizes[rest[0]] = site.params.channels - sum(s or 0 for s in known)
    if None in sizes or sum(sizes) != site.params.channels or (rest and sizes[rest[0]] < 1):
        return f"the channels of the concat {cat.name} do not add up to the BN's"
    if rest and site.chain:
        return f"its input is the concat {cat.name}, and {inputs[rest[0]].name} would keep " \
               "a slice of this affine chain, which bnfold writes only as a BatchNorm"
    if rest and site.channel_axis(max(ranks)) != 1:
        return f"its input is the concat {cat.name}: the slice over {inputs[rest[0]].name} " \
               "would need a BN over a channel axis other than 1"
    plan = SplitPlan("concat")
    start = 0
    for node, layer, size in zip(inputs, layers, sizes, strict=True):
        part = slice_bn(site.params, start, start + size)
        if isinstance(layer, str):
            plan.kept = (node, part, start, start + size, layer)
        else:
            plan.folds.append((layer, _fold(layer, part)))
        start += size
    return plan


def _channels(node: fx.Node, layer: LayerSite | str, dim: int) -> int | None:
    """How many channels ``node`` brings to the concat (recorded shape, else the layer's)."""
    shape = shape_of(node)
    if shape is not None and len(shape) > dim % max(len(shape), 1):
        return shape[dim]
    if isinstance(layer, str):
        return None
    return layer.out_channels


def _fold(layer: LayerSite, bn: BNParams) -> Folded:
    """Fold ``bn`` into ``layer`` forward (raises :class:`UnsafeFoldError` when not exact)."""
    return fold_forward(
        to_numpy(layer.weight), None if layer.bias is None else to_numpy(layer.bias), bn,
        out_axis=layer.weight_out_axis, groups=layer.groups,
    )

