"""Defer imports that no fold needs: sympy, pulled in by onnx-ir at import time.

onnx-ir imports sympy (about half a second) for symbolic dimension arithmetic, which no bnfold
command uses. :func:`defer_sympy` puts a placeholder module for ``sympy`` and for
``onnx_ir._symbolic_shapes`` (which reads sympy attributes when imported) into
``sys.modules``; the first attribute read from a placeholder imports the real module, puts it
in ``sys.modules`` in the placeholder's place, and answers from it. Importing this module
(``bnfold/__init__.py`` does, first) installs the placeholders. Code that does use sympy
(onnx-ir's symbolic dims, torch) therefore gets the real module, just later.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

#: Modules replaced by placeholders until first used.
DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")


class DeferredModule(types.ModuleType):
    """A module that imports itself for real on first attribute access."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        return getattr(importlib.import_module(name), attr)


def defer_sympy() -> None:
    """Install the placeholders, unless sympy or onnx-ir is already imported or not found."""
    if any(name in sys.modules for name in ("sympy", "onnx_ir")):
        return
    if importlib.util.find_spec("sympy") is None:
        return
    for name in DEFERRED:
        sys.modules[name] = DeferredModule(name)


defer_sympy()
