"""Graph inputs that have an initializer, made constants on request (``freeze``).

From IR version 4 on, an initializer that is also a graph input is only a default: a caller
may feed another value at run time. Older exporters list every weight as such an input
(torch.onnx's ``keep_initializers_as_inputs=True``, the default of many model-zoo files), so
the fold keeps every BN that reads one, with that reason. A user who never feeds weights can
have them frozen: :func:`freeze` takes them off the main graph's inputs (their initializers
stay), after which they are constants like any other initializer and fold. Below IR version
4 initializers are graph inputs by definition and constants already: nothing is removed.
Subgraph inputs are left alone (an initializer of a subgraph is no subgraph input).
"""

from __future__ import annotations

from typing import TypeVar

import onnx

from bnfold.io.proto_stream import copy_fields
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.edit import detach_initializer_inputs
from bnfold.report import Report

Model = TypeVar("Model", onnx.ModelProto, SplitProto, "ir.Model")


def freeze(model: Model) -> tuple[Model, list[str]]:
    """``model`` without the main-graph inputs that have an initializer, and their names (in
    input order). A ``ModelProto`` or :class:`~bnfold.io.split_proto.SplitProto` is not
    changed: a new one is returned when there is anything to remove; an ``onnx_ir.Model`` is
    changed in place (pass a copy)."""
    if not isinstance(model, (onnx.ModelProto, SplitProto)):  # an onnx_ir.Model
        if model.ir_version < 4:
            return model, []
        original = detach_initializer_inputs(model.graph)
        return model, [v.name or "" for v in original if v.is_initializer()]
    proto = model.proto if isinstance(model, SplitProto) else model
    initializers = {t.name for t in proto.graph.initializer}
    names = [v.name for v in proto.graph.input if v.name in initializers]
    if proto.ir_version < 4 or not names:
        return model, []
    out = onnx.ModelProto()
    copy_fields(proto, out, lambda field: field.name != "graph")
    copy_fields(proto.graph, out.graph, lambda field: field.name != "input")
    out.graph.input.extend(v for v in proto.graph.input if v.name not in initializers)
    if isinstance(model, SplitProto):
        return SplitProto(out, model.data, model.facts), names  # (same tensors, same order)
    return out, names


def note_frozen(report: Report, names: list[str]) -> None:
    """Put the note on the inputs :func:`freeze` removed (``names``; none: no note) first
    among ``report``'s notes."""
    if not names:
        return
    shown = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more"
                                               if len(names) > 3 else "")
    report.notes.insert(0, f"froze {len(names)} graph input(s) that have an initializer "
                           f"({shown}): they are constants now, which callers can no longer "
                           "feed")
