"""Names users recognise for ONNX nodes: the torch module path the exporter recorded.

``torch.onnx.export(..., dynamo=True)`` names a BN
``node__native_batch_norm_legit_no_training_7__0`` but records where it came from in the
node's metadata: ``pkg.torch.onnx.name_scopes``, a list such as
``['', 'layer2', 'layer2.0', 'layer2.0.bn1', '_native_batch_norm_legit_no_training']`` (the
enclosing module paths, then the op), and ``namespace``, the same as
``": M/layer2: Sequential/.../layer2.0.bn1: BatchNorm2d/op: aten...."``. The module path is
the innermost module, ``layer2.0.bn1``; a graph without this metadata has none.
"""

from __future__ import annotations

import ast
from typing import Any

from bnfold.lazy_ir import ir

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
NAMESPACE = "namespace"


def module_path(node: ir.Node) -> str | None:
    """The torch module path that produced ``node`` (``"layer2.0.bn1"``), or ``None``."""
    props = node.metadata_props
    scopes = _scopes_list(props.get(NAME_SCOPES)) or [
        part.split(": ")[0] for part in props.get(NAMESPACE, "").split("/")]
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None


def _scopes_list(text: str | None) -> list[str]:
    """``"['', 'layer2', ...]"`` as a list of strings (``[]`` when absent or malformed)."""
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def node_label(node: ir.Node) -> str:
    """``"Conv node_conv2d (layer1.conv1)"``: op type, name, and module path when recorded."""
    from bnfold.passes.onnx.bn import display_name

    module = module_path(node)
    return f"{node.op_type} {display_name(node)}" + (f" ({module})" if module else "")


def neighbourhoods(model: ir.Model) -> dict[str, Any]:
    """For each BatchNormalization of ``model`` (subgraphs included), by display name: the node
    (or graph input) feeding it and the nodes (or graph output) reading it, as
    :class:`bnfold.cli.html_report.Neighbourhood`."""
    from bnfold.cli.html_report import Neighbourhood
    from bnfold.passes.onnx.bn import display_name

    out = {}
    for node in model.graph.all_nodes():
        if node.op_type != "BatchNormalization" or not node.inputs or node.inputs[0] is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        source = x.producer()
        before = [(display_name(source), node_label(source))] if source is not None else [
            ("", f"input {x.name}")]
        after = [(display_name(u), node_label(u)) for u in y.consumers()]
        if y.is_graph_output():
            after.append(("", f"output {y.name}"))
        out[display_name(node)] = Neighbourhood(before, after)
    return out
