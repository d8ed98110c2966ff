"""bnfold's ONNX passes; the onnx-ir pass classes are importable from here.

They are imported at first use (PEP 562): they derive from onnx-ir's pass classes, and a
plain dry run imports this package without onnx-ir (:mod:`bnfold.lazy_ir`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfold.passes.onnx.ir_passes import (
        BnfoldPass,
        FoldBatchNormPass,
        InsertBatchNormPass,
        ReparameterizePass,
    )

__all__ = ["BnfoldPass", "FoldBatchNormPass", "InsertBatchNormPass", "ReparameterizePass"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from bnfold.passes.onnx import ir_passes

    return getattr(ir_passes, name)
