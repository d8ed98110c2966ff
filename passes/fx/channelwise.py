"""Ops that act on each channel alone, which a per-channel affine map passes through.

An op ``P`` that is linear on each channel and keeps a channel's constant (an average, a
nearest or interpolating resample: weights that sum to one) gives ``P(s*y + t) = s*P(y) + t``
per channel, so ``BN(P(layer(x))) = P(layer'(x))`` with the BN folded into the layer: exact.
A max (pooling) commutes with ``s*y + t`` only where ``s >= 0``. The table below says, per op,
over how many trailing dims it works and when the identity holds (as TVM's
``fold_scale_axis`` lets each op declare how a per-channel scale passes through it):

* average pooling: with no padding, or with ``count_include_pad=False`` (a zero pad counted
  in the average would scale ``t`` down at the borders), and no ``divisor_override``;
* adaptive average pooling, ``interpolate`` / ``Upsample`` in every mode (each output is a
  weighted mean of one channel's inputs);
* max pooling and adaptive max pooling: when the BN's scale is ``>= 0`` in every channel,
  and without ``return_indices``;
* reflect, replicate and circular padding (copies of the channel's own values; not a
  constant fill), and slicing of the dims after the channel axis (``x[:, :, :-p]``, TCN's
  ``Chomp1d``);
* a mean over dims after the channel axis (``x.mean((2, 3))``, timm's fast global pool;
  ``keepdim`` or not: without, the rank drops by the dims reduced and the channel axis
  stays), with no ``dtype`` cast: an average of one channel's values;
* a flip of dims after the channel axis (``torch.flip(x, (2, 3))``): an index map within
  each channel.

The same identity read the other way folds ``BN -> P -> layer`` backward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.algebra import BNParams

aten = torch.ops.aten


@dataclass(frozen=True)
class Channelwise:
    """One op kind: ``spatial`` trailing dims it works over (``None``: read off the call, see
    :func:`channelwise_span`), whether it is a max, and its arguments after the input, in
    order."""

    name: str
    spatial: int | None
    is_max: bool = False
    args: tuple[str, ...] = ()
    needs_nc: bool = False  # reads (N, C, spatial...): the channel axis must be 1


_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
        "divisor_override")
_MAX = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_INTERPOLATE = ("size", "scale_factor", "mode", "align_corners")


def _avg(n: int) -> Channelwise:
    return Channelwise(f"avg_pool{n}d", n, args=_AVG)


def _max(n: int) -> Channelwise:
    return Channelwise(f"max_pool{n}d", n, is_max=True, args=_MAX)


def _adaptive(n: int, is_max: bool) -> Channelwise:
    kind = "max" if is_max else "avg"
    return Channelwise(f"adaptive_{kind}_pool{n}d", n, is_max,
                       ("output_size", "return_indices"))


_RESAMPLE = Channelwise("interpolate", None, args=_INTERPOLATE, needs_nc=True)
#: ``x[..., a:b]``: slices only (and at most one ``...``), a copy of part of each channel
_SLICE = Channelwise("slice", None)
_ATEN_SLICE = Channelwise("slice", None, args=("dim", "start", "end", "step"))
#: An ``aten.slice`` end at least this large takes the whole dim (torch.export writes
#: ``x[:, ...]`` on a dynamic dim as ``slice(x, 0, 0, 2**63 - 1)``).
_WHOLE = 2**62
#: ``F.pad``: over ``len(pad) // 2`` trailing dims; exact in the modes that copy the channel's
#: own values (not ``constant``, whose fill value the BN would not see)
_PAD = Channelwise("pad", None, args=("pad", "mode", "value"))


#: ``x.mean(dim, keepdim)``, ``torch.mean``, ``aten.mean.dim``: over the dims it names
_MEAN = Channelwise("mean", None, args=("dim", "keepdim", "dtype"))
#: ``torch.flip(x, dims)``: over the dims it names
_FLIP = Channelwise("flip", None, args=("dims",))
_METHODS: dict[str, Channelwise] = {"mean": _MEAN, "flip": _FLIP}


def _copy_pad(n: int) -> Channelwise:
    return Channelwise(f"pad{n}d", n, args=("padding",))

_MODULES: dict[type, Channelwise] = {
    nn.Upsample: _RESAMPLE, nn.UpsamplingNearest2d: _RESAMPLE,
    nn.UpsamplingBilinear2d: _RESAMPLE,
}
_FUNCTIONS: dict[Any, Channelwise] = {F.interpolate: _RESAMPLE, F.upsample: _RESAMPLE,
                                      F.pad: _PAD, aten.pad.default: _PAD,
                                      torch.mean: _MEAN, aten.mean.dim: _MEAN,
                                      torch.flip: _FLIP, aten.flip.default: _FLIP}
for _n in (1, 2, 3):  # nn.AvgPool2d / F.avg_pool2d, ... for 1-3 spatial dims
    for _module, _kind in (("AvgPool", _avg(_n)), ("MaxPool", _max(_n)),
                           ("AdaptiveAvgPool", _adaptive(_n, False)),
                           ("AdaptiveMaxPool", _adaptive(_n, True))):
        _MODULES[getattr(nn, f"{_module}{_n}d")] = _kind
        _FUNCTIONS[getattr(F, _kind.name)] = _kind
    for _module in ("ReflectionPad", "ReplicationPad", "CircularPad"):
        _MODULES[getattr(nn, f"{_module}{_n}d")] = _copy_pad(_n)
    for _op in ("reflection_pad", "replication_pad", "_pad_circular"):
        if hasattr(aten, f"{_op}{_n}d"):
            _FUNCTIONS[getattr(aten, f"{_op}{_n}d").default] = _copy_pad(_n)
_FUNCTIONS |= {
    aten.avg_pool2d.default: _avg(2), aten.avg_pool3d.default: _avg(3),
    aten.avg_pool1d.default: Channelwise("avg_pool1d", 1, args=_AVG[:5]),
    aten.max_pool1d.default: Channelwise("max_pool1d", 1, True, _MAX[:5]),
    aten.max_pool2d.default: Channelwise("max_pool2d", 2, True, _MAX[:5]),
    aten.max_pool3d.default: Channelwise("max_pool3d", 3, True, _MAX[:5]),
    aten.adaptive_avg_pool1d.default: _adaptive(1, False),
    aten.adaptive_avg_pool2d.default: _adaptive(2, False),
    aten._adaptive_avg_pool2d.default: _adaptive(2, False),
    aten.adaptive_avg_pool3d.default: _adaptive(3, False),
    aten._adaptive_avg_pool3d.default: _adaptive(3, False),
    **{getattr(aten, op).vec: _RESAMPLE for op in (
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
        "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d",
        "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d")},
}


def channelwise_op(gm: fx.GraphModule, node: fx.Node) -> Channelwise | None:
    """The per-channel op ``node`` performs on its first argument, or None."""
    if node.op == "call_module":
        return _MODULES.get(type(gm.get_submodule(str(node.target))))
    if node.op == "call_method":
        op = _METHODS.get(str(node.target))
    elif node.op != "call_function":
        return None
    elif node.target is operator.getitem:
        return _SLICE if _slice_items(node) is not None else None
    elif node.target is aten.slice.Tensor:
        return _ATEN_SLICE if all(isinstance(a, int | None) for a in node.args[1:]) else None
    else:
        op = _FUNCTIONS.get(node.target)
    if op in (_MEAN, _FLIP) and _dims(gm, node, op) is None:
        return None  # (a mean of everything, or dims only known at run time)
    return op


def _dims(gm: fx.GraphModule, node: fx.Node, op: Channelwise) -> tuple[int, ...] | None:
    """The literal dims a mean or flip names (an int or a non-empty list of ints), else
    None (``x.mean()`` and ``dim=[]`` reduce every dim, the channel axis too)."""
    dims = _reader(gm, node, op)(op.args[0], None)
    if isinstance(dims, int):
        return (dims,)
    ok = isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) for d in dims)
    return tuple(dims) if ok else None


def channelwise_rank(gm: fx.GraphModule, node: fx.Node, rank: int) -> int | None:
    """The rank of the per-channel op's output for a rank-``rank`` input: the same, except
    for a mean without ``keepdim``, which drops the dims it reduces (None: a mean or flip
    naming a dim the input lacks raises)."""
    op = channelwise_op(gm, node)
    if op not in (_MEAN, _FLIP):
        return rank
    dims = _dims(gm, node, op)
    assert dims is not None
    if not all(-rank <= d < rank for d in dims):
        return None
    if op is _FLIP or _reader(gm, node, op)("keepdim", False):
        return rank
    return rank - len({d % rank for d in dims})


def pools_to_channels(gm: fx.GraphModule, node: fx.Node, rank: int) -> bool:
    """True when ``node`` is a mean that turns a rank-``rank`` ``(N, C, ...)`` input into
    ``(N, C)``: it reduces every dim after 1, without ``keepdim`` (a global average pool
    and flatten in one: a Linear reading it sees one feature per channel)."""
    op = channelwise_op(gm, node)
    if op is not _MEAN or _reader(gm, node, op)("keepdim", False):
        return False
    dims = _dims(gm, node, op)
    assert dims is not None
    valid = all(-rank <= d < rank for d in dims)
    return valid and sorted(d % rank for d in dims) == list(range(2, rank)) and rank > 2


def _slice_items(node: fx.Node) -> tuple[Any, ...] | None:
    """The index of ``x[index]`` when it is plain slicing (slices of literal bounds and at
    most one ``...``), else None."""
    source = node.args[0] if len(node.args) == 2 else None
    if not isinstance(source, fx.Node) or (source.op, source.target) in (
            ("call_function", getattr), ("call_method", "size")):
        return None  # (a slice of ``x.shape``/``x.size()``, or of no node)
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    plain = all(item is Ellipsis or (isinstance(item, slice) and all(
        isinstance(v, int | None) for v in (item.start, item.stop, item.step)))
        for item in items)
    return items if plain and sum(item is Ellipsis for item in items) <= 1 else None


def channelwise_span(gm: fx.GraphModule, node: fx.Node, rank: int) -> int:
    """How many trailing dims of a rank-``rank`` input the per-channel op at ``node`` works
    over (an ``F.pad``: half its ``pad`` list; a resample: all after ``(N, C)``)."""
    op = channelwise_op(gm, node)
    assert op is not None
    if op is _PAD:
        pad = _reader(gm, node, op)("pad", ())
        return len(pad) // 2 if isinstance(pad, (list, tuple)) else 0
    if op is _SLICE:  # from the first dim a slice narrows to the last
        items = _slice_items(node)
        assert items is not None
        cut = items.index(Ellipsis) if Ellipsis in items else len(items)
        dims = [d for d, item in enumerate(items[:cut]) if item != slice(None)] + [
            rank - len(items) + cut + 1 + j for j, item in enumerate(items[cut + 1:])
            if item != slice(None)]
        return rank - min(dims) if dims else 0
    if op in (_MEAN, _FLIP):  # from the first dim it names to the last
        dims = _dims(gm, node, op)
        assert dims is not None
        if not all(-rank <= d < rank for d in dims):
            return rank + 1  # (it raises at this rank)
        return rank - min(d % rank for d in dims)
    if op is _ATEN_SLICE:
        read = _reader(gm, node, op)
        if read("start", None) in (None, 0) and read("step", 1) in (None, 1) and (
                read("end", None) is None or read("end", None) >= _WHOLE):
            return 0  # (the whole dim, as torch.export writes ``x[:, ...]``: a plain copy)
        dim = read("dim", 0)
        return rank - dim % rank if isinstance(dim, int) and rank else rank + 1
    return rank - 2 if op.spatial is None else op.spatial


def channelwise_refusal(gm: fx.GraphModule, node: fx.Node, params: BNParams) -> str | None:
    """Why an affine map with ``params``' scale does not pass through the per-channel op at
    ``node`` exactly (None: it does; also None for any other node)."""
    op = channelwise_op(gm, node)
    if op is None:
        return None
    arg = _reader(gm, node, op)
    if arg("return_indices", False):
        return f"{node.name} ({op.name}) also returns indices"
    if op.name.startswith("avg_pool"):
        if arg("divisor_override", None) is not None:
            return f"{node.name} ({op.name}) divides by a divisor_override, not the count"
        padding = arg("padding", 0)
        padded = any(padding) if isinstance(padding, (tuple, list)) else bool(padding)
        if padded and arg("count_include_pad", True):
            return (f"{node.name} ({op.name}) counts its zero padding in the average "
                    "(count_include_pad=True): the shift would be scaled at the borders")
    if op is _MEAN and arg("dtype", None) is not None:
        return f"{node.name} (mean) computes in {arg('dtype', None)}, a cast the BN would not see"
    if op is _PAD and arg("mode", "constant") not in ("reflect", "replicate", "circular"):
        return f"{node.name} (pad) fills with a constant, which the BN would not see"
    if op.is_max and bool(np.any(params.scale_shift()[0] < 0)):
        return (f"{node.name} ({op.name}) takes a maximum, which a negative scale of the BN "
                "turns into a minimum")
    return None


def _reader(gm: fx.GraphModule, node: fx.Node, op: Channelwise) -> Any:
    """``arg(name, default)``: the module attribute, or the call's argument by position or
    keyword (the input counting as position 0)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return lambda name, default: getattr(module, name, default)

    def arg(name: str, default: Any) -> Any:
        if name not in op.args:
            return default
        index = op.args.index(name) + 1
        return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)
    return arg
