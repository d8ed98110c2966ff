"""bnfold's ONNX passes as ``onnx_ir.passes`` passes, for ``ir.passes.PassManager`` /
``Sequential`` pipelines (next to onnx-ir's common passes and onnxscript's optimizer).

Each pass runs the bnfold function of the same job and returns onnx-ir's ``PassResult``
(``modified`` is the report's ``changed``); the per-BN :class:`~bnfold.report.Report` is on
the pass object: ``report`` (the latest call) and ``reports`` (every call, e.g. each step of
a ``PassManager(steps=2)``). Folding is exact exactly where :func:`bnfold.fold_onnx` is; a
BN it keeps is in the report with the reason.

* :class:`FoldBatchNormPass` folds in place (an ``InPlacePass``);
* :class:`InsertBatchNormPass` returns a new model (a ``FunctionalPass``, the input is left
  as it was);
* :class:`ReparameterizePass` merges parallel Conv(+BN) branches into one Conv, then folds
  the remaining BNs, in place (an ``InPlacePass``).

A new pass is a subclass of :class:`BnfoldPass` and of ``InPlacePass`` or ``FunctionalPass``
whose :meth:`~BnfoldPass.apply` calls the bnfold function with ``self.options``.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any

import onnx_ir as ir

from bnfold.report import PassResult, Report


class BnfoldPass(ir.passes.PassBase):
    """An onnx-ir pass around a bnfold pass function; keeps the reports it returns."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.reports: list[Report] = []

    @property
    def report(self) -> Report | None:
        """The per-BN report of the latest call (``None`` before the first)."""
        return self.reports[-1] if self.reports else None

    @abc.abstractmethod
    def apply(self, model: ir.Model) -> PassResult:
        """Run the bnfold function on ``model`` with ``self.options``: ``(model, Report)``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        out, report = self.apply(model)
        self.reports.append(report)
        return ir.passes.PassResult(out, report.changed)


class FoldBatchNormPass(BnfoldPass, ir.passes.InPlacePass):
    """Fold BatchNormalization into neighbouring Conv/ConvTranspose/Gemm/MatMul, in place.

    Options are :func:`bnfold.fold_onnx`'s: ``backward`` (also BN -> layer folds), ``include``
    / ``exclude`` (BN name or module path globs; the others are kept, "excluded by the user").
    """

    def __init__(self, *, backward: bool = True, include: Any = None,
                 exclude: Any = None) -> None:
        super().__init__(backward=backward, include=include, exclude=exclude)

    def apply(self, model: ir.Model) -> PassResult:
        from bnfold.passes.onnx.fold import fold_onnx

        return fold_onnx(model, inplace=True, **self.options)


class InsertBatchNormPass(BnfoldPass, ir.passes.FunctionalPass):
    """Insert BatchNormalization after Conv/ConvTranspose/Gemm/MatMul into a copy of the model.

    Options (keywords) are :func:`bnfold.insert_bn_onnx`'s: ``position``, ``skip_last``,
    ``include``, ``exclude``, ``eps``, ``momentum``, ``drop_bias``, ``training_mode``; an
    unknown one is a ``TypeError`` here, not at the first call.
    """

    def __init__(self, **options: Any) -> None:
        from bnfold.passes.onnx.insert import insert_bn_onnx

        inspect.signature(insert_bn_onnx).bind(None, **options)
        super().__init__(**options)

    def apply(self, model: ir.Model) -> PassResult:
        from bnfold.passes.onnx.insert import insert_bn_onnx

        return insert_bn_onnx(model, **self.options)


class ReparameterizePass(BnfoldPass, ir.passes.InPlacePass):
    """Merge parallel Conv(+BN) branch blocks into one Conv, then fold the BNs left, in place.

    Runs :func:`bnfold.reparameterize_onnx`: a block ``Add(BN(Conv_k(x)), BN(Conv_1(x)),
    BN(x), x)`` becomes one ``Conv(x)`` whose kernel is the sum of the branches' folded kernels
    (each zero-padded to the largest, centred) and whose bias is the sum of their biases. Exact
    (up to one rounding) where the branches agree on stride, dilation, groups and padding
    relative to their kernel size; any other block is kept with the reason in the report.
    """

    def __init__(self) -> None:
        super().__init__()

    def apply(self, model: ir.Model) -> PassResult:
        from bnfold.passes.onnx.reparam import reparameterize_onnx

        return reparameterize_onnx(model, inplace=True)
