"""A model's graphs, listed in one plain pass over its nodes.

``onnx_ir.Model.graphs()`` and ``RecursiveGraphIterator`` build a generator and an attribute
view per node; on a graph of 100k nodes one listing costs about ten plain iterations, and the
fold's set-up (validity checks, names, constants) needs the list several times. The fold lists
the graphs once, with :func:`model_graphs`, and hands the list on.
"""

from __future__ import annotations

from bnfold.lazy_ir import ir


def model_graphs(model: ir.Model) -> list[ir.Graph]:
    """``list(model.graphs())``: the main graph, then every subgraph (If/Loop/Scan bodies,
    nested), depth first in node order, each once."""
    found: dict[ir.Graph, None] = {}
    _visit(model.graph, found)
    return list(found)


def _visit(graph: ir.Graph, found: dict[ir.Graph, None]) -> None:
    found[graph] = None
    one, many = ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS
    for node in graph:
        attrs = node.attributes.data  # a UserDict's plain dict: no view built per node
        if not attrs:
            continue
        for attr in attrs.values():
            if attr.type is one and not attr.is_ref():
                _visit(attr.value, found)
            elif attr.type is many and not attr.is_ref():
                for sub in attr.value:
                    _visit(sub, found)
