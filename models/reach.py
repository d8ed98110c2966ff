"""Reach zoo: small nets for every BN spelling and every structure an exact folder must see
through (issue 9), each named for its case.

Like :mod:`bnfold.models.zoo`: ``REACH[name]`` is a :class:`~bnfold.models.zoo.ZooModel`
whose ``bn_total`` counts the BN-like sites of the net (BN modules, ``F.batch_norm`` calls,
and constant affine chains ``x * a + b`` with ``a``/``b`` tensors of the model) and whose
``bn_left`` is how many of them an exact folder must leave (the others can be removed
exactly). ``get(name)`` builds one in eval mode with random weights and non-trivial
statistics (frozen-BN buffers and affine constants included); ``example_input(name)`` gives
a matching random input.

Counting conventions, shared by the FX and the ONNX folds:

* A constant affine chain (``mul``/``add``/``sub``/``div``/``rsqrt``/``sqrt`` of model
  tensors, e.g. torchvision's ``FrozenBatchNorm2d``) is one site.
* A scalar affine (one value for every channel) and a per-channel affine whose broadcast is
  not on the layer's channel axis are kept (each one site left).
* A BN over a concat that splits into per-input slices leaves one (smaller) BN when exactly
  one input is not a foldable layer; with several such inputs the whole BN is kept.
* Weight standardization (``F.batch_norm(weight, training=True)``) is a BN on a constant:
  evaluated once, never left.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from bnfold.models.stats import random_input, randomize_bn_stats
from bnfold.models.zoo import ZooModel

# ---------------------------------------------------------------------------------------------
# BN spellings.
# ---------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Same code as ``torchvision.ops.misc.FrozenBatchNorm2d``: BN with fixed buffers,
    computed as ``x * scale + bias`` with ``scale = w * rsqrt(var + eps)``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN + activation: a ``BatchNorm2d`` subclass whose forward calls
    ``F.batch_norm`` on its own buffers, then dropout (identity) and the activation."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, 0.1, self.eps,
        )
        return self.act(self.drop(x))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's ``FrozenBatchNormAct2d``: frozen BN arithmetic, then the activation."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class FrozenBNBackbone(nn.Module):
    """torchvision detection backbone style: conv -> FrozenBatchNorm2d -> ReLU, and a basic
    block with a residual. 3 sites, all fold forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = FrozenBatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x)))))
        return F.relu(x + y)


class BNActTimm(nn.Module):
    """timm ``BatchNormAct2d`` (twice) and ``FrozenBatchNormAct2d``: the BN part folds into the
    conv before it, the activation stays. 3 sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = BatchNormAct2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1, bias=False)
        self.bn3 = FrozenBatchNormAct2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))


class FunctionalBNBuffers(nn.Module):
    """``F.batch_norm(training=False)`` on registered buffers: after a conv (forward fold) and
    before a Linear (backward fold). 2 sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        for name, c in (("a", 6), ("b", 6)):
            self.register_buffer(f"{name}_mean", torch.randn(c) * 0.5)
            self.register_buffer(f"{name}_var", torch.rand(c) * 2.7 + 0.3)
            self.register_buffer(f"{name}_weight", (torch.rand(c) + 0.5) * _signs(c))
            self.register_buffer(f"{name}_bias", torch.randn(c) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.conv(x), self.a_mean, self.a_var, self.a_weight, self.a_bias,
                         training=False, eps=1e-3)
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1)
        x = F.batch_norm(x, self.b_mean, self.b_var, self.b_weight, self.b_bias, False)
        return self.fc(x)


class SyncBNEval(nn.Module):
    """``nn.SyncBatchNorm`` in eval mode (what ``convert_sync_batchnorm`` leaves): 2 sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.SyncBatchNorm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.SyncBatchNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class AffineChain(nn.Module):
    """Constant per-channel affines written out: ImageNet-style input normalization
    ``(x - mean) / std`` before an unpadded conv (backward fold), ``x * a + b`` after a conv,
    and ``(x - m) * rsqrt(v + eps) * g + b`` with ``sub``/``div``/``rsqrt`` (forward). 3 sites.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, bias=False)
        self.scale = nn.Parameter((torch.rand(8, 1, 1) + 0.5) * _signs(8).reshape(8, 1, 1))
        self.shift = nn.Parameter(torch.randn(8, 1, 1) * 0.5)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.register_buffer("m", torch.randn(1, 6, 1, 1) * 0.5)
        self.register_buffer("v", torch.rand(1, 6, 1, 1) * 2.7 + 0.3)
        self.g = nn.Parameter((torch.rand(6, 1, 1) + 0.5) * _signs(6).reshape(6, 1, 1))
        self.b = nn.Parameter(torch.randn(6, 1, 1) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem((x - self.mean) / self.std) * self.scale + self.shift)
        y = self.conv(x)
        return F.relu((y - self.m) * torch.rsqrt(self.v + 1e-5) * self.g + self.b)


class AffineOffChannel(nn.Module):
    """Affines an exact folder must keep: a per-column scale on the last axis (W, not the
    conv's channels), and a scalar affine ``x * alpha + beta``. 2 sites, 2 left."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.col_scale = nn.Parameter(torch.rand(8) + 0.5)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("alpha", torch.tensor([1.7]))
        self.register_buffer("beta", torch.tensor([-0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x) * self.col_scale)
        return self.conv2(x) * self.alpha + self.beta


class StdConv2d(nn.Conv2d):
    """timm's weight-standardized conv: the weight goes through a training-mode
    ``F.batch_norm`` (a BN on a constant), then ``F.conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class WeightStandardization(nn.Module):
    """StdConv2d -> BatchNorm2d -> ReLU twice (BiT/NFNet style): 4 sites (2 weight
    standardizations evaluated as constants, 2 BNs folded into the standardized weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StdConv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = StdConv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class WeightReparam(nn.Module):
    """Layers whose weight is computed at each call, each -> BN: a conv under
    ``parametrizations.weight_norm`` (``g * v / ||v||``), a conv under the older hook-based
    ``spectral_norm`` (``w / sigma``, eval: no power iteration) and a Linear under the older
    ``weight_norm`` (audio and GAN-style nets). 3 sites, all foldable into the computed
    weight."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():  # (the hook-based forms are deprecated, still common)
            warnings.simplefilter("ignore", FutureWarning)
            self.conv1 = parametrizations.weight_norm(nn.Conv2d(3, 8, 3, padding=1, bias=False))
            self.conv2 = nn.utils.spectral_norm(nn.Conv2d(8, 8, 3, padding=1))
            self.fc = nn.utils.weight_norm(nn.Linear(8, 6))
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean((2, 3))))


# ---------------------------------------------------------------------------------------------
# Eval-mode no-ops.
# ---------------------------------------------------------------------------------------------


class PoolsBetween(nn.Module):
    """Per-channel pools and resamples between layer and BN: an average pool, a bilinear
    upsampling and an adaptive average pool pass the BN's affine map (folded); an average
    pool that counts its zero padding does not (kept). 4 sites, 1 left."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.c4, self.b4 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(F.avg_pool2d(self.c1(x), 2)))
        x = F.relu(self.b2(F.interpolate(self.c2(x), scale_factor=2, mode="bilinear")))
        x = F.relu(self.b3(F.adaptive_avg_pool2d(self.c3(x), 5)))
        return self.b4(F.avg_pool2d(self.c4(x), 3, stride=1, padding=1))


class NoOpsBetween(nn.Module):
    """Eval no-ops between layer and BN: conv -> Identity -> clone -> BN (forward),
    BN -> contiguous -> Dropout -> unpadded conv (backward), and timm's ``NormLinear`` head
    BN1d -> Dropout -> Linear. 3 sites. (Same-dtype casts are tested on float64 models: a
    written-out ``to(torch.float32)`` would stop the float64 reference from running.)"""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ident = nn.Identity()
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop2 = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head_bn = nn.BatchNorm1d(8)
        self.head_drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.ident(self.conv1(x)).clone()))
        x = F.relu(self.conv2(self.drop2(self.bn2(x).contiguous())))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(self.head_drop(self.head_bn(x)))


# ---------------------------------------------------------------------------------------------
# Linear structure: concat, add, several readers.
# ---------------------------------------------------------------------------------------------


class MixNetConcat(nn.Module):
    """MixNet's mixed depthwise conv: channel groups through 3x3 / 5x5 / 7x7 depthwise convs,
    concatenated on the channel axis, then one BN, which splits into per-conv slices. 2 sites
    (the pointwise conv's BN folds as usual)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(12)
        self.splits = (4, 4, 4)
        self.dw = nn.ModuleList(nn.Conv2d(4, 4, k, padding=k // 2, groups=4, bias=False)
                                for k in (3, 5, 7))
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pw_bn(self.pw(x)))
        parts = torch.split(x, self.splits, dim=1)
        x = torch.cat([conv(parts[i]) for i, conv in enumerate(self.dw)], dim=1)
        return F.relu(self.bn(x))


class ConcatPassthrough(nn.Module):
    """BN over ``cat([conv(x), x])``: the conv slice folds, ``x``'s 3 channels keep a smaller
    BN (1 left). BN over ``cat([pool(y), conv(y), y])``: two inputs are not layers, so the
    whole BN is kept (1 left). 2 sites, 2 left."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(torch.cat([self.conv1(x), x], dim=1)))
        z = torch.cat([F.max_pool2d(y, 3, 1, 1), self.conv2(y), y], dim=1)
        return self.bn2(z)


class AddOfLayers(nn.Module):
    """BN after the sum of layer outputs (RepVGG-style branches, each read only by the add):
    conv3x3(x) + conv1x1(x) -> BN and Linear + Linear -> BN1d fold, scaling each summand,
    shift into one bias. ``x + conv(x)`` -> BN is kept (``x`` is not a layer). 3 sites,
    1 left."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv_r = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_r = nn.BatchNorm2d(4)
        self.fc_a = nn.Linear(4, 6)
        self.fc_b = nn.Linear(4, 6)
        self.bn_fc = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv3(x) + self.conv1(x)))
        x = F.relu(self.bn_r(x + self.conv_r(x)))
        h = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.bn_fc(self.fc_a(h) + self.fc_b(h))


class BNMultiReader(nn.Module):
    """Inception-style: one BN output read by three unpadded layers (two 1x1 convs and a
    strided 2x2 conv): the BN folds backward into each. 1 site."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 6, 1)
        self.b = nn.Conv2d(4, 3, 1, bias=False)
        self.c = nn.Conv2d(4, 5, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        return torch.cat([self.a(x)[:, :, ::2, ::2], self.b(x)[:, :, ::2, ::2], self.c(x)], 1)


# ---------------------------------------------------------------------------------------------
# Every input rank the original accepts.
# ---------------------------------------------------------------------------------------------


class LinearBN1dTokens(nn.Module):
    """Linear -> BatchNorm1d built for ``[N, L, C]`` (BN1d normalizes ``L``): on that input the
    BN cannot fold (1 left); on ``[N, C]`` it can. Without example inputs the folded model must
    still run on both ranks with the original's result."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


REACH: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("frozen_bn_backbone", FrozenBNBackbone, (2, 3, 12, 12), 3, 0,
                 "torchvision FrozenBatchNorm2d after convs"),
        ZooModel("bn_act_timm", BNActTimm, (2, 3, 12, 12), 3, 0,
                 "timm BatchNormAct2d / FrozenBatchNormAct2d"),
        ZooModel("functional_bn_buffers", FunctionalBNBuffers, (2, 3, 10, 10), 2, 0,
                 "F.batch_norm on buffers, forward and backward"),
        ZooModel("sync_bn_eval", SyncBNEval, (2, 3, 10, 10), 2, 0, "SyncBatchNorm in eval"),
        ZooModel("affine_chain", AffineChain, (2, 3, 12, 12), 3, 0,
                 "x * a + b, (x - m) / s, rsqrt chains of model tensors"),
        ZooModel("affine_off_channel", AffineOffChannel, (2, 3, 8, 8), 2, 2,
                 "scalar and last-axis affines (kept)"),
        ZooModel("weight_standardization", WeightStandardization, (2, 3, 10, 10), 4, 0,
                 "StdConv2d (BN on a constant weight) -> BN"),
        ZooModel("weight_reparam", WeightReparam, (2, 3, 10, 10), 3, 0,
                 "weight_norm / spectral_norm layers (computed weights) -> BN"),
        ZooModel("noops_between", NoOpsBetween, (2, 3, 10, 10), 3, 0,
                 "Identity/clone/contiguous/Dropout/to between layer and BN"),
        ZooModel("pools_between", PoolsBetween, (2, 3, 12, 12), 4, 1,
                 "avg pool / upsample / adaptive pool between layer and BN"),
        ZooModel("mixnet_concat", MixNetConcat, (2, 3, 12, 12), 2, 0,
                 "BN after a channel concat of depthwise convs"),
        ZooModel("concat_passthrough", ConcatPassthrough, (2, 3, 8, 8), 2, 2,
                 "BN after concat with non-layer inputs"),
        ZooModel("add_of_layers", AddOfLayers, (2, 4, 8, 8), 3, 1,
                 "BN after the sum of layer outputs"),
        ZooModel("bn_multi_reader", BNMultiReader, (2, 4, 8, 8), 1, 0,
                 "one BN output read by several convs"),
        ZooModel("linear_bn1d_tokens", LinearBN1dTokens, (2, 8, 16), 1, 1,
                 "Linear -> BN1d on [N, L, C] (rank-dependent fold)"),
    ]
}


def _signs(c: int) -> torch.Tensor:
    """About one channel in five negative (from the global torch generator)."""
    return torch.where(torch.rand(c) < 0.2, -1.0, 1.0)


@torch.no_grad()
def randomize_frozen_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every frozen BN (a non-``_BatchNorm`` module with ``running_mean``/``running_var``
    buffers) non-trivial statistics and affine, like ``randomize_bn_stats``. Returns ``model``."""
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            c = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=gen) * 2.7 + 0.3)
            sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
            module.weight.copy_((torch.rand(c, generator=gen) + 0.5) * sign)
            module.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return model


def get(name: str, seed: int = 0) -> nn.Module:
    """Build reach model ``name`` in eval mode: random weights, non-trivial statistics."""
    if name not in REACH:
        raise KeyError(f"unknown reach model {name!r}; choose from {', '.join(REACH)}")
    torch.manual_seed(seed)
    model = REACH[name].factory()
    randomize_bn_stats(model, seed)
    randomize_frozen_stats(model, seed)
    return model.eval()


def example_input(name: str, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    """A fresh random float32 input for reach model ``name`` (``batch`` overrides dim 0)."""
    return random_input(REACH[name].input_shape, seed, batch)
