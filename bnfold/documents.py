"""The JSON documents bnfold writes (``--json``, ``--report FILE``, ``to_dict()``), in one place.

Every document has a ``schema`` key naming its kind and version; keys are only ever added
within a version. Strict JSON: non-finite floats are the strings ``"inf"``, ``"-inf"``,
``"nan"`` (:func:`json_safe`).

* ``bnfold.fold/1``: ``{schema, input, output, fold: REPORT, validation: VALIDATION|null,
  written: bool, passed: bool}``
* ``bnfold.fold-folder/1``: ``{schema, input, output, summary: {files, ok, validation_failed,
  bad_input}, results: [fold/1 document + exit_code | {input, output, written: false,
  passed: false, error, exit_code: 2}], exit_code}``
* ``bnfold.inspect/1``: ``{schema, input, report: REPORT, branches: REPORT}`` (``branches``:
  one entry per block of parallel branches, ``merged`` = would merge with ``--merge-branches``)
* ``bnfold.insert/1``: ``{schema, input, output, written, report: REPORT}``
* ``bnfold.validation/1`` (``bnfold validate``, VALIDATION): see :mod:`bnfold.validation.result`
* ``bnfold.export/1`` (:func:`bnfold.export`): REPORT plus ``{path, written, passed,
  validations: {name: VALIDATION}}`` (:class:`bnfold.exporter.ExportReport`)
* REPORT (:meth:`bnfold.report.Report.to_dict`): ``{pass, changed, counts: {folded, kept,
  inserted, skipped}, entries: [{bn, action, into?, reason?, details?}], notes: [str]}``
"""

from __future__ import annotations

import math
from typing import Any

FOLD = "bnfold.fold/1"
FOLD_FOLDER = "bnfold.fold-folder/1"
INSPECT = "bnfold.inspect/1"
INSERT = "bnfold.insert/1"
VALIDATION = "bnfold.validation/1"
EXPORT = "bnfold.export/1"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"inf"``, ``"-inf"`` or ``"nan"``
    (strict JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
