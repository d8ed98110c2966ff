"""Small, local graph edits used by the fold rules: remove a BN, add a bias, drop dead values.

Every edit keeps graph input/output names: when a removed BN's output is a graph output, the
value that replaces it takes over its name and declaration (that value had no other reader,
checked by the rules), so callers see the same output name, shape, dtype, doc string and
metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from bnfold.lazy_ir import ir
from bnfold.passes.onnx.consts import Namer, make_tensor


def remove_bn(nodes: Sequence[ir.Node], replacement: ir.Value) -> list[ir.Value]:
    """Remove a BN site (a BN node, or a chain of nodes whose last output is its ``y``) and
    make its readers read ``replacement`` (its input); return its released inputs."""
    graph = nodes[-1].graph
    assert graph is not None
    y = nodes[-1].outputs[0]
    name = y.name
    renamed = y.is_graph_output()
    if renamed:  # the graph output keeps its declaration: dtype, shape (value_info may lack
        replacement.type, replacement.shape = y.type, y.shape  # both), doc string, metadata
        replacement.doc_string = y.doc_string
        replacement.metadata_props.clear()
        replacement.metadata_props.update(y.metadata_props)
    y.replace_all_uses_with(replacement, replace_graph_outputs=True)
    internal = {n.outputs[0] for n in nodes} | {replacement}
    released = [v for n in nodes for v in n.inputs if v is not None and v not in internal]
    for node in reversed(nodes):
        graph.remove(node, safe=True)
    if renamed:
        replacement.name = name
    return released


def add_bias_after(node: ir.Node, bias: np.ndarray, namer: Namer, base: str) -> None:
    """Insert ``Add(node.output, bias)`` after ``node``; its readers then read the sum.

    The sum takes over the output's name (and graph-output slot); the layer's own output gets
    a fresh ``<name>_unbiased`` name.
    """
    graph = node.graph
    assert graph is not None
    out = node.outputs[0]
    name = namer.fresh(base)
    const = ir.Value(name=name, const_value=make_tensor(bias, name),
                     shape=ir.Shape(bias.shape), type=ir.TensorType(ir.DataType.from_numpy(
                         bias.dtype)))
    graph.register_initializer(const)
    add = ir.Node("", "Add", [out, const], name=namer.fresh(f"{base}_add"))
    summed = add.outputs[0]
    summed.type, summed.shape = out.type, out.shape
    for user, index in list(out.uses()):
        if user is not add:
            user.replace_input_with(index, summed)
    for i, o in enumerate(graph.outputs):
        if o is out:
            graph.outputs[i] = summed
    original = out.name
    out.name = namer.fresh(f"{original}_unbiased")
    summed.name = original
    graph.insert_after(node, add)


def prune(values: Iterable[ir.Value]) -> None:
    """Remove what became dead: unread initializers and nodes whose outputs nobody reads.

    Only values released by a fold (and, transitively, their producers' inputs) are examined,
    so dead code the user's graph already had is left as it was. Graph inputs are never
    removed.
    """
    stack = list(values)
    while stack:
        v = stack.pop()
        if v.uses() or v.is_graph_output() or v.is_graph_input():
            continue
        if v.is_initializer():
            graph = v.graph
            if graph is not None and graph.initializers.get(v.name) is v:
                del graph.initializers[v.name]
            continue
        node = v.producer()
        if node is None or node.graph is None:
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [i for i in node.inputs if i is not None]
        node.graph.remove(node, safe=True)
        stack.extend(inputs)


def detach_initializer_inputs(graph: ir.Graph) -> list[ir.Value]:
    """IR version < 4 lists every initializer among the graph inputs, where it is a constant
    (not an override point, as from IR 4 on). Take those off the input list so the rules treat
    them as constants; return the original input list for :func:`reattach_inputs`."""
    original = list(graph.inputs)
    graph.inputs.clear()
    graph.inputs.extend(v for v in original if not v.is_initializer())
    return original


def reattach_inputs(graph: ir.Graph, original: list[ir.Value], namer: Namer) -> None:
    """Undo :func:`detach_initializer_inputs` after a fold: the graph inputs are exactly the
    original ones again (each with its initializer, so none becomes required), and tensors the
    fold created become ``Constant`` nodes, so IR < 4 needs no new graph input."""
    listed = set(original)
    created = [v for v in graph.initializers.values() if v not in listed]
    for value in original:
        if value.const_value is not None and graph.initializers.get(value.name) is not value:
            graph.register_initializer(value)  # a folded BN's parameter: unused, still an input
    graph.inputs.clear()
    graph.inputs.extend(original)
    first = graph.node(0)
    for value in created:
        tensor = value.const_value
        assert tensor is not None and value.name is not None
        del graph.initializers[value.name]
        node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)],
                       name=namer.fresh(f"{value.name}_constant"))
        out = node.outputs[0]
        value.replace_all_uses_with(out)
        out.name, out.type, out.shape = value.name, value.type, value.shape
        graph.insert_before(first, node)
