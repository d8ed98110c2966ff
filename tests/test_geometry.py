"""IR-neutral geometry: reshape_axis against a brute-force index check, spread_features against
a float64 BN on the unflattened tensor, ConvGeometry's exactness predicates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.algebra import spread_features
from bnfold.geometry import ConvGeometry, reshape_axis
from tests.test_algebra import assert_close64, bn_ref, random_bn


def _kept_axes(dims_in: tuple[int, ...], axis: int, dims_out: tuple[int, ...]) -> list[int]:
    """Every output axis ``b`` on which each element ``(pre, c, post)`` stays ``(pre, c, post)``:
    the same index along the axis and the same row-major index over the axes before it."""
    def split(dims: tuple[int, ...], at: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.indices(dims)
        pre = np.ravel_multi_index(tuple(idx[:at]), dims[:at]) if at else np.zeros(dims, int)
        return pre.reshape(-1), idx[at].reshape(-1)

    pre_in, c_in = split(dims_in, axis)
    return [b for b in range(len(dims_out))
            if all(np.array_equal(o, i) for o, i in zip(split(dims_out, b), (pre_in, c_in),
                                                        strict=True))]


@st.composite
def reshapes(draw: st.DrawFn) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
    dims_in = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    axis = draw(st.integers(0, len(dims_in) - 1))
    factors = [f for d in dims_in for f in (_split(d) if draw(st.booleans()) else [d])]
    cuts = sorted(draw(st.sets(st.integers(1, max(len(factors) - 1, 1)), max_size=3)))
    groups = [factors[a:b] for a, b in zip([0, *cuts], [*cuts, len(factors)], strict=True)]
    dims_out = tuple(math.prod(g) for g in groups if g)
    ones = draw(st.integers(0, 2))
    at = draw(st.integers(0, len(dims_out)))
    return dims_in, axis, dims_out[:at] + (1,) * ones + dims_out[at:]


def _split(d: int) -> list[int]:
    return [2, d // 2] if d == 4 else [d]


@settings(max_examples=200, deadline=None)
@given(reshapes())
def test_reshape_axis_matches_brute_force(case: tuple[tuple[int, ...], int, tuple[int, ...]]
                                          ) -> None:
    dims_in, axis, dims_out = case
    kept = _kept_axes(dims_in, axis, dims_out)
    assert reshape_axis(dims_in, axis, dims_out) == (kept[0] if kept else None)


def test_reshape_axis_unknown_dims() -> None:
    assert reshape_axis([None, 8, 3], 1, [None, 8, 3, 1]) == 1  # dynamic batch is fine
    assert reshape_axis([None, 8, 3], 1, [None, 24]) is None  # merged with the positions
    assert reshape_axis([2, 8, None], 1, [2, 8, 5]) is None  # unknown after the axis


@pytest.mark.parametrize("spatial,repeat", [((), 1), ((3,), 1), ((2, 3), 1), ((2, 2), 2)])
def test_spread_features_is_the_bn_on_flattened_rows(spatial: tuple[int, ...],
                                                    repeat: int) -> None:
    rng = np.random.default_rng(len(spatial) + repeat)
    c = 4
    bn = random_bn(c, rng)
    x = torch.randn(3 * repeat, c, *spatial, dtype=torch.float64)
    features = repeat * c * math.prod(spatial)
    ref = bn_ref(x, bn).reshape(-1, features)
    spread = spread_features(bn, features, math.prod(spatial))
    assert spread is not None
    assert_close64(bn_ref(x.reshape(-1, features), spread), ref)
    assert spread_features(bn, features + 1, math.prod(spatial)) is None  # rows mix channels


def test_conv_geometry_predicates() -> None:
    full = ConvGeometry.symmetric([3, 3], [2, 2], dilation=[1, 1])
    assert full.every_output_sees_every_tap() and not full.unpadded()
    assert ConvGeometry.symmetric([3], [0]).unpadded()
    runtime_pads = ConvGeometry((3,), (1,), (1,), None, None, (0,))
    assert not runtime_pads.unpadded() and not runtime_pads.every_output_sees_every_tap()
    assert not ConvGeometry.symmetric([3], [2], output_padding=None).every_output_sees_every_tap()
    assert ConvGeometry.symmetric([3], [1], padding_mode="reflect").copies_border()
