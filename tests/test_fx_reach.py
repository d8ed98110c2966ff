"""Reach of the FX fold (issue 9) and hooks (issue 8 item 6): every reach-zoo model folded vs
its float64 unfolded reference on fresh inputs with random statistics, the BN-left counts,
and the report's words for each case."""

from __future__ import annotations

import pytest
import torch
from test_fx_zoo import rel_err
from torch import nn

import bnfold
from bnfold.errors import UnsupportedError
from bnfold.models import zoo

# ---------------------------------------------------------------------------------------------
# Hooks: a BN or layer with hooks is kept; other hooks are carried over or the fold refused.
# ---------------------------------------------------------------------------------------------


def _double(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * 2


def _triple_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 3,)


@pytest.mark.parametrize("where", ["features.1", "features.0"])
@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
def test_bn_or_layer_with_a_hook_is_kept(where: str, kind: str) -> None:
    model = zoo.get("plain_cnn")
    module = model.get_submodule(where)
    if kind == "forward":
        module.register_forward_hook(_double)
    elif kind == "pre":
        module.register_forward_pre_hook(_triple_input)
    else:
        module.register_full_backward_hook(lambda *_: None)
    x = zoo.example_input("plain_cnn")
    gm, report = bnfold.fold(model, x)
    kept = {e.bn: e.reason for e in report.kept}
    assert list(kept) == ["features.1"]
    assert where in kept["features.1"] and "hook" in kept["features.1"]
    assert len(report.folded) == 1  # the other BN still folds
    assert rel_err(gm, model, zoo.example_input("plain_cnn", seed=5), double=True) < 1e-6


def test_root_hooks_are_carried_over() -> None:
    model = zoo.get("plain_cnn")
    model.register_forward_pre_hook(_triple_input)
    model.register_forward_hook(lambda _m, _a, out: out + 100)
    gm, report = bnfold.fold(model)
    assert len(report.folded) == 2
    assert any("carried over" in n for n in report.notes)
    x = zoo.example_input("plain_cnn", seed=5)
    with torch.no_grad():  # copy.deepcopy of a GraphModule rebuilds it without hooks
        ref = model.double()(x.double())
        assert float((gm.double()(x.double()) - ref).abs().max() / ref.abs().max()) < 1e-6


def test_hook_on_an_inlined_module_refuses_the_fold() -> None:
    model = zoo.get("resnet_small")
    model.layer1.register_forward_hook(_double)
    with pytest.raises(UnsupportedError, match=r"layer1 .*inlines"):
        bnfold.fold(model)
