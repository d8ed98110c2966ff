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
   folded ONNX, and unfolded vs folded ONNX, on ``example_inputs`` plus random samples of the
   same shapes;
5. an atomic write of the folded model to ``path`` only when every validation passed.
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

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bnfold.errors import BadInputError, UnsafeFoldError, UntraceableError
from bnfold.fileio import save_onnx
from bnfold.report import Report
from bnfold.validation import samples_like
from bnfold.validation import validate as run_validation
from bnfold.validation_result import ValidationResult

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch


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
        out.update(schema="bnfold.export/1", path=self.path, written=self.written,
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
    :class:`UnsafeFoldError` (with the report as ``.report``) when a validation fails; then
    ``path`` is not written. ``opset`` and ``dynamic_shapes`` go to ``torch.onnx.export``.
    """
    if model.training:
        raise BadInputError("the model is in training mode; call model.eval() before export")
    args = _as_args(example_inputs)
    report = ExportReport("export", path=str(path))
    reference = to_onnx(model, args, opset=opset, dynamic_shapes=dynamic_shapes)
    candidate = reference
    if fold:
        candidate = _fold_both(model, args, opset, dynamic_shapes, report)
    if validate:
        feeds = samples_like(args, reference, samples, seed=0)
        v = report.validations
        eager = f"torch {type(model).__name__} (eval)"
        v["torch_vs_unfolded_onnx"] = run_validation(
            model, reference, args, providers=validate, samples=samples,
            labels=(eager, "unfolded ONNX"))
        v["torch_vs_folded_onnx"] = run_validation(
            model, candidate, args, providers=validate, samples=samples,
            labels=(eager, "folded ONNX"))
        v["unfolded_vs_folded_onnx"] = run_validation(
            reference, candidate, providers=validate, inputs=feeds,
            labels=("unfolded ONNX", "folded ONNX"))
    if not report.passed:
        failed = next(v for v in report.validations.values() if not v.passed)
        err = UnsafeFoldError(f"validation failed, {path} not written: {failed.failures()[0]}")
        err.report = report  # type: ignore[attr-defined]
        raise err
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
    then constant folding and unused-node removal; BatchNormalization nodes stay."""
    import onnxscript.optimizer
    import torch

    # The exporter logs a warning per missing torchvision op; they say nothing about this model.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, args, dynamo=True, optimize=False, verbose=False,
                                        opset_version=opset, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise UntraceableError(f"torch.onnx.export failed: {_first_line(exc)}") from exc
    onnx_model = program.model
    onnxscript.optimizer.fold_constants(onnx_model)
    RemoveUnusedNodesPass()(onnx_model)
    return onnx_model


def _fold_both(model: torch.nn.Module, args: tuple[Any, ...], opset: int | None,
               dynamic_shapes: Any, report: ExportReport) -> ir.Model:
    import bnfold

    try:
        graph_module, fx_report = bnfold.fold(model, args)
    except UntraceableError as exc:
        report.notes.append(f"FX fold skipped ({exc}); folding the exported ONNX only")
        exported = to_onnx(model, args, opset=opset, dynamic_shapes=dynamic_shapes)
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


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:240]
