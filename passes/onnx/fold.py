"""Fold ONNX ``BatchNormalization`` nodes into neighbouring Conv/ConvTranspose/Gemm/MatMul.

``fold_onnx(model)`` visits every BN of the main graph and of every subgraph (If/Loop/Scan
bodies), in graph order, then every BN-like constant affine chain (:mod:`.sites`). A BN on a
constant is evaluated once (:mod:`.constant_bn`); for every other site it tries:

1. a forward fold into the layer that produces its input (:mod:`.forward`), through
   eval-mode no-ops (:mod:`.noops`), else
2. a split fold over a sum or channel concat of layers (:mod:`.linear`), else
3. a backward fold into the layer(s) that read its output (:mod:`.backward`),

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx

from bnfold.arguments import check_callable, check_flags, check_path
from bnfold.errors import BadInputError, cause_line
from bnfold.gc_pause import gc_paused
from bnfold.io.external_data import bind_external_data
from bnfold.io.filechecks import check_initializers
from bnfold.io.fileio import load_onnx, load_split
from bnfold.io.split_proto import SplitProto
from bnfold.lazy_ir import ir
from bnfold.passes.onnx.backward import backward_fold
from bnfold.passes.onnx.bn import display_name, inference_params
from bnfold.passes.onnx.constant_bn import constant_bn
from bnfold.passes.onnx.consts import Constants, Namer
from bnfold.passes.onnx.direct import direct_fold, direct_inspect
from bnfold.passes.onnx.edit import detach_initializer_inputs, prune, reattach_inputs
from bnfold.passes.onnx.forward import forward_fold
from bnfold.passes.onnx.frozen_inputs import freeze, note_frozen
from bnfold.passes.onnx.graphs import model_graphs
from bnfold.passes.onnx.layers import is_default
from bnfold.passes.onnx.linear import structure_fold
from bnfold.passes.onnx.names import module_path
from bnfold.passes.onnx.rules import Context, Fold
from bnfold.passes.onnx.shapes import Shapes
from bnfold.passes.onnx.sites import Site, affine_chains, affine_site
from bnfold.passes.onnx.validity import check_graphs
from bnfold.report import Entry, PassResult, Report
from bnfold.selection import EVERY_BN, Selection

_MAX_ROUNDS = 8
_NONE = Entry("", "kept")


def fold_onnx(model: Any, *, inplace: bool = False, backward: bool = True,
              base_dir: str | os.PathLike[str] | None = None,
              max_const_elements: int | None = None,
              include: Any = None, exclude: Any = None,
              progress: Callable[[int, int], Any] | None = None,
              freeze_initializer_inputs: bool = False) -> PassResult:
    """Fold every exactly foldable BN of ``model``; return ``(folded model, report)``.

    ``model`` is an ``onnx.ModelProto`` (a new ``ModelProto`` is returned; the input is never
    changed, ``inplace`` does not apply), an ``onnx_ir.Model``
    (an ``onnx_ir.Model`` is returned; the input is cloned first unless ``inplace=True``, and
    the clone shares unchanged tensors) or a path (an ``onnx_ir.Model`` is returned, its
    external tensors still lazy: only the tensors a fold touches are read; save it with
    :func:`bnfold.io.fileio.save_onnx`; a single-file model is read as
    :func:`bnfold.io.fileio.load_split` reads it, and the model returned holds no view of the
    file, :meth:`~bnfold.io.split_proto.SplitProto.to_ir`) or a
    :class:`~bnfold.io.split_proto.SplitProto` (what
    :func:`bnfold.io.fileio.load_for_pass` reads: a ``SplitProto`` is returned when the fold
    runs on the protobuf, else an ``onnx_ir.Model`` whose unchanged large tensors are still
    views of the file's map, :meth:`~bnfold.io.split_proto.SplitProto.to_ir`).
    ``backward=False`` disables BN -> layer folds.
    An in-memory model with external tensors needs ``base_dir=``, the folder they lie in
    (:func:`bnfold.io.external_data.bind_external_data`). ``max_const_elements`` bounds the size
    of any tensor computed from constants (a bias or BN parameter built by
    ``Expand``/``ConstantOfShape``/...); default: the largest tensor the model stores (see
    :class:`bnfold.passes.onnx.consts.Constants`). A BN whose fold needs a larger one is kept,
    with the reason. ``include`` / ``exclude``: globs on the BN's node name or torch module
    path (:mod:`bnfold.selection`, :mod:`.names`); a BN they leave out is kept, "excluded by
    the user". ``progress(done, total)``, when given, is called once per BN as the first
    round settles it (``total``: the BNs of every graph); the pass itself prints nothing.
    A plain ``ModelProto`` (every BN right after a Conv/ConvTranspose/Gemm only it reads, all
    tensors initializers) is folded on the protobuf by :func:`.direct.direct_fold`, with
    the same result and report. ``freeze_initializer_inputs``: first take the graph inputs
    that have an initializer off the inputs, so their tensors fold as constants
    (:mod:`.frozen_inputs`; without it a BN that reads one is kept, with the reason).
    """
    check_flags(inplace=inplace, backward=backward,
                freeze_initializer_inputs=freeze_initializer_inputs)
    check_callable(progress, "progress(done, total)")
    check_path(base_dir, "base_dir", optional=True)
    select = Selection.of(include, exclude)
    frozen: list[str] = []
    with gc_paused():
        source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        from_file = source is not None
        if from_file:
            model = load_split(model)
        if isinstance(model, (onnx.ModelProto, SplitProto)):  # a plain one never enters onnx-ir
            if freeze_initializer_inputs:
                model, frozen = freeze(model)
            fast = direct_fold(model, select=select, progress=progress,
                               max_const_elements=max_const_elements)
            if fast is not None:
                note_frozen(fast.report, frozen)
                if from_file:
                    return PassResult(_to_ir(fast.model, copy=True, source=source),
                                      fast.report)
                return fast
        ir_model, as_proto = _working_copy(model, inplace or from_file, views=not from_file,
                                           source=source)
        if freeze_initializer_inputs and isinstance(model, ir.Model):  # (protobufs: above)
            _, frozen = freeze(ir_model)
        bind_external_data(ir_model, base_dir)
        report = _fold(ir_model, "fold_onnx", backward=backward,
                       max_const_elements=max_const_elements, select=select,
                       progress=progress, source=model)
        note_frozen(report, frozen)
        out = ir.serde.serialize_model(ir_model) if as_proto else ir_model
    return PassResult(out, report)


def inspect_onnx(model: Any, *, base_dir: str | os.PathLike[str] | None = None,
                 max_const_elements: int | None = None,
                 freeze_initializer_inputs: bool = False) -> Report:
    """What :func:`fold_onnx` would do with each BN (folded into what, or kept and why).

    Runs the fold on a copy that shares the input's tensors; the input is not changed. The
    report is a dry run: entries keep the action names (``folded`` means "would fold"),
    ``report.dry_run`` is true, ``report.changed`` is false, and its table says "would fold".
    ``freeze_initializer_inputs``: as for :func:`fold_onnx`. A plain ``ModelProto`` or
    :class:`~bnfold.io.split_proto.SplitProto` is dry-run on the protobuf
    (:func:`.direct.direct_inspect`), the same report without importing onnx-ir.
    """
    check_flags(freeze_initializer_inputs=freeze_initializer_inputs)
    check_path(base_dir, "base_dir", optional=True)
    frozen: list[str] = []
    with gc_paused():
        if isinstance(model, (onnx.ModelProto, SplitProto)):  # a plain one never enters onnx-ir
            if freeze_initializer_inputs:
                model, frozen = freeze(model)
            fast = direct_inspect(model, max_const_elements=max_const_elements)
            if fast is not None:
                note_frozen(fast, frozen)
                return fast
        ir_model, _ = _working_copy(model, inplace=False, views=True)  # (a report: no view escapes)
        if freeze_initializer_inputs and not isinstance(model, (onnx.ModelProto, SplitProto)):
            frozen = freeze(ir_model)[1]
        bind_external_data(ir_model, base_dir)
        report = _fold(ir_model, "inspect_onnx", backward=True,
                       max_const_elements=max_const_elements, source=model)
        note_frozen(report, frozen)
    report.dry_run = True
    return report


def _working_copy(model: Any, inplace: bool, *, views: bool = False,
                  source: str | None = None) -> tuple[ir.Model, bool]:
    """The onnx-ir model a pass edits, and whether the pass hands it back as a ``ModelProto``:
    yes for a ``ModelProto``; no for a :class:`~bnfold.io.split_proto.SplitProto` (a new
    model, its tensors held apart kept as views of the file's map with ``views``), an
    ``ir.Model`` (itself, or its clone unless ``inplace``) and a path (the file's model).
    ``source``: the file a ``SplitProto`` was read from, named in its errors."""
    if isinstance(model, SplitProto):
        check_initializers(model, source or "model")
        return _to_ir(model, copy=not views, source=source), False
    if isinstance(model, onnx.ModelProto):
        check_initializers(model, "model")
        try:
            return ir.serde.deserialize_model(model), True
        except Exception as exc:
            raise BadInputError(f"not a valid ONNX model: {cause_line(exc)}") from exc
    if isinstance(model, ir.Model):
        return (model if inplace else model.clone()), False
    if isinstance(model, (str, os.PathLike)):
        return load_onnx(model), False
    raise BadInputError(
        f"expected an onnx.ModelProto, onnx_ir.Model or path, got {type(model).__name__}")


def _to_ir(split: SplitProto, *, copy: bool, source: str | None = None) -> ir.Model:
    """``split.to_ir(copy=copy)``; a model onnx-ir cannot read is a one-line
    :class:`BadInputError` (naming ``source``, the file it was read from, when given, as
    :func:`~bnfold.io.fileio.load_onnx` does)."""
    try:
        return split.to_ir(copy=copy)
    except Exception as exc:
        if source is not None:
            raise BadInputError(f"{source}: could not load the ONNX model "
                                f"({cause_line(exc)})") from exc
        raise BadInputError(f"not a valid ONNX model: {cause_line(exc)}") from exc


def _fold(model: ir.Model, pass_name: str, *, backward: bool,
          max_const_elements: int | None, select: Selection = EVERY_BN,
          progress: Callable[[int, int], Any] | None = None, source: Any = None) -> Report:
    """Fold (or, for ``inspect_onnx``, try) every BN of ``model``, in place; ``source``: what
    the model was read from (shape inference runs on a ``ModelProto`` or ``SplitProto``,
    :class:`~.shapes.Shapes`)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    report = Report(pass_name)
    if opset is None:
        report.notes.append("the model imports no default-domain opset: nothing to fold")
        return report
    graphs = model_graphs(model)
    check_graphs(model, graphs=graphs)
    namer, shapes = Namer(model, graphs=graphs), _shapes(model, source)
    entries: dict[ir.Node, Entry] = {}
    with initializer_inputs_as_constants(model, report):
        consts = Constants(model, max_const_elements, graphs=graphs)
        tick = (_ticker(progress, sum(sum(map(_is_bn, g)) for g in graphs))
                if progress else None)
        for graph in graphs:
            ctx = Context(graph, opset, namer, shapes, consts)
            for _ in range(_MAX_ROUNDS):
                if not _round(ctx, entries, backward, select, tick):
                    break
        for node, entry in entries.items():
            entry.module = module_path(node)
        report.entries.extend(entries.values())
    report.entries.extend(_function_entries(model))
    return report


@contextmanager
def initializer_inputs_as_constants(model: ir.Model, report: Report) -> Iterator[None]:
    """Run the body with an IR < 4 model's initializer inputs (constants at that IR version)
    off the graph inputs (:func:`.edit.detach_initializer_inputs`), so the rules treat them as
    constants; then put the inputs back as they were (:func:`.edit.reattach_inputs`: new
    tensors become ``Constant`` nodes), with a note in ``report`` when its entries changed the
    model. A model of IR >= 4, or with no such input (an enclosing call took them off), runs
    the body as it is."""
    legacy = model.ir_version < 4 and any(v.is_initializer() for v in model.graph.inputs)
    inputs = detach_initializer_inputs(model.graph) if legacy else []
    try:
        yield
    finally:
        if legacy:
            reattach_inputs(model.graph, inputs, Namer(model))
    if legacy and any(e.action in ("folded", "merged") for e in report.entries):
        report.notes.append(
            f"IR version {model.ir_version}: initializers are graph inputs (constants at "
            "this IR version), so folded BN parameters stay as unused graph inputs and new "
            "tensors are Constant nodes")


def _shapes(model: ir.Model, source: Any) -> Shapes:
    """The model's :class:`Shapes`, inferred on ``source`` if it is the protobuf the model
    was read from."""
    if isinstance(source, SplitProto):
        return Shapes(model, source.proto, apart=source.data.keys())
    return Shapes(model, source if isinstance(source, onnx.ModelProto) else None)


def _function_entries(model: ir.Model) -> list[Entry]:
    """A kept entry for each BN inside a model-local function (never folded, never silent)."""
    entries = []
    for function in model.functions.values():
        where = f"{function.domain}.{function.name}" if function.domain else function.name
        for node in ir.traversal.RecursiveGraphIterator(function):
            if _is_bn(node):
                entries.append(Entry(
                    f"{where}/{display_name(node)}", "kept",
                    reason=(f"inside model-local function {where}: functions are not folded "
                            "(each call may pass other weights); inline them first, e.g. "
                            "onnx.inliner.inline_local_functions, to fold this BN")))
    return entries


def _is_bn(node: ir.Node) -> bool:
    return node.op_type == "BatchNormalization" and is_default(node)


def _ticker(progress: Callable[[int, int], Any], total: int) -> Callable[[ir.Node], None]:
    """``tick(bn)``: report ``progress(done, total)`` the first time each BN is visited."""
    seen: set[ir.Node] = set()

    def tick(bn: ir.Node) -> None:
        if bn not in seen:
            seen.add(bn)
            progress(len(seen), max(total, len(seen)))
    return tick


def _round(ctx: Context, entries: dict[ir.Node, Entry], backward: bool,
           select: Selection, tick: Callable[[ir.Node], None] | None = None) -> bool:
    """One pass over the graph's BNs and BN-like affine chains; true when another round may
    fold more: something folded and some site stayed (a fold can only enable a site that did
    not fold yet: a BN kept, or an affine chain not BN-like on its own)."""
    changed = unsettled = False
    selective = select != EVERY_BN  # (else no BN is excluded: its names need not be read)
    for bn in [n for n in ctx.graph if _is_bn(n)]:
        if tick is not None:
            tick(bn)
        if bn.graph is None or entries.get(bn, _NONE).details.get("sliced"):
            continue  # removed by an earlier fold of this round, or left by a split fold
        excluded = selective and select.refusal((display_name(bn), module_path(bn)))
        if excluded:
            _settle(bn, excluded, ctx, entries, backward)
            continue
        value = constant_bn(bn, ctx)
        if value is not None and not isinstance(value, str):  # a BN on a constant, evaluated
            entries[bn] = Entry(display_name(bn), "folded", value.name, details={
                "direction": "constant", "kind": "BatchNormalization on a constant"})
            _release(ctx)
            changed = True
            continue
        params = inference_params(bn, ctx.opset, ctx.consts) if value is None else value
        site = params if isinstance(params, str) else Site([bn], bn.inputs[0], params)
        folded = _settle(bn, site, ctx, entries, backward)
        changed, unsettled = changed or folded, unsettled or not folded
    for chain in affine_chains(ctx.graph, ctx.consts):
        site = affine_site(chain, ctx)
        if site is None:
            unsettled = True
            continue
        head = chain[0].node
        site = (selective and select.refusal((display_name(head), module_path(head)))) or site
        kind = chain[0].node.op_type if isinstance(site, str) else site.kind
        folded = _settle(chain[0].node, site, ctx, entries, backward, kind)
        changed, unsettled = changed or folded, unsettled or not folded
    return changed and unsettled


def _settle(key: ir.Node, site: Site | str, ctx: Context, entries: dict[ir.Node, Entry],
            backward: bool, kind: str = "BatchNormalization") -> bool:
    """Plan and apply one site's fold, or record why it stays; true when it folded."""
    name = display_name(key)
    with np.errstate(over="ignore"):  # an overflowing fold is refused and reported
        outcome = site if isinstance(site, str) else _plan(site, ctx, backward)
    if isinstance(outcome, str):
        entries[key] = Entry(name, "kept", reason=outcome, details={"kind": kind})
        return False
    outcome.apply()
    _release(ctx)
    into = ", ".join(display_name(n) for n in [outcome.into, *outcome.also])
    details = {"direction": outcome.direction, "layer": outcome.into.op_type, "kind": kind}
    if outcome.kept:  # the BN left in the site's place carries the entry
        entries.pop(key, None)
        left = next(n for n in ctx.graph if n.op_type == "BatchNormalization"
                    and n.name == name and n is not key)
        entries[left] = Entry(name, "kept", into, outcome.kept, {**details, "sliced": True})
    else:
        entries[key] = Entry(name, "folded", into, details=details)
    return True


def _release(ctx: Context) -> None:
    """After a rewrite: prune what it left unread; shapes are no longer the source's."""
    ctx.shapes.edited()
    prune(ctx.released)
    ctx.released.clear()


def _plan(site: Site, ctx: Context, backward: bool) -> Fold | str:
    forward = forward_fold(site, ctx)
    if isinstance(forward, Fold):
        return forward
    split = structure_fold(site, ctx)
    if split is not None:
        if isinstance(split, Fold):
            return split
        forward = split
    if not backward:
        return forward
    back = backward_fold(site, ctx)
    if isinstance(back, Fold):
        return back
    return f"{forward}; and {back}"
