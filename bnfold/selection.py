"""Per-BN control of a fold: the user's ``include`` / ``exclude`` globs.

A BN is known by several names: its node name, and the torch module path when the graph
records one (``layer2.0.bn1``: FX module calls, ``torch.export`` and dynamo-exported ONNX
metadata). A glob (:func:`fnmatch.fnmatchcase`, case-sensitive) selects a BN when it matches
one of these names or a dotted prefix of one (``"layer2"`` selects ``layer2.0.bn1``). A BN is
folded only when it is selected by ``include`` (if given) and by no ``exclude`` glob;
``exclude`` wins. Every other BN is kept, and the report says "excluded by the user".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bnfold.errors import BadInputError

EXCLUDED = "excluded by the user"


@dataclass(frozen=True)
class Selection:
    """The ``include`` / ``exclude`` globs of one fold (empty: every BN may fold)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: Any = None, exclude: Any = None) -> Selection:
        """From ``None``, one glob, or a list of globs; anything else is a BadInputError."""
        return cls(_globs(include, "include"), _globs(exclude, "exclude"))

    def refusal(self, names: Iterable[str | None]) -> str | None:
        """Why the BN known by ``names`` must be kept (``"excluded by the user (...)"``), or
        ``None`` when the fold may try it."""
        paths = {prefix for name in names if name for prefix in _prefixes(name)}
        for glob in self.exclude:
            if any(fnmatch.fnmatchcase(p, glob) for p in paths):
                return f"{EXCLUDED} (exclude {glob!r})"
        if self.include and not any(fnmatch.fnmatchcase(p, glob)
                                    for glob in self.include for p in paths):
            listed = ", ".join(repr(g) for g in self.include)
            return f"{EXCLUDED} (matched by no include glob: {listed})"
        return None


EVERY_BN = Selection()  # no globs: every BN may fold


def _globs(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set, frozenset)) or not all(
            isinstance(item, str) and item for item in items):
        raise BadInputError(f"{what} takes BN name globs (a string or a list of strings), "
                            f"got {value!r}")
    return tuple(items)


def _prefixes(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a", "a.b"]``: the name and the modules containing it."""
    parts = name.split(".")
    return [name, *(".".join(parts[:i]) for i in range(1, len(parts)))]
