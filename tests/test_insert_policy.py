"""The insertion policy shared by the FX and ONNX insert passes (passes/insert_policy.py), on
toy graphs (dicts of readers / inputs), and the same refusals from both passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import BadInputError
from bnfold.passes.insert_policy import (
    check_options,
    following_norm,
    last_layers,
    selector_list,
    skip_reason,
)

# conv -> relu -> flat -> bn ; fc -> out ; conv2 -> add(conv2, fc) -> out2
READERS = {"conv": ["relu"], "relu": ["flat"], "flat": ["bn"], "fc": ["add"], "add": []}
INPUTS = {"out": ["fc", "add"], "add": ["conv2", "fc"], "fc": ["relu"], "relu": ["conv"],
          "conv": ["x"], "conv2": ["x"], "x": []}


def _norm_after(start: str, depth: int = 4) -> str | None:
    return following_norm(start, lambda v: READERS.get(v, []),
                          lambda r: f"BN {r!r}" if r == "bn" else None,
                          lambda r, v: r if r in ("relu", "flat") else None, depth)


def test_following_norm_looks_through_readers_that_keep_channels_up_to_depth() -> None:
    assert _norm_after("conv") == "BN 'bn'"
    assert _norm_after("conv", depth=1) is None  # bn is three readers away
    assert _norm_after("fc") is None


def test_last_layers_stop_at_the_first_layer_on_each_path_back() -> None:
    layers = {"conv", "conv2", "fc"}
    assert last_layers(["out"], lambda n: INPUTS[n], layers) == {"fc", "conv2"}


def test_skip_reasons_in_order_include_exclude_norm_last() -> None:
    def reason(include=(), exclude=(), norm=None, last=False):
        return skip_reason(lambda specs: repr(specs[0]) if "a" in specs else None,
                           list(include), list(exclude), lambda: norm, last, "the output")

    assert reason(include=["b"], exclude=["a"]) == "not selected by include"
    assert reason(include=["a"], exclude=["a"]) == "excluded by 'a'"
    assert reason(norm="BN 'x'", last=True) == "already followed by BN 'x'"
    assert reason(last=True) == "produces the output (skip_last=True)"
    assert reason() is None


def test_options_and_selectors_are_checked_once_for_both_passes() -> None:
    check_options("after_activation", 0, None)
    with pytest.raises(BadInputError, match=r"momentum must be a number in \[0, 1\] or None"):
        check_options("before_activation", 1e-5, 2)
    with pytest.raises(BadInputError, match=r"got None \(no running average\)"):
        check_options("before_activation", 1e-5, None, why_no_none="no running average")
    with pytest.raises(BadInputError, match="position must be one of"):
        check_options("middle", 1e-5, 0.1)
    with pytest.raises(BadInputError, match="eps must be"):
        check_options("before_activation", float("inf"), 0.1)
    assert selector_list("a*", "include", lambda s: isinstance(s, str), "globs") == ["a*"]
    assert selector_list(("a", "b"), "include", lambda s: isinstance(s, str), "globs") == [
        "a", "b"]
    with pytest.raises(BadInputError, match="exclude takes globs, got 3"):
        selector_list(["a", 3], "exclude", lambda s: isinstance(s, str), "globs")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fx_and_onnx_insert_refuse_bad_options_with_the_same_words(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 1))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 1, 5, 5),), str(path), dynamo=False)
    for run in (bnfold.insert_bn, bnfold.insert_bn_onnx):
        target = model if run is bnfold.insert_bn else str(path)
        with pytest.raises(BadInputError, match="position must be one of before_activation"):
            run(target, position="middle")
        with pytest.raises(BadInputError, match="eps must be a finite number >= 0"):
            run(target, eps=-1.0)
        _, report = run(target)
        assert [e.reason for e in report.skipped] == [
            f"produces {'the model' if run is bnfold.insert_bn else 'a graph'} output "
            "(skip_last=True)"]
