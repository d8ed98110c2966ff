"""Static shapes for the fold rules: declared ones first, else ONNX shape inference.

Some rules need a value's rank or dims (the MatMul feature axis, layout ops between a layer
and its BN, the positions per channel before a Flatten). Exporters often leave intermediate
values without ``value_info`` (torch's TorchScript exporter does for MatMul outputs), so when a
rule asks for a shape nobody declared, ``onnx.shape_inference`` (through onnx-ir's
``ShapeInferencePass``, non-strict, with data propagation) runs once per model on a clone
whose large tensors are left out. The working model is never annotated: inferred shapes only
guide planning, so the output's ``value_info`` is the input's. If inference cannot tell, the
rule keeps the BN and says the shape is unknown.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

Dims = list[int | None]
#: How a refusal says a needed shape is unknown.
UNKNOWN = "unknown (not declared, and ONNX shape inference could not tell)"


def declared_dims(value: ir.Value) -> Dims | None:
    """The value's declared dims (``None`` for symbolic ones), or ``None`` if rank unknown."""
    return _dims(value.shape)


def _dims(shape: ir.Shape | None) -> Dims | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) else None for d in shape]


class Shapes:
    """Dims of values of one model: declared, else inferred once on first need."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._inferred: dict[int, dict[str, ir.Shape]] | None = None

    def dims(self, graph: ir.Graph, value: ir.Value) -> Dims | None:
        """Dims of ``value`` (of ``graph``), declared or inferred; ``None`` if unknown."""
        declared = declared_dims(value)
        if declared is not None or not value.name:
            return declared
        if self._inferred is None:
            self._inferred = _infer(self._model)
        return _dims(self._inferred.get(id(graph), {}).get(value.name))


def _infer(model: ir.Model) -> dict[int, dict[str, ir.Shape]]:
    """Shapes by graph (``id``) and value name, from shape inference on a clone."""
    clone = model.clone()  # shares tensors; the pass drops large ones while it runs
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    out: dict[int, dict[str, ir.Shape]] = {}
    for original, inferred in zip(model.graphs(), clone.graphs(), strict=True):
        values = ir.convenience.create_value_mapping(inferred, include_subgraphs=False)
        out[id(original)] = {name: v.shape for name, v in values.items() if v.shape is not None}
    return out
