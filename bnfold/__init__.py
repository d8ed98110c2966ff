"""bnfold: insert, fold and validate Batch Normalization in torch.fx and ONNX graphs."""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from bnfold import api
from bnfold.errors import (
    BadInputError,
    BnfoldError,
    UnsafeFoldError,
    UnsupportedError,
    UntraceableError,
    ValidationFailedError,
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
    "ValidationFailedError",
    "__version__",
    "export",
    "fold",
    "fold_onnx",
    "insert_bn",
    "insert_bn_onnx",
    "inspect_onnx",
    "recalibrate",
    "reparameterize",
    "reparameterize_onnx",
    "validate",
]

if TYPE_CHECKING:
    from bnfold.api import (
        export,
        fold,
        fold_onnx,
        insert_bn,
        insert_bn_onnx,
        inspect_onnx,
        recalibrate,
        reparameterize,
        reparameterize_onnx,
        validate,
    )


def __getattr__(name: str) -> Any:
    """The public functions, imported on first use (:mod:`bnfold.api`): ``import bnfold``
    imports neither torch nor onnxruntime nor onnxscript."""
    if name in api.HOMES:
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
