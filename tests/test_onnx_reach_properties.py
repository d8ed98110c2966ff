"""Property tests for the ONNX fold's reach: random affine chains (every op order, operand
side and constant layout), no-ops, channel concats and sums of layers, each around random
Conv/Gemm layers. Every site must fold, and the folded model in ONNX Runtime must equal a
float64 evaluation of the UNFOLDED graph (onnx's reference evaluator, every tensor upcast) on
a fresh input."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from onnx_cases import Builder, feeds, reference, rel_err, run_ort
from test_properties import PROFILE

import bnfold

FP32_TOL = 1e-5


def _affine(draw: st.DrawFn, b: Builder, x: str, c: int, rank: int) -> str:
    """A random constant per-channel chain on axis 1 of ``x`` (at least one Mul or Div)."""
    ops = draw(st.lists(st.sampled_from(["Mul", "Add", "Sub", "Div"]), min_size=1,
                        max_size=3).filter(lambda o: "Mul" in o or "Div" in o))
    for i, op in enumerate(ops):
        values = b.rng.normal(0, 0.5, c)
        if op in ("Mul", "Div"):
            values = (b.rng.random(c) + 0.5) * np.where(b.rng.random(c) < 0.2, -1, 1)
        layout = draw(st.sampled_from(["full", "lead", "unsqueeze"])) if rank > 2 else "flat"
        name = f"{x}_k{i}"
        if layout == "full":
            const = b.init(name, values.reshape(1, c, *[1] * (rank - 2)))
        elif layout == "lead":
            const = b.init(name, values.reshape(c, *[1] * (rank - 2)))
        elif layout == "unsqueeze":
            axes = b.init(f"{name}_axes", np.arange(1, rank - 1), TensorProto.INT64)
            const = b.node("Unsqueeze", [b.init(f"{name}_v", values), axes], [name])
        else:
            const = b.init(name, values)
        c_first = op != "Div" and draw(st.booleans())
        x = b.node(op, [const, x] if c_first else [x, const], [f"{x}_{op.lower()}{i}"])
    return x


def _noops(draw: st.DrawFn, b: Builder, x: str) -> str:
    for i in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["Identity", "Dropout"]))
        x = b.node(op, [x], [f"{x}_{op.lower()}{i}"])
    return x


def _site(draw: st.DrawFn, b: Builder, x: str, y: str, c: int, rank: int,
          spelling: str) -> str:
    if spelling == "affine":
        return b.node("Identity", [_affine(draw, b, x, c, rank)], [y])
    return b.bn(x, y, c)


@st.composite
def structures(draw: st.DrawFn) -> tuple[onnx.ModelProto, str]:
    """``(model, structure)``: one BN-like site next to layers, all of it exactly foldable."""
    structure = draw(st.sampled_from(["forward", "backward", "concat", "sum"]))
    spelling = draw(st.sampled_from(["bn", "affine"]))
    b = Builder(draw(st.integers(0, 2**31 - 1)))
    cin, size = draw(st.integers(2, 4)), draw(st.integers(3, 6))  # 1 channel: a scalar
    dense = structure == "backward" and draw(st.booleans())
    x_shape = [2, cin] if dense else [2, cin, size, size]
    if structure == "forward":
        c, k = draw(st.integers(2, 6)), draw(st.sampled_from([1, 3]))
        h = b.node("Conv", ["x", b.rand("w", [c, cin, k, k])], ["h"], pads=[k // 2] * 4)
        if draw(st.booleans()):
            h = _noops(draw, b, h)
        _site(draw, b, h, "y", c, 4, spelling)
    elif structure == "backward":
        n = _site(draw, b, "x", "n", cin, len(x_shape), spelling)
        if draw(st.booleans()):
            n = _noops(draw, b, n)
        c = draw(st.integers(1, 5))
        if dense:
            b.node("Gemm", [n, b.rand("w", [cin, c])], ["y"])
        else:
            b.node("Conv", [n, b.rand("w", [c, cin, 2, 2])], ["y"], strides=[2, 2])
    else:
        parts = draw(st.lists(st.integers(2, 4), min_size=2, max_size=3 if structure ==
                              "concat" else 2))
        if structure == "sum":
            parts = [parts[0]] * len(parts)
        outs = []
        for i, c in enumerate(parts):
            k = draw(st.sampled_from([1, 3]))
            outs.append(b.node("Conv", ["x", b.rand(f"w{i}", [c, cin, k, k])], [f"h{i}"],
                               pads=[k // 2] * 4))
        if structure == "concat":
            h = b.node("Concat", outs, ["cat"], axis=1)
        else:
            h = b.node("Add", outs, ["sum"])
        _site(draw, b, h, "y", sum(parts) if structure == "concat" else parts[0], 4, spelling)
    return b.model({"x": x_shape}, {"y": None}), f"{structure} {spelling}"


@settings(PROFILE, max_examples=120)
@given(case=structures(), seed=st.integers(0, 2**31 - 1))
def test_reach_sites_fold_exactly(case: tuple[onnx.ModelProto, str], seed: int) -> None:
    model, structure = case
    before = model.SerializeToString()
    folded, report = bnfold.fold_onnx(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(folded, full_check=True)
    assert [e.action for e in report.entries] == ["folded"], (structure, report.table())
    assert not any(n.op_type in ("BatchNormalization", "Mul", "Div", "Sub")
                   for n in folded.graph.node), structure
    x = feeds(model, seed)
    want = reference(model, x)
    assert rel_err(run_ort(folded, x), want) < FP32_TOL, structure
