"""The ``bnfold`` command: subcommands (:mod:`bnfold.cli.commands`), their one-line errors
(:mod:`bnfold.cli.errors`), tables for people (:mod:`bnfold.cli.render`), the HTML report and the
PT2 program commands. ``bnfold = "bnfold.cli:main"``; ``python -m bnfold.cli`` runs the same."""

from bnfold.cli.commands import main

__all__ = ["main"]
