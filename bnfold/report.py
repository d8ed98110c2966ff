"""One report type for every pass: what it changed and, for each BN it left, why.

Each entry is ``{bn, action, into, reason, ...}`` where ``action`` is one of
``folded`` (BN removed into ``into``), ``kept`` (BN left in the graph, ``reason`` says why),
``inserted`` (a new BN after ``after``) or ``skipped`` (an insertion candidate left alone);
``merged`` is a block of parallel branches merged ``into`` one conv (``bnfold.reparameterize``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

from bnfold.tables import plain_table

Action = Literal["folded", "kept", "inserted", "skipped", "merged"]
HEADERS = ("BN", "action", "into / reason")


@dataclass
class Entry:
    """What a pass did with one BN (or one insertion candidate)."""

    bn: str
    action: Action
    into: str | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # the torch module path the graph records for the BN, if any

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @property
    def shown(self) -> str:
        """The BN as tables show it: ``"node (module path)"`` when the module differs."""
        return f"{self.bn} ({self.module})" if self.module and self.module != self.bn \
            else self.bn


@dataclass
class Report:
    """The record a pass returns; ``changed`` is true when the model was rewritten.

    ``dry_run=True`` (``inspect_onnx``): the entries say what the pass *would* do; nothing was
    changed, so ``changed`` is false and :meth:`label` reads "would fold".
    """

    pass_name: str
    entries: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def add(
        self,
        bn: str,
        action: Action,
        *,
        into: str | None = None,
        reason: str | None = None,
        **details: Any,
    ) -> Entry:
        entry = Entry(bn, action, into, reason, dict(details))
        self.entries.append(entry)
        return entry

    def by_action(self, action: Action) -> list[Entry]:
        return [e for e in self.entries if e.action == action]

    @property
    def folded(self) -> list[Entry]:
        return self.by_action("folded")

    @property
    def kept(self) -> list[Entry]:
        return self.by_action("kept")

    @property
    def inserted(self) -> list[Entry]:
        return self.by_action("inserted")

    @property
    def skipped(self) -> list[Entry]:
        return self.by_action("skipped")

    @property
    def merged(self) -> list[Entry]:
        return self.by_action("merged")

    @property
    def changed(self) -> bool:
        return not self.dry_run and bool(self.folded or self.inserted or self.merged)

    def label(self, action: Action) -> str:
        """How to show ``action``: as is, or ``"would fold"``/``"would keep"``... in a dry run."""
        if not self.dry_run:
            return action
        return "would " + {"folded": "fold", "kept": "keep", "inserted": "insert",
                           "skipped": "skip", "merged": "merge"}[action]

    def counts(self) -> dict[str, int]:
        out = {"folded": 0, "kept": 0, "inserted": 0, "skipped": 0}
        for e in self.entries:
            out[e.action] = out.get(e.action, 0) + 1  # "merged" only where a block merged
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "dry_run": self.dry_run,
            "changed": self.changed,
            "counts": self.counts(),
            "entries": [e.to_dict() for e in self.entries],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def rows(self) -> list[tuple[str, str, str]]:
        """Table cells (:data:`HEADERS`), one row per entry: the BN, what happened to it, and
        into what (folded, inserted, merged) or why (kept, skipped)."""
        return [(e.shown, self.label(e.action),
                 (e.into if e.action in ("folded", "inserted", "merged") else e.reason) or "")
                for e in self.entries]

    def summary(self, nothing: str = "nothing to do") -> str:
        """``"<pass>: 3 folded, 1 kept"`` (``nothing`` when there are no entries)."""
        counts = ", ".join(f"{v} {self.label(k)}" for k, v in self.counts().items() if v)
        return f"{self.pass_name}: {counts or nothing}"

    def table(self) -> str:
        """A plain-text table for people (no colour codes, safe to paste in a README)."""
        lines = plain_table(HEADERS, self.rows())
        lines.append(self.summary())
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class PassResult(NamedTuple):
    """What every pass returns: unpack as ``model, report = bnfold.fold(...)``."""

    model: Any
    report: Report

    @property
    def changed(self) -> bool:
        return self.report.changed
