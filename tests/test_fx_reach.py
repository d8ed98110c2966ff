"""Reach of the FX fold (issue 9) and hooks (issue 8 item 6): every reach-zoo model folded vs
its float64 unfolded reference on fresh inputs with random statistics, the BN-left counts,
and the report's words for each case."""

from __future__ import annotations

import pytest
import torch
from test_fx_zoo import bn_nodes, rel_err
from torch import nn

import bnfold
from bnfold.errors import UnsupportedError
from bnfold.models import reach, zoo

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


# ---------------------------------------------------------------------------------------------
# The reach zoo: exact against float64, with the BN-left count each net declares.
# ---------------------------------------------------------------------------------------------

_PENDING = {"noops_between", "mixnet_concat", "add_of_layers", "bn_multi_reader",
            "linear_bn1d_tokens"}
REACH = [n for n in reach.REACH if n not in _PENDING]


@pytest.mark.parametrize("shapes", [True, False], ids=["example_inputs", "no_shapes"])
@pytest.mark.parametrize("name", REACH)
def test_reach_zoo_folds_exactly_to_its_bn_left(name: str, shapes: bool) -> None:
    model = reach.get(name)
    spec = reach.REACH[name]
    gm, report = bnfold.fold(model, reach.example_input(name) if shapes else None)
    assert len(report.entries) == spec.bn_total, report.table()
    assert len(report.kept) == spec.bn_left, report.table()
    assert all(e.reason and e.details["kind"] for e in report.kept)
    x = reach.example_input(name, seed=123, batch=3)  # fresh input, another batch size
    assert rel_err(gm, model, x, double=False) < 1e-5
    assert rel_err(gm, model, x, double=True) < 1e-6


@pytest.mark.parametrize(("name", "kinds"), [
    ("frozen_bn_backbone", {"affine mul+add"}),
    ("bn_act_timm", {"F.batch_norm", "affine mul+add"}),
    ("sync_bn_eval", {"SyncBatchNorm"}),
    ("affine_chain", {"affine sub+div", "affine mul+add", "affine sub+mul+mul+add"}),
    ("weight_standardization", {"batch_norm on a constant", "BatchNorm2d"}),
])
def test_report_says_what_was_folded(name: str, kinds: set[str]) -> None:
    _, report = bnfold.fold(reach.get(name), reach.example_input(name))
    assert {e.details["kind"] for e in report.folded} == kinds
    assert not report.kept


def test_off_channel_and_scalar_affines_are_kept_with_the_reason() -> None:
    model = reach.get("affine_off_channel")
    gm, report = bnfold.fold(model, reach.example_input("affine_off_channel"))
    reasons = [e.reason for e in report.kept]
    assert "dim 3" in reasons[0] and "conv1's channels are on dim 1" in reasons[0]
    assert "scalar affine" in reasons[1]
    assert gm.code == bnfold.fold(gm)[0].code


def test_constant_bn_is_evaluated_once_into_the_weight() -> None:
    """Weight standardization: no batch_norm left on the weight path, the standardized weight
    is a new Parameter, and the BN after the conv folds into it."""
    model = reach.get("weight_standardization")
    gm, report = bnfold.fold(model, reach.example_input("weight_standardization"))
    assert not bn_nodes(gm)
    constant = [e for e in report.folded if e.details["direction"] == "constant"]
    assert [e.bn for e in constant] == ["conv1 (batch_norm)", "conv2 (batch_norm_1)"]
    assert all(isinstance(gm.get_parameter(e.into), nn.Parameter) for e in constant)
