"""Property-based tests: random layer + BN configurations, folded through both front ends.

Each property draws a layer (Conv/ConvTranspose 1-3d, Linear/Gemm) with random channels,
groups, kernel, stride, padding, dilation, output padding and bias, a BN with random
non-trivial statistics, and checks the fold against a float64 evaluation of the UNFOLDED
model on a fresh input (never the example input):

1. FX forward (``layer -> BN -> act``, modules or functional calls, with or without example
   inputs): always folded, exact.
2. FX backward (``act -> BN -> layer``): folded exactly when ``algebra.backward_fold_refusal``
   says exact, kept (with that reason) otherwise.
3. ONNX forward and backward (opsets 9-21, asymmetric pads, Gemm transA/transB/alpha/beta and
   every C shape): forward always folded; backward folded exactly when the math says every
   output sees the whole kernel (or the BN shift is 0); both checked in ONNX Runtime.
4. fp16/bf16 ``fold_forward``/``fold_backward`` on grouped Conv/ConvTranspose and ``[in, out]``
   weights: every folded value is within 0.5 ulp of the float64 fold.

The error is ``max|got - want|`` over the float64 magnitude of the terms (:func:`scaled_err`),
below ``FP32_TOL``. Hypothesis runs derandomized and without an example database, so every run
(and CI) sees the same examples; ``--hypothesis-show-statistics`` shows what they covered.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_cases import count, run_ort
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfold
from bnfold.algebra import BNParams, backward_fold_refusal, fold_backward, fold_forward
from bnfold.geometry import ConvGeometry
from bnfold.models.stats import randomize_bn_stats
from bnfold.passes.fx.dispatch import RankDispatch

FP32_TOL = 1e-5
PROFILE = settings(database=None, derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
F_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


# ---------------------------------------------------------------------------------------------
# Random layer geometry.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """One layer's hyper-parameters and an input size it accepts (``dims == 0``: Linear)."""

    kind: str  # "linear" | "conv" | "conv_transpose"
    dims: int
    cin: int
    cout: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any  # tuple of ints, or "same" / "valid" (Conv only)
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    padding_mode: str
    size: tuple[int, ...]
    bias: bool

    def pads(self) -> tuple[int, ...]:
        """Total padding per spatial axis, what decides the backward fold's exactness."""
        if self.padding == "valid":
            return (0,) * self.dims
        if self.padding == "same":
            return tuple(d * (k - 1) for d, k in zip(self.dilation, self.kernel, strict=True))
        return tuple(self.padding)


@st.composite
def geometries(draw: st.DrawFn, kinds: tuple[str, ...] = ("conv", "conv_transpose", "linear"),
               modes: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular"),
               ) -> Geometry:
    kind = draw(st.sampled_from(kinds))
    bias = draw(st.booleans())
    if kind == "linear":
        cin, cout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        return Geometry(kind, 0, cin, cout, 1, (), (), (), (), (), "zeros", (), bias)
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    ints = st.lists(st.integers(1, 3), min_size=dims, max_size=dims).map(tuple)
    kernel, stride = draw(ints), draw(ints)
    dilation = draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims).map(tuple))
    padding: Any = draw(st.lists(st.integers(0, 2), min_size=dims, max_size=dims).map(tuple))
    size = list(draw(st.lists(st.integers(1, 6), min_size=dims, max_size=dims)))
    if kind == "conv":
        choices = ["ints", "valid"] + (["same"] if set(stride) == {1} else [])
        how = draw(st.sampled_from(choices))
        padding = padding if how == "ints" else how
        mode = draw(st.sampled_from(modes))
        pads = (0,) * dims if padding == "valid" else padding
        for i in range(dims):  # every output has an input; reflect needs pad < size
            reach = dilation[i] * (kernel[i] - 1) + 1
            pad = reach - 1 if padding == "same" else pads[i]
            size[i] = max(size[i], reach, pad + 1)
        return Geometry(kind, dims, cin, cout, groups, kernel, stride, padding, dilation,
                        (0,) * dims, mode, tuple(size), bias)
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1))
                           for s, d in zip(stride, dilation, strict=True))
    for i in range(dims):  # the output must have at least one element
        while (size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) \
                + output_padding[i] + 1 < 1:
            size[i] += 1
    return Geometry(kind, dims, cin, cout, groups, kernel, stride, padding, dilation,
                    output_padding, "zeros", tuple(size), bias)


# ---------------------------------------------------------------------------------------------
# torch models: layer and BN as modules or as functional calls.
# ---------------------------------------------------------------------------------------------

def make_layer(g: Geometry) -> nn.Module:
    if g.kind == "linear":
        return nn.Linear(g.cin, g.cout, bias=g.bias)
    if g.kind == "conv":
        return CONV[g.dims](g.cin, g.cout, g.kernel, g.stride, g.padding, g.dilation, g.groups,
                            g.bias, g.padding_mode)
    return CONVT[g.dims](g.cin, g.cout, g.kernel, g.stride, g.padding, g.output_padding,
                         g.groups, g.bias, g.dilation)


class FunctionalLayer(nn.Module):
    """The same layer as an ``F.linear``/``F.conv*``/``F.conv_transpose*`` call."""

    def __init__(self, layer: nn.Module, g: Geometry) -> None:
        super().__init__()
        self.weight, self.bias, self.g = layer.weight, layer.bias, g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.g
        if g.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        if g.kind == "conv":
            return F_CONV[g.dims](x, self.weight, self.bias, g.stride, g.padding, g.dilation,
                                  g.groups)
        return F_CONVT[g.dims](x, self.weight, self.bias, g.stride, g.padding, g.output_padding,
                               g.groups, g.dilation)


class FunctionalBN(nn.Module):
    """An ``F.batch_norm(..., training=False)`` call on the tensors of ``bn``."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


@st.composite
def bn_configs(draw: st.DrawFn) -> dict[str, Any]:
    return {"affine": draw(st.booleans()), "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
            "seed": draw(st.integers(0, 2**31 - 1)),
            "functional": draw(st.booleans())}


def make_bn(channels: int, dims: int, cfg: dict[str, Any], zero_shift: bool = False
            ) -> nn.Module:
    """A BN with random statistics (``zero_shift``: mean 0 and beta 0, so ``t == 0``)."""
    bn = BN[dims](channels, eps=cfg["eps"], affine=cfg["affine"])
    randomize_bn_stats(bn, seed=cfg["seed"])
    if zero_shift:
        with torch.no_grad():
            bn.running_mean.zero_()
            if bn.bias is not None:
                bn.bias.zero_()
    return FunctionalBN(bn) if cfg["functional"] else bn


def input_shape(g: Geometry, batch: int = 2) -> tuple[int, ...]:
    return (batch, g.cin, *g.size)


def bn_params(bn: nn.Module) -> BNParams:
    def arr(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.detach().double().numpy()

    return BNParams(arr(bn.running_mean), arr(bn.running_var), float(bn.eps), arr(bn.weight),
                    arr(bn.bias))


def bn_count(gm: torch.fx.GraphModule) -> int:
    """BN modules still present plus functional BN calls left in the graph (a BN kept only
    for the ranks a rank dispatch sends to the original path does not count)."""
    dispatched = {id(m) for d in gm.modules() if isinstance(d, RankDispatch)
                  for m in d.original.modules()}
    modules = sum(isinstance(m, _BatchNorm | FunctionalBN) and id(m) not in dispatched
                  for m in gm.modules())
    calls = sum(n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)
                for n in gm.graph.nodes)
    return modules + calls


def fold_and_compare(model: nn.Sequential, g: Geometry, seed: int, with_example: bool = True
                     ) -> tuple[Any, Any, float]:
    """Fold ``model`` (with an example input, or without: folds may be rank-dispatched); return
    ``(folded, report, err)``, ``err`` the error on a fresh input of another batch size
    against ``model`` in float64 (see :func:`scaled_err`). Also checks that the input model
    was not changed."""
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(input_shape(g), generator=gen)
    fresh = torch.randn(input_shape(g, batch=3), generator=gen)
    gm, report = bnfold.fold(model, example if with_example else None)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model changed"
    with torch.no_grad():
        want = copy.deepcopy(model).double()(fresh.double())
        got = gm(fresh)
        scale = magnitude(model, fresh)
    assert got.dtype == torch.float32 and got.shape == want.shape
    return gm, report, scaled_err(got.double().numpy(), want.numpy(), scale)


def scaled_err(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> float:
    """``max|got - want| / max(scale)``: ``scale`` is the model evaluated in float64 on
    absolute values (:func:`magnitude`), the size of the terms a float32 evaluation rounds.
    It is ``max|want|`` unless terms cancel (BN shift against the layer output); there a
    plain relative error measures the cancellation, not the fold."""
    return float(np.max(np.abs(got - want))) / max(float(np.max(scale)), 1e-30)


def _absolute(module: nn.Module) -> nn.Module:
    """A float64 copy with ``|W|``, ``|b|``, ``|gamma|``, ``|beta|`` and mean ``-|mean|``, so
    that on ``|x|`` every sum and the BN's ``(y - mean) * s + beta`` add magnitudes."""
    out = copy.deepcopy(module).double()
    for name, t in [*out.named_parameters(), *out.named_buffers()]:
        if name.endswith("running_mean"):
            t.copy_(-t.abs())
        elif t.is_floating_point() and not name.endswith("running_var"):
            t.abs_()
    return out


def magnitude(model: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """``model`` on absolute values (:func:`_absolute`) in float64; activations apply to the
    input as it is, and are skipped after the first layer (they are at most 1.13-Lipschitz,
    so the error before them bounds the error after them)."""
    h, started = x.double(), False
    for m in model:
        if isinstance(m, tuple(ACTIVATIONS.values())):
            h = h if started else m(h)
            continue
        h, started = _absolute(m)(h.abs()), True
    return h.numpy()


# ---------------------------------------------------------------------------------------------
# 1. FX forward fold.
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(PROFILE, max_examples=150)
@given(g=geometries(), bn_cfg=bn_configs(), functional_layer=st.booleans(),
       act=st.sampled_from(sorted(ACTIVATIONS)), with_example=st.booleans())
def test_fx_forward_fold_is_exact(g: Geometry, bn_cfg: dict[str, Any], functional_layer: bool,
                                  act: str, with_example: bool) -> None:
    torch.manual_seed(bn_cfg["seed"])
    layer = make_layer(g)
    if functional_layer and g.padding_mode == "zeros":
        layer = FunctionalLayer(layer, g)
    model = nn.Sequential(layer, make_bn(g.cout, g.dims, bn_cfg), ACTIVATIONS[act]())
    gm, report, err = fold_and_compare(model, g, bn_cfg["seed"], with_example)
    assert [e.action for e in report.entries] == ["folded"], report.table()
    event("rank dispatch" if "rank_dispatch" in report.entries[0].details else "no dispatch")
    assert report.entries[0].details["direction"] == "forward"
    assert bn_count(gm) == 0
    assert err < FP32_TOL, (err, g)


# ---------------------------------------------------------------------------------------------
# 2. FX backward fold.
# ---------------------------------------------------------------------------------------------

def _conv2d(padding: Any, mode: str = "zeros", groups: int = 2,
            stride: tuple[int, int] = (2, 1)) -> Geometry:
    return Geometry("conv", 2, 4, 6, groups, (3, 2), stride, padding, (1, 2), (0, 0), mode,
                    (5, 6), True)


def _convt2d(stride: tuple[int, int], padding: tuple[int, int]) -> Geometry:
    return Geometry("conv_transpose", 2, 4, 6, 2, (3, 2), stride, padding, (1, 2), (0, 0),
                    "zeros", (4, 3), True)


_BN_CFG = {"affine": True, "eps": 1e-5, "seed": 3, "functional": False}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@settings(PROFILE, max_examples=150)
@given(g=geometries(modes=("zeros", "zeros", "reflect", "replicate", "circular")),
       bn_cfg=bn_configs(), zero_shift=st.sampled_from([False, False, True]),
       functional_layer=st.booleans(), act=st.sampled_from(sorted(ACTIVATIONS)))
# Each outcome of the refusal, whatever the generator favours: zero-padded conv kept (unless
# t == 0), copy-padded conv folded, ConvTranspose folded only when every output sees every tap.
@example(g=_conv2d((1, 1)), bn_cfg=_BN_CFG, zero_shift=False, functional_layer=False,
         act="none")
@example(g=_conv2d((1, 1)), bn_cfg=_BN_CFG, zero_shift=True, functional_layer=True,
         act="relu")
@example(g=_conv2d("same", "reflect", stride=(1, 1)), bn_cfg=_BN_CFG, zero_shift=False,
         functional_layer=False, act="none")
@example(g=_conv2d((2, 1), "circular", 1), bn_cfg=_BN_CFG, zero_shift=False,
         functional_layer=False, act="none")
@example(g=_convt2d((1, 1), (2, 2)), bn_cfg=_BN_CFG, zero_shift=False, functional_layer=True,
         act="none")
@example(g=_convt2d((2, 1), (2, 2)), bn_cfg=_BN_CFG, zero_shift=False, functional_layer=False,
         act="none")
def test_fx_backward_fold_matches_refusal(g: Geometry, bn_cfg: dict[str, Any],
                                          zero_shift: bool, functional_layer: bool,
                                          act: str) -> None:
    torch.manual_seed(bn_cfg["seed"])
    bn = make_bn(g.cin, g.dims, bn_cfg, zero_shift)
    layer = make_layer(g)
    if functional_layer and g.padding_mode == "zeros":
        layer = FunctionalLayer(layer, g)
    model = nn.Sequential(ACTIVATIONS[act](), bn, layer)
    refusal = backward_fold_refusal(g.kind, bn_params(bn), ConvGeometry.symmetric(
        g.kernel, g.pads(), padding_mode=g.padding_mode, stride=g.stride, dilation=g.dilation,
        output_padding=g.output_padding))
    gm, report, err = fold_and_compare(model, g, bn_cfg["seed"])
    (entry,) = report.entries
    event(f"{g.kind} {entry.action}")
    if refusal is None:
        assert entry.action == "folded", report.table()
        assert entry.details["direction"] == "backward"
        assert bn_count(gm) == 0
    else:
        assert entry.action == "kept" and refusal in (entry.reason or ""), report.table()
        assert bn_count(gm) == 1
    assert err < FP32_TOL, (err, g, refusal)


# ---------------------------------------------------------------------------------------------
# 3. ONNX folds: forward (layer -> BN) and backward (BN -> layer).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OnnxCase:
    """A hand-built ONNX graph and everything needed to evaluate it in float64 with torch.

    ``order`` is ``"forward"`` (``x -> layer -> BN -> act``) or ``"backward"``
    (``x -> BN -> layer -> act``); ``exact`` says whether a backward fold would be exact;
    ``training``: the BN declares its statistics outputs at opset <= 13 (training mode by the
    spec: ONNX Runtime uses batch statistics), so it must be kept.
    """

    model: onnx.ModelProto
    x: np.ndarray
    params: dict[str, np.ndarray]
    attrs: dict[str, Any]
    op: str
    act: str
    order: str
    exact: bool = True
    training: bool = False


def _bn_arrays(rng: np.random.Generator, c: int, zero_shift: bool) -> dict[str, np.ndarray]:
    sign = np.where(rng.random(c) < 0.2, -1.0, 1.0)
    out = {"scale": (rng.random(c) + 0.5) * sign, "bn_b": rng.normal(0, 0.5, c),
           "mean": rng.normal(0, 0.5, c), "var": rng.random(c) * 2.7 + 0.3}
    if zero_shift:  # t = beta - mean * s == 0 exactly
        out["bn_b"], out["mean"] = np.zeros(c), np.zeros(c)
    return out


def onnx_out_size(op: str, size: int, k: int, s: int, d: int, op_pad: int, pads: int) -> int:
    if op == "Conv":
        return (size + pads - d * (k - 1) - 1) // s + 1
    return (size - 1) * s + op_pad + d * (k - 1) + 1 - pads


def _gemm(draw: st.DrawFn, rng: np.random.Generator, opset: int, order: str
          ) -> tuple[dict[str, Any], dict[str, np.ndarray], tuple[int, ...], int]:
    """Gemm attributes and tensors; backward folds are drawn only where documented exact
    (``transA=0``, ``alpha = 1``, ``C`` absent (any ``beta``) or a per-feature vector with
    ``beta = 1``)."""
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    backward = order == "backward"
    trans_a = False if backward else draw(st.booleans())
    trans_b = draw(st.booleans())
    attrs = {"transA": int(trans_a), "transB": int(trans_b),
             "alpha": 1.0 if backward else draw(st.sampled_from([1.0, 0.5, -1.25])),
             "beta": 1.0 if backward else draw(st.sampled_from([1.0, 2.0, -0.75]))}
    params = {"W": rng.normal(0, 0.5, (n, k) if trans_b else (k, n))}
    shapes: list[Any] = ["none", (1,), (n,), (1, n)] + ([] if backward else [(), (m, n)])
    c_shape = draw(st.sampled_from(shapes))
    if c_shape == "none" and opset < 11:  # Gemm-9 requires C
        c_shape = (n,)
    if c_shape != "none":
        params["B"] = rng.normal(0, 0.5, c_shape)
    elif backward:  # beta multiplies no C: the fold's new C must not be scaled by it
        attrs["beta"] = draw(st.sampled_from([1.0, 0.3, 0.0, 2.0]))
    return attrs, params, ((k, m) if trans_a else (m, k)), (k if backward else n)


def _conv(draw: st.DrawFn, rng: np.random.Generator, op: str, order: str, zero_shift: bool
          ) -> tuple[dict[str, Any], dict[str, np.ndarray], tuple[int, ...], int, bool]:
    """Conv/ConvTranspose attributes (asymmetric pads) and tensors; the last item says
    whether a backward fold is exact (from the math, not from bnfold)."""
    g = draw(geometries(kinds=("conv" if op == "Conv" else "conv_transpose",),
                        modes=("zeros",)))
    full = op == "ConvTranspose" and order == "backward" and draw(st.booleans())
    stride = (1,) * g.dims if full else g.stride
    # ORT requires output_padding < stride (torch: < max(stride, dilation)).
    output_padding = (0,) * g.dims if full else tuple(
        min(o, s - 1) for o, s in zip(g.output_padding, g.stride, strict=True))
    begin = tuple(d * (k - 1) for d, k in zip(g.dilation, g.kernel, strict=True)) if full \
        else tuple(draw(st.lists(st.integers(0, 2), min_size=g.dims, max_size=g.dims)))
    end = begin if full and draw(st.booleans()) else \
        tuple(max(0, p + draw(st.integers(-1, 1))) for p in begin)
    attrs = {"group": g.groups, "strides": list(stride), "dilations": list(g.dilation),
             "pads": [*begin, *end]}
    if draw(st.booleans()):
        attrs["kernel_shape"] = list(g.kernel)
    if op == "ConvTranspose":
        attrs["output_padding"] = list(output_padding)
        params = {"W": rng.normal(0, 0.5, (g.cin, g.cout // g.groups, *g.kernel))}
        every_tap = set(stride) == {1} and set(output_padding) == {0} and begin == end == tuple(
            d * (k - 1) for d, k in zip(g.dilation, g.kernel, strict=True))
    else:
        params = {"W": rng.normal(0, 0.5, (g.cout, g.cin // g.groups, *g.kernel))}
        every_tap = not any(begin) and not any(end)
    size = list(g.size)
    for i in range(g.dims):  # at least one output element
        while onnx_out_size(op, size[i], g.kernel[i], stride[i], g.dilation[i],
                            output_padding[i], begin[i] + end[i]) < 1:
            size[i] += 1
    if g.bias:
        params["B"] = rng.normal(0, 0.5, g.cout)
    channels = g.cin if order == "backward" else g.cout
    return attrs, params, (2, g.cin, *size), channels, every_tap or zero_shift


@st.composite
def onnx_cases(draw: st.DrawFn, order: str) -> OnnxCase:
    opset = draw(st.sampled_from([9, 11, 13, 15, 18, 21]))
    op = draw(st.sampled_from(["Conv", "Conv", "ConvTranspose", "ConvTranspose", "Gemm"]))
    act = draw(st.sampled_from(["none", "Relu", "Tanh"]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    zero_shift = order == "backward" and draw(st.sampled_from([False, False, True]))
    training = opset <= 13 and draw(st.sampled_from([False, False, False, True]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if op == "Gemm":
        attrs, params, x_shape, channels = _gemm(draw, rng, opset, order)
        exact = True
    else:
        attrs, params, x_shape, channels, exact = _conv(draw, rng, op, order, zero_shift)
    params.update(_bn_arrays(rng, channels, zero_shift))
    x = rng.normal(size=x_shape).astype(np.float32)
    # The reference uses the float32 values the graph holds, in float64.
    stored = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
    attrs_eps = {**attrs, "epsilon": eps}
    y_shape = _reference(op, act, order, stored, attrs_eps, x).shape
    layer = helper.make_node(op, ["h", "W", *(["B"] if "B" in params else [])], ["z"],
                             name="layer", **attrs)
    bn = helper.make_node("BatchNormalization", ["h", "scale", "bn_b", "mean", "var"], ["z"],
                          name="bn", epsilon=eps)
    if training:  # declared, read by nothing
        bn.output.extend(["running_mean", "running_var", "saved_mean", "saved_var"])
    first, second = (layer, bn) if order == "forward" else (bn, layer)
    first.input[0], first.output[0], second.input[0] = "x", "h", "h"
    nodes = [first, second]
    if act == "none":
        second.output[0] = "y"
    else:
        nodes.append(helper.make_node(act, ["z"], ["y"], name="act"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(onnx.IR_VERSION, 10)
    onnx.checker.check_model(model, full_check=True)
    return OnnxCase(model, x, stored, attrs_eps, op, act, order, exact, training)


def _reference(op: str, act: str, order: str, params: dict[str, np.ndarray],
               a: dict[str, Any], x: np.ndarray, absolute: bool = False) -> np.ndarray:
    """float64 evaluation of the unfolded graph with torch (ONNX pads and crops written out).

    ``absolute=True``: on absolute values and without the activation, the scale that
    :func:`scaled_err` divides by (see :func:`_absolute`)."""
    p = {k: torch.from_numpy(v) for k, v in params.items()}
    if absolute:
        p = {k: -v.abs() if k == "mean" else v.abs() for k, v in p.items()}
        a = {**a, "alpha": abs(a.get("alpha", 1.0)), "beta": abs(a.get("beta", 1.0))}
        x, act = np.abs(x), "none"

    def bn(h: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (h.dim() - 2)
        return (h - p["mean"].reshape(shape)) / torch.sqrt(p["var"].reshape(shape)
                                                           + a["epsilon"]) \
            * p["scale"].reshape(shape) + p["bn_b"].reshape(shape)

    h = torch.from_numpy(x.astype(np.float64))
    if order == "backward":
        h = bn(h)
    if op == "Gemm":
        lhs = h.T if a["transA"] else h
        rhs = p["W"].T if a["transB"] else p["W"]
        h = a["alpha"] * lhs @ rhs
        if "B" in p:
            h = h + a["beta"] * p["B"]
    else:
        dims = h.dim() - 2
        begin, end = a["pads"][:dims], a["pads"][dims:]
        if op == "Conv":
            torch_pads = [v for i in reversed(range(dims)) for v in (begin[i], end[i])]
            h = F_CONV[dims](F.pad(h, torch_pads), p["W"], p.get("B"), a["strides"], 0,
                             a["dilations"], a["group"])
        else:
            full = F_CONVT[dims](h, p["W"], p.get("B"), a["strides"], 0, a["output_padding"],
                                 a["group"], a["dilations"])
            crop = [slice(b, n - e) for b, e, n in zip(begin, end, full.shape[2:], strict=True)]
            h = full[(slice(None), slice(None), *crop)]
    if order == "forward":
        h = bn(h)
    return {"none": h, "Relu": torch.relu(h), "Tanh": torch.tanh(h)}[act].numpy()


def check_onnx_fold(case: OnnxCase, seed: int) -> Any:
    """Fold ``case``; check the input is unchanged, the output model valid and, on a fresh
    input in ORT (no graph optimizations), equal to the float64 reference (the unfolded
    graph too: the reference must describe it as ORT runs it). Returns the report."""
    original = case.model.SerializeToString()
    folded, report = bnfold.fold_onnx(case.model)
    assert case.model.SerializeToString() == original, "the input model changed"
    onnx.checker.check_model(folded, full_check=True)
    (entry,) = report.entries
    assert count(folded) == (entry.action == "kept")
    fresh = np.random.default_rng(seed).normal(size=case.x.shape).astype(np.float32)
    args = (case.op, case.act, case.order, case.params, case.attrs, fresh)
    want, scale = _reference(*args), _reference(*args, absolute=True)
    outputs = [run_ort(model, {"x": fresh})[0] for model in (case.model, folded)]
    if case.training:  # kept as it was: ORT computes the same batch-statistics output
        np.testing.assert_array_equal(outputs[1], outputs[0])
        return report
    for got in outputs:
        assert got.shape == want.shape
        assert scaled_err(got.astype(np.float64), want, scale) < FP32_TOL
    return report


@settings(PROFILE, max_examples=200)
@given(case=onnx_cases("forward"), seed=st.integers(0, 2**31 - 1))
def test_onnx_forward_fold_is_exact(case: OnnxCase, seed: int) -> None:
    report = check_onnx_fold(case, seed)
    if case.training:
        assert "training mode" in (report.kept[0].reason or ""), report.table()
        return
    assert [e.action for e in report.entries] == ["folded"], report.table()
    assert report.entries[0].details.get("direction") == "forward"


@settings(PROFILE, max_examples=200)
@given(case=onnx_cases("backward"), seed=st.integers(0, 2**31 - 1))
def test_onnx_backward_fold_iff_exact(case: OnnxCase, seed: int) -> None:
    report = check_onnx_fold(case, seed)
    (entry,) = report.entries
    event(f"{case.op} {entry.action}")
    assert entry.action == ("folded" if case.exact and not case.training else "kept"), \
        report.table()
    if case.exact and not case.training:
        assert entry.details.get("direction") == "backward"
    else:
        assert entry.reason


# ---------------------------------------------------------------------------------------------
# 4. fp16 / bf16 folds are correctly rounded (<= 0.5 ulp) for every grouped layout.
# ---------------------------------------------------------------------------------------------

def assert_half_ulp(got: np.ndarray, exact: np.ndarray) -> None:
    """``got`` (16-bit float) is within half a unit in its last place of float64 ``exact``."""
    g64 = got.astype(np.float64)
    ulp = np.spacing(np.abs(got)).astype(np.float64)  # numpy's fp16 spacing(-x) is off
    err = np.abs(g64 - exact)
    bad = ~(err <= 0.5 * ulp * (1 + 1e-9))
    assert not bad.any(), (g64[bad][:5], exact[bad][:5])


@settings(PROFILE, max_examples=300)
@given(dtype=st.sampled_from([np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]),
       layout=st.sampled_from(["conv", "conv_transpose", "linear_t"]),
       direction=st.sampled_from(["forward", "backward"]),
       groups=st.sampled_from([1, 2, 3, 4]), per_in=st.integers(1, 4), per_out=st.integers(1, 4),
       dims=st.integers(0, 3), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), bias_scale=st.sampled_from([1.0, -0.75]))
def test_16bit_folds_are_correctly_rounded(dtype: np.dtype, layout: str, direction: str,
                                           groups: int, per_in: int, per_out: int, dims: int,
                                           seed: int, scale: float, bias_scale: float) -> None:
    rng = np.random.default_rng(seed)
    if layout == "linear_t":  # Gemm/MatMul weight [in, out]: no groups, no kernel
        groups, dims = 1, 0
    cin, cout = groups * per_in, groups * per_out
    kernel = tuple(rng.integers(1, 4, dims))
    lead, second = (cin, cout // groups) if layout == "conv_transpose" else \
        (cout, cin // groups) if layout == "conv" else (cin, cout)
    w = (rng.normal(0, scale, (lead, second, *kernel))).astype(dtype)
    b = rng.normal(0, scale, cout).astype(dtype)
    # Channel of each weight entry [i, j] along the layer's input and output sides.
    i, j = np.meshgrid(np.arange(lead), np.arange(second), indexing="ij")
    if layout == "conv":
        out_ch, in_ch = i, (i // per_out) * per_in + j
    elif layout == "conv_transpose":
        in_ch, out_ch = i, (i // per_in) * per_out + j
    else:
        in_ch, out_ch = i, j
    side = out_ch if direction == "forward" else in_ch
    rng_bn = np.random.default_rng(seed + 1)
    bn = BNParams(rng_bn.normal(0, 0.5, side.max() + 1), rng_bn.uniform(0.3, 3, side.max() + 1),
                  1e-5, rng_bn.uniform(0.5, 1.5, side.max() + 1) * rng_bn.choice([-1, 1],
                                                                                 side.max() + 1),
                  rng_bn.normal(0, 0.5, side.max() + 1))
    s, t = bn.scale_shift()
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    expand = (slice(None), slice(None)) + (None,) * dims
    if direction == "forward":
        out_axis = 0 if layout == "conv" else 1
        f = fold_forward(w, b, bn, out_axis=out_axis, groups=groups, bias_scale=bias_scale)
        exact_w, exact_b = w64 * s[out_ch][expand], s * (b64 * bias_scale) + t
    else:
        f = fold_backward(w, b, bn, in_axis=0 if layout != "conv" else 1, groups=groups,
                          out_axis=1 if layout != "conv" else 0)
        exact_w = w64 * s[in_ch][expand]
        contrib = (w64 * t[in_ch][expand]).reshape(lead, second, -1).sum(axis=2)
        exact_b = b64.copy()
        np.add.at(exact_b, out_ch, contrib)
    assert f.weight.dtype == dtype and f.bias.dtype == dtype
    assert_half_ulp(f.weight, exact_w)
    assert_half_ulp(f.bias, exact_b)
