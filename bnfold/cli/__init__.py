"""The ``bnfold`` command: subcommands (:mod:`bnfold.cli.commands`), their one-line errors
(:mod:`bnfold.cli.errors`), tables for people (:mod:`bnfold.cli.render`), the HTML report and the
PT2 program commands. ``bnfold = "bnfold.cli:main"``; ``python -m bnfold.cli`` runs the same."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: :func:`bnfold.cli.commands.main`, imported here so that a Ctrl-C
    while the command's modules load ends in the same one line and exit code 130 as one
    during the command (not a traceback)."""
    try:
        from bnfold.cli.commands import main as run
    except KeyboardInterrupt:
        print("bnfold: error: interrupted", file=sys.stderr)
        return 130
    return run(argv)


__all__ = ["main"]
