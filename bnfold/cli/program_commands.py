"""``bnfold fold`` / ``bnfold inspect`` for ``torch.export.save`` archives (``.pt2``).

The archive is loaded with ``torch.export.load`` (only after :func:`is_pt2_archive`
has recognised it; a plain checkpoint is never unpickled), folded with :func:`bnfold.fold`
(``--merge-branches``: :func:`bnfold.reparameterize`) and written with ``torch.export.save``,
atomically. The JSON documents are the ONNX commands'
(``bnfold.fold/1``, ``bnfold.inspect/1``), with ``validation: null``.
"""

from __future__ import annotations

import argparse
import operator
import os
import zipfile
from pathlib import Path
from typing import Any

from bnfold import documents
from bnfold.errors import BadInputError


def is_pt2_archive(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a ``torch.export.save`` archive (read from the zip's directory
    and its ``archive_format`` entry only; nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.rpartition("/")[2] == "archive_format"]
            return any(archive.read(n).strip() == b"pt2" for n in names)
    except (OSError, zipfile.BadZipFile):
        return False


def is_program_file(path: Path) -> bool:
    """A ``.pt2`` name, or a zip that is a PT2 archive whatever its name (torch is imported
    only for programs)."""
    return path.suffix == ".pt2" or (path.is_file() and is_pt2_archive(path))


def fold_program(args: argparse.Namespace) -> int:
    """Fold the program in ``args.input`` (``--merge-branches``: merge branch blocks first),
    write it to ``-o``; exit code 0."""
    import bnfold
    from bnfold.cli.commands import (
        OK,
        _check_report_path,
        _emit,
        _fold_progress,
        _merge_branches,
        _output_path,
    )
    from bnfold.programs import load_program, save_program

    out = _output_path(args)
    if out.is_dir():
        raise BadInputError(f"{out}: is a directory; give an output file")
    if out.suffix.lower() in (".onnx", ".onnxtxt", ".pb"):
        raise BadInputError(f"{out}: the folded program is a torch.export archive, not an "
                            "ONNX model; name the output .pt2 (bnfold.export writes ONNX)")
    _check_report_path(args, args.input, out)
    if args.validate:
        raise BadInputError("--validate runs ONNX models in ONNX Runtime; it does not apply "
                            "to a torch.export program (the fold is exact: compare "
                            "program.module() outputs in torch)")
    _no_freeze(args)
    merge = _merge_branches(args)
    program = load_program(args.input)
    if merge:
        folded, report = bnfold.reparameterize(program)
    else:
        with _fold_progress(not args.json) as update:
            folded, report = bnfold.fold(program, include=args.include, exclude=args.exclude,
                                         progress=update)
    if not args.json:
        from bnfold.cli.render import print_report

        print_report(report, f"fold {args.input}")
    save_program(folded, out)
    if not args.json:
        print(f"wrote {out}")
    _emit(args, {"schema": documents.FOLD, "input": str(args.input), "output": str(out),
                 "fold": report.to_dict(), "validation": None, "written": True,
                 "passed": True})
    return OK


def _no_freeze(args: argparse.Namespace) -> None:
    """Refuse ``--freeze-initializer-inputs`` for a program (an ONNX graph-input notion)."""
    if args.freeze_initializer_inputs:
        raise BadInputError("--freeze-initializer-inputs applies to ONNX models; a torch.export "
                            "program's weights are parameters, not graph inputs")


def inspect_program(args: argparse.Namespace) -> int:
    """What folding the program in ``args.input`` would do; nothing is written."""
    import bnfold
    from bnfold.cli.commands import OK, _check_report_path, _emit
    from bnfold.programs import load_program

    _check_report_path(args, args.input)
    _no_freeze(args)
    program = load_program(args.input)
    args_, kwargs = program.example_inputs or (None, None)
    module = program.module()
    _, report = bnfold.fold(module, None if kwargs else args_)  # no re-export
    report.dry_run = True
    staged = []
    if args.html is not None:
        from bnfold.cli import html_report

        staged.append(html_report.write(args.html, html_report.render(
            report, f"bnfold inspect {args.input.name}", _neighbourhoods(module))))
    if not args.json:
        from bnfold.cli.render import print_report

        print_report(report, f"inspect {args.input}")
    _emit(args, {"schema": documents.INSPECT, "input": str(args.input),
                 "report": report.to_dict()}, staged)
    return OK


def _neighbourhoods(module: Any) -> dict[str, Any]:
    """For each BN of a program's module, by its report label: the node feeding it and the
    nodes reading it (through the ``getitem`` of ATen BNs that return a tuple)."""
    from bnfold.cli.html_report import Neighbourhood
    from bnfold.passes.fx.sites import bn_label, is_batchnorm

    def label(node: Any) -> tuple[str, str]:
        what = node.target.__name__ if callable(node.target) else str(node.target)
        return node.name, f"{what.split('.')[0]} {node.name}"

    out = {}
    for node in module.graph.nodes:
        if not is_batchnorm(module, node) or not node.args:
            continue
        users = [u for u in node.users if u.target is not operator.getitem] + [
            w for u in node.users if u.target is operator.getitem for w in u.users]
        source = node.args[0]
        out[bn_label(module, node)] = Neighbourhood(
            [label(source)] if hasattr(source, "name") else [], [label(u) for u in users])
    return out
