"""BN-like affine chains in an FX graph: ``x * a + b`` written out with arithmetic.

torchvision's ``FrozenBatchNorm2d`` (``x * scale + bias`` with ``scale = w * (rv +
eps).rsqrt()``), input normalization ``(x - mean) / std``, ``(x - m) * rsqrt(v + eps) * g + b``
are BatchNorms in all but name. A chain is a run of nodes ``x op c`` (``op`` in
add/sub/mul/div, ``c - x`` and ``c + x``/``c * x`` too) with ``c`` constant
(:class:`~bnfold.passes.fx.constants.Constants`: computed only from the model's tensors), each
node but the last read only by the next; in place too (``x.mul_(c).add_(d)``, as some
FrozenBatchNorm2d variants write it), which is ``x * c + d`` exactly when nothing else sees the
write: no other reader of ``x`` or of a tensor ``x`` is a view of, none a graph input or model
tensor (else the chain is kept with the reason). Its constants are evaluated in float64 and composed
by :func:`bnfold.algebra.compose_affine` into ``x * a + b``, then presented to the fold rules
as the BN ``mean 0, var 1, eps 0, gamma a, beta b`` (:func:`bnfold.algebra.affine_bn`), whose
``s, t`` are exactly ``a, b``: every BN rule (forward, backward, splits) folds it exactly.

The channel axis is where the constants vary, by right-aligned broadcasting
(:func:`bnfold.algebra.broadcast_of`): a ``[C, 1, 1]`` constant is on axis ``rank - 3`` of a
rank-``rank`` input (axis 1 of ``[N, C, H, W]``); the fold rules then check it is the layer's
channel axis. A chain whose tensor constants are all scalars is kept with the reason (one
value for all channels is not a per-channel normalization); a chain of Python numbers only
(``x * 0.5``) or with a constant varying on several axes (a positional embedding) is not
BN-like and not reported. A chain whose constants vary along different axes one after the other
(``y * a_c + b_w``: channels, then width) is as many chains, one per axis, each reported
(the per-channel one folds where it can, the other is kept with the reason).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from bnfold.algebra import Broadcast, affine_bn, broadcast_of, compose_affine
from bnfold.errors import UnsafeFoldError
from bnfold.passes.fx.axes import value_users
from bnfold.passes.fx.constants import (
    Constants,
    NotConstant,
    alias_source,
    owner_label,
    returns_alias,
)
from bnfold.passes.fx.sites import BatchNormSite, is_layer

aten = torch.ops.aten
_OPS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
    aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul",
    aten.div.Tensor: "div",  # (torch.export graphs)
}
_METHOD_OPS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}
#: The in-place forms (``x.mul_(a)``: FrozenBatchNorm2d variants), which write into ``x``.
_INPLACE_OPS: dict[Any, str] = {aten.add_.Tensor: "add", aten.sub_.Tensor: "sub",
                                aten.mul_.Tensor: "mul", aten.div_.Tensor: "div"}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


@dataclass
class AffineChain:
    """One BN-like chain: its site (or why it is kept), report label and kind."""

    head: fx.Node
    site: BatchNormSite | str
    label: str
    kind: str  # "affine mul+add"


@dataclass
class _Step:
    node: fx.Node
    op: str
    x: fx.Node
    c: Any  # a constant node or a Python number
    c_first: bool
    inplace: bool = False  # (x.mul_(c): the result is x, written)


def affine_chains(gm: fx.GraphModule, consts: Constants) -> dict[fx.Node, AffineChain]:
    """Every BN-like affine chain of ``gm``, by its first node."""
    chains: list[list[_Step]] = []
    tail: dict[fx.Node, list[_Step]] = {}
    for node in gm.graph.nodes:
        step = _step(node, consts)
        if step is None:
            continue
        prev = tail.pop(step.x, None)
        if prev is not None and len(step.x.users) == 1:
            prev.append(step)
        else:
            prev = [step]
            chains.append(prev)
        tail[node] = prev
    found = {}
    for steps in chains:
        for run in _runs(steps, consts):
            chain = _describe(gm, run, consts)
            if chain is not None:
                found[chain.head] = chain
    return found


def _runs(steps: list[_Step], consts: Constants) -> list[list[_Step]]:
    """``steps`` cut where a constant varies along another axis than the one before it
    (scalars go with the run they are in); one run when that cannot be told."""
    runs: list[list[_Step]] = [[]]
    axis = None
    for step in steps:
        try:
            v = consts.value(step.c)
        except NotConstant:
            return [steps]
        where = broadcast_of(tuple(v.shape)) if isinstance(v, torch.Tensor) else None
        here = None if where is None or where.from_end is None else (
            where.from_end, where.channels)
        if here is not None and axis is not None and here != axis:
            runs.append([])
        axis = here or axis
        runs[-1].append(step)
    return runs


def _step(node: fx.Node, consts: Constants) -> _Step | None:
    if node.op == "call_function":
        op, inplace = _OPS.get(node.target), node.target in _INPLACE_OPS
        op = op or _INPLACE_OPS.get(node.target)
    elif node.op == "call_method":
        op, inplace = _METHOD_OPS.get(str(node.target)), str(node.target) in _INPLACE_METHODS
        op = op or _INPLACE_METHODS.get(str(node.target))
    else:
        return None
    if op is None or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and not consts.is_constant(a) and consts.is_constant(b):
        return _Step(node, op, a, b, False, inplace)
    if isinstance(b, fx.Node) and not consts.is_constant(b) and consts.is_constant(a) \
            and not inplace:
        return _Step(node, op, b, a, True)
    return None


def _inplace_refusal(gm: fx.GraphModule, head: _Step) -> str | None:
    """Why a chain whose first step writes into its input (``x.mul_(a)``) is no plain affine
    of ``x``: it changes ``x`` for every other reader of ``x``, or of a tensor ``x`` is a view
    of (or written in place from), and for the caller when that is a graph input or a model
    tensor. The walk back ends at a tensor the write could still be shared through unless
    it is new (:func:`_fresh`): ``Identity``, an eval ``Dropout``, ``nn.ReLU(inplace=True)``
    and ``.to``/``.float`` of the same dtype return their input itself, unseen as views, so
    any other producer keeps the chain. None: nothing else sees the write, so the chain
    computes ``x * a + b`` exactly."""
    reader, x = head.node, head.x
    while True:
        if x.op in ("placeholder", "get_attr"):
            what = "a graph input" if x.op == "placeholder" else "a model tensor"
            return f"{head.node.name} writes in place into {x.name} ({what}): the caller " \
                   "would see the write, which a fold removes"
        others = [u.name for u in value_users(x) if u is not reader]
        if others:
            return f"{head.node.name} writes in place into {x.name}, which " \
                   f"{', '.join(others)} also read: not a plain affine of it"
        source = alias_source(gm, x)
        if source is None:
            return None if _fresh(gm, x) else (
                f"{head.node.name} writes in place into {x.name}, which is no conv/linear "
                "output and may be another tensor itself (the fold would drop a write other "
                "readers of it see)")
        reader, x = x, source


def _fresh(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s result is a new tensor: a conv/linear's, or an ATen op's whose schema
    returns no alias of an argument (``torch.export`` graphs)."""
    if is_layer(gm, node):
        return True
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
        and not returns_alias(target)


def _describe(gm: fx.GraphModule, steps: list[_Step], consts: Constants) -> AffineChain | None:
    """The chain as a BN site, a reason to keep it, or None when it is not BN-like."""
    values, shapes, dtypes = [], [], set()
    for s in steps:
        try:
            v = consts.value(s.c)
        except NotConstant:
            return None
        if isinstance(v, torch.Tensor):
            shape = broadcast_of(tuple(v.shape))
            if shape is None or not v.is_floating_point():
                return None
            shapes.append(shape)
            dtypes.add(consts.dtype(s.c))
            v = v.reshape(-1).numpy()
        elif not isinstance(v, (int, float)):
            return None
        values.append(v)
    if not shapes:
        return None  # Python numbers only: not a BN spelling
    head = steps[0].node
    kind = "affine " + "+".join(s.op for s in steps)
    label = owner_label(head, [s.c for s in steps])
    channel = [b for b in shapes if b.from_end is not None]
    if not channel:
        return AffineChain(head, "a scalar affine (one value for every channel) is not a "
                                 "per-channel normalization; kept as written", label, kind)
    if len({(b.from_end, b.channels) for b in channel}) > 1:
        return None  # constants varying on different axes: not one per-channel affine
    written = _inplace_refusal(gm, steps[0]) if steps[0].inplace else None
    if written:
        return AffineChain(head, written, label, kind)
    if len(dtypes) > 1:
        return AffineChain(head, f"its constants mix dtypes {sorted(map(str, dtypes))}", label,
                           kind)
    c = channel[0].channels
    try:
        a, b = compose_affine([(s.op, np.asarray(v), s.c_first)
                               for s, v in zip(steps, values, strict=True)], c)
    except UnsafeFoldError as exc:
        return AffineChain(head, str(exc), label, kind)
    site = BatchNormSite(
        head, steps[-1].node, _rule(channel[0], max(s.rank for s in shapes)), affine_bn(a, b),
        [], source=int(steps[0].c_first), chain=tuple(s.node for s in steps),
        dtype=dtypes.pop(),
    )
    return AffineChain(head, site, label, kind)


def _rule(where: Broadcast, min_rank: int) -> Any:
    """Channel axis at each input rank: ``rank + from_end`` when the constants do not
    broadcast the input to a higher rank."""
    assert where.from_end is not None
    return lambda rank: rank + where.from_end if rank >= max(min_rank, 1) else None
