"""The fold algebra against direct float64 evaluation of layer + BN with torch."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import algebra
from bnfold.algebra import (
    BFLOAT16,
    BNParams,
    backward_fold_refusal,
    fold_backward,
    fold_forward,
    per_channel,
    round_to,
)
from bnfold.errors import UnsafeFoldError
from bnfold.geometry import ConvGeometry

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONV_CASES = list(itertools.product([1, 2, 3], [1, 2, 4], [True, False]))


def random_bn(c: int, rng: np.random.Generator, affine: bool = True) -> BNParams:
    return BNParams(
        mean=rng.normal(0, 0.5, c),
        var=rng.uniform(0.3, 3.0, c),
        eps=1e-5,
        gamma=rng.uniform(0.5, 1.5, c) * rng.choice([-1, 1], c) if affine else None,
        beta=rng.normal(0, 0.5, c) if affine else None,
    )


def bn_ref(y: torch.Tensor, bn: BNParams, axis: int = 1) -> torch.Tensor:
    """Float64 BN over ``axis`` straight from the definition."""
    shape = [1] * y.dim()
    shape[axis] = -1

    def v(a: np.ndarray | None, default: float) -> torch.Tensor:
        arr = np.full(bn.channels, default) if a is None else np.asarray(a, np.float64)
        return torch.from_numpy(arr).reshape(shape)

    return v(bn.gamma, 1.0) * (y - v(bn.mean, 0)) / torch.sqrt(v(bn.var, 0) + bn.eps) + v(
        bn.beta, 0.0
    )


def t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64))


def assert_close64(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max()) / scale
    assert err < 1e-12, err


@pytest.mark.parametrize("dims,groups,bias", CONV_CASES)
def test_forward_conv(dims: int, groups: int, bias: bool) -> None:
    rng = np.random.default_rng(dims * 10 + groups)
    cin, cout, k = 8, 8, 3
    w = rng.normal(size=(cout, cin // groups, *([k] * dims)))
    b = rng.normal(size=cout) if bias else None
    bn = random_bn(cout, rng)
    x = torch.randn(2, cin, *([7] * dims), dtype=torch.float64)
    kw = dict(stride=2, padding=1, dilation=1, groups=groups)
    ref = bn_ref(CONV[dims](x, t64(w), None if b is None else t64(b), **kw), bn)
    f = fold_forward(w, b, bn, out_axis=0)
    assert_close64(CONV[dims](x, t64(f.weight), t64(f.bias), **kw), ref)


@pytest.mark.parametrize("dims,groups,bias", CONV_CASES)
def test_forward_conv_transpose(dims: int, groups: int, bias: bool) -> None:
    rng = np.random.default_rng(dims * 10 + groups + 100)
    cin, cout, k = 8, 12, 3
    w = rng.normal(size=(cin, cout // groups, *([k] * dims)))
    b = rng.normal(size=cout) if bias else None
    bn = random_bn(cout, rng)
    x = torch.randn(2, cin, *([4] * dims), dtype=torch.float64)
    kw = dict(stride=2, padding=1, output_padding=1, groups=groups)
    ref = bn_ref(CONVT[dims](x, t64(w), None if b is None else t64(b), **kw), bn)
    f = fold_forward(w, b, bn, out_axis=1, groups=groups)
    assert_close64(CONVT[dims](x, t64(f.weight), t64(f.bias), **kw), ref)


@pytest.mark.parametrize("transposed,bias", list(itertools.product([False, True], [True, False])))
def test_forward_linear_and_gemm(transposed: bool, bias: bool) -> None:
    rng = np.random.default_rng(7)
    w = rng.normal(size=(6, 5))  # [out, in]
    b = rng.normal(size=6) if bias else None
    bn = random_bn(6, rng, affine=bias)
    x = torch.randn(9, 5, dtype=torch.float64)
    ref = bn_ref(F.linear(x, t64(w), None if b is None else t64(b)), bn)
    weight = w.T.copy() if transposed else w
    f = fold_forward(weight, b, bn, out_axis=1 if transposed else 0)
    w_out = t64(f.weight).T if transposed else t64(f.weight)
    assert_close64(F.linear(x, w_out, t64(f.bias)), ref)


@pytest.mark.parametrize("c_shape", [(), (1,), (6,), (1, 6), (9, 6)])
def test_forward_gemm_bias_broadcast_and_beta(c_shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    a = torch.randn(9, 5, dtype=torch.float64)
    w = rng.normal(size=(5, 6))  # Gemm B with transB=0
    c = rng.normal(size=c_shape)
    alpha, beta = 0.7, -1.3
    bn = random_bn(6, rng)
    ref = bn_ref(alpha * a @ t64(w) + beta * t64(c), bn)
    f = fold_forward(alpha * w, c, bn, out_axis=1, bias_scale=beta)
    assert f.bias.shape == np.broadcast_shapes(c_shape, (6,))
    assert_close64(a @ t64(f.weight) + t64(f.bias), ref)


@pytest.mark.parametrize("dims,groups,padding,mode", [
    (1, 1, 0, "zeros"), (2, 2, 0, "zeros"), (3, 1, 0, "zeros"), (2, 4, 1, "reflect"),
    (2, 1, 1, "replicate"), (1, 2, 2, "circular"), (2, 8, 0, "zeros"),
])
def test_backward_conv(dims: int, groups: int, padding: int, mode: str) -> None:
    rng = np.random.default_rng(dims + groups + padding)
    cin, cout, k = 8, 8, 3
    w = rng.normal(size=(cout, cin // groups, *([k] * dims)))
    b = rng.normal(size=cout)
    bn = random_bn(cin, rng)
    geometry = ConvGeometry.symmetric([k] * dims, [padding] * dims, padding_mode=mode)
    assert backward_fold_refusal("conv", bn, geometry) is None
    x = torch.randn(2, cin, *([6] * dims), dtype=torch.float64)

    def conv(inp: torch.Tensor, wt: torch.Tensor, bs: torch.Tensor) -> torch.Tensor:
        if padding and mode != "zeros":
            pad_mode = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}
            inp = F.pad(inp, [padding] * (2 * dims), mode=pad_mode[mode])
            return CONV[dims](inp, wt, bs, groups=groups)
        return CONV[dims](inp, wt, bs, padding=padding, groups=groups)

    ref = conv(bn_ref(x, bn), t64(w), t64(b))
    f = fold_backward(w, b, bn, in_axis=1, groups=groups)
    assert_close64(conv(x, t64(f.weight), t64(f.bias)), ref)


def test_backward_zero_padded_conv_is_refused_unless_shift_is_zero() -> None:
    rng = np.random.default_rng(0)
    bn = random_bn(4, rng)
    padded = ConvGeometry.symmetric([3, 3], [1, 1])
    reason = backward_fold_refusal("conv", bn, padded)
    assert reason and "padded border" in reason
    s, _ = bn.scale_shift()
    zero_shift = BNParams(mean=np.zeros(4), var=bn.var, eps=bn.eps, gamma=bn.gamma,
                          beta=np.zeros(4))
    assert backward_fold_refusal("conv", zero_shift, padded) is None
    assert s.shape == (4,)


@pytest.mark.parametrize("groups", [1, 2])
def test_backward_conv_transpose_full_coverage(groups: int) -> None:
    rng = np.random.default_rng(groups)
    cin, cout, k = 4, 6, 3
    w = rng.normal(size=(cin, cout // groups, k, k))
    b = rng.normal(size=cout)
    bn = random_bn(cin, rng)
    ok = ConvGeometry.symmetric([k, k], [2, 2])
    assert backward_fold_refusal("conv_transpose", bn, ok) is None
    for bad in (ConvGeometry.symmetric([k, k], [2, 2], stride=[2, 2]),
                ConvGeometry.symmetric([k, k], [2, 2], output_padding=None),
                ConvGeometry((k, k), (1, 1), (1, 1), (2, 2), (2, 1), (0, 0))):
        assert backward_fold_refusal("conv_transpose", bn, bad)
    x = torch.randn(2, cin, 7, 7, dtype=torch.float64)
    ref = F.conv_transpose2d(bn_ref(x, bn), t64(w), t64(b), padding=2, groups=groups)
    f = fold_backward(w, b, bn, in_axis=0, out_axis=1, groups=groups)
    assert_close64(F.conv_transpose2d(x, t64(f.weight), t64(f.bias), padding=2, groups=groups), ref)


@pytest.mark.parametrize("transposed", [False, True])
def test_backward_linear(transposed: bool) -> None:
    rng = np.random.default_rng(11)
    w = rng.normal(size=(6, 5))
    bn = random_bn(5, rng)
    x = torch.randn(9, 5, dtype=torch.float64)
    ref = F.linear(bn_ref(x, bn), t64(w))
    if transposed:
        f = fold_backward(w.T.copy(), None, bn, in_axis=0, out_axis=1)
        out = x @ t64(f.weight) + t64(f.bias)
    else:
        f = fold_backward(w, None, bn, in_axis=1, out_axis=0)
        out = F.linear(x, t64(f.weight), t64(f.bias))
    assert_close64(out, ref)


def _neighbours(y: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    bits = y.view(np.uint16).astype(np.int32)
    sign = np.where(bits & 0x8000, -1, 1)
    up = np.where(sign > 0, bits + 1, bits - 1).astype(np.uint16).view(dtype)
    down = np.where(sign > 0, bits - 1, bits + 1).astype(np.uint16).view(dtype)
    return up.astype(np.float64), down.astype(np.float64)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BFLOAT16])
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
def test_round_to_is_correctly_rounded(dtype: np.dtype, seed: int, scale: float) -> None:
    x = np.random.default_rng(seed).normal(0, scale, 512)
    y = round_to(x, dtype)
    assert y.dtype == dtype
    err = np.abs(y.astype(np.float64) - x)
    for n in _neighbours(y, dtype):
        d = np.abs(n - x)
        assert np.all((err <= d) | np.isnan(d))  # no representable neighbour is closer


def test_round_to_avoids_double_rounding_in_bfloat16() -> None:
    # 1 + 2^-8 + 2^-30: a tie for bf16 after a float32 rounding, just above it in float64.
    x = np.array([1 + 2.0**-8 + 2.0**-30])
    naive = x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    exact = round_to(x, BFLOAT16).astype(np.float64)
    assert exact[0] == 1 + 2.0**-7
    assert naive[0] == 1.0  # what a float32-first cast does


def test_fp16_fold_is_within_half_ulp_of_float64_fold() -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float16)
    bn = random_bn(16, rng)
    f = fold_forward(w, None, bn)
    s, _ = bn.scale_shift()
    exact = w.astype(np.float64) * s[:, None, None, None]
    ulp = np.spacing(np.abs(f.weight)).astype(np.float64)
    assert np.all(np.abs(f.weight.astype(np.float64) - exact) <= 0.5 * ulp)
    assert f.weight.dtype == np.float16 and f.bias.dtype == np.float16


def test_overflow_is_refused() -> None:
    w = np.full((2, 2), 60000, np.float16)
    bn = BNParams(mean=np.zeros(2), var=np.full(2, 0.01), eps=0.0, gamma=np.ones(2),
                  beta=np.zeros(2))
    with pytest.raises(UnsafeFoldError, match="not finite in float16"):
        fold_forward(w, None, bn)


def test_non_positive_variance_is_refused() -> None:
    bn = BNParams(mean=np.zeros(2), var=np.array([1.0, -1.0]), eps=1e-5)
    with pytest.raises(UnsafeFoldError, match="not positive"):
        bn.scale_shift()


def test_channel_mismatch_is_refused() -> None:
    rng = np.random.default_rng(1)
    with pytest.raises(UnsafeFoldError, match="channels"):
        fold_forward(rng.normal(size=(4, 3)), None, random_bn(5, rng))


def test_per_channel_reduction() -> None:
    a = np.repeat(np.arange(3.0)[:, None, None], 4, axis=1).repeat(2, axis=2)
    assert per_channel(a).tolist() == [0.0, 1.0, 2.0]
    a[1, 0, 0] = 9
    assert per_channel(a) is None


# ---------------------------------------------------------------------------------------------
# Reach (issue 9): affine chains, concat slices, sums.
# ---------------------------------------------------------------------------------------------

def test_broadcast_of_finds_the_one_varying_axis() -> None:
    from bnfold.algebra import Broadcast, broadcast_of
    assert broadcast_of((5, 1, 1)) == Broadcast(-3, 5, 3)
    assert broadcast_of((1, 5, 1, 1)) == Broadcast(-3, 5, 4)
    assert broadcast_of((7,)) == Broadcast(-1, 7, 1)
    assert broadcast_of((1, 1)) == Broadcast(None, 1, 2)
    assert broadcast_of(()) == Broadcast(None, 1, 0)
    assert broadcast_of((3, 4)) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "sub", "mul", "div"]), st.booleans(),
                          st.booleans()), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_compose_affine_matches_the_chain(ops: list[tuple[str, bool, bool]], seed: int) -> None:
    from bnfold.algebra import compose_affine
    rng = np.random.default_rng(seed)
    c = 4
    x = rng.normal(size=(3, c))
    y = x.copy()
    steps = []
    for op, scalar, first in ops:
        first = first and op != "div"
        v = rng.uniform(0.5, 1.5, 1 if scalar else c) * rng.choice([-1, 1])
        steps.append((op, v, first))
        y = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
             "mul": lambda a, b: a * b, "div": lambda a, b: a / b}[op](
            *((v, y) if first else (y, v)))
    a, b = compose_affine(steps, c)
    np.testing.assert_allclose(x * a + b, y, rtol=1e-12, atol=1e-12)


def test_compose_affine_refuses_what_is_not_affine() -> None:
    from bnfold.algebra import compose_affine
    with pytest.raises(UnsafeFoldError, match="not an affine"):
        compose_affine([("div", np.ones(3), True)], 3)
    with pytest.raises(UnsafeFoldError, match="non-finite"):
        compose_affine([("div", np.array([1.0, 0.0, 2.0]), False)], 3)
    with pytest.raises(UnsafeFoldError, match="2 values, expected 3"):
        compose_affine([("mul", np.ones(2), False)], 3)


def test_affine_bn_scale_shift_is_bit_exact() -> None:
    from bnfold.algebra import affine_bn
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    s, t = affine_bn(a, b).scale_shift()
    assert np.array_equal(s, a) and np.array_equal(t, b)


def test_slices_of_a_bn_fold_like_the_whole_bn() -> None:
    """cat(conv1, conv2) -> BN == cat(conv1 folded with BN[:c1], conv2 with BN[c1:])."""
    from bnfold.algebra import slice_bn
    rng = np.random.default_rng(1)
    bn = BNParams(rng.normal(size=7), rng.uniform(0.3, 3, 7), 1e-5, rng.normal(size=7),
                  rng.normal(size=7))
    w, bias = rng.normal(size=(7, 3, 3, 3)), rng.normal(size=7)
    whole = fold_forward(w, bias, bn)
    parts = [fold_forward(w[i:j], bias[i:j], slice_bn(bn, i, j)) for i, j in ((0, 3), (3, 7))]
    assert np.array_equal(np.concatenate([p.weight for p in parts]), whole.weight)
    assert np.array_equal(np.concatenate([p.bias for p in parts]), whole.bias)
    assert slice_bn(BNParams(bn.mean, bn.var, 1e-5), 2, 4).gamma is None


def test_split_sum_scales_every_summand_and_shifts_once() -> None:
    from bnfold.algebra import split_sum
    rng = np.random.default_rng(2)
    bn = BNParams(rng.normal(size=5), rng.uniform(0.3, 3, 5), 1e-3, rng.normal(size=5),
                  rng.normal(size=5))
    ys = [rng.normal(size=(4, 5)) for _ in range(3)]
    s, t = bn.scale_shift()
    parts = split_sum(bn, 3)
    total = sum(y * p.scale_shift()[0] + p.scale_shift()[1] for y, p in zip(ys, parts,
                                                                           strict=True))
    np.testing.assert_allclose(total, sum(ys) * s + t, rtol=1e-12, atol=1e-12)
    assert all(not np.any(p.scale_shift()[1]) for p in parts[1:])


# ---------------------------------------------------------------------------------------------
# Reach, ONNX side: a BN evaluated on a constant.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_evaluate_bn_matches_torch_in_float64(training: bool) -> None:
    from bnfold.algebra import evaluate_bn
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    bn = BNParams(rng.normal(size=5), rng.uniform(0.3, 3, 5), 1e-3, rng.normal(size=5),
                  rng.normal(size=5))
    want = F.batch_norm(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(bn.mean),
                        torch.from_numpy(bn.var), torch.from_numpy(bn.gamma),
                        torch.from_numpy(bn.beta), training=training, eps=1e-3).numpy()
    got = evaluate_bn(x, bn, training=training)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    moved = evaluate_bn(np.moveaxis(x, 1, 3), bn, training=training, axis=3)
    np.testing.assert_allclose(np.moveaxis(moved, 3, 1), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("var", [1.0, -2.0, 1.0], "running_var \\+ eps is not positive and finite"),
    ("var", [1.0, np.inf, 1.0], "running_var \\+ eps is not positive and finite"),
    ("var", [1.0, np.nan, 1.0], "running_var \\+ eps is not positive and finite"),
    ("gamma", [1.0, 2.0], "BN gamma has 2 values, expected 3"),
    ("gamma", [1.0, np.inf, 1.0], "BN gamma holds non-finite values"),
    ("beta", [1.0, 1.0, 1.0, 1.0], "BN beta has 4 values, expected 3"),
    ("beta", [np.nan, 1.0, 1.0], "BN beta holds non-finite values"),
    ("mean", [1.0, 1.0, -np.inf], "BN mean holds non-finite values"),
])
def test_scale_shift_refuses_each_bad_parameter_by_name(field, value, message) -> None:
    good = {"mean": np.zeros(3), "var": np.ones(3), "gamma": np.ones(3), "beta": np.zeros(3)}
    params = BNParams(eps=1e-5, **{**good, field: np.array(value)})
    with pytest.raises(UnsafeFoldError, match=message):
        params.scale_shift()
    with pytest.raises(UnsafeFoldError, match="running_var"):  # the variance is checked first
        BNParams(eps=1e-5, **{**good, field: np.array(value), "var": -np.ones(3)}
                 ).scale_shift()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, groups", [
    ((300, 229, 3, 3), 0, 1), ((120, 90, 5, 7), 1, 3), ((70_001,), 0, 1)])
def test_large_weight_scaling_is_the_float64_product_rounded_once(
        dtype: np.dtype, shape: tuple[int, ...], axis: int, groups: int, monkeypatch) -> None:
    """Several cast buffers' worth of elements: bit for bit ``float64(W) * s`` rounded once,
    with bnfold's buffer size and with numpy's default; the buffer size is restored."""
    rng = np.random.default_rng(7)
    w = (rng.normal(size=shape) * 3).astype(dtype)
    channels = shape[axis] * groups
    s = rng.random(channels) * 4 + 0.1
    view, vshape = algebra._channel_view(shape, channels, axis, groups)
    exact = (w.astype(np.float64).reshape(view) * s.reshape(vshape)).astype(dtype)
    before = np.getbufsize()
    for buffer in (algebra.CAST_BUFFER, 8192):
        monkeypatch.setattr(algebra, "CAST_BUFFER", buffer)
        got = algebra._scaled_rounded(w, s, axis, groups, "weight")
        assert got.dtype == dtype and got.shape == shape
        assert np.array_equal(got.reshape(view).view(np.uint8), exact.view(np.uint8))
        assert np.getbufsize() == before
    with pytest.raises(UnsafeFoldError):
        algebra._scaled_rounded(np.full(shape, np.finfo(dtype).max, dtype), s + 1, axis,
                                groups, "weight")
    assert np.getbufsize() == before
