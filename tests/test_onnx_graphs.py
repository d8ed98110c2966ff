"""``model_graphs``: the fold's one listing of a model's graphs is ``list(model.graphs())``."""

from __future__ import annotations

import onnx_ir as ir
from onnx import TensorProto, helper

from bnfold.passes.onnx.graphs import model_graphs


def _branch(name: str, inner: list[ir.Node] | None = None) -> ir.Graph:
    """A graph ``name`` of one Relu after ``inner`` (nodes that hold subgraphs)."""
    return ir.Graph([], [], nodes=[*(inner or []), ir.Node("", "Relu", [], name=f"{name}_relu")],
                    name=name)


def _if(name: str, then: ir.Graph, other: ir.Graph) -> ir.Node:
    return ir.Node("", "If", [], [ir.AttrGraph("then_branch", then),
                                  ir.AttrGraph("else_branch", other)], name=name)


def test_model_graphs_lists_nested_subgraphs_in_model_graphs_order() -> None:
    deep = _branch("deep")
    then = _branch("then", [_if("inner_if", deep, _branch("deep_else"))])
    many = ir.Node("custom", "Many", [], [ir.AttrGraphs("bodies", [_branch("b0"),
                                                                    _branch("b1")])],
                   name="many")
    main = ir.Graph([], [], nodes=[ir.Node("", "Relu", [], name="relu"),
                                   _if("outer_if", then, _branch("else")), many,
                                   _if("last_if", _branch("t2"), _branch("e2"))],
                    name="main")
    model = ir.Model(main, ir_version=8)
    names = [g.name for g in model_graphs(model)]
    assert names == [g.name for g in model.graphs()]
    assert names == ["main", "then", "deep", "deep_else", "else", "b0", "b1", "t2", "e2"]


def test_model_graphs_of_a_graph_without_subgraphs() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    assert model_graphs(model) == [model.graph]
