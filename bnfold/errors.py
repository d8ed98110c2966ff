"""Errors that bnfold raises on purpose. The CLI prints ``str(error)`` on one line, exit 2."""

from __future__ import annotations

import re
from typing import Any

#: A terminal escape sequence (colour, cursor), as torch.onnx's rich-formatted errors hold.
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b")


class BnfoldError(Exception):
    """Base class: a problem with the user's input or request, not a bug in bnfold."""


class BadInputError(BnfoldError):
    """The input is missing, unreadable, truncated, not the expected format, or malformed."""


class UnsupportedError(BnfoldError):
    """The input is valid but uses something bnfold does not handle (an op, an opset...)."""


class UntraceableError(BnfoldError):
    """A torch model could neither be symbolically traced nor exported to a graph."""


class UnsafeFoldError(BnfoldError):
    """A fold would not be exact or would produce non-finite / overflowing weights."""


class ValidationFailedError(UnsafeFoldError):
    """A result failed its validation and was not written; ``report`` says what differed.

    Public counterpart of the internal refusal :class:`UnsafeFoldError` (a subclass of it, so
    ``except UnsafeFoldError`` still catches it): raised by :func:`bnfold.export`.
    """

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``exc``'s message, stripped, at most ``limit`` characters
    (the exception's type name when the message is blank), without terminal escape
    sequences: a library error in one line."""
    lines = [line.strip() for line in _ESCAPE.sub("", str(exc)).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__


def cause_line(exc: BaseException) -> str:
    """:func:`first_line` of the innermost exception in ``exc``'s chain: onnx-ir's
    deserializer wraps the error that says what is wrong in one that names its own function
    ("Error calling _deserialize_graph with: ...")."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return first_line(exc)
