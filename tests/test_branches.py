"""bnfold.branches: the merged conv equals the float64 sum of its branches, and every merge that
would not be exact is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.algebra import BNParams
from bnfold.branches import (
    AffineBranch,
    ConstantBranch,
    ConvBranch,
    constant_branch,
    merge,
    merge_refusal,
)
from bnfold.errors import UnsafeFoldError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _bn(c: int, rng: np.random.Generator) -> BNParams:
    sign = np.where(rng.random(c) < 0.2, -1.0, 1.0)
    return BNParams(mean=rng.normal(0, 0.5, c), var=rng.uniform(0.3, 3, c), eps=1e-5,
                    gamma=(rng.random(c) + 0.5) * sign, beta=rng.normal(0, 0.5, c))


def _conv(name: str, rng: np.random.Generator, cout: int, cin: int, kernel: tuple[int, ...], *,
          groups: int = 1, stride: int = 1, dilation: int = 1, pads: tuple | None = None,
          bias: bool = True, bn: bool = True, mode: str = "zeros",
          dtype: type = np.float64) -> ConvBranch:
    n = len(kernel)
    if pads is None:
        pads = tuple(((k - 1) * dilation // 2,) * 2 for k in kernel)
    return ConvBranch(
        name, rng.normal(0, 0.3, (cout, cin // groups, *kernel)).astype(dtype),
        rng.normal(0, 0.3, cout).astype(dtype) if bias else None, (stride,) * n, pads,
        (dilation,) * n, groups, mode, _bn(cout, rng) if bn else None)


def _run_conv(x: torch.Tensor, weight: np.ndarray, bias: np.ndarray | None, stride: tuple,
              pads: tuple, dilation: tuple, groups: int, mode: str) -> torch.Tensor:
    flat = [p for pair in reversed(pads) for p in pair]
    xp = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    w = torch.from_numpy(np.asarray(weight, np.float64))
    b = None if bias is None else torch.from_numpy(np.asarray(bias, np.float64))
    return _CONV[w.dim() - 2](xp, w, b, stride, 0, dilation, groups)


def _reference(x: torch.Tensor, branches: list) -> list[torch.Tensor]:
    """Each branch in float64, computed as written (BN after the conv)."""
    outs = []
    for b in branches:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if isinstance(b, ConvBranch):
            y = _run_conv(x, b.weight, b.bias, b.stride, b.pads, b.dilation, b.groups,
                          b.padding_mode)
            if b.bn is not None:
                s, t = b.bn.scale_shift()
                y = y * torch.from_numpy(s).view(shape) + torch.from_numpy(t).view(shape)
        elif isinstance(b, ConstantBranch):  # (broadcast as the Add does)
            y = torch.zeros_like(x[:, :1]) + torch.from_numpy(np.asarray(b.value, np.float64))
        else:
            s, t = b.scale_shift(x.shape[1])
            y = x * torch.from_numpy(s).view(shape) + torch.from_numpy(t).view(shape)
        outs.append(y)
    return outs


def _check_exact(branches: list, x: torch.Tensor, tol: float = 1e-10) -> None:
    outs = _reference(x, branches)
    ref = sum(outs[1:], outs[0])
    m = merge(branches)
    got = _run_conv(x, m.weight, m.bias, m.stride, m.pads, m.dilation, m.groups, m.padding_mode)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, err


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_repvgg_block_with_identity_bn_is_exact(n: int, groups: int) -> None:
    rng = np.random.default_rng(n * 10 + groups)
    c = 8
    branches = [_conv("k3", rng, c, c, (3,) * n, groups=groups, bias=False),
                _conv("k1", rng, c, c, (1,) * n, groups=groups),
                AffineBranch("bn", bn=_bn(c, rng))]
    x = torch.randn(2, c, *(6,) * n, dtype=torch.float64)
    _check_exact(branches, x)
    m = merge(branches)
    assert m.weight.shape == (c, c // groups, *(3,) * n) and m.base == "k3"


def test_mobileone_style_branches_scale_and_plain_identity() -> None:
    rng = np.random.default_rng(1)
    c = 6
    branches = [*(_conv(f"k3_{i}", rng, c, c, (3, 3), groups=c) for i in range(3)),
                _conv("k1", rng, c, c, (1, 1), groups=c, bn=False),
                AffineBranch("scale", scale=rng.normal(0, 1, c)),
                AffineBranch("x"), AffineBranch("bn", bn=_bn(c, rng))]
    _check_exact(branches, torch.randn(2, c, 7, 5, dtype=torch.float64))


def test_asymmetric_kernels_dilation_and_stride() -> None:
    rng = np.random.default_rng(2)
    branches = [_conv("k3x3", rng, 4, 6, (3, 3), dilation=2, stride=2),
                _conv("k1x3", rng, 4, 6, (1, 3), dilation=2, stride=2),
                _conv("k3x1", rng, 4, 6, (3, 1), dilation=2, stride=2),
                _conv("k1x1", rng, 4, 6, (1, 1), stride=2)]
    _check_exact(branches, torch.randn(2, 6, 9, 8, dtype=torch.float64))


def test_uncentred_but_aligned_pads_merge_exactly() -> None:
    """Even kernels: what matters is the tap grid and the output size, not symmetry."""
    rng = np.random.default_rng(3)
    branches = [_conv("k2", rng, 4, 4, (2,), pads=((1, 0),)),
                _conv("k1", rng, 4, 4, (1,), pads=((0, 0),)),
                AffineBranch("x")]
    _check_exact(branches, torch.randn(2, 4, 7, dtype=torch.float64))
    assert merge(branches).pads == ((1, 0),)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_with_unpadded_1x1_and_identity_is_exact(mode: str) -> None:
    rng = np.random.default_rng(4)
    branches = [_conv("k3", rng, 4, 4, (3, 3), mode=mode),
                _conv("k5", rng, 4, 4, (5, 5), mode=mode),
                _conv("k1", rng, 4, 4, (1, 1)), AffineBranch("bn", bn=_bn(4, rng))]
    _check_exact(branches, torch.randn(2, 4, 7, 6, dtype=torch.float64))
    assert merge(branches).padding_mode == mode


def test_float32_is_rounded_once() -> None:
    rng = np.random.default_rng(5)
    branches = [_conv("k3", rng, 8, 8, (3, 3), dtype=np.float32),
                _conv("k1", rng, 8, 8, (1, 1), dtype=np.float32), AffineBranch("x")]
    m = merge(branches)
    assert m.weight.dtype == np.float32 and m.bias.dtype == np.float32
    exact = merge([ConvBranch(**{**b.__dict__, "weight": b.weight.astype(np.float64),
                                 "bias": b.bias.astype(np.float64)})
                   if isinstance(b, ConvBranch) else b for b in branches])
    assert np.array_equal(m.weight, exact.weight.astype(np.float32))
    assert np.array_equal(m.bias, exact.bias.astype(np.float32))


_REFUSED = {
    "strides": lambda r: [_conv("a", r, 4, 4, (3, 3), stride=2), _conv("b", r, 4, 4, (1, 1))],
    "groups": lambda r: [_conv("a", r, 4, 4, (3, 3), groups=4), _conv("b", r, 4, 4, (1, 1))],
    "output channels": lambda r: [_conv("a", r, 4, 4, (3, 3)), _conv("b", r, 2, 4, (1, 1))],
    "dilations": lambda r: [_conv("a", r, 4, 4, (3, 3), dilation=2),
                            _conv("b", r, 4, 4, (3, 3))],
    "centres do not align": lambda r: [_conv("a", r, 4, 4, (3, 3)),
                                       _conv("b", r, 4, 4, (1, 1), pads=((1, 1), (1, 1)))],
    "do not align": lambda r: [_conv("a", r, 4, 4, (2,), dilation=2, pads=((1, 1),)),
                               _conv("b", r, 4, 4, (1,), pads=((0, 0),))],
    "identity-like": lambda r: [_conv("a", r, 4, 4, (3, 3), stride=2), AffineBranch("x")],
    "padding modes": lambda r: [_conv("a", r, 4, 4, (3, 3), mode="reflect"),
                                _conv("b", r, 4, 4, (1, 1), pads=((1, 1), (1, 1)))],
    "no conv": lambda r: [AffineBranch("x"), AffineBranch("y")],
}


@pytest.mark.parametrize("what", sorted(_REFUSED))
def test_inexact_merges_are_refused_with_a_reason(what: str) -> None:
    branches = _REFUSED[what](np.random.default_rng(0))
    why = merge_refusal(branches)
    assert why is not None and what in why, why
    with pytest.raises(UnsafeFoldError):
        merge(branches)


def test_shift_by_an_even_kernel_with_identity_is_refused() -> None:
    rng = np.random.default_rng(6)
    why = merge_refusal([_conv("k2", rng, 4, 4, (2,), pads=((1, 1),)), AffineBranch("x")])
    assert why and "identity-like" in why


def test_overflow_is_refused() -> None:
    rng = np.random.default_rng(7)
    a = _conv("a", rng, 2, 2, (1,), bn=False, dtype=np.float16)
    big = ConvBranch("b", np.full((2, 2, 1), 60000, np.float16), None, (1,), ((0, 0),), (1,))
    with pytest.raises(UnsafeFoldError, match="not finite"):
        merge([a, big, big])


@st.composite
def _blocks(draw: st.DrawFn) -> tuple[list, torch.Tensor, bool]:
    """Random blocks; ``regular`` marks the textbook case (odd kernels, centred zero padding,
    one stride/dilation/groups), which must always merge."""
    n = draw(st.integers(1, 3))
    c = draw(st.sampled_from([2, 4]))
    groups = draw(st.sampled_from([1, 2, c]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    regular = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    branches: list = []
    for i in range(draw(st.integers(1, 3))):
        odd = (1, 3) if n == 3 else (1, 3, 5)
        kernel = tuple(draw(st.sampled_from(odd if regular else (1, 2, 3))) for _ in range(n))
        pads = None if regular else tuple(
            (draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(n))
        mode = "zeros" if regular else draw(st.sampled_from(["zeros", "reflect"]))
        branches.append(_conv(
            f"conv{i}", rng, c, c, kernel, groups=groups if regular else draw(
                st.sampled_from([groups, 1])), stride=stride if regular else draw(
                st.sampled_from([stride, 1])), dilation=dilation, pads=pads, mode=mode,
            bias=draw(st.booleans()), bn=draw(st.booleans())))
    if stride == 1 or not regular:
        for kind in draw(st.lists(st.sampled_from(["x", "scale", "bn"]), max_size=2)):
            branches.append(AffineBranch(kind, scale=rng.normal(0, 1, c) if kind == "scale"
                                         else None, bn=_bn(c, rng) if kind == "bn" else None))
    x = torch.randn(1, c, *(7 if n < 3 else 5,) * n, dtype=torch.float64)
    return branches, x, regular


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_blocks())
def test_property_merge_is_exact_or_refused(block: tuple[list, torch.Tensor, bool]) -> None:
    branches, x, regular = block
    why = merge_refusal(branches)
    if regular:
        assert why is None, why
    try:
        outs = _reference(x, branches)
    except RuntimeError:  # a branch cannot run on this input (e.g. reflect wider than it)
        outs = None
    if outs is not None and len({o.shape for o in outs}) > 1:
        assert why is not None, "branches of different output sizes must be refused"
    if why is None and outs is not None:
        _check_exact(branches, x)


@pytest.mark.parametrize(("shape", "kind"), [
    ((), ConstantBranch), ((8, 1, 1), ConstantBranch), ((1, 8, 1, 1), ConstantBranch),
    ((1, 1, 1), ConstantBranch), ((1, 1, 6, 5), str), ((5,), str), ((3, 8, 1, 1), str),
    ((2, 1, 8, 1, 1), str)])
def test_constant_summand_is_a_bias_only_when_per_channel_and_not_widening(
        shape: tuple[int, ...], kind: type) -> None:
    """A constant added to a [2, 8, 6, 5] sum: one value per channel (or one) is a bias,
    exact against float64; one that varies elsewhere or would widen the sum is refused."""
    rng = np.random.default_rng(7)
    value = rng.normal(0, 1, shape)
    got = constant_branch("k", value, [2, None, 6, 5], 8)
    assert isinstance(got, kind), got
    if isinstance(got, ConstantBranch):
        branches = [_conv("k3", rng, 8, 8, (3, 3)), _conv("k1", rng, 8, 8, (1, 1)), got]
        _check_exact(branches, torch.randn(2, 8, 6, 5, dtype=torch.float64))


def test_a_zero_summand_adds_nothing_unless_it_widens_the_sum() -> None:
    assert constant_branch("z", np.zeros((2, 8, 6, 5)), [2, None, 6, 5], 8) is None
    assert "broadcasts dim 0" in str(constant_branch("z", np.zeros((3, 8, 6, 5)),
                                                     [1, None, 6, 5], 8))
    assert "not known" in str(constant_branch("z", np.zeros((2, 1, 6, 5)),
                                              [None, None, None, None], 8))
    assert "rank" in str(constant_branch("z", np.zeros((8, 1, 1)), None, 8))
