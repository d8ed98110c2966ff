"""The public API: each function of ``bnfold`` is its implementation, re-exported here.

The work happens in ``bnfold.passes`` (graph rewrites, one module per pass and IR), in
``bnfold.algebra`` (the fold math), in :mod:`bnfold.validation.session` and :mod:`bnfold.exporter`.
Nothing is restated: ``bnfold.fold_onnx`` *is* :func:`bnfold.passes.onnx.fold.fold_onnx`, so its
signature, return type and docstring are the implementation's own. ``fold``, ``insert_bn``
and ``reparameterize`` are the FX passes that also take a ``torch.export.ExportedProgram``
(:func:`bnfold.programs.also_on_programs`).

The implementations import torch, onnxruntime or onnxscript, so each one is imported on first
use (PEP 562 ``__getattr__``): ``import bnfold`` stays light. Type checkers read the imports
under ``TYPE_CHECKING`` below, with the real signatures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfold.exporter import export as export
    from bnfold.passes.fx.fold import fold_fx as fold  # noqa: F401
    from bnfold.passes.fx.insert import insert_bn_fx as insert_bn  # noqa: F401
    from bnfold.passes.fx.reparam import reparameterize_fx as reparameterize  # noqa: F401
    from bnfold.passes.onnx.fold import fold_onnx as fold_onnx
    from bnfold.passes.onnx.fold import inspect_onnx as inspect_onnx
    from bnfold.passes.onnx.insert import insert_bn_onnx as insert_bn_onnx
    from bnfold.passes.onnx.reparam import reparameterize_onnx as reparameterize_onnx
    from bnfold.recalibration import recalibrate as recalibrate
    from bnfold.validation.session import validate as validate

# public name -> (module, implementation)
HOMES: dict[str, tuple[str, str]] = {
    "fold": ("bnfold.passes.fx.fold", "fold_fx"),
    "reparameterize": ("bnfold.passes.fx.reparam", "reparameterize_fx"),
    "insert_bn": ("bnfold.passes.fx.insert", "insert_bn_fx"),
    "recalibrate": ("bnfold.recalibration", "recalibrate"),
    "fold_onnx": ("bnfold.passes.onnx.fold", "fold_onnx"),
    "inspect_onnx": ("bnfold.passes.onnx.fold", "inspect_onnx"),
    "insert_bn_onnx": ("bnfold.passes.onnx.insert", "insert_bn_onnx"),
    "validate": ("bnfold.validation.session", "validate"),
    "export": ("bnfold.exporter", "export"),
    "reparameterize_onnx": ("bnfold.passes.onnx.reparam", "reparameterize_onnx"),
}
#: FX passes that also take an ExportedProgram (and then return one).
_ON_PROGRAMS = frozenset({"fold", "insert_bn", "reparameterize"})

__all__ = list(HOMES)


def __getattr__(name: str) -> Any:
    """Import the implementation of the public function ``name`` on first use."""
    if name not in HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = HOMES[name]
    function = getattr(importlib.import_module(module), attr)
    if name in _ON_PROGRAMS:
        from bnfold.programs import also_on_programs

        function = also_on_programs(function, name)
    globals()[name] = function
    return function


def __dir__() -> list[str]:
    return sorted({*globals(), *HOMES})
