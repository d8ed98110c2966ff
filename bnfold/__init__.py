"""bnfold: insert, fold and validate Batch Normalization in torch.fx and ONNX graphs."""

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
    imports neither torch nor onnxruntime nor onnxscript; ``__version__`` is read from the
    installed metadata on first use (``importlib.metadata`` costs ~25 ms to import)."""
    if name in api.HOMES:
        return getattr(api, name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("bnfold")
        except PackageNotFoundError:  # running from a source tree without install
            found = "0.0.0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
