"""Layers whose weight is computed at each call (``weight_norm``, ``spectral_norm``, any
parametrization): their BN folds into the computed weight, exactly, and the user's model keeps
its reparameterization (``bnfold.passes.fx.computed_weights``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from onnx_cases import run_ort
from test_fx_zoo import rel_err
from test_onnx_reach import dynamo_export
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import bnfold
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx.computed_weights import reparameterization_hooks
from bnfold.passes.onnx.fold import fold_onnx


class _Twice(nn.Module):
    """A user parametrization of one tensor: ``2 * w``."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def _old(fn, module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # (the hook-based forms are deprecated)
        warnings.simplefilter("ignore", FutureWarning)
        return fn(module)


def _layer(kind: str) -> nn.Module:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    if kind == "weight_norm":
        return parametrizations.weight_norm(conv)
    if kind == "spectral_norm":
        return parametrizations.spectral_norm(conv)
    if kind == "old weight_norm":
        return _old(nn.utils.weight_norm, conv)
    if kind == "old spectral_norm":
        return _old(nn.utils.spectral_norm, conv)
    if kind == "orthogonal":
        return parametrizations.orthogonal(nn.Linear(8, 8))
    parametrize.register_parametrization(conv, "weight", _Twice())
    parametrize.register_parametrization(conv, "bias", _Twice())
    return conv


KINDS = ["weight_norm", "spectral_norm", "old weight_norm", "old spectral_norm", "orthogonal",
         "user parametrization"]


def _net(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = _layer(kind)
    if kind == "orthogonal":
        model, x = nn.Sequential(layer, nn.BatchNorm1d(8), nn.ReLU()), torch.randn(4, 8)
    else:
        model, x = nn.Sequential(layer, nn.BatchNorm2d(8), nn.ReLU()), torch.randn(2, 3, 9, 9)
    if kind.startswith("old"):  # the hook's last result goes stale: the next call recomputes
        with torch.no_grad():
            getattr(layer, "weight_g" if "weight" in kind else "weight_orig").mul_(1.5)
    return randomize_bn_stats(model).eval(), x


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("shapes", [True, False], ids=["example_inputs", "no_shapes"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_computed_weight_takes_the_bn(kind: str, shapes: bool) -> None:
    model, x = _net(kind)
    before = _outputs(model, x)
    gm, report = bnfold.fold(model, x if shapes else None)
    (entry,) = report.entries
    assert entry.action == "folded", entry.reason
    name = "orthogonal" if kind == "orthogonal" else kind.removeprefix("old ").replace(
        "user parametrization", "parametrization Twice")
    assert any(name in m for m in entry.details["materialized"]), entry.details
    if "rank_dispatch" not in entry.details:  # (Linear -> BN1d, no shapes: per-rank branches)
        assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in gm.modules())
        assert not parametrize.is_parametrized(gm.get_submodule("0"))
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert rel_err(gm, model, fresh, double=True) < 1e-6
    assert rel_err(gm, model, fresh, double=False) < 1e-5
    # the user's model keeps its reparameterization and computes what it did
    assert torch.equal(_outputs(model, x), before)
    layer = model.get_submodule("0")
    assert parametrize.is_parametrized(layer) or reparameterization_hooks(layer)


def test_a_tied_original_is_left_as_it_is() -> None:
    """conv1's weight is ``2 * w`` with ``w`` also conv2's weight: folding conv1's BN writes a
    new weight for conv1 only; conv2 still reads ``w`` (exact against float64)."""
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    conv2.weight = conv1.weight
    parametrize.register_parametrization(conv1, "weight", _Twice())
    model = randomize_bn_stats(nn.Sequential(conv1, nn.BatchNorm2d(4), nn.ReLU(), conv2)).eval()
    x = torch.randn(2, 4, 7, 7)
    gm, report = bnfold.fold(model, x)
    assert [e.action for e in report.entries] == ["folded"]
    assert rel_err(gm, model, torch.randn(2, 4, 7, 7), double=True) < 1e-6


def test_a_shared_weight_norm_layer_folds_into_copies() -> None:
    """One hook-based weight_norm conv called twice, each call -> its own BN: two copies of
    the layer take one BN each (copying the layer first materializes its weight, which
    ``copy.deepcopy`` of a hook-based weight_norm module refuses)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = _old(nn.utils.weight_norm, nn.Conv2d(4, 4, 3, padding=1))
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.conv(torch.relu(self.bn1(self.conv(x)))))

    torch.manual_seed(0)
    model = randomize_bn_stats(Net()).eval()
    x = torch.randn(2, 4, 6, 6)
    gm, report = bnfold.fold(model, x)
    assert [e.action for e in report.entries] == ["folded", "folded"]
    assert rel_err(gm, model, torch.randn(2, 4, 6, 6), double=True) < 1e-6


def test_a_parametrization_in_training_mode_keeps_the_bn() -> None:
    """spectral_norm runs a power-iteration step at each training call: no constant weight."""
    model, x = _net("spectral_norm")
    model[0].parametrizations.train()
    gm, report = bnfold.fold(model, x)
    (entry,) = report.kept
    assert "spectral_norm of weight is in training mode" in entry.reason
    assert parametrize.is_parametrized(gm.get_submodule("0"))


def test_a_layer_with_another_hook_beside_weight_norm_is_kept() -> None:
    model, x = _net("old weight_norm")
    model[0].register_forward_hook(lambda _m, _a, out: out * 2)
    _, report = bnfold.fold(model, x)
    assert "forward hook" in report.kept[0].reason


def test_the_dynamo_export_of_a_spectral_norm_conv_folds() -> None:
    """dynamo computes the weight as ``w / (u . (W v))``: the cone's MatMul is bounded by its
    operands' shapes, so it is evaluated and the BN folds."""
    model, x = _net("spectral_norm")
    folded, report = fold_onnx(dynamo_export(model, x))
    assert [e.action for e in report.entries] == ["folded"]
    with torch.no_grad():
        want = model.double()(x.double()).numpy()
    got = run_ort(folded, {folded.graph.input[0].name: x.numpy()})[0]
    assert abs(got - want).max() / abs(want).max() < 1e-5


def test_insert_puts_a_bn_after_a_parametrized_layer_and_the_fold_takes_it_back() -> None:
    """insert_bn sees a weight_norm conv as the conv it is (a BN of its channels after it),
    keeps a bias a parametrization computes (``drop_bias``), and the fold of the trained,
    recalibrated-in-eval result folds into the computed weight."""
    torch.manual_seed(0)
    conv2 = nn.Conv2d(8, 5, 3)
    parametrize.register_parametrization(conv2, "bias", _Twice())
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), conv2,
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 4))
    x = torch.randn(4, 3, 7, 7)
    gm, report = bnfold.insert_bn(model, drop_bias=True, example_inputs=x)
    inserted = {e.into: e.details["bias"] for e in report.entries if e.action == "inserted"}
    assert inserted == {"0": "dropped (BN's beta takes its role)",
                        "2": "kept: a parametrization computes it"}
    assert [gm.get_submodule(f"{n}_bn").num_features for n in ("0", "2")] == [8, 5]
    gm.train()
    gm(x)  # one training step's statistics
    gm.eval()
    randomize_bn_stats(gm)
    folded, fold_report = bnfold.fold(gm, x)
    assert [e.action for e in fold_report.entries] == ["folded", "folded"]
    assert rel_err(folded, gm, torch.randn(4, 3, 7, 7), double=True) < 1e-6


# ---------------------------------------------------------------------------------------------
# torch.export programs: the weight is computed by ATen ops in the graph.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_an_exported_program_folds_into_the_computed_weight(kind: str) -> None:
    """``torch.export`` writes the parametrization into the graph (``aten._weight_norm``,
    spectral norm's ``mv``/``vdot``/``div``...): the cone is evaluated in float64 from the
    program's tensors, the BN folds into a new weight and the computation is gone."""
    model, x = _net(kind)
    with warnings.catch_warnings():  # (export warns about the hook form's weight attribute)
        warnings.simplefilter("ignore", UserWarning)
        program = torch.export.export(model, (x,))
    folded, report = bnfold.fold(program, x)
    (entry,) = report.entries
    assert entry.action == "folded", entry.reason
    assert entry.details["materialized"][0].startswith("weight (aten."), entry.details
    code = folded.graph_module.code
    assert not any(f"aten.{op}." in code for op in ("batch_norm", "_weight_norm", "mv")), code
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert rel_err(folded.module(), model, fresh, double=True) < 1e-6


class _Computed(nn.Module):
    """Functional convs whose weights are computed from the model's tensors (folds) or with
    the input, a random draw, an in-place write or a growing expand (each BN kept)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.s = nn.Parameter(torch.rand(6, 1, 1, 1) + 0.5)
        self.bn = nn.BatchNorm2d(6)

    def weight(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w - self.w.mean((1, 2, 3), keepdim=True)  # weight standardization
        w = w / (w.var((1, 2, 3), keepdim=True) + 1e-5).sqrt() * self.s
        if self.how == "input":
            return w * x.mean()
        if self.how == "random":
            return w * torch.rand_like(w)
        if self.how == "in-place":
            self.s.data.mul_(1.0)
            return w
        if self.how == "through narrow":
            self.s.narrow(0, 0, 2).mul_(x.mean())
            return w
        if self.how == "through chunk":
            self.s.chunk(2)[0].mul_(x.mean())
            return w
        if self.how == "as out=":
            torch.mul(self.s, x.mean(), out=self.s)
            return w
        if self.how == "growing":
            return w.sum().expand(6, 3, 3, 3).expand(600, 6, 3, 3, 3)[0]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(nn.functional.conv2d(x, self.weight(x), padding=1)))


@pytest.mark.parametrize("exported", [False, True], ids=["symbolic_trace", "torch.export"])
def test_a_weight_computed_from_the_models_tensors_folds(exported: bool) -> None:
    torch.manual_seed(0)
    model = randomize_bn_stats(_Computed("tensors")).eval()
    x = torch.randn(2, 3, 8, 8)
    source = torch.export.export(model, (x,)) if exported else model
    folded, report = bnfold.fold(source, x)
    (entry,) = report.entries
    assert entry.action == "folded", entry.reason
    gm = folded.module() if exported else folded
    assert not any(n.op == "call_function" and "var" in str(n.target) for n in gm.graph.nodes)
    assert rel_err(gm, model, torch.randn(2, 3, 8, 8), double=True) < 1e-6


@pytest.mark.parametrize("how", ["input", "random", "in-place", "growing", "through narrow",
                                 "through chunk", "as out="])
def test_a_weight_not_computed_from_the_models_tensors_alone_keeps_its_bn(how: str) -> None:
    """Also a tensor the forward writes in place through a view (``narrow``, ``chunk``) or
    as ``out=``: the next call would see another weight."""
    torch.manual_seed(0)
    model = randomize_bn_stats(_Computed(how)).eval()
    x = torch.randn(2, 3, 8, 8)
    source = model if how in ("in-place", "through narrow", "through chunk", "as out=") \
        else torch.export.export(model, (x,))
    _, report = bnfold.fold(source, x)
    (entry,) = report.entries
    assert entry.action == "kept"
    assert "computed in the graph, not from the model's tensors alone" in entry.reason


def test_a_module_weight_the_forward_writes_keeps_its_bn() -> None:
    """``self.conv.weight.data.mul_(...)`` after the call: a fold into the conv would be
    scaled again at every call (and land on a copy)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            self.conv.weight.data.mul_(x.mean())
            return y

    model = randomize_bn_stats(Net()).eval()
    _, report = bnfold.fold(model)
    assert report.kept[0].reason == "conv.weight is written in place by the graph (each call " \
        "changes it); backward fold: its output is a graph output"


class _Advancing(nn.Module):
    """A forward that advances a buffer in place (a running counter of inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.register_buffer("buf", torch.ones(1))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(nn.functional.conv2d(x, self.w * self.buf))
        self.buf.add_(x.mean())
        return y


@pytest.mark.parametrize("route", ["example_inputs", "torch.export"])
def test_running_the_graph_for_shapes_or_export_leaves_its_state(route: str) -> None:
    """The shape pass runs the graph on the example inputs and a program is exported again:
    a buffer the forward writes is put back, so the result starts where the input stands
    (it was one call ahead); its BN is kept, the weight being written each call."""
    torch.manual_seed(0)
    model, x = randomize_bn_stats(_Advancing()).eval(), torch.randn(2, 3, 8, 8)
    if route == "torch.export":
        program = torch.export.export(model, (x,))
        folded, report = bnfold.fold(program, x)
        assert torch.equal(folded.state_dict["buf"], program.state_dict["buf"])
    else:
        folded, report = bnfold.fold(model, x)
        assert torch.equal(folded.get_buffer("buf"), model.buf)
    assert [e.action for e in report.entries] == ["kept"]
