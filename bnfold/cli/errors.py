"""How the ``bnfold`` command reports a failure: one line that names the file and the problem.

* :func:`expected_error`: the line for a failure caused by the input, not by a bug in bnfold:
  a :class:`~bnfold.errors.BnfoldError`'s message, or ``FILE: problem`` for an ``OSError``
  (permission denied, file name too long, no space left...) and for the ``RuntimeError``
  that ``pathlib`` raises before Python 3.13 for a symlink loop; ``None`` for anything else.
* :func:`naming`: a pass over a model read from a file does not know the file's name; errors
  it raises get the name in front.
* :func:`quiet_libraries`: the libraries' own log and warning lines (onnx-ir's "cannot be found
  in any scope", onnxscript's "Evaluation failed: Unable to allocate 4.00 TiB" while it tries
  a constant) are not printed: bnfold reports what came of them (a kept BN, an error line), so
  the error stays the only line on stderr and a successful run prints no noise. File names
  that are not valid UTF-8 are printed with backslash escapes instead of failing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from bnfold.errors import BnfoldError
from bnfold.io.filechecks import os_problem

_LIBRARIES = ("onnx_ir", "onnxscript", "onnx", "onnxruntime")


def expected_error(exc: BaseException) -> str | None:
    """The one-line message for an input's failure, or ``None`` when ``exc`` is a bug."""
    if isinstance(exc, BnfoldError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError):
        name = exc.filename
        where = f"{Path(name) if isinstance(name, bytes) else name}: " if name else ""
        return f"{where}{os_problem(exc)}"
    if isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop from "):
        return f"{str(exc).removeprefix('Symlink loop from ')}: too many levels of symbolic links"
    return None


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Put ``path`` in front of a BnfoldError raised inside, unless it already names it."""
    try:
        yield
    except BnfoldError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


def quiet_libraries() -> None:
    """Silence library log records and Python warnings for this process (the CLI's)."""
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    warnings.simplefilter("ignore")
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
