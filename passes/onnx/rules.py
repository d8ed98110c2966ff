"""What the fold rules share: the context they run in, the fold they return, and checks.

A rule looks at one BN and returns either a :class:`Fold` (every check passed and the new
tensors are already computed, so applying it cannot fail halfway) or a string saying, in
words a user understands, why that BN stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bnfold.lazy_ir import ir
from bnfold.passes.onnx.bn import consumers_text, display_name
from bnfold.passes.onnx.consts import Constants, Namer, data_uses
from bnfold.passes.onnx.shapes import Dims, Shapes


@dataclass
class Context:
    """Where a rule runs: the graph, the default-domain opset, names, shapes, constants,
    released values."""

    graph: ir.Graph
    opset: int
    namer: Namer
    shapes: Shapes
    consts: Constants
    released: list[ir.Value] = field(default_factory=list)

    def dims(self, value: ir.Value | None) -> Dims | None:
        """Static dims of ``value`` (``None`` for symbolic ones; ``None`` if rank unknown)."""
        return None if value is None else self.shapes.dims(self.graph, value)


@dataclass
class Fold:
    """A checked fold: ``apply()`` rewrites the graph (removing the BN)."""

    into: ir.Node
    direction: str
    apply: Callable[[], None]
    also: list[ir.Node] = field(default_factory=list)  # further layers folded into
    kept: str | None = None  # a partial fold: why a (smaller) BN stays in the site's place


def constant(ctx: Context, value: ir.Value | None, what: str, layer: ir.Node
             ) -> np.ndarray | str:
    """The array behind ``value`` or why the layer's ``what`` cannot be folded into."""
    if value is None:
        return f"{display_name(layer)} has no {what}"
    arr = ctx.consts.array(value)
    if isinstance(arr, str):
        return f"{display_name(layer)} {what} {value.name!r} {arr}"
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        return f"{display_name(layer)} {what} has dtype {arr.dtype}, not a float"
    return arr


def optional_bias(ctx: Context, layer: ir.Node, index: int) -> np.ndarray | str | None:
    """The constant bias at input ``index`` of ``layer``; ``None`` when it has none."""
    if index >= len(layer.inputs) or layer.inputs[index] is None:
        return None
    return constant(ctx, layer.inputs[index], "bias", layer)


def conv_tensors(ctx: Context, layer: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """A Conv/ConvTranspose's constant ``(weight, bias or None)``, or why they are not."""
    weight = constant(ctx, layer.inputs[1] if len(layer.inputs) > 1 else None, "weight", layer)
    if isinstance(weight, str):
        return weight
    bias = optional_bias(ctx, layer, 2)
    if isinstance(bias, str):
        return bias
    return weight, bias


def sole_reader(value: ir.Value, producer: str, reader: ir.Node | None = None, *,
                repeated: bool = False) -> str | None:
    """``None`` if ``value`` has exactly one reader (``reader``), else why that blocks the
    fold (naming the other readers); ``repeated``: that reader may read it several times."""
    uses = data_uses(value)
    if repeated and uses and all(u.node is uses[0].node for u in uses):
        uses = uses[:1]
    if value.is_graph_output() or len(uses) != 1:
        if not value.is_graph_output() and len({id(u.node) for u in uses}) == 1:
            return (f"{producer} output {value.name!r} is read {len(uses)} times by "
                    f"{display_name(uses[0].node)}")
        return f"{producer} output {value.name!r} also feeds {consumers_text(value, reader)}"
    return None


def release(ctx: Context, node: ir.Node, index: int) -> None:
    """Remember that ``node``'s input ``index`` may become dead after a rewrite."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        ctx.released.append(node.inputs[index])
