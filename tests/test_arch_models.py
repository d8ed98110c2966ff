"""The full-size architecture families (:mod:`bnfold.models.arch`) at a cheap width: BN counts,
``bnfold.fold`` and ``fold_onnx`` (TorchScript and dynamo exports) leave exactly ``bn_left``
BNs and match the unfolded model in float64 on a fresh input; at width 1.0 the nets have
their real parameter counts."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx_cases import count, rel_err, run_ort
from test_onnx_reach import dynamo_export, torchscript_export
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfold
from bnfold.models import arch
from bnfold.passes.fx import trace
from bnfold.passes.onnx.fold import fold_onnx

NAMES = list(arch.ARCHS)
WIDTH = 0.25  # every channel count x 0.25 (depth, and so every BN, kept)
FP32_TOL = 1e-5

#: torchvision's published ``num_params`` for the same nets, and YOLOv5s's 7,235,389 (v6.0
#: yolov5s.yaml, 80 classes) less its Detect head's three 1x1 convs (229,245).
REAL_PARAMS = {
    "resnet18": 11_689_512, "resnet50": 25_557_032, "resnext50_32x4d": 25_028_904,
    "mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548, "regnety_400mf": 4_344_144,
    "shufflenet_v2_x1_0": 2_278_604, "densenet121": 7_978_856, "googlenet": 6_624_904,
    "cspdarknet_yolov5s": 7_006_144,
}


def bn_modules(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def bn_nodes(gm: fx.GraphModule) -> int:
    """BN calls left in a graph (modules and functional forms)."""
    return sum(
        (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), _BatchNorm))
        or (n.op == "call_function" and "batch_norm" in str(n.target))
        for n in gm.graph.nodes)


def outputs(y: torch.Tensor | tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.detach().double().numpy() for t in (y if isinstance(y, tuple) else (y,))]


def float64_run(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return outputs(copy.deepcopy(model).double()(x.double()))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per process while these tests run: under ``-n 2`` on two cores, two
    workers of two OpenMP threads each spin against each other (runs 2x slower or worse)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=NAMES)
def case(request: pytest.FixtureRequest):
    """(name, model at WIDTH, export input, fresh input, float64 reference on the fresh one)."""
    name = request.param
    model = arch.get(name, width=WIDTH)
    x = arch.example_input(name, small=True)
    fresh = arch.example_input(name, seed=7, small=True)
    return name, model, x, fresh, float64_run(model, fresh)


def test_bn_total_at_every_width(case) -> None:
    name, model, _, _, _ = case
    spec = arch.ARCHS[name]
    assert 0 <= spec.bn_left <= spec.bn_total
    assert bn_modules(model) == spec.bn_total
    with torch.device("meta"):  # the real net, without allocating its weights
        assert bn_modules(spec.factory(1.0)) == spec.bn_total


def test_the_comparison_can_fail(case) -> None:
    """The reference depends on the input, and one BN's statistics changed by 10% moves the
    output far past the tolerance: an error below FP32_TOL means something."""
    _, model, x, fresh, want = case
    assert rel_err(float64_run(model, x), want) > 1e-3
    wrong = copy.deepcopy(model)
    bn = next(m for m in wrong.modules() if isinstance(m, _BatchNorm))
    bn.running_var.mul_(1.1)
    assert rel_err(float64_run(wrong, fresh), want) > 100 * FP32_TOL


@pytest.mark.parametrize("shapes", ["real", "meta"])
def test_fx_fold_leaves_bn_left(case, shapes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes from a real forward pass (these small inputs) and on the meta device (as a
    full-size input takes them) fold alike."""
    name, model, x, fresh, want = case
    spec = arch.ARCHS[name]
    ran: list[bool] = []
    if shapes == "meta":
        monkeypatch.setattr(trace, "META_FROM_ELEMENTS", 0)
        meta_pass = trace._shapes_meta_when_large
        monkeypatch.setattr(trace, "_shapes_meta_when_large",
                            lambda gm, args: ran.append(meta_pass(gm, args)) or ran[-1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, report = bnfold.fold(model, x)
    assert bn_nodes(gm) == spec.bn_left, report.table()
    assert len(report.entries) == spec.bn_total
    assert len(report.kept) == spec.bn_left
    assert all(e.reason for e in report.kept)
    assert all(e.into and e.details["direction"] in ("forward", "backward")
               for e in report.folded)
    # (meta ran it, no fallback; only a fold that needs a shape runs the example inputs)
    needed = "example_inputs were not run: no fold needed a shape" not in report.notes
    assert needed == (name == "densenet121")
    assert ran == ([True] if shapes == "meta" and needed else [])
    with torch.no_grad():
        got = outputs(gm(fresh))
    assert rel_err(got, want) < FP32_TOL
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("exporter", ["TorchScript", "dynamo"])
def test_onnx_fold_leaves_bn_left(case, exporter: str) -> None:
    """Both exporters, every BN kept: TorchScript with ``TrainingMode.PRESERVE``, dynamo
    with ``optimize=False`` (its conv biases and affine-less BN parameters are computed
    fills, which the fold sees through)."""
    name, model, x, fresh, want = case
    spec = arch.ARCHS[name]
    proto = (dynamo_export if exporter == "dynamo" else torchscript_export)(model, x)
    assert count(proto) == spec.bn_total, "the exporter did not keep every BN"
    folded, report = fold_onnx(proto)
    onnx.checker.check_model(folded, full_check=True)
    assert count(folded) == spec.bn_left, report.table()
    assert len(report.kept) == spec.bn_left
    assert all(e.reason for e in report.kept)
    feeds = {proto.graph.input[0].name: fresh.numpy()}
    assert rel_err(run_ort(folded, feeds), want) < FP32_TOL
    assert rel_err(run_ort(proto, feeds), want) < FP32_TOL


@pytest.mark.parametrize("name", list(REAL_PARAMS))
def test_real_parameter_counts(name: str) -> None:
    model = arch.get(name)
    assert sum(p.numel() for p in model.parameters()) == REAL_PARAMS[name]


def test_full_size_forward_and_heads() -> None:
    model = arch.get("mobilenet_v2")
    with torch.no_grad():
        y = model(arch.example_input("mobilenet_v2"))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    with torch.device("meta"):
        assert arch.ARCHS["repvgg_a0"].factory(1.0).head[-1].out_features == 1000
        assert arch.ARCHS["mobileone_s0"].factory(1.0).head[-1].in_features == 1024


def test_yolov5s_returns_three_scales() -> None:
    model = arch.get("cspdarknet_yolov5s", width=WIDTH)
    with torch.no_grad():
        p3, p4, p5 = model(arch.example_input("cspdarknet_yolov5s", small=True))
    assert [t.shape[-1] for t in (p3, p4, p5)] == [8, 4, 2]
    assert [t.shape[1] for t in (p3, p4, p5)] == [32, 64, 128]


def test_width_keeps_grouped_convs_valid() -> None:
    """ResNeXt keeps 32 groups, RegNet 8 channels per group, depthwise stays depthwise;
    width 1.0 has the real channels (ShuffleNet's 116 is no multiple of 8)."""
    def convs(model: nn.Module) -> list[nn.Conv2d]:
        return [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    with torch.device("meta"):
        for width in (0.125, WIDTH, 1.0):
            resnext = convs(arch.ARCHS["resnext50_32x4d"].factory(width))
            assert {c.groups for c in resnext} == {1, 32}
            regnet = [c for c in convs(arch.ARCHS["regnety_400mf"].factory(width))
                      if c.groups > 1]
            assert regnet and all(c.in_channels == 8 * c.groups for c in regnet)
            for name in ("mobilenet_v2", "efficientnet_b0", "mobileone_s0"):
                grouped = [c for c in convs(arch.ARCHS[name].factory(width)) if c.groups > 1]
                assert grouped and all(c.groups == c.in_channels == c.out_channels
                                       for c in grouped), name
        shuffle = convs(arch.ARCHS["shufflenet_v2_x1_0"].factory(1.0))
        assert 116 in {c.out_channels for c in shuffle}
        small = convs(arch.ARCHS["resnet50"].factory(WIDTH))
        assert all(c.out_channels % 8 == 0 for c in small)


def test_get_and_inputs() -> None:
    with pytest.raises(KeyError, match="resnet18"):
        arch.get("resnet19")
    a, b = arch.get("unet_bn", seed=3, width=0.125), arch.get("unet_bn", seed=3, width=0.125)
    assert not a.training
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert arch.example_input("unet_bn").shape == (1, 3, 256, 256)
    assert arch.example_input("unet_bn", small=True, batch=5).shape == (5, 3, 64, 64)
    assert not torch.equal(arch.example_input("resnet18", seed=1),
                           arch.example_input("resnet18", seed=2))
