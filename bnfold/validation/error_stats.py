"""The distribution of an output's error, beyond its maximum (Polygraphy-style statistics).

Over every element of every sample where both runs hold finite values:

* ``abs``: ``|cand - ref|``;
* ``rel``: ``|cand - ref| / |ref|``, over the elements with ``|ref| > atol`` only (the same
  "meaningful" elements as ``max_rel``: near zero a relative error says nothing);

each summarised by ``mean``, ``median`` and ``p99`` (the 99th percentile, linear
interpolation), computed in float64. A maximum can be one unlucky element; the median and p99
say whether the error is typical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STATS = ("mean", "median", "p99")


def error_stats(refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], atol: float
                ) -> dict[str, dict[str, float]]:
    """``{"abs": {mean, median, p99}, "rel": {...}}`` of the errors (empty dicts when no
    element qualifies); ``refs`` / ``cands`` are float64 arrays, one per sample."""
    abs_err, rel_err = [], []
    for r, c in zip(refs, cands, strict=True):
        both = np.isfinite(r) & np.isfinite(c)
        err = np.abs(c[both] - r[both])
        abs_err.append(err)
        meaningful = np.abs(r[both]) > atol
        rel_err.append(err[meaningful] / np.abs(r[both][meaningful]))
    return {"abs": _summary(np.concatenate(abs_err)), "rel": _summary(np.concatenate(rel_err))}


def _summary(values: np.ndarray) -> dict[str, float]:
    if not values.size:
        return {}
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p99": float(np.percentile(values, 99))}


def stats_line(stats: dict[str, dict[str, float]]) -> str:
    """``"|Δ| mean 1.2e-08 median 0 p99 1.1e-07; rel mean ... "`` for tables."""
    parts = []
    for key, label in (("abs", "|Δ|"), ("rel", "rel")):
        values = stats.get(key) or {}
        if values:
            parts.append(f"{label} " + " ".join(f"{k} {values[k]:.3g}" for k in STATS))
    return "; ".join(parts) or "no finite elements"
