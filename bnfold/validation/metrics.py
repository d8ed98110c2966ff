"""Compare one output of two runs: error metrics and a dtype-aware pass/fail.

An element passes when ``|cand - ref| <= atol + rtol * |ref|`` (computed in float64), and
NaN/inf appear in the same places with the same values. The default tolerance depends on the
precision the model computes in (:data:`DEFAULT_TOL`: about 80 float32 ulps, 450 float64
ulps, 5 float16 or bfloat16 ulps; correct folds of the zoo models measure 1/50 to 1/8 of
it)::

    rtol = tol(dtype)        atol = tol(dtype) * max|ref|

``dtype`` is the coarser of the output's dtype and the model's compute dtype (the coarsest
float type among its weights, casts and graph inputs/outputs): a float16 model with float32
inputs and outputs (``keep_io_types``) carries float16 rounding error into float32 outputs.

``atol`` is relative to the output's scale because floating-point error bounds are norm-wise:
a sum that cancels to near zero still carries the rounding error of its large terms, so a
purely element-wise relative test fails on correct models and a fixed absolute one passes
wrong models whose outputs are small. Integer and bool outputs must match exactly. A user
``atol``/``rtol`` replaces the default as given (``atol`` absolute).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from bnfold.documents import json_safe
from bnfold.validation.error_stats import error_stats

DEFAULT_TOL: dict[str, float] = {
    "float64": 1e-13,
    "float32": 1e-5,
    "float16": 5e-3,
    "bfloat16": 4e-2,
}
CROSS_PROVIDER_FACTOR = 10.0
"""CPU-vs-CUDA comparisons of one model use this times the default tolerance: the two EPs
use different kernels and accumulation orders, which are not errors of the model."""


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


def default_tolerance(dtype: np.dtype) -> float:
    """The default ``tol`` for outputs of ``dtype`` (0 = exact, for non-float outputs)."""
    return DEFAULT_TOL.get(dtype_name(dtype), 0.0)


def coarsest(dtypes: Sequence[np.dtype]) -> np.dtype | None:
    """The float dtype among ``dtypes`` with the largest default tolerance (None if none)."""
    floats = [np.dtype(d) for d in dtypes if default_tolerance(np.dtype(d)) > 0]
    return max(floats, key=default_tolerance, default=None)


def tolerance_dtype(output: np.dtype, compute: np.dtype | None) -> np.dtype:
    """The dtype whose default tolerance applies to a float ``output`` of a model computing in
    ``compute``: the coarser of the two. Integer and bool outputs stay exact."""
    if default_tolerance(output) == 0 or compute is None:
        return np.dtype(output)
    return max((np.dtype(output), np.dtype(compute)), key=default_tolerance)


def tolerance_rule() -> str:
    """The rule the defaults follow, in words, for reports."""
    per = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOL.items())
    return (f"|cand - ref| <= atol + rtol*|ref|; default rtol = tol(dtype), atol = tol(dtype) * "
            f"max|ref| per output, dtype = the coarser of the output's and the model's compute "
            f"dtype, tol: {per}; integer/bool outputs exact; CPU-vs-CUDA rows use "
            f"{CROSS_PROVIDER_FACTOR:g}x tol")


@dataclass
class Comparison:
    """The metrics of one output over all samples; ``worst`` is the element with the largest
    error relative to its allowance ``atol + rtol*|ref|``; ``tol_dtype`` is the dtype whose
    default tolerance applied (``"given"`` when the user set both ``atol`` and ``rtol``)."""

    output: str
    dtype: str
    shape: list[int]
    atol: float
    rtol: float
    tol_dtype: str
    max_abs: float
    max_rel: float
    cosine: float
    worst: dict[str, Any] = field(default_factory=dict)
    passed: bool = True
    reason: str | None = None
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # error_stats.py

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data; non-finite floats become the strings "inf"/"nan"."""
        return {k: json_safe(v) for k, v in self.__dict__.items() if v is not None}


def did_not_run(name: str, ref: np.ndarray, why: str) -> Comparison:
    """A failed comparison of output ``name``: the candidate did not run where the reference
    (whose first output sample is ``ref``) did."""
    ref = np.asarray(ref)
    return Comparison(name, dtype_name(ref.dtype), list(ref.shape), 0.0, 0.0, "-",
                      float("inf"), float("inf"), float("nan"), passed=False,
                      reason=f"the candidate did not run where the reference did: {why}")


def compare_output(
    name: str,
    refs: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    tol_factor: float = 1.0,
    compute_dtype: np.dtype | None = None,
) -> Comparison:
    """Compare output ``name`` of the reference and the candidate over every sample.

    ``compute_dtype``: the model's coarsest float dtype (see the module docstring); ``None``
    uses the output's dtype alone.
    """
    dtype = np.asarray(refs[0]).dtype
    shape = list(np.shape(refs[0]))
    mismatch = _structural_mismatch(refs, cands)
    tol_dt = tolerance_dtype(dtype, compute_dtype)
    tol = default_tolerance(tol_dt) * tol_factor
    tol_name = "given" if atol is not None and rtol is not None else dtype_name(tol_dt)
    r64 = [np.asarray(r).astype(np.float64) for r in refs]
    finite = [np.abs(r[np.isfinite(r)]) for r in r64]
    scale = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
    a = tol * scale if atol is None else float(atol)
    rt = tol if rtol is None else float(rtol)
    if mismatch:
        return Comparison(name, dtype_name(dtype), shape, a, rt, tol_name, float("inf"),
                          float("inf"), float("nan"), passed=False, reason=mismatch)
    c64 = [np.asarray(c).astype(np.float64) for c in cands]
    max_abs = max_rel = 0.0
    worst: dict[str, Any] = {}
    worst_ratio = -1.0
    dot = nr = nc = 0.0
    for i, (r, c) in enumerate(zip(r64, c64, strict=True)):
        with np.errstate(invalid="ignore", over="ignore"):
            err, ratio = _errors(r, c, a, rt)
        max_abs = max(max_abs, float(err.max(initial=0.0)))
        meaningful = np.abs(r) > a
        if meaningful.any():  # (an infinite reference missed is an infinite error: not inf/inf)
            e = err[meaningful]
            with np.errstate(invalid="ignore"):
                rel = np.where(np.isinf(e), np.inf, e / np.abs(r[meaningful]))
            max_rel = max(max_rel, float(rel.max()))
        if ratio.size and float(ratio.max()) > worst_ratio:
            idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
            worst_ratio = float(ratio.max())
            worst = {"sample": i, "index": [int(j) for j in idx],
                     "ref": float(r[idx]), "cand": float(c[idx]), "ratio": worst_ratio}
        both = np.isfinite(r) & np.isfinite(c)
        dot += float(np.dot(r[both], c[both]))
        nr += float(np.dot(r[both], r[both]))
        nc += float(np.dot(c[both], c[both]))
    cosine = 1.0 if nr == nc == 0.0 else dot / np.sqrt(nr * nc) if nr and nc else 0.0
    passed = worst_ratio <= 1.0
    reason = None if passed else (
        f"error {worst['cand'] - worst['ref']:.3g} at {worst['index']} (sample {worst['sample']}) "
        f"is {worst_ratio:.3g}x the allowed {a:.3g} + {rt:.3g}*|ref|")
    exact = _integer_mismatch(refs, cands) if dtype.kind in "biu" else None
    if exact is not None:  # (float64 holds integers exactly only up to 2**53)
        passed, reason, max_abs = False, exact[0], max(max_abs, exact[1])
    return Comparison(name, dtype_name(dtype), shape, a, rt, tol_name, max_abs, max_rel,
                      float(cosine), worst, passed, reason, error_stats(r64, c64, a))


def _errors(r: np.ndarray, c: np.ndarray, atol: float, rtol: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Element errors (0 where both hold the same value, NaN included; inf where only one is
    NaN) and errors divided by their allowance ``atol + rtol*|ref|``."""
    same = (r == c) | (np.isnan(r) & np.isnan(c))
    err = np.where(same, 0.0, np.abs(c - r))
    err = np.where(np.isnan(err), np.inf, err)
    allowed = atol + rtol * np.abs(np.where(np.isfinite(r), r, 0.0))
    ratio = err / np.where(allowed > 0, allowed, np.finfo(np.float64).tiny)
    return err, ratio


def _integer_mismatch(refs: Sequence[np.ndarray], cands: Sequence[np.ndarray]
                      ) -> tuple[str, float] | None:
    """The first element where integer outputs differ, compared as integers (not through
    float64), and its absolute difference; ``None`` when every element is equal."""
    for i, (r, c) in enumerate(zip(refs, cands, strict=True)):
        r, c = np.asarray(r), np.asarray(c)
        differ = r != c
        if differ.any():
            idx = tuple(int(j) for j in np.argwhere(differ)[0])
            ref, cand = int(r[idx]), int(c[idx])
            return (f"{int(differ.sum())} element(s) differ (integer outputs match exactly): "
                    f"{cand} for {ref} at {list(idx)} (sample {i})", float(abs(cand - ref)))
    return None


def _structural_mismatch(refs: Sequence[np.ndarray], cands: Sequence[np.ndarray]) -> str | None:
    for i, (r, c) in enumerate(zip(refs, cands, strict=True)):
        r, c = np.asarray(r), np.asarray(c)
        if r.shape != c.shape:
            return f"shape {list(c.shape)} is not the reference's {list(r.shape)} (sample {i})"
        if r.dtype != c.dtype:
            return f"dtype {dtype_name(c.dtype)} is not the reference's {dtype_name(r.dtype)}"
    return None
