"""A BN after a per-channel pool or resample folds through it into the layer before it
(``bnfold.passes.fx.channelwise``, ``bnfold.passes.onnx.channelwise``): an average or a
resample passes ``s*y + t`` exactly, a max only where ``s >= 0``, a zero-padded average that
counts its padding does not. Every fold is checked against the unfolded model in float64."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx_cases import Builder
from test_fx_fold import fold_checked, prepared
from test_fx_zoo import rel_err
from test_onnx_fold import check
from test_onnx_reach import _ort_vs_float64, dynamo_export, torchscript_export
from torch import nn

import bnfold
from bnfold.passes.onnx.fold import fold_onnx

_OPS = {
    "AvgPool2d": lambda: nn.AvgPool2d(2),
    "avg_pool2d, padding, count_include_pad=False": lambda: lambda y: F.avg_pool2d(
        y, 3, stride=1, padding=1, count_include_pad=False),
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d(3),
    "MaxPool2d, padding": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "adaptive_max_pool2d": lambda: lambda y: F.adaptive_max_pool2d(y, 2),
    "interpolate nearest": lambda: lambda y: F.interpolate(y, scale_factor=2),
    "interpolate bilinear": lambda: lambda y: F.interpolate(y, scale_factor=1.5,
                                                            mode="bilinear"),
    "interpolate bicubic, align_corners": lambda: lambda y: F.interpolate(
        y, size=(7, 5), mode="bicubic", align_corners=True),
    "Upsample": lambda: nn.Upsample(scale_factor=2, mode="bilinear"),
}


class _Through(nn.Module):
    """``conv -> op -> BN``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        made = _OPS[op]()
        self.op = made if isinstance(made, nn.Module) else None
        self.fn = None if isinstance(made, nn.Module) else made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(self.bn(self.op(y) if self.op is not None else self.fn(y)))


@pytest.mark.parametrize("shapes", [True, False], ids=["example_inputs", "no_shapes"])
@pytest.mark.parametrize("op", list(_OPS))
def test_fx_folds_through_a_per_channel_op(op: str, shapes: bool) -> None:
    model = prepared(_Through(op))
    if "max" in op.lower():  # a positive scale in every channel (see the refusal test)
        with torch.no_grad():
            model.bn.weight.abs_()
    _, report = fold_checked(model, torch.randn(2, 3, 9, 9), shapes=shapes)
    (entry,) = report.folded
    assert entry.into == "conv" and len(entry.details["through"]) == 1, entry.details


@pytest.mark.parametrize("exported", [False, True], ids=["symbolic_trace", "torch.export"])
def test_fx_keeps_the_bn_where_the_op_does_not_pass_the_affine_map(exported: bool) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.ModuleList(nn.Conv2d(3, 4, 1) for _ in range(3))
            self.bn = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.bn[0](F.avg_pool2d(self.c[0](x), 3, stride=1, padding=1))
            b = self.bn[1](F.max_pool2d(self.c[1](x), 3, stride=1, padding=1))
            c = self.bn[2](F.avg_pool2d(self.c[2](x), 3, stride=1, padding=1,
                                        count_include_pad=False, divisor_override=8))
            return a + b + c

    model = prepared(Net())
    with torch.no_grad():
        model.bn[1].weight[2] = -0.7
    x = torch.randn(2, 3, 8, 8)
    _, report = bnfold.fold(torch.export.export(model, (x,)) if exported else model, x)
    assert len(report.kept) == 3, report.table()
    reasons = [e.reason for e in report.entries]
    assert "counts its zero padding in the average" in reasons[0]
    assert "a negative scale of the BN turns into a minimum" in reasons[1]
    assert "divisor_override" in reasons[2]


def _onnx(op: str, channels: int = 6, size: int = 10, **attrs) -> onnx.ModelProto:
    b = Builder(7)
    b.node("Conv", ["x", b.rand("w", [6, 3, 3, 3])], ["c"])
    inputs = ["c"]
    if op == "Resize":
        scales = attrs.pop("scales")
        inputs += ["", b.init("scales", np.array(scales, np.float32))]
    if op == "Slice":
        inputs += [b.init(k, np.array(attrs.pop(k)), onnx.TensorProto.INT64)
                   for k in ("starts", "ends", "axes")]
    b.node(op, inputs, ["p"], **attrs)
    b.bn("p", "y", channels)
    model = b.model({"x": [2, 3, size, size]}, {"y": None})
    if op in ("MaxPool", "GlobalMaxPool"):  # a positive scale in every channel
        scale = next(t for t in model.graph.initializer if t.name == "y_scale")
        scale.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(scale)), "y_scale"))
    return model


@pytest.mark.parametrize("op, attrs", [
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 0}),
    ("GlobalAveragePool", {}),
    ("MaxPool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("GlobalMaxPool", {}),
    ("Resize", {"scales": [1, 1, 2, 2], "mode": "nearest"}),
    ("Resize", {"scales": [1, 1, 1.5, 1.5], "mode": "linear"}),
    ("Resize", {"scales": [1, 1, 2, 2], "mode": "cubic",
                "coordinate_transformation_mode": "align_corners"}),
    ("Slice", {"starts": [0, 1], "ends": [-1, 100], "axes": [2, -1]}),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))[:40])
def test_onnx_folds_through_a_per_channel_op(op: str, attrs: dict) -> None:
    _, report = check(_onnx(op, **attrs), 0)
    assert report.folded[0].into == "Conv_0"


@pytest.mark.parametrize("op, attrs, reason", [
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
     "counts its padding in the average"),
    ("Resize", {"scales": [1, 2, 1, 1], "mode": "nearest", "channels": 12},
     "resizes the channel axis"),
    ("Slice", {"starts": [0], "ends": [4], "axes": [1], "channels": 4},
     "works along the channel axis"),
])
def test_onnx_keeps_the_bn_where_the_op_does_not_pass_the_affine_map(
        op: str, attrs: dict, reason: str) -> None:
    _, report = check(_onnx(op, **attrs), 1)
    assert reason in report.kept[0].reason


@pytest.mark.parametrize("size, kernel, stride, dilation, opset", [
    (11, 2, 2, 1, 17),  # torch's AvgPool2d(2, 2, ceil_mode=True): last window 1 past the end
    (12, 3, 2, 1, 22),
    (12, 3, 2, 2, 19),  # dilated, the last window 1 past the end
    (10, 3, 2, 1, 17),  # ceil_mode with no window past the end
])
def test_onnx_ceil_mode_average_pool_counting_no_padding_folds(
        size: int, kernel: int, stride: int, dilation: int, opset: int) -> None:
    """``count_include_pad=1`` (torch's export of ``AvgPool2d(k, s, ceil_mode=True)``) with every
    pad 0: ceil_mode's last window is averaged over the input's elements only (ONNX Runtime and
    the reference alike), so ``avg(s*y + t) = s*avg(y) + t``; checked in ORT and float64."""
    b = Builder(11)
    b.node("Conv", ["x", b.rand("w", [6, 3, 3, 3])], ["c"])
    attrs = {"dilations": [dilation] * 2} if dilation > 1 else {}
    b.node("AveragePool", ["c"], ["p"], kernel_shape=[kernel] * 2, strides=[stride] * 2,
           pads=[0, 0, 0, 0], ceil_mode=1, count_include_pad=1, **attrs)
    b.bn("p", "y", 6)
    _, report = check(b.model({"x": [2, 3, size, size]}, {"y": None}, opset=opset), 0)
    assert report.folded[0].into == "Conv_0"


@pytest.mark.parametrize("pads, size, reason", [
    ([0, 0, 0, 0], 9, "last window runs 2 elements past the input's end"),
    ([0, 0, 1, 1], 11, "counts its padding in the average"),
])
def test_onnx_ceil_mode_average_pool_keeps_the_bn_with_a_true_reason(
        pads: list, size: int, reason: str) -> None:
    """A pad counted in the average, or a last window 2 past the end (onnx's reference puts
    half of it before the input and counts it), keeps the BN, saying which."""
    b = Builder(12)
    b.node("Conv", ["x", b.rand("w", [6, 3, 3, 3])], ["c"])
    b.node("AveragePool", ["c"], ["p"], kernel_shape=[3, 3], strides=[3, 3], pads=pads,
           ceil_mode=1, count_include_pad=1)
    b.bn("p", "y", 6)
    # (no numeric check: onnx's reference and ORT place the overrun windows differently)
    _, report = check(b.model({"x": [2, 3, size, size]}, {"y": None}), 1, ref=False)
    assert reason in report.kept[0].reason


def test_onnx_max_pool_with_a_negative_scale_keeps_the_bn() -> None:
    model = _onnx("MaxPool", kernel_shape=[2, 2])
    scale = next(t for t in model.graph.initializer if t.name == "y_scale")
    values = numpy_helper.to_array(scale).copy()
    values[3] = -values[3]
    scale.CopyFrom(numpy_helper.from_array(values, "y_scale"))
    _, report = check(model, 1)
    assert "a negative scale of the BN turns into a minimum" in report.kept[0].reason


@pytest.mark.parametrize("exporter", [torchscript_export, dynamo_export],
                         ids=["TorchScript", "dynamo"])
def test_exports_fold_through_pools_resamples_and_slices(exporter) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c3, self.b3 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.b1(F.avg_pool2d(self.c1(x), 2)))
            x = torch.relu(self.b2(F.interpolate(self.c2(x), scale_factor=2, mode="bilinear")))
            return self.b3(F.max_pool2d(self.c3(x), 2)[:, :, 1:])

    torch.manual_seed(0)
    model = prepared(Net())
    with torch.no_grad():
        model.b3.weight.abs_()
    x = torch.randn(2, 3, 16, 16)
    folded, report = fold_onnx(exporter(model, x))
    assert [e.action for e in report.entries] == ["folded"] * 3, report.table()
    assert _ort_vs_float64(model, folded, x) < 1e-5


_BEFORE = {
    "avg_pool2d": lambda y: F.avg_pool2d(y, 2),
    "F.pad reflect": lambda y: F.pad(y, (1, 1, 2, 0), mode="reflect"),
    "ReplicationPad2d": nn.ReplicationPad2d(1),
    "interpolate": lambda y: F.interpolate(y, scale_factor=2),
}


@pytest.mark.parametrize("exported", [False, True], ids=["symbolic_trace", "torch.export"])
@pytest.mark.parametrize("op", list(_BEFORE))
def test_fx_folds_backward_through_a_per_channel_op(op: str, exported: bool) -> None:
    """``BN -> P -> conv`` (no conv padding): ``conv(P(s*x + t)) = conv(s*P(x) + t)``."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3)
            self.op = _BEFORE[op]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.op(self.bn(x)))

    model, x = prepared(Net()), torch.randn(2, 3, 8, 8)
    folded, report = bnfold.fold(torch.export.export(model, (x,)) if exported else model, x)
    (entry,) = report.entries
    assert (entry.action, entry.details.get("direction")) == ("folded", "backward"), entry.reason
    gm = folded.module() if exported else folded
    assert rel_err(gm, model, torch.randn(2, 3, 8, 8), double=True) < 1e-6


@pytest.mark.parametrize("op, reason", [
    (lambda y: F.pad(y, (1, 1, 1, 1)), "fills with a constant"),
    (lambda y: F.pad(y, (1, 1, 1, 1, 1, 1), mode="replicate"), "works along the BN's channel"),
    (lambda y: F.avg_pool2d(y, 3, stride=1, padding=1), "counts its zero padding"),
], ids=["constant pad", "pad of the channels", "padded average"])
def test_fx_keeps_the_bn_before_a_per_channel_op_that_does_not_pass_it(op, reason: str) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(5 if "channel" in reason else 3,
                                                                 5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(op(self.bn(x)))

    _, report = fold_checked(prepared(Net()), torch.randn(2, 3, 8, 8), left=1)
    assert reason in report.kept[0].reason


_SLICES = {
    "Chomp1d": (lambda y: y[:, :, :-2].contiguous(), 1),
    "x[..., 1:-1]": (lambda y: y[..., 1:-1], 2),
    "x[:, :, ::2, 1:]": (lambda y: y[:, :, ::2, 1:], 2),
}


@pytest.mark.parametrize("exported", [False, True], ids=["symbolic_trace", "torch.export"])
@pytest.mark.parametrize("case", list(_SLICES))
def test_fx_folds_through_slices_of_the_dims_after_the_channels(case: str, exported: bool
                                                                ) -> None:
    """TCN's ``Chomp1d`` (``conv1d(padding=p) -> x[:, :, :-p] -> BN1d``) and other slices of
    the spatial dims copy part of each channel: forward and backward folds pass them."""
    cut, dims = _SLICES[case]
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = conv(3, 6, 3, padding=2), bn(6)
            self.b2, self.c2 = bn(6), conv(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(cut(self.b2(torch.relu(self.b1(cut(self.c1(x)))))))

    model = prepared(Net())
    x = torch.randn(2, 3, *(9,) * dims)
    folded, report = bnfold.fold(torch.export.export(model, (x,)) if exported else model, x)
    assert [(e.action, e.details.get("direction")) for e in report.entries] == [
        ("folded", "forward"), ("folded", "backward")], report.table()
    gm = folded.module() if exported else folded
    assert rel_err(gm, model, torch.randn(2, 3, *(9,) * dims), double=True) < 1e-6


def test_fx_keeps_a_bn_over_a_channel_slice() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)[:, :4])

    _, report = fold_checked(prepared(Net()), torch.randn(2, 3, 5, 5), left=1)
    assert "works along the layer's feature axis" in report.kept[0].reason


class _PoolHead(nn.Module):
    """ConvMixer's head, ``GELU -> BN -> global average pool -> flatten -> Linear``, after a
    ``BN -> avg_pool2d -> conv`` stem: both BNs fold backward through the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0, self.c0 = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)
        self.c, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(F.gelu(self.c(self.c0(F.avg_pool2d(self.bn0(x), 2)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("route", ["example_inputs", "no_shapes", "torch.export"])
def test_fx_folds_a_bn_backward_through_a_global_pool_into_the_head(route: str) -> None:
    model, x = prepared(_PoolHead()), torch.randn(2, 3, 12, 12)
    source = torch.export.export(model, (x,)) if route == "torch.export" else model
    folded, report = bnfold.fold(source, None if route == "no_shapes" else x)
    assert [(e.action, e.details.get("direction")) for e in report.entries] == [
        ("folded", "backward")] * 2, report.table()
    gm = folded.module() if route == "torch.export" else folded
    assert rel_err(gm, model, torch.randn(2, 3, 12, 12), double=True) < 1e-6


@pytest.mark.parametrize("exporter", [torchscript_export, dynamo_export],
                         ids=["TorchScript", "dynamo"])
def test_onnx_folds_a_bn_backward_through_a_pool(exporter) -> None:
    """TorchScript writes the global pool as GlobalAveragePool, dynamo as ReduceMean."""
    model, x = prepared(_PoolHead()), torch.randn(2, 3, 12, 12)
    folded, report = fold_onnx(exporter(model, x))
    assert [(e.action, e.details.get("direction")) for e in report.entries] == [
        ("folded", "backward")] * 2, report.table()
    assert _ort_vs_float64(model, folded, x) < 1e-5


@pytest.mark.parametrize("axes, keepdims, channels, reason", [
    ([1], 1, 1, "works along the channel axis"),
    ([0, 2], 0, 6, "drops the batch axis"),  # [2, 6, 6, 6] -> [6, 6]: axis 1 is now W
])
def test_onnx_a_mean_that_moves_or_mixes_the_channels_keeps_the_bn(
        axes: list[int], keepdims: int, channels: int, reason: str) -> None:
    model = _onnx("ReduceMean", channels=channels, size=8, axes=axes, keepdims=keepdims)
    _, report = check(model, 1)
    assert reason in report.kept[0].reason


@pytest.mark.parametrize("op, attrs", [
    ("Slice", {"starts": [1], "ends": [100], "axes": [-1]}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("Resize", {"scales": [1, 1, 2, 2], "mode": "linear"}),
])
def test_onnx_folds_backward_through_a_per_channel_op(op: str, attrs: dict) -> None:
    """``BN -> P -> Conv`` with no conv padding: ``conv(P(s*x + t)) = conv(s*P(x) + t)``."""
    b = Builder(8)
    b.bn("x", "n", 3)
    inputs = ["n"]
    if op == "Resize":
        inputs += ["", b.init("scales", np.array(attrs.pop("scales"), np.float32))]
    if op == "Slice":
        inputs += [b.init(k, np.array(attrs.pop(k)), onnx.TensorProto.INT64)
                   for k in ("starts", "ends", "axes")]
    b.node(op, inputs, ["p"], **attrs)
    b.node("Conv", ["p", b.rand("w", [4, 3, 3, 3])], ["y"])
    _, report = check(b.model({"x": [2, 3, 10, 10]}, {"y": None}), 0)
    assert report.folded[0].details["direction"] == "backward"


def test_onnx_reads_a_resize_channel_scale_off_its_computed_scales() -> None:
    """TorchScript without constant folding computes the scales (Concat of Constants) and
    declares no shape after the Resize: the channel scale is read off the constant."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(F.interpolate(self.c(x), scale_factor=2))

    model, x = prepared(Net()), torch.randn(2, 3, 9, 9)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17,
                          do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    proto = onnx.load_from_string(buf.getvalue())
    assert [n.op_type for n in proto.graph.node if n.op_type == "Concat"]
    folded, report = fold_onnx(proto)
    assert [e.action for e in report.entries] == ["folded"], report.table()
    assert _ort_vs_float64(model, folded, x) < 1e-5
