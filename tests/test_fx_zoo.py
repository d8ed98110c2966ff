"""Every zoo model: bnfold.fold vs the unfolded model in float64, BN counts, no input mutation,
idempotence."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import bnfold
from bnfold.models import zoo
from bnfold.passes.fx.model_copy import deep_copy

NAMES = list(zoo.ZOO)


def bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """BN calls left in a graph (modules and functional forms)."""
    out = []
    for n in gm.graph.nodes:
        if (n.op == "call_module" and isinstance(
            gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm
        )) or (n.op == "call_function" and "batch_norm" in str(n.target)):
            out.append(n)
    return out


def flat(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return torch.cat([o.reshape(-1) for o in out])


def rel_err(model: nn.Module, reference: nn.Module, x: torch.Tensor, *, double: bool) -> float:
    """max |model(x) - reference64(x)| / max |reference64(x)| (model in fp32 or float64).
    Copies as ``copy.deepcopy`` does (bnfold's copy: it also copies a hook-based
    ``weight_norm`` layer, which ``copy.deepcopy`` refuses)."""
    with torch.no_grad():
        ref = flat(deep_copy(reference).double()(x.double()))
        out = flat(deep_copy(model).double()(x.double())) if double else flat(model(x)).double()
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=NAMES)
def folded(request: pytest.FixtureRequest):
    name = request.param
    model = zoo.get(name)
    before = {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters(remove_duplicate=False))
    gm, report = bnfold.fold(model, zoo.example_input(name))
    return name, model, gm, report, before, params_before


def test_folded_matches_float64_reference(folded) -> None:
    name, model, gm, _, _, _ = folded
    x = zoo.example_input(name, seed=123, batch=3)  # fresh input, another batch size
    assert rel_err(gm, model, x, double=False) < 1e-5  # fp32 run of the folded model
    assert rel_err(gm, model, x, double=True) < 1e-6  # only the weight rounding to fp32 left


def test_bn_left_is_expected(folded) -> None:
    name, _, gm, report, _, _ = folded
    spec = zoo.ZOO[name]
    assert len(bn_nodes(gm)) == spec.bn_left
    assert len(report.kept) == spec.bn_left
    assert len(report.entries) == spec.bn_total
    assert all(e.reason for e in report.kept)
    assert all(e.into and e.details["direction"] in ("forward", "backward")
               for e in report.folded)


def test_input_model_unchanged(folded) -> None:
    _, model, gm, _, before, params_before = folded
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (value, ptr) in before.items():
        assert after[k].data_ptr() == ptr, k
        assert torch.equal(after[k], value), k
    for k, p in model.named_parameters(remove_duplicate=False):
        assert p is params_before[k], k
    assert gm is not model


def test_fold_twice_equals_once(folded) -> None:
    name, _model, gm, report, _, _ = folded
    gm2, report2 = bnfold.fold(gm, zoo.example_input(name))
    assert gm2.code == gm.code
    s1, s2 = gm.state_dict(), gm2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not report2.folded
    assert [e.bn for e in report2.kept] == [e.bn for e in report.kept]


@pytest.mark.parametrize("name", NAMES)
def test_without_example_inputs_is_exact_and_leaves_the_same_bns(name: str) -> None:
    """Without shapes the pass reads ranks off the graph and guards the rest at run time: it
    leaves exactly the BNs it leaves with shapes, and is exact on the model's inputs."""
    model = zoo.get(name)
    gm, report = bnfold.fold(model)
    assert len(report.kept) == zoo.ZOO[name].bn_left
    assert len(bn_nodes(gm)) == len(report.kept)
    for e in report.kept:
        assert e.reason
    x = zoo.example_input(name, seed=7)
    assert rel_err(gm, model, x, double=False) < 1e-5
    assert rel_err(gm, model, x, double=True) < 1e-6


def test_fold_twice_equals_once_without_example_inputs() -> None:
    """Rank guards included: a second fold finds nothing to fold and changes nothing."""
    for name in ("mlp_bn1d", "levit_block", "conv_multi_use"):
        gm, report = bnfold.fold(zoo.get(name))
        gm2, report2 = bnfold.fold(gm)
        assert gm2.code == gm.code
        assert not report2.folded and len(report2.kept) == len(report.kept)


# ---------------------------------------------------------------------------------------------
# fp16 / bf16: every fold of every zoo model is the float64 fold rounded once.
# ---------------------------------------------------------------------------------------------

def exact_fold(layer: nn.Module, bn: nn.Module, direction: str) -> tuple[torch.Tensor, ...]:
    """The folded weight and bias in float64, written out per layout (independent of
    bnfold.algebra): forward scales output channels, backward scales input channels and adds
    ``W . t`` to the bias; ConvTranspose weights are [Cin, Cout/g, k..], others [out, in/g, ..].
    """
    s = torch.ones(bn.num_features, dtype=torch.float64) if bn.weight is None \
        else bn.weight.double()
    s = s / torch.sqrt(bn.running_var.double() + bn.eps)
    t = -bn.running_mean.double() * s + (0 if bn.bias is None else bn.bias.double())
    w, g = layer.weight.double(), getattr(layer, "groups", 1)
    convt = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    out = w.shape[1] * g if convt else w.shape[0]
    b = torch.zeros(out, dtype=torch.float64) if layer.bias is None else layer.bias.double()
    if direction == "forward" and convt:
        cin, per = w.shape[:2]
        return (w.reshape(g, cin // g, per, -1) * s.reshape(g, 1, per, 1)).reshape(w.shape), \
            b * s + t
    if direction == "forward":
        return w * s.reshape(-1, *[1] * (w.dim() - 1)), b * s + t
    per = w.shape[1]  # backward into conv/linear: input channel (o // (out/g)) * per + j
    shape = (out, per, *[1] * (w.dim() - 2))
    s_in = s.reshape(g, per).repeat_interleave(out // g, 0).reshape(shape)
    t_in = t.reshape(g, per).repeat_interleave(out // g, 0).reshape(shape)
    return w * s_in, b + (w * t_in).flatten(1).sum(1)


def ulp_error(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """max |got - exact| in units of ``dtype``'s spacing at ``exact`` (subnormals included)."""
    mant, emin = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}[dtype]
    e = torch.clamp(torch.floor(torch.log2(exact.abs() + 1e-300)), min=emin)
    return float(((got.double() - exact).abs() / 2.0 ** (e - mant)).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_folds_are_correctly_rounded(dtype: torch.dtype) -> None:
    kinds = set()
    for name in NAMES:
        model = zoo.get(name).to(dtype)
        gm, report = bnfold.fold(model, zoo.example_input(name).to(dtype))
        assert len(report.kept) == zoo.ZOO[name].bn_left, name
        for e in report.folded:
            layer = model.get_submodule(e.details.get("copy_of", e.into))
            bn = model.get_submodule(e.bn.split(" ")[0])
            weight, bias = exact_fold(layer, bn, e.details["direction"])
            folded = gm.get_submodule(e.into)
            assert folded.weight.dtype == folded.bias.dtype == dtype
            assert ulp_error(folded.weight, weight, dtype) <= 0.5, (name, e.bn)
            assert ulp_error(folded.bias, bias, dtype) <= 0.5, (name, e.bn)
            kinds.add((type(layer).__name__, e.details["direction"]))
    assert len(kinds) == 9, kinds  # conv/convT 1d-3d, linear, forward and backward
