"""fold_forward_many equals fold_forward per BN, bit for bit, and refuses as it does."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfold import algebra
from bnfold.algebra import BFLOAT16, BNParams, Folded, fold_forward, fold_forward_many
from bnfold.errors import UnsafeFoldError

DTYPES = (np.float16, BFLOAT16, np.float32, np.float64)


def _group(rng: np.random.Generator, count: int, shape: tuple[int, ...], channels: int,
           dtype: np.dtype, bias: bool, affine: bool) -> tuple[list, list, list[BNParams]]:
    weights = [(rng.standard_normal(shape) * 3).astype(dtype) for _ in range(count)]
    biases = [rng.standard_normal(channels).astype(dtype) if bias else None
              for _ in range(count)]
    bns = [BNParams(rng.standard_normal(channels).astype(dtype),
                    rng.uniform(1e-3, 4, channels).astype(dtype), 1e-5,
                    rng.standard_normal(channels).astype(dtype) if affine else None,
                    rng.standard_normal(channels).astype(dtype) if affine else None)
           for _ in range(count)]
    return weights, biases, bns


@pytest.fixture(params=["stacked", "one by one"])
def batching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Alike folds stacked (small weights), or scaled one by one into one output array (as
    weights over ``BATCH_MAX_WEIGHT`` elements are)."""
    if request.param == "one by one":
        monkeypatch.setattr(algebra, "BATCH_MAX_WEIGHT", 0)
    return request.param


def _per_bn(weights: list, biases: list, bns: list[BNParams], **kw: object) -> list[Folded]:
    return [fold_forward(w, b, bn, **kw) for w, b, bn in zip(weights, biases, bns, strict=True)]


def _same(a: list[Folded], b: list[Folded]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in ((x.weight, y.weight), (x.bias, y.bias)):
            assert u.dtype == v.dtype and u.shape == v.shape
            assert u.tobytes() == v.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "channels", "kw"), [
    ((6, 4, 3, 3), 6, {}),
    ((4, 3, 1, 1), 6, {"out_axis": 1, "groups": 2}),  # ConvTranspose [Cin, Cout/g, k..]
    ((5, 7), 7, {"out_axis": 1, "bias_scale": 0.75}),  # Gemm transB=0 with beta
])
@pytest.mark.parametrize(("bias", "affine"), [(True, True), (False, True), (True, False)])
def test_batched_equals_per_bn(dtype: np.dtype, shape: tuple[int, ...], channels: int,
                               kw: dict, bias: bool, affine: bool,
                               monkeypatch: pytest.MonkeyPatch, batching: str) -> None:
    rng = np.random.default_rng(len(shape) * 4 + 2 * bias + affine)
    weights, biases, bns = _group(rng, 9, shape, channels, np.dtype(dtype), bias, affine)
    expected = _per_bn(weights, biases, bns, **kw)
    with monkeypatch.context() as patch:  # alike folds are stacked, not folded one by one
        patch.setattr(algebra, "fold_forward", None)
        got = fold_forward_many(weights, biases, bns, **kw)
    _same(got, expected)


def _refusal(fn: object) -> str:
    with pytest.raises(UnsafeFoldError) as info:
        fn()  # type: ignore[operator]
    return str(info.value)


@pytest.mark.parametrize("defect", ["negative var", "nan mean", "inf gamma", "overflow"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_refusal_in_the_group_refuses_as_per_bn(defect: str, dtype: np.dtype,
                                                   batching: str) -> None:
    rng = np.random.default_rng(1)
    weights, biases, bns = _group(rng, 5, (4, 2, 1, 1), 4, np.dtype(dtype), True, True)
    bad = bns[3]
    if defect == "negative var":
        bns[3] = BNParams(bad.mean, -np.abs(bad.var) - 1, bad.eps, bad.gamma, bad.beta)
    elif defect == "nan mean":
        bns[3] = BNParams(np.full_like(bad.mean, np.nan), bad.var, bad.eps, bad.gamma, bad.beta)
    elif defect == "inf gamma":
        bns[3] = BNParams(bad.mean, bad.var, bad.eps, np.full_like(bad.gamma, np.inf), bad.beta)
    else:  # a huge scale overflows the weight's dtype
        big = np.full_like(bad.gamma, ml_dtypes.finfo(np.dtype(dtype)).max)
        bns[3] = BNParams(bad.mean, np.full_like(bad.var, 1e-4), 0.0, big, bad.beta)
    with np.errstate(over="ignore"):
        expected = _refusal(lambda: _per_bn(weights, biases, bns))
        assert _refusal(lambda: fold_forward_many(weights, biases, bns)) == expected
        del bns[3], weights[3], biases[3]  # the rest of the group folds, stacked, as per BN
        _same(fold_forward_many(weights, biases, bns), _per_bn(weights, biases, bns))


def test_unlike_folds_are_folded_one_by_one() -> None:
    rng = np.random.default_rng(2)
    w1, b1, n1 = _group(rng, 2, (4, 2), 4, np.dtype(np.float32), True, True)
    w2, b2, n2 = _group(rng, 2, (4, 3), 4, np.dtype(np.float16), False, False)
    weights, biases, bns = w1 + w2, b1 + b2, n1 + n2
    _same(fold_forward_many(weights, biases, bns), _per_bn(weights, biases, bns))


def test_large_weights_share_one_output_array() -> None:
    """Weights over ``BATCH_MAX_WEIGHT`` elements: not stacked, each result a slice of one
    array, bit for bit the per-BN folds."""
    rng = np.random.default_rng(3)
    shape = (64, 120, 3, 3)
    assert np.prod(shape) > algebra.BATCH_MAX_WEIGHT
    weights, biases, bns = _group(rng, 3, shape, 64, np.dtype(np.float32), True, True)
    got = fold_forward_many(weights, biases, bns)
    _same(got, _per_bn(weights, biases, bns))
    assert got[0].weight.base is not None and got[0].weight.base is got[2].weight.base


def test_parameters_of_mixed_dtypes_and_shapes_stack_as_per_bn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Alike folds whose BN parameters differ in dtype (each cast to float64 as the stack is
    written) and in shape (``[C, 1]`` flattened, ``[C]`` as it is) are stacked and equal the
    per-BN folds bit for bit."""
    rng = np.random.default_rng(7)
    weights, biases, bns = _group(rng, 6, (4, 3, 1, 1), 4, np.dtype(np.float32), True, True)
    dtypes = (np.float16, BFLOAT16, np.float32, np.float64, np.float32, np.float16)
    bns = [BNParams(bn.mean.astype(dtype), bn.var.reshape(4, 1), bn.eps,
                    bn.gamma.astype(dtype).reshape(1, 4), bn.beta)  # type: ignore[union-attr]
           for bn, dtype in zip(bns, dtypes, strict=True)]
    expected = _per_bn(weights, biases, bns)
    with monkeypatch.context() as patch:
        patch.setattr(algebra, "fold_forward", None)
        got = fold_forward_many(weights, biases, bns)
    _same(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis", "groups"), [
    ((9, 4, 3, 3), 0, 1),  # Conv forward
    ((6, 3, 2, 2), 1, 3),  # grouped ConvTranspose forward: channels g * 3 + j
    ((5, 8), 1, 1),  # transposed Gemm weight [in, out]
    ((1, 7), 1, 1),  # one row: nothing to split
])
def test_a_weight_split_over_threads_equals_one_product(monkeypatch, dtype, shape, axis,
                                                        groups) -> None:
    """Row blocks on threads (weights of ``SPLIT_MIN`` elements or more) give every bit the
    single product gives; a product that overflows is refused alike."""
    rng = np.random.default_rng(3)
    channels = shape[axis] * groups
    weights, biases, bns = _group(rng, 1, shape, channels, np.dtype(dtype), True, True)
    whole = fold_forward(weights[0], biases[0], bns[0], out_axis=axis, groups=groups)
    monkeypatch.setattr(algebra, "SPLIT_MIN", 1)
    monkeypatch.setattr(algebra, "WORKERS", 4)
    split = fold_forward(weights[0], biases[0], bns[0], out_axis=axis, groups=groups)
    assert split.weight.tobytes() == whole.weight.tobytes()
    assert split.bias.tobytes() == whole.bias.tobytes()
    huge = np.full(shape, np.finfo(dtype).max, dtype)
    with pytest.raises(UnsafeFoldError, match="not finite"):
        fold_forward(huge, None, BNParams(np.zeros(channels), np.full(channels, 0.01), 1e-5),
                     out_axis=axis, groups=groups)


def _fold_split_weight() -> None:
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    fold_forward(w, None, BNParams(np.zeros(8), np.ones(8), 1e-5))


def test_a_forked_child_scales_on_threads_of_its_own(monkeypatch) -> None:
    """The threads are started once per process: a child forked after the parent used them
    (their threads do not run in it) starts its own instead of waiting forever."""
    import multiprocessing
    import threading
    import time

    monkeypatch.setattr(algebra, "SPLIT_MIN", 1)
    from bnfold import workers

    barrier = threading.Barrier(workers.WORKERS)  # every thread of the pool started, then idle
    workers.pool().map(lambda _: barrier.wait(), range(workers.WORKERS))
    time.sleep(0.3)
    child = multiprocessing.get_context("fork").Process(target=_fold_split_weight)
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
