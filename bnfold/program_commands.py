"""``bnfold fold`` / ``bnfold inspect`` for ``torch.export.save`` archives (``.pt2``).

The archive is loaded with ``torch.export.load`` (only after :func:`bnfold.programs.is_pt2_archive`
has recognised it; a plain checkpoint is never unpickled), folded with :func:`bnfold.fold` and
written with ``torch.export.save``, atomically. The JSON documents are the ONNX commands'
(``bnfold.fold/1``, ``bnfold.inspect/1``), with ``validation: null``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bnfold.errors import BadInputError


def is_program_file(path: Path) -> bool:
    """A ``.pt2`` name, or a zip that is a PT2 archive whatever its name."""
    from bnfold.programs import is_pt2_archive

    return path.suffix == ".pt2" or (path.is_file() and is_pt2_archive(path))


def fold_program(args: argparse.Namespace) -> int:
    """Fold the program in ``args.input``, write it to ``-o``; exit code 0."""
    import bnfold
    from bnfold.cli import OK, _check_report_path, _emit, _output_path
    from bnfold.programs import load_program, save_program

    out = _output_path(args)
    _check_report_path(args, args.input, out)
    if args.validate:
        raise BadInputError("--validate runs ONNX models in ONNX Runtime; it does not apply "
                            "to a torch.export program (the fold is exact: compare "
                            "program.module() outputs in torch)")
    folded, report = bnfold.fold(load_program(args.input), include=args.include,
                                 exclude=args.exclude)
    if not args.json:
        from bnfold.render import print_report

        print_report(report, f"fold {args.input}")
    save_program(folded, out)
    if not args.json:
        print(f"wrote {out}")
    _emit(args, {"schema": "bnfold.fold/1", "input": str(args.input), "output": str(out),
                 "fold": report.to_dict(), "validation": None, "written": True,
                 "passed": True})
    return OK


def inspect_program(args: argparse.Namespace) -> int:
    """What folding the program in ``args.input`` would do; nothing is written."""
    import bnfold
    from bnfold.cli import OK, _check_report_path, _emit
    from bnfold.programs import load_program

    _check_report_path(args, args.input)
    program = load_program(args.input)
    args_, kwargs = program.example_inputs or (None, None)
    _, report = bnfold.fold(program.module(), None if kwargs else args_)  # no re-export
    report.dry_run = True
    if not args.json:
        from bnfold.render import print_report

        print_report(report, f"inspect {args.input}")
    _emit(args, {"schema": "bnfold.inspect/1", "input": str(args.input),
                 "report": report.to_dict()})
    return OK
