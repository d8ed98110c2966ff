"""`bnfold demo` end to end (without its training section, which tests/test_fx_insert.py runs)."""

from __future__ import annotations

import json

import pytest

from bnfold.demo import run_demo
from bnfold.errors import BadInputError


@pytest.mark.parametrize("model", ["plain_cnn", "conv_multi_use"])
def test_demo_folds_validates_and_reports_json(model: str, capsys: pytest.CaptureFixture) -> None:
    assert run_demo(model=model, as_json=True, train=False) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    fx = doc["fx_fold"]
    assert fx["max_rel_err_vs_float64"] < 1e-5
    assert fx["bn_left"] == fx["bn_left_expected"]
    onnx_counts = doc["onnx_fold"]["report"]["counts"]
    assert onnx_counts["kept"] == fx["bn_left_expected"] and onnx_counts["folded"] > 0
    runs = doc["onnx_fold"]["validation"]["runs"]
    assert any(r["provider"] == "cpu" and r["status"] == "ran" and r["passed"] for r in runs)


def test_demo_refuses_an_unknown_model() -> None:
    with pytest.raises(BadInputError, match="unknown zoo model"):
        run_demo(model="nope", train=False)
