"""onnx-ir, imported at its first use.

``import onnx_ir`` takes ~0.3 s, most of it sympy (onnx-ir builds a table of sympy functions
at import), and a plain model's dry run (``bnfold inspect``, :mod:`bnfold.passes.onnx.direct`)
never needs it. So bnfold's modules write ``from bnfold.lazy_ir import ir`` instead of
``import onnx_ir as ir``: :data:`ir` stands for the module and imports it at the first
attribute read (``ir.Model``), after which it holds onnx-ir's names itself, so later reads cost
what a module's do. Nothing at a module's top level reads ``ir.``; a test runs the plain
inspect in a fresh interpreter and checks sympy was never imported. (Two modules import
onnx-ir itself, being no part of a dry run: ``passes/onnx/ir_passes.py``, whose classes derive
from onnx-ir's, and ``validation/upcast.py``.)
(``importlib.util.LazyLoader`` cannot do this on Python 3.11: the next ``import onnx_ir``
statement anywhere reads the module's ``__spec__``, which loads it.)
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any


class _Lazy(types.ModuleType):
    """A module object that imports the module of its name at the first attribute read."""

    def __getattr__(self, name: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(vars(module))  # (later reads of these names are plain)
        return getattr(module, name)


if TYPE_CHECKING:
    import onnx_ir as ir
else:
    ir = _Lazy("onnx_ir")
