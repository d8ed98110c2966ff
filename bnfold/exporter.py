"""One-shot export: fold in torch.fx, export to ONNX, fold what export left, validate, write.

``export(model, example_inputs, path)`` does, in order:

1. ``bnfold.fold`` on the torch model (FX level; a model FX cannot trace skips this step and
   relies on step 3, which the report notes);
2. ``torch.onnx.export(..., dynamo=True, optimize=False)`` of the unfolded model (the
   reference) and of the folded one, each cleaned by onnxscript's constant folding and
   unused-node removal only: the exporter's own optimizer is not run because it fuses
   Conv+BN itself, which would leave nothing for bnfold to fold or to account for;
3. ``bnfold.fold_onnx`` on the exported folded model, for what export exposed (e.g. a BN the
   FX pass kept because of a torch-level view that ONNX expresses differently);
4. validation in ONNX Runtime: torch eager vs unfolded ONNX (export parity), torch eager vs
   folded ONNX, and unfolded vs folded ONNX, on ``example_inputs``, random samples of the
   same shapes and, when the export has dynamic dims, one random sample with each of them
   twice its example size (so a shape baked in by a fold is caught);
5. an atomic write of the folded model to ``path`` only when every validation passed.

``opset`` is the ai.onnx opset of the written file, exactly: torch.onnx implements opset 18
and newer, so a lower one is reached with onnxscript's version converter after constant
folding; if it cannot be reached, :class:`UnsupportedError` says so (nothing is written).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnx_ir.passes.common import RemoveUnusedNodesPass

from bnfold import documents
from bnfold.arguments import check_flags, check_module, check_path
from bnfold.errors import (
    BadInputError,
    UnsupportedError,
    UntraceableError,
    ValidationFailedError,
    first_line,
)
from bnfold.io.filechecks import MIN_OPSET
from bnfold.io.fileio import save_onnx
from bnfold.lazy_ir import ir
from bnfold.report import Report
from bnfold.validation.inputs import Sample, check_counts, input_specs, random_array
from bnfold.validation.result import ValidationResult
from bnfold.validation.session import samples_like
from bnfold.validation.session import validate as run_validation

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import torch

EXPORTER_MIN_OPSET = 18
"""The lowest ai.onnx opset torch.onnx's exporter has implementations for."""
QUIET_LOGGERS = ("torch.onnx", "onnxscript", "torch.export")


@dataclass
class ExportReport(Report):
    """The export's report: every BN entry of both fold passes (``details["stage"]`` is
    ``fx`` or ``onnx``), the three validations, and whether ``path`` was written."""

    path: str = ""
    written: bool = False
    validations: dict[str, ValidationResult] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.validations.values())

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(schema=documents.EXPORT, path=self.path, written=self.written,
                   passed=self.passed,
                   validations={k: v.to_dict() for k, v in self.validations.items()})
        return out


def export(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    fold: bool = True,
    validate: Sequence[str] | None = ("cpu", "cuda"),
    opset: int | None = None,
    dynamic_shapes: Any = None,
    samples: int = 3,
) -> ExportReport:
    """Export ``model`` (eval mode) to ``path`` with its BNs folded, validated in ORT.

    ``validate``: providers to validate on (``None`` or ``()`` skips validation). Raises
    :class:`ValidationFailedError` (with the report as ``.report``) when a validation fails; then
    ``path`` is not written. ``opset`` and ``dynamic_shapes`` go to ``torch.onnx.export``.
    """
    check_module(model)
    check_path(path, "path")
    check_flags(fold=fold)
    if model.training:
        raise BadInputError("the model is in training mode; call model.eval() before export")
    if validate:
        check_counts(samples, 0)
    args = _as_args(example_inputs)
    report = ExportReport("export", path=str(path))
    reference = to_onnx(model, args, opset=opset, dynamic_shapes=dynamic_shapes)
    candidate = reference
    if fold:
        candidate = _fold_both(model, args, reference, opset, dynamic_shapes, report)
    if validate:
        feeds = samples_like(args, reference, samples, seed=0)
        feeds += _resized_samples(reference, feeds[0], seed=samples)
        v = report.validations
        eager = f"torch {type(model).__name__} (eval)"
        v["torch_vs_unfolded_onnx"] = run_validation(
            model, reference, providers=validate, inputs=feeds, labels=(eager, "unfolded ONNX"))
        v["torch_vs_folded_onnx"] = run_validation(
            model, candidate, providers=validate, inputs=feeds, labels=(eager, "folded ONNX"))
        v["unfolded_vs_folded_onnx"] = run_validation(
            reference, candidate, providers=validate, inputs=feeds,
            labels=("unfolded ONNX", "folded ONNX"))
    if not report.passed:
        failed = next(v for v in report.validations.values() if not v.passed)
        raise ValidationFailedError(
            f"validation failed, {path} not written: {failed.failures()[0]}", report)
    save_onnx(candidate, Path(path))
    report.written = True
    return report


def export_unfolded(model: torch.nn.Module, example_inputs: Any, path: str | os.PathLike[str],
                    *, opset: int | None = None, dynamic_shapes: Any = None) -> None:
    """Export ``model`` to ONNX with its BatchNormalization nodes kept, written atomically."""
    save_onnx(to_onnx(model, _as_args(example_inputs), opset=opset,
                      dynamic_shapes=dynamic_shapes), Path(path))


def to_onnx(model: torch.nn.Module, args: tuple[Any, ...], *, opset: int | None = None,
            dynamic_shapes: Any = None) -> ir.Model:
    """``torch.onnx.export`` (dynamo) without the exporter's optimizer (it fuses Conv+BN),
    then constant folding and unused-node removal; BatchNormalization nodes stay. ``opset``
    (default: the exporter's) is the model's ai.onnx opset, or :class:`UnsupportedError`."""
    import onnx
    import onnxscript.optimizer
    import torch

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not (isinstance(opset, int) and MIN_OPSET <= opset <= newest):
        raise BadInputError(f"opset must be an integer from {MIN_OPSET} to {newest}, "
                            f"got {opset!r}")
    try:
        with _quiet():
            program = torch.onnx.export(
                model, args, dynamo=True, optimize=False, verbose=False,
                opset_version=None if opset is None else max(opset, EXPORTER_MIN_OPSET),
                dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise UntraceableError(f"torch.onnx.export failed: {first_line(exc)}") from exc
    onnx_model = program.model
    onnxscript.optimizer.fold_constants(onnx_model)
    RemoveUnusedNodesPass()(onnx_model)
    if opset is not None and _opset(onnx_model) != opset:
        _convert(onnx_model, opset)
    return onnx_model


def _opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _convert(model: ir.Model, opset: int) -> None:
    """Convert ``model`` in place to ai.onnx ``opset`` (onnxscript's converter, ONNX's as its
    fallback), then check the result; :class:`UnsupportedError` if either fails."""
    import onnx
    from onnxscript import version_converter

    exported = _opset(model)
    with _quiet():  # converts in place, or leaves the model as it was
        version_converter.convert_version(model, opset, fallback=True)
    why = "onnxscript's and ONNX's version converters both failed"
    if _opset(model) == opset:
        _drop_default_attributes(model, exported or opset, opset)
        try:
            onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
        except Exception as exc:
            why = f"the converted model is invalid: {first_line(exc)}"
        else:
            return
    raise UnsupportedError(f"the export is ai.onnx opset {exported} and could not be converted "
                           f"to opset {opset} ({why}); use opset {EXPORTER_MIN_OPSET} or newer")


def _drop_default_attributes(model: ir.Model, source: int, target: int) -> None:
    """Remove attributes that the ``target`` opset's schema of a node does not know and that
    hold the ``source`` schema's default (the behaviour the older op always had). The version
    converters leave some behind, e.g. ``noop_with_empty_axes=0`` on ReduceMean 18 -> 17."""
    import onnx

    for graph in model.graphs():
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            try:
                old = onnx.defs.get_schema(node.op_type, target, "")
                new = onnx.defs.get_schema(node.op_type, source, "")
            except onnx.defs.SchemaError:
                continue
            for name in [n for n in node.attributes if n not in old.attributes]:
                spec = new.attributes.get(name)
                if spec is not None and spec.default_value.name and node.attributes[name].value \
                        == onnx.helper.get_attribute_value(spec.default_value):
                    del node.attributes[name]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and converters' chatter (prints, warnings, log records with
    tracebacks): what matters comes back as an exception or a checked result."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _resized_samples(reference: ir.Model, first: Sample, seed: int) -> list[Sample]:
    """One random sample with every dynamic dim of ``reference``'s inputs at twice its size in
    ``first`` (doubling keeps any divisibility the example had); none if all dims are fixed."""
    import numpy as np

    specs = input_specs(ir.serde.serialize_model(reference))
    if all(isinstance(d, int) for s in specs for d in s.shape or ()):
        return []
    named = {d: 2 * first[s.name].shape[axis] for s in specs
             for axis, d in enumerate(s.shape or ()) if isinstance(d, str)}

    def size(name: str, axis: int, d: int | str | None) -> int:
        if isinstance(d, int):
            return d
        return named[d] if isinstance(d, str) else 2 * first[name].shape[axis]

    rng = np.random.default_rng(seed)
    return [{s.name: random_array(tuple(size(s.name, a, d) for a, d in enumerate(s.shape or ())),
                                  first[s.name].dtype, rng) for s in specs}]


def _fold_both(model: torch.nn.Module, args: tuple[Any, ...], reference: ir.Model,
               opset: int | None, dynamic_shapes: Any, report: ExportReport) -> ir.Model:
    """FX fold then export, then the ONNX fold; a model FX cannot trace has only the ONNX
    fold, of ``reference`` (its unfolded export; ``fold_onnx`` works on a copy)."""
    import bnfold

    try:
        graph_module, fx_report = bnfold.fold(model, args)
    except UntraceableError as exc:
        report.notes.append(f"FX fold skipped ({exc}); folding the exported ONNX only")
        exported = reference
    else:
        _merge(report, fx_report, "fx")
        exported = to_onnx(graph_module, args, opset=opset, dynamic_shapes=dynamic_shapes)
    folded, onnx_report = bnfold.fold_onnx(exported)
    _merge(report, onnx_report, "onnx")
    return folded


def _merge(report: ExportReport, part: Report, stage: str) -> None:
    """Add ``part``'s entries. A BN the FX pass kept reaches the ONNX pass, whose entry is
    the final word; the FX reason is kept as a note so each BN is counted once."""
    for e in part.entries:
        if stage == "fx" and e.action == "kept":
            report.notes.append(f"fx: kept {e.bn}: {e.reason}")
            continue
        report.add(e.bn, e.action, into=e.into, reason=e.reason, stage=stage, **e.details)
    report.notes.extend(f"{stage}: {n}" for n in part.notes)


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise BadInputError("example_inputs must be a tensor or a tuple of tensors")
