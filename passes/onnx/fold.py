"""Fold ONNX ``BatchNormalization`` nodes into neighbouring Conv/ConvTranspose/Gemm/MatMul.

``fold_onnx(model)`` visits every BN of the main graph and of every subgraph (If/Loop/Scan
bodies), in graph order, and for each tries:

1. a forward fold into the layer that produces its input (:mod:`.forward`), else
2. a backward fold into the single layer that reads its output (:mod:`.backward`),

repeating until nothing changes (so ``BN -> BN -> Conv`` chains fold completely). A BN that is
not an inference-mode affine map (:mod:`.bn`) or whose fold would be inexact, overflow its
dtype, or touch a tensor another node reads without copying it is kept, and the report says
why. BNs inside model-local functions are reported as kept (a function body is a template
whose weights may differ per call); inline the functions first to fold them. The math is
:mod:`bnfold.algebra` (float64, rounded once to each tensor's dtype).

Guarantees: graph input/output names, shapes and dtypes, metadata, opset imports and
value_info of surviving values are unchanged; weights shared with other readers are copied
before folding; new initializer names are deterministic (``<layer>_bnfold_weight``,
``_1``... when taken); initializers and constant nodes a fold left unread are removed; the
same input gives byte-identical output, and folding twice changes nothing more.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bnfold.errors import BadInputError
from bnfold.external_data import bind_external_data
from bnfold.fileio import load_onnx
from bnfold.gc_pause import gc_paused
from bnfold.passes.onnx.backward import backward_fold
from bnfold.passes.onnx.bn import display_name, inference_params
from bnfold.passes.onnx.consts import Namer
from bnfold.passes.onnx.edit import detach_initializer_inputs, prune, reattach_inputs
from bnfold.passes.onnx.forward import forward_fold
from bnfold.passes.onnx.rules import Context, Fold
from bnfold.passes.onnx.shapes import Shapes
from bnfold.report import Entry, PassResult, Report

_MAX_ROUNDS = 8


def fold_onnx(model: Any, *, inplace: bool = False, backward: bool = True,
              base_dir: str | os.PathLike[str] | None = None) -> PassResult:
    """Fold every exactly foldable BN of ``model``; return ``(folded model, report)``.

    ``model`` is an ``onnx.ModelProto`` (a new ``ModelProto`` is returned; the input is never
    changed, ``inplace`` does not apply), an ``onnx_ir.Model``
    (an ``onnx_ir.Model`` is returned; the input is cloned first unless ``inplace=True``, and
    the clone shares unchanged tensors) or a path (an ``onnx_ir.Model`` is returned, its
    external tensors still lazy: only the tensors a fold touches are read; save it with
    :func:`bnfold.fileio.save_onnx`). ``backward=False`` disables BN -> layer folds.
    An in-memory model with external tensors needs ``base_dir=``, the folder they lie in
    (:func:`bnfold.external_data.bind_external_data`).
    """
    with gc_paused():
        ir_model, as_proto = _working_copy(model, inplace)
        bind_external_data(ir_model, base_dir)
        report = _fold(ir_model, "fold_onnx", backward=backward)
        out = ir.serde.serialize_model(ir_model) if as_proto else ir_model
    return PassResult(out, report)


def inspect_onnx(model: Any, *, base_dir: str | os.PathLike[str] | None = None) -> Report:
    """What :func:`fold_onnx` would do with each BN (folded into what, or kept and why).

    Runs the fold on a copy that shares the input's tensors; the input is not changed. The
    report is a dry run: entries keep the action names (``folded`` means "would fold"),
    ``report.dry_run`` is true, ``report.changed`` is false, and its table says "would fold".
    """
    with gc_paused():
        ir_model, _ = _working_copy(model, inplace=False)
        bind_external_data(ir_model, base_dir)
        report = _fold(ir_model, "inspect_onnx", backward=True)
    report.dry_run = True
    return report


def _working_copy(model: Any, inplace: bool) -> tuple[ir.Model, bool]:
    if isinstance(model, onnx.ModelProto):
        try:
            return ir.serde.deserialize_model(model), True
        except Exception as exc:
            raise BadInputError(f"not a valid ONNX model: {exc}".splitlines()[0]) from exc
    if isinstance(model, ir.Model):
        return (model if inplace else model.clone()), False
    if isinstance(model, (str, os.PathLike)):
        return load_onnx(model), False
    raise BadInputError(
        f"expected an onnx.ModelProto, onnx_ir.Model or path, got {type(model).__name__}")


def _fold(model: ir.Model, pass_name: str, *, backward: bool) -> Report:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    report = Report(pass_name)
    if opset is None:
        report.notes.append("the model imports no default-domain opset: nothing to fold")
        return report
    namer, shapes = Namer(model), Shapes(model)
    entries: dict[ir.Node, Entry] = {}
    legacy = model.ir_version < 4 and any(v.is_initializer() for v in model.graph.inputs)
    inputs = detach_initializer_inputs(model.graph) if legacy else []
    for graph in list(model.graphs()):
        ctx = Context(graph, opset, namer, shapes)
        for _ in range(_MAX_ROUNDS):
            if not _round(ctx, entries, backward):
                break
    if legacy:
        reattach_inputs(model.graph, inputs, namer)
        if any(e.action == "folded" for e in entries.values()):
            report.notes.append(
                f"IR version {model.ir_version}: initializers are graph inputs (constants at "
                "this IR version), so folded BN parameters stay as unused graph inputs and new "
                "tensors are Constant nodes")
    report.entries.extend(entries.values())
    report.entries.extend(_function_entries(model))
    return report


def _function_entries(model: ir.Model) -> list[Entry]:
    """A kept entry for each BN inside a model-local function (never folded, never silent)."""
    entries = []
    for function in model.functions.values():
        where = f"{function.domain}.{function.name}" if function.domain else function.name
        for node in ir.traversal.RecursiveGraphIterator(function):
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                entries.append(Entry(
                    f"{where}/{display_name(node)}", "kept",
                    reason=(f"inside model-local function {where}: functions are not folded "
                            "(each call may pass other weights); inline them first, e.g. "
                            "onnx.inliner.inline_local_functions, to fold this BN")))
    return entries


def _round(ctx: Context, entries: dict[ir.Node, Entry], backward: bool) -> bool:
    """One pass over the graph's BNs; true when something folded."""
    changed = False
    for node in list(ctx.graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        name = display_name(node)
        with np.errstate(over="ignore"):  # an overflowing fold is refused and reported
            outcome = _plan(node, ctx, backward)
        if isinstance(outcome, Fold):
            outcome.apply()
            prune(ctx.released)
            ctx.released.clear()
            entries[node] = Entry(name, "folded", display_name(outcome.into),
                                      details={"direction": outcome.direction,
                                               "layer": outcome.into.op_type})
            changed = True
        else:
            entries[node] = Entry(name, "kept", reason=outcome)
    return changed


def _plan(bn: ir.Node, ctx: Context, backward: bool) -> Fold | str:
    params = inference_params(bn, ctx.opset)
    if isinstance(params, str):
        return params
    forward = forward_fold(bn, params, ctx)
    if isinstance(forward, Fold) or not backward:
        return forward
    back = backward_fold(bn, params, ctx)
    if isinstance(back, Fold):
        return back
    return f"{forward}; and {back}"
