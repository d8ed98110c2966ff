"""The ``bnfold`` command: fold, inspect, validate, insert, demo.

Exit codes: 0 ok; 1 validation failed; 2 bad input or usage (one line on stderr, no traceback,
no output file, the input untouched). Outputs are written through a temp file and a rename;
``-o`` equal to the input is refused unless ``--in-place``. ``--json`` prints one JSON document
on stdout and nothing else; otherwise rich tables. Progress bars go to stderr, only when it is a
terminal. The JSON documents and their schemas: :mod:`bnfold.documents`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold import documents

OK, FAILED, BAD_INPUT = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    if sys.stdout is None:  # (started with its standard output closed: ``>&-``)
        _error("standard output is closed: bnfold prints its tables and JSON there; give it "
               "one (> /dev/null to drop them)")
        return BAD_INPUT
    parser = build_parser()
    args = parser.parse_args(argv)
    args.json = args.json or args.json_top
    from bnfold.cli.errors import expected_error, quiet_libraries
    from bnfold.errors import BnfoldError

    quiet_libraries()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return int(_run_trapping_signals(args))
    except BnfoldError as exc:
        _error(str(exc))
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        if os.environ.get("BNFOLD_DEBUG"):
            raise
        _error(expected_error(exc) or
               f"internal error: {type(exc).__name__}: {exc} (BNFOLD_DEBUG=1 shows the traceback)")
    return BAD_INPUT


def _error(message: str) -> None:
    line = " ".join(message.split())
    if sys.stderr is not None:
        print(f"bnfold: error: {line}", file=sys.stderr)


def _run_trapping_signals(args: argparse.Namespace) -> int:
    """Run the command with SIGTERM and SIGHUP (unless ignored, as under ``nohup``) raising
    ``SystemExit(128 + signal)``, as SIGINT raises KeyboardInterrupt: the writers' cleanup
    runs, so no temporary or half-written file is left behind."""
    import signal
    import threading

    def stop(signum: int, frame: object) -> None:
        _error(f"terminated by {signal.Signals(signum).name}")
        raise SystemExit(128 + signum)

    trapped = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                trapped[sig] = signal.signal(sig, stop)
    try:
        return int(args.func(args))
    finally:
        for sig, previous in trapped.items():
            signal.signal(sig, previous)


class _Version(argparse.Action):
    """``--version``: print ``bnfold <version>`` and exit, the version read only then."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from bnfold import __version__

        print(f"bnfold {__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--json", dest="json_top", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fold", parents=[common, check, report],
                       help="fold BatchNormalization into neighbouring layers",
                       description="Fold BNs of IN (a file, or a folder of .onnx files); a "
                                   "torch.export .pt2 archive gives a .pt2 archive.")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument("-o", "--output", type=Path, metavar="OUT")
    p.add_argument("--in-place", action="store_true",
                   help="allow OUT to be IN (without -o: overwrite IN)")
    p.add_argument("--validate", action="store_true",
                   help="validate IN vs OUT in ONNX Runtime; OUT is written only if it passes")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="fold only BNs whose node name or torch module path matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="keep BNs whose node name or torch module path matches (repeatable; wins)")
    p.add_argument("--merge-branches", action="store_true",
                   help="also merge parallel Conv(+BN)/BN/identity branches summed by an Add "
                        "into one Conv (RepVGG, MobileOne...; exact)")
    p.add_argument(*_FREEZE, action="store_true", help=_FREEZE_HELP)
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("inspect", parents=[common, report],
                       help="per-BN table: folds into what, or why not")
    p.add_argument("input", type=Path, metavar="IN")
    p.add_argument(*_FREEZE, action="store_true", help=_FREEZE_HELP)
    p.add_argument("--html", type=Path, metavar="FILE.html",
                   help="also write the table with each BN's graph neighbourhood as HTML")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("validate", parents=[common, check, report],
                       help="compare two ONNX models in ONNX Runtime (exit 1 if they differ)")
    p.add_argument("reference", type=Path, metavar="A")
    p.add_argument("candidate", type=Path, metavar="B")
    p.add_argument("--save-inputs", type=Path, metavar="FILE.npz",
                   help="write the input samples used (golden inputs)")
    p.add_argument("--save-outputs", type=Path, metavar="FILE.npz",
                   help="write the reference's and the candidate's outputs")
    p.add_argument("--load-inputs", type=Path, metavar="FILE.npz",
                   help="run on the samples of a --save-inputs file")
    p.add_argument("--no-upcast-reference", dest="upcast_reference", action="store_false",
                   help="compare a float16/bfloat16 model against itself, not against its "
                        "graph computed in float32")
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
    """What folding one file gave: its exit code, the JSON document describing it, and the
    output written beside its path, still to commit (:func:`_emit`)."""

    code: int
    doc: dict[str, Any]
    staged: Any = None
    reads: set[Path] = field(default_factory=set)  # the input's external data files


def cmd_fold(args: argparse.Namespace) -> int:
    from bnfold.errors import BadInputError

    if args.input.is_dir():
        return _fold_folder(args)
    from bnfold.cli.program_commands import fold_program, is_program_file

    if is_program_file(args.input):  # a torch.export.save archive (.pt2)
        return fold_program(args)
    out = _output_path(args)
    if out.exists() and out.is_dir():
        raise BadInputError(f"{out}: is a directory; give an output file")
    from bnfold.io.output_paths import check_written_path

    check_written_path("-o", out, [], _samples(args))
    _check_report_path(args, args.input, out)
    outcome = _fold_file(args, args.input, out, show=not args.json)
    _emit(args, outcome.doc, [outcome.staged] if outcome.staged else [])
    if outcome.staged and not args.json:
        print(f"wrote {out}")
    return outcome.code


def _fold_file(args: argparse.Namespace, src: Path, out: Path, *, show: bool) -> _Outcome:
    import bnfold
    from bnfold.cli.errors import naming
    from bnfold.io.external_data import referenced_files
    from bnfold.io.fileio import load_checked, load_for_pass, stage_save
    from bnfold.io.split_proto import SplitProto

    merge = _merge_branches(args)
    model = load_checked(src) if merge else load_for_pass(src)
    with naming(src):
        if merge:
            from bnfold.passes.onnx.frozen_inputs import note_frozen

            model, frozen = _frozen(args, model)
            folded, report = bnfold.reparameterize_onnx(model)
            note_frozen(report, frozen)
        else:
            with _fold_progress(show) as update:
                folded, report = bnfold.fold_onnx(
                    model, include=args.include, exclude=args.exclude, progress=update,
                    freeze_initializer_inputs=args.freeze_initializer_inputs)
    doc: dict[str, Any] = {"schema": documents.FOLD, "input": str(src), "output": str(out),
                           "fold": report.to_dict(), "validation": None}
    if show:
        from bnfold.cli.render import print_report

        print_report(report, f"fold {src}")
    result = None
    if args.validate:
        candidate = folded.whole() if isinstance(folded, SplitProto) else folded
        result = _run_validation(args, src, candidate, labels=(str(src), f"folded {out.name}"))
        doc["validation"] = result.to_dict()
        if show:
            from bnfold.cli.render import print_validation

            print_validation(result)
    passed = result is None or result.passed
    single_file = isinstance(model, SplitProto)  # (no external data: reads no other file)
    reads = set() if single_file else referenced_files(model)
    staged = stage_save(folded, out, keep=_kept(reads, src, out)) if passed else None
    doc.update(written=passed, passed=passed)
    if show and not passed:
        print(f"validation failed: {out} not written")
    return _Outcome(OK if passed else FAILED, doc, staged, reads)


def _fold_progress(show: bool) -> Any:
    """A progress bar for one file's fold (stderr, terminals only, past 1 s) when ``show``;
    else a context yielding ``None`` (no callback: folder runs draw their own bar)."""
    if not show:
        return contextlib.nullcontext()
    from bnfold.cli.render import progress_bar

    return progress_bar("folding BNs")


def _kept(reads: set[Path], src: Path, out: Path) -> set[Path]:
    """The data files an output may not remove: what its input reads, unless it replaces
    that input (folding in place), whose old data then goes if bnfold wrote it."""
    return set() if src.resolve() == out.resolve() else reads


def _fold_folder(args: argparse.Namespace) -> int:
    from bnfold.cli.errors import expected_error
    from bnfold.errors import BadInputError
    from bnfold.io.folderscan import model_files

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
    files, unreadable = model_files(src_dir, out_dir.resolve() if inside else None)
    if not files and not unreadable:
        raise BadInputError(f"{src_dir}: no .onnx files in this folder")
    _check_report_path(args, *files, *(out_dir / f.relative_to(src_dir) for f in files))
    from bnfold.io.output_paths import check_folder_outputs

    check_folder_outputs([out_dir / f.relative_to(src_dir) for f in files], files)
    from bnfold.cli.render import progress_bar

    results: list[dict[str, Any]] = [
        {"input": str(d), "output": str(out_dir / d.relative_to(src_dir)), "written": False,
         "passed": False, "error": f"{d}: could not read this folder ({why})",
         "exit_code": BAD_INPUT}
        for d, why in unreadable]
    staged: list[Any] = []  # committed together with the report, after every file is folded
    reads: dict[Path, set[Path]] = {}  # input -> the data files it reads
    with progress_bar("folding", len(files)) as update, _discarded_on_error(staged):
        for i, src in enumerate(files):
            out = out_dir / src.relative_to(src_dir)
            try:
                outcome = _fold_file(args, src, out, show=False)
                doc, code = outcome.doc, outcome.code
                reads[src.resolve()] = outcome.reads
                if outcome.staged:
                    outcome.staged.release_model()
                    staged.append(outcome.staged)
            except Exception as exc:  # one bad file must not stop the others
                if os.environ.get("BNFOLD_DEBUG"):
                    raise
                error = expected_error(exc) or " ".join(
                    f"internal error: {type(exc).__name__}: {exc}".split())
                doc, code = {"input": str(src), "output": str(out), "written": False,
                             "passed": False, "error": error}, BAD_INPUT
            doc["exit_code"] = code
            results.append(doc)
            update(i + 1, len(files))
    code = max(r["exit_code"] for r in results)
    summary = {"files": len(results), "ok": sum(r["exit_code"] == OK for r in results),
               "validation_failed": sum(r["exit_code"] == FAILED for r in results),
               "bad_input": sum(r["exit_code"] == BAD_INPUT for r in results)}
    doc = {"schema": documents.FOLD_FOLDER, "input": str(src_dir), "output": str(out_dir),
           "summary": summary, "results": results, "exit_code": code}
    if not args.json:
        _print_folder(results, summary)
    for s in staged:  # no output removes a data file that another input reads
        s.keep = set().union(*(r for src, r in reads.items() if src != s.target.resolve()))
    _emit(args, doc, staged)
    return code


@contextlib.contextmanager
def _discarded_on_error(staged: list[Any]) -> Iterator[None]:
    """Remove every staged output if the block fails (an interrupt, a signal): a folder run
    commits nothing until all its files are folded."""
    try:
        yield
    except BaseException:
        for output in staged:
            output.discard()
        raise


def _print_folder(results: list[dict[str, Any]], summary: dict[str, int]) -> None:
    from bnfold.cli.render import print_rows

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
    from bnfold.cli.errors import naming
    from bnfold.cli.program_commands import inspect_program, is_program_file

    _check_html_path(args)
    if is_program_file(args.input):  # a torch.export.save archive (.pt2)
        return inspect_program(args)
    _check_report_path(args, args.input)
    from bnfold.io.fileio import load_for_pass
    from bnfold.io.split_proto import SplitProto
    from bnfold.passes.onnx.frozen_inputs import note_frozen
    from bnfold.passes.onnx.reparam import inspect_branches

    # (a plain single-file model is dry-run on the protobuf, without onnx-ir: start-up time)
    model, frozen = _frozen(args, load_for_pass(args.input))
    with naming(args.input):
        report, blocks = bnfold.inspect_onnx(model), inspect_branches(model)
    note_frozen(report, frozen)
    staged = []
    if args.html is not None:
        from bnfold.cli import html_report
        from bnfold.passes.onnx.names import neighbourhoods

        ir_model = model.to_ir(copy=False) if isinstance(model, SplitProto) else model
        staged.append(html_report.write(args.html, html_report.render(
            report, f"bnfold inspect {args.input.name}", neighbourhoods(ir_model))))
    if not args.json:
        from bnfold.cli.render import print_report

        print_report(report, f"inspect {args.input}")
        if blocks.entries:
            print_report(blocks, "branch blocks (bnfold fold --merge-branches)")
    _emit(args, {"schema": documents.INSPECT, "input": str(args.input),
                 "report": report.to_dict(), "branches": blocks.to_dict()}, staged)
    return OK


def cmd_validate(args: argparse.Namespace) -> int:
    from bnfold.io.output_paths import check_written_paths
    from bnfold.validation.golden import handle_args, write_requested

    check_written_paths({"--report": args.report, "--save-inputs": args.save_inputs,
                         "--save-outputs": args.save_outputs},
                        [args.reference, args.candidate], _samples(args))
    handle_args(args)
    result = _run_validation(args, args.reference, args.candidate)
    staged = write_requested(args, result)
    if not args.json:
        from bnfold.cli.render import print_validation

        print_validation(result)
    _emit(args, result.to_dict(), staged)
    return OK if result.passed else FAILED


def cmd_insert(args: argparse.Namespace) -> int:
    import bnfold
    from bnfold.cli.errors import naming
    from bnfold.io.external_data import referenced_files
    from bnfold.io.fileio import load_checked, stage_save

    out = _output_path(args)
    _check_report_path(args, args.input, out)
    model = load_checked(args.input)
    with naming(args.input):
        inserted, report = bnfold.insert_bn_onnx(
            model, position=args.position, skip_last=args.skip_last, include=args.include,
            exclude=args.exclude, eps=args.eps, momentum=args.momentum,
            drop_bias=args.drop_bias, training_mode=args.training_mode)
    staged = stage_save(inserted, out, keep=_kept(referenced_files(model), args.input, out))
    if not args.json:
        from bnfold.cli.render import print_report

        print_report(report, f"insert {args.input}")
    _emit(args, {"schema": documents.INSERT, "input": str(args.input), "output": str(out),
                 "written": True, "report": report.to_dict()}, [staged])
    if not args.json:
        print(f"wrote {out}")
    return OK


def cmd_demo(args: argparse.Namespace) -> int:
    from bnfold.errors import BadInputError
    from bnfold.models import zoo

    if args.model not in zoo.ZOO:
        raise BadInputError(f"unknown zoo model {args.model!r}; choose from {', '.join(zoo.ZOO)}")
    from bnfold.demo import run_demo

    _quiet_onnxruntime()
    return int(run_demo(model=args.model, as_json=args.json, train=not args.skip_training))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _output_path(args: argparse.Namespace) -> Path:
    from bnfold.errors import BadInputError

    if args.output is None:
        if args.in_place:
            return args.input
        raise BadInputError("missing -o OUT (or --in-place to overwrite the input)")
    if args.output.resolve() == args.input.resolve() and not args.in_place:
        raise BadInputError(f"-o {args.output} is the input file; pass --in-place to overwrite it")
    _check_output_file(args.output, args.input)
    return args.output


def _check_output_file(out: Path, src: Path) -> None:
    """Refuse an output that is stdout (``-``, or the stream this process writes to) or an
    external data file of the input (writing it would destroy the input)."""
    from bnfold.errors import BadInputError
    from bnfold.io.external_data import files_named_by

    if str(out) == "-" or _is_own_stream(out):
        raise BadInputError(f"-o {out}: bnfold does not write a model to its standard output "
                            "or error (tables and JSON go there); give a file")
    if out.exists() and out.resolve() in files_named_by(src):
        raise BadInputError(f"-o {out}: is an external data file of the input {src}; "
                            "give another output")


def _is_own_stream(path: Path) -> bool:
    """True if ``path`` is this process's stdout or stderr (``/dev/null`` is nobody's)."""
    try:
        st = os.stat(path)
        if os.path.samestat(st, os.stat(os.devnull)):
            return False
        return any(os.path.samestat(st, os.fstat(fd)) for fd in (1, 2))
    except OSError:
        return False


def _check_html_path(args: argparse.Namespace) -> None:
    """``inspect --html``: the output-path checks of ``--report``, and not the report file."""
    from bnfold.io.output_paths import check_written_paths

    check_written_paths({"--report": args.report, "--html": args.html}, [args.input])


_FREEZE = ("--freeze-initializer-inputs",)
_FREEZE_HELP = ("treat graph inputs that have an initializer (weights exported as inputs, e.g. "
                "keep_initializers_as_inputs=True) as constants: they fold, and callers can no "
                "longer feed them")


def _frozen(args: argparse.Namespace, model: Any) -> tuple[Any, list[str]]:
    """``--freeze-initializer-inputs`` on a loaded model: the model to pass on, and the
    names of the inputs it no longer has (:func:`bnfold.passes.onnx.frozen_inputs.freeze`)."""
    if not args.freeze_initializer_inputs:
        return model, []
    from bnfold.passes.onnx.frozen_inputs import freeze

    return freeze(model)


def _merge_branches(args: argparse.Namespace) -> bool:
    """``--merge-branches``, refused with ``--include``/``--exclude`` (they select BNs)."""
    if args.merge_branches and (args.include or args.exclude):
        from bnfold.errors import BadInputError

        raise BadInputError("--include/--exclude select BNs to fold; they do not "
                            "combine with --merge-branches")
    return bool(args.merge_branches)


def _check_report_path(args: argparse.Namespace, *models: Path) -> None:
    """Refuse, before any work, a ``--report`` path that is a folder, one of the models or a
    sample file the command reads."""
    from bnfold.io.output_paths import check_written_path

    check_written_path("--report", getattr(args, "report", None), models, _samples(args))


def _samples(args: argparse.Namespace) -> list[Path]:
    """The sample files the command reads (``--inputs``, ``--load-inputs``)."""
    load = getattr(args, "load_inputs", None)
    return [Path(p) for p in getattr(args, "inputs", None) or []] + ([load] if load else [])


def _run_validation(args: argparse.Namespace, reference: Any, candidate: Any,
                    labels: tuple[str, str] | None = None) -> Any:
    import bnfold
    from bnfold.cli.render import progress_bar

    _quiet_onnxruntime()

    with progress_bar("validating") as update:
        return bnfold.validate(
            reference, candidate, providers=args.providers, require=args.require,
            inputs=args.inputs, dims=dict(args.dim), atol=args.atol, rtol=args.rtol,
            seed=args.seed, samples=args.samples, optimize=args.ort_optimize,
            progress=update, labels=labels,
            upcast_reference=getattr(args, "upcast_reference", True))


def _quiet_onnxruntime() -> None:
    """Silence ONNX Runtime's own logging; imported only by commands that run it."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


def _emit(args: argparse.Namespace, doc: dict[str, Any], staged: Sequence[Any] = ()) -> None:
    """Write ``doc`` for ``--report`` (staged) if given, print it as JSON with ``--json``,
    then commit the ``staged`` outputs (models, :func:`bnfold.io.fileio.stage_save`; other
    files, :class:`bnfold.io.staged_save.StagedFile`) and the report. A report that cannot be
    written leaves nothing written and prints no JSON (exit 2 means nothing was written); a
    standard output that cannot be written (a closed pipe, a full disk) leaves nothing
    written either; what could still fail after the JSON is out is a rename."""
    text = json.dumps(doc, indent=2, allow_nan=False, default=str)
    path = getattr(args, "report", None)
    with contextlib.ExitStack() as pending:
        for output in staged:
            pending.enter_context(output)  # discarded unless committed
        report = None
        if path is not None:
            from bnfold.io.staged_save import StagedFile

            with _report_errors(path):
                report = pending.enter_context(
                    StagedFile(path, lambda tmp: tmp.write_text(text + "\n")))
        if args.json:
            print(text, flush=True)
        for output in staged:
            output.commit()
        if report is not None:
            with _report_errors(path):
                report.commit()


@contextlib.contextmanager
def _report_errors(path: Path) -> Iterator[None]:
    """An ``OSError`` writing the ``--report`` file as one line naming it."""
    try:
        yield
    except OSError as exc:
        from bnfold.errors import BadInputError

        where = f": {exc.filename}" if exc.filename and exc.strerror else ""
        raise BadInputError(f"--report {path}: could not write "
                            f"({exc.strerror or exc}{where})") from exc

