"""BN-like sites of an ONNX graph: a ``BatchNormalization`` node, or a chain of constant
``Mul``/``Add``/``Sub``/``Div`` nodes that computes the same per-channel ``x * a + b``.

TorchScript exports of torchvision's ``FrozenBatchNorm2d``, tf2onnx's BN, input
normalization ``(x - mean) / std`` and ``(x - m) * rsqrt(v + eps) * g + b`` are BatchNorms
in all but name. A chain is a run of nodes ``x op c`` (``c op x`` for ``Add``/``Mul``/``Sub``
too; ``c / x`` is not affine) whose other operand ``c`` is a constant
(:class:`~bnfold.passes.onnx.consts.Constants`: ``Reshape``/``Unsqueeze``/``Sqrt``/
``Reciprocal``... of initializers are evaluated), each node but the last read only by the
next. Its constants are composed in float64 by :func:`bnfold.algebra.compose_affine` into
``x * a + b`` and presented to the fold rules as the BN :func:`bnfold.algebra.affine_bn`
(``s, t`` exactly ``a, b``), so every rule folds it exactly.

The channel axis is where the constants vary (:func:`bnfold.algebra.broadcast_of`): a
``[C, 1, 1]`` constant on a rank-4 ``x`` is axis 1. A chain is a site when it holds a ``Mul``
or ``Div`` (a lone ``Add`` after a MatMul is that layer's bias) and a constant of rank >= 1
(rank-0 constants are Python numbers in the exported code, like ``x * 0.5``: not a BN
spelling). A chain of one value for every channel is kept with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.algebra import BNParams, affine_bn, broadcast_of, compose_affine
from bnfold.errors import UnsafeFoldError
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import display_name
from bnfold.passes.onnx.consts import Constants, data_uses
from bnfold.passes.onnx.layers import is_default
from bnfold.passes.onnx.rules import Context
from bnfold.passes.onnx.shapes import UNKNOWN

_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


@dataclass
class Site:
    """``y = s * x + t`` per channel on ``axis`` of ``x``, computed by ``nodes`` (in order:
    ``nodes[0]`` reads ``x``, ``nodes[-1]`` writes ``y``); ``kind`` is what the report calls
    it (``BatchNormalization``, ``affine Mul+Add``)."""

    nodes: list[ir.Node]
    x: ir.Value
    params: BNParams
    kind: str = "BatchNormalization"
    axis: int = 1
    x_index: int = 0  # which input of nodes[0] is x

    @property
    def y(self) -> ir.Value:
        return self.nodes[-1].outputs[0]

    def current_x(self) -> ir.Value:
        """What ``nodes[0]`` reads as ``x`` now (a rewrite before it may have renewed it)."""
        value = self.nodes[0].inputs[self.x_index]
        assert value is not None
        return value

    @property
    def name(self) -> str:
        return display_name(self.nodes[0])

    @property
    def what(self) -> str:
        """``"the BN"`` or ``"the affine Mul+Add"``, for reasons."""
        return "the BN" if self.kind == "BatchNormalization" else f"the {self.kind}"


@dataclass(frozen=True)
class _Step:
    node: ir.Node
    x: ir.Value
    c: ir.Value
    c_first: bool


def _step(node: ir.Node, consts: Constants) -> _Step | None:
    if node.op_type not in _AFFINE_OPS or not is_default(node) \
            or len(node.inputs) != 2 or None in node.inputs:
        return None
    a, b = node.inputs
    assert a is not None and b is not None
    if consts.is_constant(b) and not consts.is_constant(a):
        return _Step(node, a, b, False)
    if consts.is_constant(a) and not consts.is_constant(b) and node.op_type != "Div":
        return _Step(node, b, a, True)
    return None


def affine_chains(graph: ir.Graph, consts: Constants) -> list[list[_Step]]:
    """Maximal chains of constant affine steps in ``graph`` (each a candidate site)."""
    steps = {node: s for node in graph if (s := _step(node, consts)) is not None}
    chains = []
    for step in steps.values():
        producer = step.x.producer()
        if producer in steps and _single_reader(step.x):
            continue  # not the head of its chain
        chain = [step]
        while _single_reader(chain[-1].node.outputs[0]):
            user = data_uses(chain[-1].node.outputs[0])[0].node
            nxt = steps.get(user)
            if nxt is None or nxt.x is not chain[-1].node.outputs[0]:
                break
            chain.append(nxt)
        if any(s.node.op_type in ("Mul", "Div") for s in chain):
            chains.append(chain)
    return chains


def _single_reader(value: ir.Value) -> bool:
    return not value.is_graph_output() and len(data_uses(value)) == 1


def affine_site(chain: list[_Step], ctx: Context) -> Site | str | None:
    """The chain as a :class:`Site`, a reason to keep it, or ``None`` if not BN-like."""
    values, where = [], []
    for s in chain:
        arr = ctx.consts.array(s.c)
        if isinstance(arr, str):
            return None
        if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
            return None
        b = broadcast_of(arr.shape)
        if b is None:
            return None  # varies on several axes (a positional embedding...): not a BN
        values.append(arr)
        where.append(b)
    if all(b.rank == 0 for b in where):
        return None  # Python numbers only
    kind = "affine " + "+".join(s.node.op_type for s in chain)
    channel = {(b.from_end, b.channels) for b in where if b.from_end is not None}
    if not channel:
        return (f"{kind}: a scalar affine (one value for every channel) is not a per-channel "
                "normalization; kept as written")
    if len(channel) > 1:
        return None
    (from_end, channels), = channel
    dims = ctx.dims(chain[0].x)
    if dims is None:
        return f"{kind}: the rank of its input is {UNKNOWN}"
    if max(b.rank for b in where) > len(dims):
        return f"{kind}: a constant has higher rank than its input (it broadcasts the input)"
    try:
        a, b = compose_affine([(s.node.op_type.lower(), np.asarray(v), s.c_first)
                               for s, v in zip(chain, values, strict=True)], channels)
    except UnsafeFoldError as exc:
        return f"{kind}: {exc}"
    return Site([s.node for s in chain], chain[0].x, affine_bn(a, b), kind,
                len(dims) + from_end, int(chain[0].c_first))
