"""Errors that bnfold raises on purpose. The CLI prints ``str(error)`` on one line, exit 2."""

from __future__ import annotations


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
