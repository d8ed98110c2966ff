"""bnfold: insert, fold and validate Batch Normalization in torch.fx and ONNX graphs."""

from importlib.metadata import PackageNotFoundError, version

import bnfold.deferred_imports  # noqa: F401  (first: defers sympy, which no fold needs)
from bnfold.api import (
    export,
    fold,
    fold_onnx,
    insert_bn,
    insert_bn_onnx,
    inspect_onnx,
    recalibrate,
    validate,
)
from bnfold.errors import (
    BadInputError,
    BnfoldError,
    UnsafeFoldError,
    UnsupportedError,
    UntraceableError,
)
from bnfold.report import Entry, PassResult, Report

try:
    __version__ = version("bnfold")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "BadInputError",
    "BnfoldError",
    "Entry",
    "PassResult",
    "Report",
    "UnsafeFoldError",
    "UnsupportedError",
    "UntraceableError",
    "__version__",
    "export",
    "fold",
    "fold_onnx",
    "insert_bn",
    "insert_bn_onnx",
    "inspect_onnx",
    "recalibrate",
    "validate",
]
