"""The insertion policy both insert passes share (FX ``passes/fx/insert.py`` and ONNX
``passes/onnx/insert.py``), free of any graph type.

What it decides: which options are valid (:func:`check_options`), how ``include`` /
``exclude`` are read (:func:`selector_list`), why a candidate layer gets no BN and in which order
the reasons are checked (:func:`skip_reason`), whether a normalization already follows a layer
(:func:`following_norm`), and which layers are the head that ``skip_last`` leaves alone
(:func:`last_layers`). Each pass supplies only how its IR answers the questions: a node's
readers, whether a reader normalizes or passes the channels through, what a selector matches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from bnfold.errors import BadInputError

#: Where the new BN goes: layer -> BN -> activation, or layer -> activation -> BN.
POSITIONS = ("before_activation", "after_activation")

N = TypeVar("N")  # a graph node
V = TypeVar("V")  # what a node reads: a node (FX) or a value (ONNX)
S = TypeVar("S")  # one include / exclude selector


def check_options(position: str, eps: Any, momentum: Any, *,
                  why_no_none: str | None = None) -> None:
    """Refuse an unknown ``position``, an ``eps`` that is not a finite number >= 0, and a
    ``momentum`` outside [0, 1]; ``momentum=None`` (PyTorch's cumulative average) is allowed
    unless ``why_no_none`` says why the IR has no such thing."""
    if position not in POSITIONS:
        raise BadInputError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if not (_is_number(eps) and 0 <= eps < float("inf")):
        raise BadInputError(f"eps must be a finite number >= 0, got {eps!r}")
    if momentum is None and why_no_none is None:
        return
    if not (_is_number(momentum) and 0 <= momentum <= 1):
        if why_no_none:
            raise BadInputError(
                f"momentum must be a number in [0, 1], got {momentum!r} ({why_no_none})")
        raise BadInputError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def selector_list(value: Any, what: str, accepts: Callable[[Any], bool],
                  expected: str) -> list[Any]:
    """``include`` / ``exclude`` as a list (one selector or an iterable of them; ``None``:
    empty), each checked by ``accepts``; ``BadInputError`` names ``expected`` otherwise."""
    if value is None:
        return []
    single = isinstance(value, (str, type)) or not isinstance(value, Iterable)
    items = [value] if single else list(value)
    for item in items:
        if not accepts(item):
            raise BadInputError(f"{what} takes {expected}, got {item!r}")
    return items


def skip_reason(selected_by: Callable[[Sequence[S]], str | None], include: Sequence[S],
                exclude: Sequence[S], normalized_by: Callable[[], str | None], is_last: bool,
                output: str) -> str | None:
    """Why a candidate layer gets no BN, or ``None``: not included, excluded (``exclude`` wins
    over ``include``), already followed by a normalization (so inserting twice equals
    inserting once), or the head (``is_last``: it produces ``output`` and ``skip_last`` is on).
    ``selected_by(specs)`` names the first selector matching the layer."""
    if include and selected_by(include) is None:
        return "not selected by include"
    if exclude and (spec := selected_by(exclude)) is not None:
        return f"excluded by {spec}"
    if (norm := normalized_by()) is not None:
        return f"already followed by {norm}"
    if is_last:
        return f"produces {output} (skip_last=True)"
    return None


def following_norm(value: V, readers: Callable[[V], Iterable[N]],
                   norm: Callable[[N], str | None], passes_through: Callable[[N, V], V | None],
                   depth: int = 4) -> str | None:
    """The normalization reading ``value`` directly or through up to ``depth`` readers that
    take it as their data input and keep its channels (activations, dropouts, reshapes):
    ``norm(reader)`` describes a normalization, ``passes_through(reader, value)`` is what the
    reader hands on (``None``: it does not pass ``value`` through)."""
    for reader in readers(value):
        if (desc := norm(reader)) is not None:
            return desc
    if depth == 0:
        return None
    for reader in readers(value):
        onward = passes_through(reader, value)
        if onward is not None and (
                desc := following_norm(onward, readers, norm, passes_through, depth - 1)):
            return desc
    return None


def last_layers(starts: Iterable[N | None], inputs_of: Callable[[N], Iterable[N | None]],
                layers: set[N]) -> set[N]:
    """Layers with a path to a graph output that crosses no other layer: the walk back from
    ``starts`` (the graph's outputs) stops at each layer it meets."""
    found: set[N] = set()
    seen: set[N] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in layers:
            found.add(node)
        else:
            stack.extend(inputs_of(node))
    return found
