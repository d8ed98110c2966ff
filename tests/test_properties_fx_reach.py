"""Property-based tests of the FX fold's reach (issue 9), in tests/test_properties.py's style:
random affine chains (forward after a conv, backward before a Linear), random concat and sum
splits, random eval no-ops between layer and BN, each folded and checked against a float64
evaluation of the UNFOLDED model on a fresh input, with or without example inputs, and the
report's action predicted from the configuration (never "whatever happened")."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.models.stats import randomize_bn_stats

PROFILE = settings(database=None, derandomize=True, deadline=None, max_examples=60,
                   suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-5


def float64_err(gm: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """max |fp32 folded - float64 unfolded| / max |float64 unfolded| on ``x``."""
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        got = gm(x).double()
    assert got.shape == want.shape
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Affine chains.
# ---------------------------------------------------------------------------------------------

_STEP = st.tuples(st.sampled_from(["add", "sub", "mul", "div"]),
                  st.sampled_from(["channel", "channel4", "scalar_tensor", "number"]),
                  st.booleans())


class Affine(nn.Module):
    """``x`` through a chain of ``x op c`` / ``c op x`` steps with model tensors ``c``."""

    def __init__(self, steps: list[tuple[str, str, bool]], c: int, gen: torch.Generator,
                 channel_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.steps = []
        for i, (op, kind, first) in enumerate(steps):
            first = first and op != "div"
            sign = 1.0 if torch.rand(1, generator=gen).item() < 0.8 else -1.0
            value = (torch.rand(c, generator=gen) + 0.5) * sign
            if kind == "number":
                const: Any = float(value[0])
            else:
                shape = (1, c, 1, 1) if kind == "channel4" and len(channel_shape) == 3 else (
                    channel_shape if kind != "scalar_tensor" else (1,))
                self.register_buffer(f"c{i}", value[:1].reshape(shape) if kind ==
                                     "scalar_tensor" else value.reshape(shape))
                const = f"c{i}"
            self.steps.append((op, const, first))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op, const, first in self.steps:
            c = getattr(self, const) if isinstance(const, str) else const
            a, b = (c, x) if first else (x, c)
            x = {"add": torch.add, "sub": torch.sub, "mul": torch.mul,
                 "div": torch.div}[op](a, b)
        return x


def _per_channel(steps: list[tuple[str, str, bool]], c: int) -> bool:
    """A tensor constant varies along the channels (with one channel it is a scalar)."""
    return c > 1 and any(kind in ("channel", "channel4") for _, kind, _ in steps)


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(steps=st.lists(_STEP, min_size=1, max_size=5), cout=st.integers(1, 6),
       groups=st.sampled_from([1, 2]), padding=st.integers(0, 1), seed=st.integers(0, 2**16),
       with_example=st.booleans())
def test_affine_chain_after_a_conv(steps: list, cout: int, groups: int, padding: int,
                                   seed: int, with_example: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = nn.Conv2d(2 * groups, cout * groups, 3, padding=padding, groups=groups)
    affine = Affine(steps, cout * groups, gen, (cout * groups, 1, 1))
    model = nn.Sequential(conv, affine, nn.ReLU()).eval()
    x = torch.randn(2, 2 * groups, 6, 6, generator=gen)
    tensors = any(kind != "number" for _, kind, _ in steps)
    gm, report = bnfold.fold(model, x if with_example else None)
    if not tensors:
        assert not report.entries  # Python numbers only: not a BN spelling
    elif not _per_channel(steps, cout * groups):
        assert [e.action for e in report.entries] == ["kept"]
        assert "scalar affine" in report.entries[0].reason
    else:
        assert [e.action for e in report.entries] == ["folded"], report.table()
        assert report.entries[0].details["kind"].startswith("affine ")
    assert float64_err(gm, model, torch.randn(3, 2 * groups, 6, 6, generator=gen)) < TOL


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(steps=st.lists(_STEP, min_size=1, max_size=5), c=st.integers(1, 6),
       seed=st.integers(0, 2**16), with_example=st.booleans())
def test_affine_chain_before_a_linear(steps: list, c: int, seed: int,
                                      with_example: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps = [(op, "channel" if kind == "channel4" else kind, first)
             for op, kind, first in steps]
    model = nn.Sequential(nn.ReLU(), Affine(steps, c, gen, (c,)), nn.Linear(c, 3)).eval()
    x = torch.randn(4, c, generator=gen)
    gm, report = bnfold.fold(model, x if with_example else None)
    if _per_channel(steps, c):
        assert [e.action for e in report.entries] == ["folded"], report.table()
        assert report.entries[0].details["direction"] == "backward"
    assert float64_err(gm, model, torch.randn(5, c, generator=gen)) < TOL


# ---------------------------------------------------------------------------------------------
# Concat and sum splits.
# ---------------------------------------------------------------------------------------------


class Merge(nn.Module):
    """``BN(cat(...))`` or ``BN(sum(...))`` over convs of ``x`` and passthrough inputs."""

    def __init__(self, widths: list[int], passthrough: int, how: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, w, 3, padding=1, bias=i % 2 == 0)
                                   for i, w in enumerate(widths))
        self.passthrough, self.how = passthrough, how
        width = widths[0] if how == "add" else sum(widths) + 3 * passthrough
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [conv(x) for conv in self.convs] + [x * (i + 1.0)
                                                    for i in range(self.passthrough)]
        merged = torch.cat(parts, 1) if self.how == "cat" else sum(parts[1:], parts[0])
        return F.relu(self.bn(merged))


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(widths=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       passthrough=st.integers(0, 2), how=st.sampled_from(["cat", "add"]),
       seed=st.integers(0, 2**16), with_example=st.booleans())
def test_concat_and_sum_splits(widths: list[int], passthrough: int, how: str, seed: int,
                               with_example: bool) -> None:
    if how == "add":
        widths = [3] * len(widths)  # summands of one width (x too, for a passthrough)
    torch.manual_seed(seed)
    model = randomize_bn_stats(Merge(widths, passthrough, how), seed).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    gm, report = bnfold.fold(model, x if with_example else None)
    (entry,) = report.entries
    if passthrough == 0:
        assert entry.action == "folded", report.table()
    elif how == "cat" and passthrough == 1:
        assert entry.action == "kept" and "channels only" in entry.reason, report.table()
    else:
        assert entry.action == "kept" and entry.reason
    assert float64_err(gm, model, torch.randn(3, 3, 5, 5, generator=gen)) < TOL


# ---------------------------------------------------------------------------------------------
# Eval no-ops.
# ---------------------------------------------------------------------------------------------

_NOOPS = {
    "identity": nn.Identity, "dropout": lambda: nn.Dropout(0.4), "dropout2d": nn.Dropout2d,
    "contiguous": lambda: _Lambda(lambda t: t.contiguous()),
    "clone": lambda: _Lambda(lambda t: t.clone()),
    "f_dropout": lambda: _Lambda(lambda t: F.dropout(t, 0.3, training=False)),
}


class _Lambda(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.filterwarnings("ignore")
@PROFILE
@given(before=st.lists(st.sampled_from(sorted(_NOOPS)), max_size=3),
       after=st.lists(st.sampled_from(sorted(_NOOPS)), max_size=3),
       seed=st.integers(0, 2**16), with_example=st.booleans())
def test_noops_between_layer_and_bn(before: list[str], after: list[str], seed: int,
                                    with_example: bool) -> None:
    """conv -> no-ops -> BN (forward) and relu -> BN -> no-ops -> 1x1 conv (backward)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), *[_NOOPS[n]() for n in before], nn.BatchNorm2d(4),
        nn.ReLU(), nn.BatchNorm2d(4), *[_NOOPS[n]() for n in after], nn.Conv2d(4, 2, 1),
    )
    model = randomize_bn_stats(model, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    gm, report = bnfold.fold(model, x if with_example else None)
    assert [e.action for e in report.entries] == ["folded", "folded"], report.table()
    assert [e.details["direction"] for e in report.entries] == ["forward", "backward"]
    assert float64_err(gm, model, torch.randn(3, 3, 5, 5, generator=gen)) < TOL
