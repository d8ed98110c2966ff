"""fold_onnx runs another round only when one may fold more (and then still folds chains)."""

from __future__ import annotations

import pytest
from onnx_cases import Builder, feeds, reference, rel_err, run_ort

from bnfold.passes.onnx import fold as fold_module
from bnfold.passes.onnx.fold import fold_onnx


@pytest.fixture
def rounds(monkeypatch) -> list[int]:
    """How many times each fold walked the graph's affine chains (once per round) on the
    onnx-ir path (the protobuf fast path, passes/onnx/direct.py, has no rounds)."""
    monkeypatch.setattr(fold_module, "direct_fold", lambda *args, **kwargs: None)
    calls: list[int] = []
    real = fold_module.affine_chains

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fold_module, "affine_chains", counted)
    return calls


def _check(model, bn_left: int) -> None:
    out, report = fold_onnx(model)
    assert len(report.kept) == bn_left, report.table()
    x = feeds(model)
    assert rel_err(run_ort(out, x), reference(model, x)) < 1e-5


def test_a_round_where_every_bn_folds_is_the_last(rounds) -> None:
    b = Builder(41)
    b.node("Conv", ["x", b.rand("w0", [4, 3, 1, 1])], ["c0"])
    b.bn("c0", "y0", 4)
    b.node("Conv", ["y0", b.rand("w1", [4, 4, 1, 1])], ["c1"])
    b.bn("c1", "y1", 4)
    _check(b.model({"x": [2, 3, 4, 4]}, {"y1": None}), 0)
    assert len(rounds) == 1


def test_a_bn_kept_behind_another_bn_gets_a_second_round(rounds) -> None:
    """BN -> BN -> Conv: the first BN is read by a BN until the second folds into the conv."""
    b = Builder(42)
    b.bn("x", "y0", 3)
    b.bn("y0", "y1", 3)
    b.node("Conv", ["y1", b.rand("w", [4, 3, 1, 1])], ["c"])
    _check(b.model({"x": [2, 3, 4, 4]}, {"c": None}), 0)
    assert len(rounds) == 2
