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

import onnx_ir as ir

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
