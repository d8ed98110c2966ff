"""Checks of the public functions' plain arguments, one per kind: each refuses a value of the
wrong type with a one-line :class:`~bnfold.errors.BadInputError` naming the argument, before
the value reaches code that would fail on it with a raw ``TypeError`` (or, for a flag, take
any truthy value for ``True``)."""

from __future__ import annotations

import os

import numpy as np

from bnfold.errors import BadInputError


def check_module(model: object) -> None:
    """Refuse a ``model`` that is not a ``torch.nn.Module`` (torch is imported only if it is
    not imported yet, as a module of it cannot exist before)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(model).__name__}")


def check_flags(**flags: object) -> None:
    """Refuse a boolean keyword argument that is not ``True`` or ``False`` (a numpy bool, or
    the integer 0 or 1, is one): ``backward="no"`` would otherwise be read as true."""
    for name, value in flags.items():
        if not (isinstance(value, (bool, np.bool_))
                or (isinstance(value, (int, np.integer)) and value in (0, 1))):
            raise BadInputError(f"{name} must be True or False, got {shown(value)}")


def check_callable(value: object, usage: str) -> None:
    """Refuse a callback argument that is neither ``None`` nor callable; ``usage`` shows how
    it is called and starts with the argument's name (``"progress(done, total)"``)."""
    if value is not None and not callable(value):
        name = usage.partition("(")[0]
        raise BadInputError(f"{name} must be None or a callable {usage}, got {shown(value)}")


def check_path(value: object, name: str, *, optional: bool = False) -> None:
    """Refuse a ``name`` that is not a path (``str`` or ``os.PathLike``); with ``optional``,
    ``None`` is accepted too."""
    if optional and value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        none = " or None" if optional else ""
        raise BadInputError(f"{name} takes a path (str or os.PathLike){none}, "
                            f"got {shown(value)}")


def shown(value: object) -> str:
    """``value``'s repr when short and on one line, else its type's name."""
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else type(value).__name__
