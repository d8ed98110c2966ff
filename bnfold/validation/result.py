"""What :func:`bnfold.validate` returns: per provider and per output, the metrics and a verdict.

``result.passed`` is true when at least one provider ran, every comparison that ran passed and
every *required* provider really ran. ``table()`` is a plain-text table for people, ``rows()``
the cells both tables are built from, ``to_dict()``/``to_json()`` strict JSON (no NaN/inf
numbers: non-finite values are the strings ``"nan"``, ``"inf"``, ``"-inf"``), schema
``bnfold.validation/1``; keys are only ever added within a schema version::

    schema     "bnfold.validation/1"
    passed     bool
    reference, candidate   str (labels)
    settings   {providers: [str], require: [str], samples: int, seed: int,
                ort_graph_optimizations: "enabled"|"disabled", atol: float|null,
                rtol: float|null (null: dtype-aware default), tolerance_rule: str,
                compute_dtype: str|null, reference_model: str ("as given", or how a
                float16/bfloat16 reference was computed in higher precision)}
    inputs     [{name, dtype, shape: [int] (first sample's), shapes?: [[int]] (when samples
                 differ), source: str}]
    notes      [str]
    runs       [{provider: "cpu"|"cuda"|"cpu vs cuda", comparison: str,
                 status: "ran"|"unavailable", ran_on: [str] (session.get_providers()),
                 required: bool, passed: bool, note?: str (why unavailable),
                 outputs: [{output, dtype, shape, atol, rtol, tol_dtype, max_abs, max_rel,
                            cosine, worst: {sample, index: [int], ref, cand, ratio} | {},
                            passed, reason?: str, stats: {abs: {mean, median, p99},
                            rel: {mean, median, p99}} (see bnfold.validation.error_stats)}]}]
    failures   [str] (one line per failed comparison or missing required provider)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.documents import VALIDATION as SCHEMA
from bnfold.documents import json_safe
from bnfold.tables import plain_table
from bnfold.validation.error_stats import stats_line
from bnfold.validation.metrics import Comparison

HEADERS = ("provider", "output", "dtype", "max abs", "max rel", "cosine", "worst at",
           "atol / rtol", "result")


@dataclass
class ProviderRun:
    """The comparison of one pair of runs on one execution provider (or CPU vs CUDA).

    ``status`` is ``ran`` or ``unavailable``; ``ran_on`` is ``session.get_providers()`` of the
    candidate's session, i.e. what really ran, not what was asked for.
    """

    provider: str
    comparison: str
    status: str
    ran_on: list[str]
    comparisons: list[Comparison] = field(default_factory=list)
    note: str | None = None
    required: bool = False
    outputs: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    ref_outputs: list[list[np.ndarray]] = field(default_factory=list, repr=False)

    @property
    def passed(self) -> bool:
        if self.status != "ran":
            return not self.required
        return all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "provider": self.provider, "comparison": self.comparison, "status": self.status,
            "ran_on": list(self.ran_on), "required": self.required, "passed": self.passed,
            "outputs": [c.to_dict() for c in self.comparisons],
        }
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class ValidationResult:
    """Everything one validation found, and the settings and inputs it used."""

    reference: str
    candidate: str
    settings: dict[str, Any]
    inputs: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    runs: list[ProviderRun] = field(default_factory=list)
    samples: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)  # the feeds

    @property
    def passed(self) -> bool:
        return any(r.status == "ran" for r in self.runs) and all(r.passed for r in self.runs)

    def failures(self) -> list[str]:
        """One line per failed comparison or missing required provider."""
        out = []
        for run in self.runs:
            if run.status != "ran" and run.required:
                out.append(f"{run.provider}: required but {run.note}")
            out.extend(f"{run.provider}: {c.output}: {c.reason}" for c in run.comparisons
                       if not c.passed)
        return out

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "schema": SCHEMA,
            "passed": self.passed,
            "reference": self.reference,
            "candidate": self.candidate,
            "settings": dict(self.settings),
            "inputs": list(self.inputs),
            "notes": list(self.notes),
            "runs": [r.to_dict() for r in self.runs],
            "failures": self.failures(),
        })

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def rows(self) -> list[tuple[str, ...]]:
        """Table cells, one row per provider and output (one row for an unavailable EP)."""
        rows = []
        for run in self.runs:
            if run.status != "ran":
                verdict = "FAIL (required)" if run.required else "skipped"
                rows.append((run.provider, "-", "-", "-", "-", "-", "-", "-",
                             f"{verdict}: {run.note}"))
                continue
            for c in run.comparisons:
                worst = (f"{c.worst['index']} s{c.worst['sample']}" if c.worst else "-")
                rows.append((run.provider, c.output, c.dtype, f"{c.max_abs:.3g}",
                             f"{c.max_rel:.3g}", f"{c.cosine:.9f}", worst,
                             f"{c.atol:.2g} / {c.rtol:.2g}",
                             "ok" if c.passed else f"FAIL: {c.reason}"))
        return rows

    def reference_lines(self) -> list[str]:
        """``reference: ...`` when the reference is not the given model as is (16-bit)."""
        how = self.settings.get("reference_model", "as given")
        return [] if how == "as given" else [f"reference: {how}"]

    def stats_lines(self) -> list[str]:
        """One line per provider and output: the error distribution (mean, median, p99)."""
        return [f"errors {run.provider} {c.output}: {stats_line(c.stats)}" for run in self.runs
                for c in run.comparisons if c.stats]

    def summary(self) -> str:
        ran = [r for r in self.runs if r.status == "ran"]
        ran_on = sorted({p for r in ran for p in r.ran_on[:1]})
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"validation {verdict}: {self.candidate} vs {self.reference}, "
                f"{self.settings['samples']} samples, ran on {', '.join(ran_on) or 'nothing'}, "
                f"ORT graph optimizations {self.settings['ort_graph_optimizations']}")

    def table(self) -> str:
        """A plain-text table (no colour codes) with the inputs used and the verdict."""
        lines = plain_table(HEADERS, self.rows())
        lines += [f"input {i['name']}: {i['dtype']} {i.get('shapes', i['shape'])} "
                  f"({i['source']})" for i in self.inputs]
        lines += self.stats_lines() + self.reference_lines()
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"tolerance: {self.settings['tolerance_rule']}")
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
