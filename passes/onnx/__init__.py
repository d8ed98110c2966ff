"""bnfold's ONNX passes; the onnx-ir pass classes are importable from here."""

from bnfold.passes.onnx.ir_passes import (
    BnfoldPass,
    FoldBatchNormPass,
    InsertBatchNormPass,
    ReparameterizePass,
)

__all__ = ["BnfoldPass", "FoldBatchNormPass", "InsertBatchNormPass", "ReparameterizePass"]
