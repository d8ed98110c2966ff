"""Rich tables and progress bars for the CLI (people); ``--json`` bypasses all of this."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bnfold.report import HEADERS as REPORT_HEADERS
from bnfold.report import Report
from bnfold.validation.result import HEADERS, ValidationResult

# Wide when piped (logs, CI, README), the terminal's width otherwise.
console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def report_table(report: Report, title: str) -> Table:
    """One row per BN: what happened to it, into what, or why it was kept."""
    table = Table(title=title, title_justify="left")
    for col in REPORT_HEADERS:
        table.add_column(col, overflow="fold")
    colours = {"folded": "green", "kept": "yellow", "inserted": "cyan", "skipped": "dim",
               "merged": "green"}
    for e, (bn, label, detail) in zip(report.entries, report.rows(), strict=True):
        table.add_row(bn, f"[{colours[e.action]}]{label}[/]", detail)
    return table


def print_report(report: Report, title: str) -> None:
    console.print(report_table(report, title))
    console.print(report.summary(nothing="no BatchNormalization found"))
    for note in report.notes:
        console.print(f"note: {note}")


def print_validation(result: ValidationResult) -> None:
    """The per-provider, per-output table, the inputs used, the tolerance rule, the verdict."""
    table = Table(title=f"{result.candidate} vs {result.reference}", title_justify="left")
    for col in HEADERS:
        table.add_column(col, overflow="fold")
    for row in result.rows():
        verdict = row[-1]
        style = "green" if verdict == "ok" else "yellow" if verdict.startswith("skipped") else "red"
        table.add_row(*row[:-1], f"[{style}]{verdict}[/]")
    console.print(table)
    for i in result.inputs:
        console.print(f"input {i['name']}: {i['dtype']} {i.get('shapes', i['shape'])} "
                      f"({i['source']})")
    for line in result.stats_lines() + result.reference_lines():
        console.print(line)
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"tolerance: {result.settings['tolerance_rule']}", style="dim")
    console.print(result.summary(), style="bold green" if result.passed else "bold red")


def print_rows(title: str, headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in headers:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


#: A progress bar appears only once its work has run this long (short runs print nothing).
SHOW_AFTER_S = 1.0


@contextmanager
def progress_bar(description: str, total: int | None = None
                 ) -> Iterator[Callable[[int, int], Any]]:
    """Yield ``update(done, total)``; shows a bar on stderr only when stderr is a terminal,
    and only from the first update after :data:`SHOW_AFTER_S` seconds."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(description, total=total)
    start = time.monotonic()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        if not bar.live.is_started and time.monotonic() - start >= SHOW_AFTER_S:
            bar.start()

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()
