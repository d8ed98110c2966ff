"""``torch.export`` programs in and out of the FX passes, and PT2 archives on disk.

:func:`on_program` runs an FX pass (``fold_fx``, ``insert_bn_fx``, ...) on an
``ExportedProgram``: the pass rewrites the program's unlifted module (``program.module()``,
parameters and buffers as attributes, so the input program is never touched), and the result
is exported again with ``torch.export.export`` on the program's example inputs and its dynamic
dims: each symbolic input dim becomes a ``Dim`` with the program's range for it (shared where
inputs share the symbol) or, when torch refuses those as too wide (the program also guards
sizes inside the range, ``H - 2 != 1`` after an unpadded 3x3 conv, as ``Dim.AUTO`` exports
make), a ``Dim.DYNAMIC`` hint with the same range where the range starts at 2 or more, from
which torch derives the guards and relations again. The new
program has the same user inputs and outputs (names, pytree specs, dynamic dims), a state
dict with the folded weights (removed BNs' parameters and buffers gone) and runs like the
input wherever the FX pass is exact. The module of a program is in training mode, so BNs
that ``insert_bn`` adds to a program normalize with batch statistics (a training graph, e.g.
for quantization-aware training). A program that was lowered to core ATen
(``run_decompositions()``, dialect ``ATEN``) is lowered again with the default table.

:func:`load_program` reads a ``torch.export.save`` archive (a zip with ``archive_format`` =
``pt2``) with ``torch.export.load``; any other file is refused before anything is unpickled.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.exc import UserError, UserErrorType
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from bnfold.arguments import check_flags
from bnfold.cli.program_commands import is_pt2_archive
from bnfold.errors import BadInputError, UnsupportedError, first_line
from bnfold.passes.fx.constants import state_kept
from bnfold.passes.fx.trace import quiet_pytree_warning, upper_bound
from bnfold.report import PassResult


def is_program(obj: object) -> bool:
    """True for a ``torch.export.ExportedProgram``."""
    return isinstance(obj, ExportedProgram)


def on_program(fx_pass: Callable[..., PassResult], program: ExportedProgram,
               example_inputs: Any = None, **options: Any) -> PassResult:
    """Run ``fx_pass(module, example_inputs=..., **options)`` on ``program``'s module and
    return ``(ExportedProgram, Report)``.

    ``example_inputs`` (a tensor or tuple) replaces the program's own example inputs, for the
    pass and for the new export. ``inplace=True`` is refused: a program is never rewritten in
    place.
    """
    inplace = options.pop("inplace", False)
    check_flags(inplace=inplace)
    if inplace:
        raise BadInputError("inplace=True does not apply to an ExportedProgram: a new program "
                            "is returned and the input is left as it was")
    args, kwargs = _example_inputs(program, example_inputs)
    unlifted = program.module()
    # torch.export's own hooks on the unlifted module (input checks against the program's
    # signature) belong to that module; the program exported again below gets its own.
    unlifted._forward_pre_hooks.clear()
    unlifted._forward_hooks.clear()
    module, report = fx_pass(unlifted, example_inputs=None if kwargs else args, **options)
    try:
        new = _export_again(module, program, args, kwargs)
        if program.dialect == "ATEN":
            with quiet_pytree_warning():
                new = new.run_decompositions()
    except Exception as exc:
        first = first_line(exc, limit=1000)
        raise UnsupportedError(
            f"{report.pass_name} rewrote the program but torch.export could not export the "
            f"result again ({first})") from exc
    report.notes.append("ExportedProgram in, ExportedProgram out (exported again on the "
                        "program's example inputs, with its dynamic dims)")
    return PassResult(new, report)


def also_on_programs(fx_pass: Callable[..., PassResult], name: str) -> Callable[..., PassResult]:
    """``fx_pass`` under the public ``name``, also taking an ``ExportedProgram`` as its model
    (then through :func:`on_program`); signature, return type and docstring are ``fx_pass``'s."""

    @functools.wraps(fx_pass)
    def run(model: Any, *args: Any, **kwargs: Any) -> PassResult:
        if is_program(model):  # torch.export.ExportedProgram in, ExportedProgram out
            return on_program(fx_pass, model, *args, **kwargs)
        return fx_pass(model, *args, **kwargs)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = (f"{(fx_pass.__doc__ or '').rstrip()}\n\n    A ``torch.export.ExportedProgram`` "
                   "model gives an ``ExportedProgram`` (see :mod:`bnfold.programs`).\n")
    return run


def _example_inputs(program: ExportedProgram, given: Any
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if given is not None:
        return (tuple(given) if isinstance(given, (tuple, list)) else (given,)), {}
    if program.example_inputs is None:
        raise BadInputError("this ExportedProgram carries no example inputs; pass "
                            "example_inputs")
    args, kwargs = program.example_inputs
    return tuple(args), dict(kwargs)


def _export_again(module: torch.nn.Module, program: ExportedProgram, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> ExportedProgram:
    """``module`` exported with ``program``'s dynamic dims: named ``Dim``s first, ``Dim.DYNAMIC``
    hints with the same ranges (see :func:`_dim`) when torch finds a named range violated by
    a guard."""
    try:
        return _export(module, args, kwargs, _dynamic_shapes(program, kwargs, named=True))
    except UserError as exc:
        if exc.error_type != UserErrorType.CONSTRAINT_VIOLATION:
            raise
    return _export(module, args, kwargs, _dynamic_shapes(program, kwargs, named=False))


def _export(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            dynamic_shapes: Any) -> ExportedProgram:
    """``torch.export.export``, with the module's tensors put back after its forward."""
    with state_kept(module):  # (exporting runs the forward: a buffer it writes would move)
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)


def _dynamic_shapes(program: ExportedProgram, kwargs: dict[str, Any], named: bool) -> Any:
    """The program's dynamic dims in ``torch.export``'s ``dynamic_shapes`` form (one entry per
    positional input, then per keyword input), as named ``Dim``s or ``Dim.DYNAMIC`` hints;
    ``None`` when every dim is static."""
    kinds = iter(program.graph_signature.input_specs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    dims: dict[Any, Any] = {}
    leaves: list[dict[int, Any] | None] = []
    for node in placeholders:
        if next(kinds).kind != InputKind.USER_INPUT:
            continue
        value = node.meta.get("val")
        shape = value.shape if isinstance(value, torch.Tensor) else ()
        spec = {axis: _dim(program, size, dims, named) for axis, size in enumerate(shape)
                if isinstance(size, torch.SymInt)}
        leaves.append(spec or None)
    if not dims and all(leaf is None for leaf in leaves):
        return None
    args, kw = pytree.tree_unflatten(leaves, program.call_spec.in_spec)
    return (*args, *(kw[k] for k in kwargs))


def _dim(program: ExportedProgram, size: torch.SymInt, dims: dict[Any, Any], named: bool
         ) -> Any:
    """One ``Dim`` per symbol (shared where inputs share it), with the program's range; unless
    ``named``, a ``Dim.DYNAMIC`` hint instead (torch relates the dims again from its guards)
    where the range starts at 2 or more (a hint's range does: torch specializes sizes 0 and 1),
    so the hint's range is the program's."""
    expr = size.node.expr
    if not expr.is_Symbol:
        return Dim.AUTO
    if expr not in dims:
        bounds = program.range_constraints.get(expr)
        lower = int(bounds.lower) if bounds is not None else 0
        upper = upper_bound(bounds) if bounds is not None else None
        dims[expr] = (Dim(str(expr), min=lower, max=upper) if named or lower < 2
                      else Dim.DYNAMIC(min=lower, max=upper))
    return dims[expr]


def load_program(path: str | os.PathLike[str]) -> ExportedProgram:
    """``torch.export.load`` of a PT2 archive; anything else is a one-line BadInputError."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    if not is_pt2_archive(path):
        raise BadInputError(f"{path}: not a torch.export archive (torch.export.save writes "
                            "one); plain checkpoints are not loaded")
    try:
        return torch.export.load(path)
    except Exception as exc:
        first = first_line(exc, limit=1000)
        raise BadInputError(f"{path}: could not load the torch.export archive ({first})"
                            ) from exc


def save_program(program: ExportedProgram, path: str | os.PathLike[str]) -> None:
    """``torch.export.save`` to ``path`` atomically (through memory, then temp file + rename:
    ``torch.export.save`` wants a ``.pt2`` name or a buffer)."""
    from bnfold.io.fileio import atomic_path

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
