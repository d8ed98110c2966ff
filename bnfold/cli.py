"""The ``bnfold`` command: fold, inspect, validate, insert, demo.

Exit codes: 0 ok; 1 validation failed; 2 bad input or usage (one line on stderr, no traceback,
no output file, the input untouched). Outputs are written through a temp file and a rename;
``-o`` equal to the input is refused unless ``--in-place``. ``--json`` prints one JSON document
on stdout and nothing else; otherwise rich tables. Progress bars go to stderr, only when it is a
terminal. JSON schemas (keys are only ever added within a version):

* ``bnfold.fold/1``: ``{schema, input, output, fold: REPORT, validation: VALIDATION|null,
  written: bool, passed: bool}``
* ``bnfold.fold-folder/1``: ``{schema, input, output, summary: {files, ok, validation_failed,
  bad_input}, results: [fold/1 document + exit_code | {input, output, written: false,
  passed: false, error, exit_code: 2}], exit_code}``
* ``bnfold.inspect/1``: ``{schema, input, report: REPORT, branches: REPORT}`` (``branches``:
  one entry per block of parallel branches, ``merged`` = would merge with ``--merge-branches``)
* ``bnfold.insert/1``: ``{schema, input, output, written, report: REPORT}``
* ``bnfold.validation/1`` (``bnfold validate``): see :mod:`bnfold.validation_result`
* REPORT (:meth:`bnfold.report.Report.to_dict`): ``{pass, changed, counts: {folded, kept,
  inserted, skipped}, entries: [{bn, action, into?, reason?, details?}], notes: [str]}``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OK, FAILED, BAD_INPUT = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = args.json or args.json_top
    from bnfold.errors import BnfoldError

    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return int(args.func(args))
    except BnfoldError as exc:
        _error(str(exc))
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (BNFOLD_DEBUG=1 shows the traceback)")
    return BAD_INPUT


def _error(message: str) -> None:
    line = " ".join(message.split())
    print(f"bnfold: error: {line}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from bnfold import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    check = argparse.ArgumentParser(add_help=False)
    check.add_argument("--providers", type=_csv, default=["cpu", "cuda"],
                       help="execution providers, comma-separated (default: cpu,cuda; the "
                            "CPU EP always runs)")
    check.add_argument("--require", type=_csv, default=[],
                       help="providers that must really run (e.g. cuda), else exit 1")
    check.add_argument("--atol", type=_tolerance,
                       help="absolute tolerance (default: dtype-aware)")
    check.add_argument("--rtol", type=_tolerance,
                       help="relative tolerance (default: dtype-aware)")
    check.add_argument("--dim", type=_dim, action="append", default=[], metavar="NAME=SIZE",
                       help="size of a dynamic dim, e.g. batch=4 (repeatable; default 2)")
    check.add_argument("--inputs", action="append", metavar="FILE",
                       help=".npz (keyed by input name) or .npy input sample (repeatable)")
    check.add_argument("--samples", type=int, default=3, help="random samples (default 3)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random samples")
    check.add_argument("--ort-optimize", action="store_true",
                       help="enable ORT graph optimizations (disabled by default: ORT's own "
                            "Conv+BN fusion could mask a wrong fold)")
    report = argparse.ArgumentParser(add_help=False)
    report.add_argument("--report", type=Path, metavar="FILE", help="also write the JSON here")

    parser = argparse.ArgumentParser(
        prog="bnfold", description="Fold, insert and validate BatchNorm in ONNX models.",
        epilog="exit codes: 0 ok, 1 validation failed, 2 bad input or usage")
    parser.add_argument("--version", action="version", version=f"bnfold {__version__}")
    parser.add_argument("--json", dest="json_top", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fold", parents=[common, check, report],
                       help="fold BatchNormalization into neighbouring layers",
                       description="Fold BNs of IN (a file, or a folder of .onnx files).")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("-o", "--output", type=Path, metavar="OUT")
    p.add_argument("--in-place", action="store_true",
                   help="allow OUT to be IN (without -o: overwrite IN)")
    p.add_argument("--validate", action="store_true",
                   help="validate IN vs OUT in ONNX Runtime; OUT is written only if it passes")
    p.add_argument("--merge-branches", action="store_true",
                   help="also merge parallel Conv(+BN)/BN/identity branches summed by an Add "
                        "into one Conv (RepVGG, MobileOne...; exact)")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("inspect", parents=[common, report],
                       help="per-BN table: folds into what, or why not")
    p.add_argument("input", type=Path, metavar="IN")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("validate", parents=[common, check, report],
                       help="compare two ONNX models in ONNX Runtime (exit 1 if they differ)")
    p.add_argument("reference", type=Path, metavar="A")
    p.add_argument("candidate", type=Path, metavar="B")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("insert", parents=[common, report],
                       help="insert BatchNormalization after Conv/Gemm/MatMul")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("-o", "--output", type=Path, metavar="OUT")
    p.add_argument("--in-place", action="store_true", help="allow OUT to be IN")
    p.add_argument("--position", choices=("before_activation", "after_activation"),
                   default="before_activation", help="BN before (default) or after the activation")
    p.add_argument("--skip-last", action=argparse.BooleanOptionalAction, default=True,
                   help="leave alone the last layer(s) before an output (default: skip)")
    p.add_argument("--include-last", dest="skip_last", action="store_false",
                   help="same as --no-skip-last")
    p.add_argument("--include", action="append", metavar="GLOB|OP",
                   help="only these node-name globs or op types (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB|OP",
                   help="not these node-name globs or op types (repeatable; wins)")
    p.add_argument("--eps", type=float, default=1e-5, help="BN epsilon (default 1e-5)")
    p.add_argument("--momentum", type=float, default=0.1,
                   help="BN momentum, PyTorch convention (default 0.1)")
    p.add_argument("--drop-bias", action="store_true",
                   help="remove the layer bias the BN makes redundant in training")
    p.add_argument("--training-mode", action="store_true",
                   help="write training-mode BNs (batch statistics, running mean/var outputs); "
                        "default: inference-mode BNs with identity statistics")
    p.set_defaults(func=cmd_insert)

    p = sub.add_parser("demo", parents=[common], help="run the end-to-end demo on a zoo model")
    p.add_argument("--model", default="resnet_small", help="zoo model name")
    p.add_argument("--skip-training", action="store_true",
                   help="leave out the insert-train-fold section (the slow one)")
    p.set_defaults(func=cmd_demo)
    return parser


def _csv(text: str) -> list[str]:
    return [p.strip().lower() for p in text.split(",") if p.strip()]


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _dim(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name or not size.isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE with SIZE >= 1, got {text!r}")
    return name, int(size)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

@dataclass
class _Outcome:
    """What folding one file gave: its exit code and the JSON document describing it."""

    code: int
    doc: dict[str, Any]


def cmd_fold(args: argparse.Namespace) -> int:
    from bnfold.errors import BadInputError

    if args.input.is_dir():
        return _fold_folder(args)
    out = _output_path(args)
    if out.exists() and out.is_dir():
        raise BadInputError(f"{out}: is a directory; give an output file")
    _check_report_path(args, args.input, out)
    outcome = _fold_file(args, args.input, out, show=not args.json)
    _emit(args, outcome.doc)
    return outcome.code


def _fold_file(args: argparse.Namespace, src: Path, out: Path, *, show: bool) -> _Outcome:
    import bnfold
    from bnfold.fileio import save_onnx

    model = load_checked(src)
    fold = bnfold.reparameterize_onnx if args.merge_branches else bnfold.fold_onnx
    folded, report = fold(model)
    doc: dict[str, Any] = {"schema": "bnfold.fold/1", "input": str(src), "output": str(out),
                           "fold": report.to_dict(), "validation": None}
    if show:
        from bnfold.render import print_report

        print_report(report, f"fold {src}")
    result = None
    if args.validate:
        result = _run_validation(args, src, folded, labels=(str(src), f"folded {out.name}"))
        doc["validation"] = result.to_dict()
        if show:
            from bnfold.render import print_validation

            print_validation(result)
    passed = result is None or result.passed
    if passed:
        save_onnx(folded, out)
    doc.update(written=passed, passed=passed)
    if show:
        print(f"wrote {out}" if passed else f"validation failed: {out} not written")
    return _Outcome(OK if passed else FAILED, doc)


def _fold_folder(args: argparse.Namespace) -> int:
    from bnfold.errors import BadInputError, BnfoldError

    if args.output is None and not args.in_place:
        raise BadInputError("folding a folder needs -o OUTDIR (or --in-place)")
    src_dir = args.input
    out_dir = src_dir if args.output is None else args.output
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"{out_dir}: exists and is not a directory")
    if out_dir.resolve() == src_dir.resolve() and not args.in_place:
        raise BadInputError(f"{out_dir}: is the input folder; pass --in-place to overwrite")
    _check_report_path(args)
    inside = out_dir.resolve() != src_dir.resolve() and out_dir.resolve().is_relative_to(
        src_dir.resolve())  # outputs of an earlier run are not inputs
    files = sorted(p for p in src_dir.rglob("*.onnx") if p.is_file() and not (
        inside and p.resolve().is_relative_to(out_dir.resolve())))
    if not files:
        raise BadInputError(f"{src_dir}: no .onnx files in this folder")
    from bnfold.render import progress_bar

    results: list[dict[str, Any]] = []
    with progress_bar("folding", len(files)) as update:
        for i, src in enumerate(files):
            out = out_dir / src.relative_to(src_dir)
            try:
                outcome = _fold_file(args, src, out, show=False)
                doc, code = outcome.doc, outcome.code
            except Exception as exc:  # one bad file must not stop the others
                if os.environ.get("BNFOLD_DEBUG"):
                    raise
                what = "" if isinstance(exc, BnfoldError) else (
                    f"internal error: {type(exc).__name__}: ")
                doc, code = {"input": str(src), "output": str(out), "written": False,
                             "passed": False, "error": what + " ".join(str(exc).split())}, BAD_INPUT
            doc["exit_code"] = code
            results.append(doc)
            update(i + 1, len(files))
    code = max(r["exit_code"] for r in results)
    summary = {"files": len(results), "ok": sum(r["exit_code"] == OK for r in results),
               "validation_failed": sum(r["exit_code"] == FAILED for r in results),
               "bad_input": sum(r["exit_code"] == BAD_INPUT for r in results)}
    doc = {"schema": "bnfold.fold-folder/1", "input": str(src_dir), "output": str(out_dir),
           "summary": summary, "results": results, "exit_code": code}
    if not args.json:
        _print_folder(results, summary)
    _emit(args, doc)
    return code


def _print_folder(results: list[dict[str, Any]], summary: dict[str, int]) -> None:
    from bnfold.render import print_rows

    rows = []
    for r in results:
        counts = r.get("fold", {}).get("counts", {})
        status = ("ok" if r["exit_code"] == OK else "validation failed"
                  if r["exit_code"] == FAILED else f"error: {r['error']}")
        rows.append((r["input"], str(counts.get("folded", "-")), str(counts.get("kept", "-")),
                     status))
    print_rows("fold folder", ("file", "folded", "kept", "result"), rows)
    print(f"{summary['files']} files: {summary['ok']} ok, {summary['validation_failed']} "
          f"failed validation, {summary['bad_input']} bad input")


def cmd_inspect(args: argparse.Namespace) -> int:
    import bnfold

    _check_report_path(args, args.input)
    from bnfold.passes.onnx.reparam import inspect_branches

    model = load_checked(args.input)
    report, blocks = bnfold.inspect_onnx(model), inspect_branches(model)
    if not args.json:
        from bnfold.render import print_report

        print_report(report, f"inspect {args.input}")
        if blocks.entries:
            print_report(blocks, "branch blocks (bnfold fold --merge-branches)")
    _emit(args, {"schema": "bnfold.inspect/1", "input": str(args.input),
                 "report": report.to_dict(), "branches": blocks.to_dict()})
    return OK


def cmd_validate(args: argparse.Namespace) -> int:
    _check_report_path(args, args.reference, args.candidate)
    result = _run_validation(args, args.reference, args.candidate)
    if not args.json:
        from bnfold.render import print_validation

        print_validation(result)
    _emit(args, result.to_dict())
    return OK if result.passed else FAILED


def cmd_insert(args: argparse.Namespace) -> int:
    import bnfold
    from bnfold.fileio import save_onnx

    out = _output_path(args)
    _check_report_path(args, args.input, out)
    model = load_checked(args.input)
    inserted, report = bnfold.insert_bn_onnx(
        model, position=args.position, skip_last=args.skip_last, include=args.include,
        exclude=args.exclude, eps=args.eps, momentum=args.momentum, drop_bias=args.drop_bias,
        training_mode=args.training_mode)
    save_onnx(inserted, out)
    if not args.json:
        from bnfold.render import print_report

        print_report(report, f"insert {args.input}")
        print(f"wrote {out}")
    _emit(args, {"schema": "bnfold.insert/1", "input": str(args.input), "output": str(out),
                 "written": True, "report": report.to_dict()})
    return OK


def cmd_demo(args: argparse.Namespace) -> int:
    from bnfold.errors import BadInputError
    from bnfold.models import zoo

    if args.model not in zoo.ZOO:
        raise BadInputError(f"unknown zoo model {args.model!r}; choose from {', '.join(zoo.ZOO)}")
    from bnfold.demo import run_demo

    return int(run_demo(model=args.model, as_json=args.json, train=not args.skip_training))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def load_checked(path: Path) -> Any:
    """Load an ONNX file for a pass: readable (:func:`bnfold.fileio.load_onnx`), a known
    ai.onnx opset, and accepted by ``onnx.checker``; else a one-line BnfoldError."""
    import onnx

    from bnfold.errors import BadInputError
    from bnfold.fileio import load_onnx
    from bnfold.validation import check_opset

    model = load_onnx(path)
    check_opset(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise BadInputError(f"{path}: invalid ONNX model ({lines[0] if lines else exc!r})") from exc
    return model


def _output_path(args: argparse.Namespace) -> Path:
    from bnfold.errors import BadInputError

    if args.output is None:
        if args.in_place:
            return args.input
        raise BadInputError("missing -o OUT (or --in-place to overwrite the input)")
    if args.output.resolve() == args.input.resolve() and not args.in_place:
        raise BadInputError(f"-o {args.output} is the input file; pass --in-place to overwrite it")
    return args.output


def _check_report_path(args: argparse.Namespace, *models: Path) -> None:
    """Refuse, before any work, a ``--report`` path that is a folder or one of the models."""
    from bnfold.errors import BadInputError

    path = getattr(args, "report", None)
    if path is None:
        return
    if path.is_dir():
        raise BadInputError(f"--report {path}: is a directory; give a file")
    if any(path.resolve() == m.resolve() for m in models):
        raise BadInputError(f"--report {path}: is a model file of this command; give another")


def _run_validation(args: argparse.Namespace, reference: Any, candidate: Any,
                    labels: tuple[str, str] | None = None) -> Any:
    import bnfold
    from bnfold.render import progress_bar

    with progress_bar("validating") as update:
        return bnfold.validate(
            reference, candidate, providers=args.providers, require=args.require,
            inputs=args.inputs, dims=dict(args.dim), atol=args.atol, rtol=args.rtol,
            seed=args.seed, samples=args.samples, optimize=args.ort_optimize,
            progress=update, labels=labels)


def _emit(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """Print ``doc`` as JSON with ``--json``; write it to ``--report`` atomically if given."""
    text = json.dumps(doc, indent=2, allow_nan=False, default=str)
    if args.json:
        print(text)
    path = getattr(args, "report", None)
    if path is not None:
        from bnfold.errors import BadInputError
        from bnfold.fileio import write_atomic

        try:
            write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))
        except OSError as exc:
            raise BadInputError(f"--report {path}: could not write ({exc.strerror or exc})"
                                ) from exc


if __name__ == "__main__":
    sys.exit(main())
