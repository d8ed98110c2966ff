"""Full-size architecture families with BatchNorm, written from their papers' layer tables.

No model hub: every net here is written out from its paper's layer table (torchvision's layout
where the paper leaves a choice open: the ResNet-50 stride on the 3x3, GoogLeNet's BN variant
with 3x3 in the "5x5" branch, RegNet's SE width), with the real channel counts and the
1000-class classifier heads where the real net has one. Every BN is a separate module and
every conv before a BN has no bias, as the originals.

``get(name, width=...)`` builds one in eval mode with random (He-normal) weights and
non-trivial BN statistics; ``example_input(name)`` gives a matching random input (``small``:
a cheap one for tests). ``width`` scales every channel count and rounds it to a multiple of 8
(at least 8), keeping the depth, so ``ARCHS[name].bn_total`` and ``.bn_left`` hold at any
width; grouped convs keep their group count (ResNeXt: 32 groups, narrower per group) or their
group width (RegNet: 8 channels per group), depthwise convs stay depthwise. ``width=1.0`` is
the real net. ``ARCHS[name].bn_left`` is how many BNs a correct, exact folder must leave.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.models.rep import RepBlock
from bnfold.models.stats import random_input, randomize_bn_stats
from bnfold.models.zoo import BasicBlock

Act = Callable[[], nn.Module] | None


def _divisible(v: float, divisor: int = 8) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), never more
    than 10% below ``v`` (MobileNet's ``_make_divisible``)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _ch(c: int, width: float) -> int:
    """Channel count ``c`` at ``width``: ``c`` itself at 1.0, else a multiple of 8 (>= 8)."""
    return c if width == 1.0 else _divisible(c * width)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d [-> activation], "same" padding by default."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: Act = nn.ReLU, eps: float = 1e-5, padding: int | None = None) -> None:
        pad = (k - 1) // 2 if padding is None else padding
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, groups=groups,
                                             bias=False), nn.BatchNorm2d(cout, eps=eps)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average pool, 1x1 conv (bias) -> act -> 1x1 conv (bias)
    -> gate, times the input. No BN."""

    def __init__(self, c: int, squeeze: int, act: Callable[[], nn.Module] = nn.ReLU,
                 gate: Callable[[], nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Classifier(nn.Sequential):
    """Global average pool, flatten, [dropout (identity in eval)], Linear."""

    def __init__(self, cin: int, classes: int = 1000, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(cin, classes))
        super().__init__(*layers)


# ---------------------------------------------------------------------------------------------
# ResNet-18, ResNet-50, ResNeXt-50 (32x4d)
# ---------------------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision): 1x1-BN-ReLU, 3x3 (stride, groups)-BN-ReLU,
    1x1-BN, plus the shortcut (1x1-BN when it resizes), ReLU."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = ConvBN(cin, cout, 1, stride, act=None) \
            if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        short = x if self.downsample is None else self.downsample(x)
        return F.relu(out + short)


class ResNet(nn.Module):
    """ResNet / ResNeXt (He et al. 2016, Xie et al. 2017): 7x7/2 stem, 3x3/2 max pool, four
    stages (64, 128, 256, 512 planes; the first block of stages 2-4 has stride 2), 1000-class
    head. ``bottleneck``: 1x1-3x3-1x1 blocks with 4x expansion; ``groups`` and
    ``group_width`` (channels per group of stage 1's 3x3) make it a ResNeXt."""

    def __init__(self, depths: tuple[int, ...], bottleneck: bool, width: float = 1.0,
                 groups: int = 1, group_width: int = 64) -> None:
        super().__init__()
        stem = _ch(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = stem, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if bottleneck:
                    per_group = max(1, round(group_width * planes / 64 * width))
                    mid = groups * per_group if groups > 1 else _ch(planes, width)
                    cout = _ch(planes * 4, width)
                    blocks.append(Bottleneck(cin, mid, cout, stride, groups))
                else:
                    cout = _ch(planes, width)
                    blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = Classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


# ---------------------------------------------------------------------------------------------
# MobileNetV2, MobileNetV3-Large, EfficientNet-B0: inverted residuals
# ---------------------------------------------------------------------------------------------

class MBConv(nn.Module):
    """Inverted residual (MobileNetV2 / V3, EfficientNet's MBConv): [1x1 expand-BN-act] ->
    kxk depthwise-BN-act [-> SE] -> 1x1 project-BN (linear bottleneck), plus the input when
    the stride is 1 and the channels match (drop-path is the identity in eval: omitted)."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int,
                 act: Callable[[], nn.Module], expand: bool, se: nn.Module | None = None,
                 eps: float = 1e-5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expand:
            layers.append(ConvBN(cin, hidden, 1, act=act, eps=eps))
        layers.append(ConvBN(hidden, hidden, k, stride, groups=hidden, act=act, eps=eps))
        if se is not None:
            layers.append(se)
        layers.append(ConvBN(hidden, cout, 1, act=None, eps=eps))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class FeaturesHead(nn.Module):
    """``features`` (a stem and blocks, then a 1x1 ConvBN to ``last`` channels), then
    ``classifier``: the inverted-residual nets' layout."""

    def finish(self, layers: list[nn.Module], cin: int, last: int, act: Callable[[], nn.Module],
               classifier: nn.Module, eps: float = 1e-5) -> None:
        """Append the 1x1 ConvBN ``cin -> last`` to ``layers`` and set both parts."""
        layers.append(ConvBN(cin, last, 1, act=act, eps=eps))
        self.features = nn.Sequential(*layers)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MobileNetV2(FeaturesHead):
    """MobileNetV2 (Sandler et al. 2018, Table 2): 3x3/2 stem 32, 17 inverted residuals
    (t, c, n, s), 1x1 conv to 1280, ReLU6 throughout, 1000-class head."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        cin = _ch(32, width)
        layers: list[nn.Module] = [ConvBN(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTING:
            cout = _ch(c, width)
            for i in range(n):
                layers.append(MBConv(cin, round(cin * t), cout, 3, s if i == 0 else 1,
                                     nn.ReLU6, expand=t != 1))
                cin = cout
        last = _ch(1280, width)
        self.finish(layers, cin, last, nn.ReLU6, Classifier(last, dropout=0.2))


class MobileNetV3Large(FeaturesHead):
    """MobileNetV3-Large (Howard et al. 2019, Table 1): 3x3/2 stem 16 (hardswish), 15
    bottlenecks (kernel, expansion, out, SE, activation, stride; SE squeeze to a quarter of
    the expansion, ReLU then hardsigmoid, its convs with bias and no BN), 1x1 conv to 960, then
    Linear 1280 -> hardswish -> Linear 1000. BN eps 1e-3."""

    SETTING = ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2),
               (3, 72, 24, False, "RE", 1), (5, 72, 40, True, "RE", 2),
               (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
               (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1),
               (3, 184, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
               (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
               (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1),
               (5, 960, 160, True, "HS", 1))

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        eps = 1e-3
        cin, prev = _ch(16, width), 16
        layers: list[nn.Module] = [ConvBN(3, cin, 3, 2, act=nn.Hardswish, eps=eps)]
        for k, exp, c, use_se, nl, s in self.SETTING:
            hidden, cout = _ch(exp, width), _ch(c, width)
            act = nn.Hardswish if nl == "HS" else nn.ReLU
            se = SqueezeExcite(hidden, _divisible(hidden // 4), nn.ReLU, nn.Hardsigmoid) \
                if use_se else None
            layers.append(MBConv(cin, hidden, cout, k, s, act, expand=exp != prev, se=se,
                                 eps=eps))
            cin, prev = cout, c
        last, hidden = _ch(960, width), _ch(1280, width)
        self.finish(layers, cin, last, nn.Hardswish, nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(last, hidden), nn.Hardswish(),
            nn.Dropout(0.2), nn.Linear(hidden, 1000)), eps)


class EfficientNetB0(FeaturesHead):
    """EfficientNet-B0 (Tan & Le 2019, Table 1): 3x3/2 stem 32, 16 MBConv blocks (expansion,
    kernel, stride, out, repeats; SE squeeze to a quarter of the block's input channels, SiLU
    then sigmoid, no BN), 1x1 conv to 1280, 1000-class head; SiLU throughout."""

    SETTING = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
               (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        cin = _ch(32, width)
        layers: list[nn.Module] = [ConvBN(3, cin, 3, 2, act=nn.SiLU)]
        for e, k, s, c, n in self.SETTING:
            cout = _ch(c, width)
            for i in range(n):
                se = SqueezeExcite(cin * e, max(1, cin // 4), nn.SiLU, nn.Sigmoid)
                layers.append(MBConv(cin, cin * e, cout, k, s if i == 0 else 1, nn.SiLU,
                                     expand=e != 1, se=se))
                cin = cout
        last = _ch(1280, width)
        self.finish(layers, cin, last, nn.SiLU, Classifier(last, dropout=0.2))


# ---------------------------------------------------------------------------------------------
# RegNetY-400MF, ShuffleNetV2 x1.0
# ---------------------------------------------------------------------------------------------

class RegNetYBlock(nn.Module):
    """RegNetY residual bottleneck (Radosavovic et al. 2020): 1x1-BN-ReLU, grouped 3x3
    (8 channels per group, stride)-BN-ReLU, SE (squeeze to a quarter of the block's input
    width), 1x1-BN; plus the shortcut (1x1-BN when it resizes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8) -> None:
        super().__init__()
        self.a = ConvBN(cin, cout, 1)
        self.b = ConvBN(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcite(cout, round(0.25 * cin))
        self.c = ConvBN(cout, cout, 1, act=None)
        self.proj = ConvBN(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.proj is None else self.proj(x)
        return F.relu(short + self.c(self.se(self.b(self.a(x)))))


class RegNetY400MF(nn.Module):
    """RegNetY-400MF: 3x3/2 stem 32, stages of width 48, 104, 208, 440 and depth 1, 3, 6, 6
    (each starting with stride 2), group width 8, SE ratio 0.25, 1000-class head."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        cin = _ch(32, width)
        self.stem = ConvBN(3, cin, 3, 2)
        stages = []
        for w, depth in zip((48, 104, 208, 440), (1, 3, 6, 6), strict=True):
            cout = _ch(w, width)
            blocks = []
            for i in range(depth):
                blocks.append(RegNetYBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.trunk = nn.Sequential(*stages)
        self.head = Classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.stem(x)))


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view as [N, groups, C/groups, H, W], swap, flatten."""
    n, c = x.size(0), x.size(1)
    return x.view(n, groups, c // groups, x.size(2), x.size(3)).transpose(1, 2).flatten(1, 2)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit (Ma et al. 2018, Fig. 3c/d): stride 1 splits the channels in two
    (chunk), runs 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU on one half and concatenates
    the other; stride 2 runs that branch and a 3x3/2 depthwise-BN, 1x1-BN-ReLU branch on the
    whole input. Then a channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        self.branch1 = nn.Sequential(
            ConvBN(cin, cin, 3, stride, groups=cin, act=None), ConvBN(cin, half, 1),
        ) if stride > 1 else None
        first = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            ConvBN(first, half, 1), ConvBN(half, half, 3, stride, groups=half, act=None),
            ConvBN(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 1.0x (Table 5): 3x3/2 conv 24, 3x3/2 max pool, stages of 116, 232, 464
    channels with 4, 8, 4 units (the first with stride 2), 1x1 conv 1024, 1000-class head."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        cin = _ch(24, width)
        self.conv1 = ConvBN(3, cin, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for c, n in zip((116, 232, 464), (4, 8, 4), strict=True):
            cout = _ch(c, width)
            stages.append(nn.Sequential(*(ShuffleUnit(cin if i == 0 else cout, cout,
                                                      2 if i == 0 else 1) for i in range(n))))
            cin = cout
        self.stage2, self.stage3, self.stage4 = stages
        last = _ch(1024, width)
        self.conv5 = ConvBN(cin, last, 1)
        self.head = Classifier(last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.head(self.conv5(x))


# ---------------------------------------------------------------------------------------------
# DenseNet-121, GoogLeNet (Inception v1 with BN)
# ---------------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    """DenseNet-BC layer: concat of every earlier feature map -> BN-ReLU-1x1 conv (4 x growth)
    -> BN-ReLU-3x3 conv (growth)."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.ModuleList):
    """Dense layers, each reading the concat of the block input and all earlier layers'
    outputs; returns the concat of all of them."""

    def __init__(self, n: int, cin: int, growth: int) -> None:
        super().__init__(DenseLayer(cin + i * growth, growth) for i in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """DenseNet transition: BN-ReLU-1x1 conv (halves the channels) -> 2x2/2 average pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2, 2))


class DenseNet121(nn.Module):
    """DenseNet-121 (Huang et al. 2017, Table 1): 7x7/2 conv 64-BN-ReLU, 3x3/2 max pool, dense
    blocks of 6, 12, 24, 16 layers (growth 32, bottleneck 4 x growth) with transitions
    between, a final BN (norm5)-ReLU, 1000-class head."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        growth, c = _ch(32, width), _ch(64, width)
        layers: list[nn.Module] = [nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        for i, n in enumerate((6, 12, 24, 16)):
            layers.append(DenseBlock(n, c, growth))
            c += n * growth
            if i < 3:
                layers.append(Transition(c, c // 2))
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*layers)
        self.head = Classifier(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


class Inception(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (torchvision's "5x5" branch) |
    3x3/1 max pool -> 1x1, concatenated; each conv Conv(no bias)-BN(eps 1e-3)-ReLU."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool: int) -> None:
        super().__init__()

        def unit(a: int, b: int, k: int) -> ConvBN:
            return ConvBN(a, b, k, eps=1e-3)

        self.branch1 = unit(cin, c1, 1)
        self.branch2 = nn.Sequential(unit(cin, c3r, 1), unit(c3r, c3, 3))
        self.branch3 = nn.Sequential(unit(cin, c5r, 1), unit(c5r, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), unit(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)],
                         1)


class GoogLeNet(nn.Module):
    """GoogLeNet (Szegedy et al. 2015, Table 1) with BN, torchvision's layout without the
    auxiliary heads: 7x7/2 conv 64, max pool, 1x1 64, 3x3 192, max pool, inception 3a-3b,
    max pool, 4a-4e, max pool, 5a-5b, 1000-class head."""

    # name: 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection
    TABLE = (("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)),
             ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
             ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
             ("4e", (256, 160, 320, 32, 128, 128)), ("5a", (256, 160, 320, 32, 128, 128)),
             ("5b", (384, 192, 384, 48, 128, 128)))

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c64, c192 = _ch(64, width), _ch(192, width)
        layers: list[nn.Module] = [
            ConvBN(3, c64, 7, 2, eps=1e-3), nn.MaxPool2d(3, 2, ceil_mode=True),
            ConvBN(c64, c64, 1, eps=1e-3), ConvBN(c64, c192, 3, eps=1e-3),
            nn.MaxPool2d(3, 2, ceil_mode=True)]
        cin = c192
        for name, spec in self.TABLE:
            c1, c3r, c3, c5r, c5, pool = (_ch(c, width) for c in spec)
            layers.append(Inception(cin, c1, c3r, c3, c5r, c5, pool))
            cin = c1 + c3 + c5 + pool
            if name in ("3b", "4e"):
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True) if name == "3b"
                              else nn.MaxPool2d(2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.head = Classifier(cin, dropout=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------
# RepVGG-A0, MobileOne-S0: train-time multi-branch forms (blocks from bnfold.models.rep)
# ---------------------------------------------------------------------------------------------

def _rep_block(cin: int, cout: int, *, kernel: int = 3, stride: int = 1, groups: int = 1,
               dense: int = 1, one: bool = True) -> RepBlock:
    """A :class:`~bnfold.models.rep.RepBlock` (``dense`` kxk conv-BN branches, a 1x1 conv-BN
    branch when ``one``, an identity BN when stride 1 and the channels match) whose 1x1 conv
    has no bias, as in the RepVGG and MobileOne papers (every branch is Conv(no bias) -> BN)."""
    block = RepBlock(2, cin, cout, kernel=kernel, stride=stride, groups=groups, dense=dense,
                     one=one)
    if block.conv1x1 is not None:
        block.conv1x1.bias = None
    return block


class RepNet(nn.Module):
    """``blocks`` (each summed branches, then ReLU), then ``head``: RepVGG's and MobileOne's
    layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.relu(block(x))
        return self.head(x)


class RepVGGA0(RepNet):
    """RepVGG-A0 (Ding et al. 2021, Tables 2-3), train-time form: blocks of 3x3-BN + 1x1-BN
    (+ identity BN when stride 1 and channels match) summed, then ReLU; stages of 1, 2, 4,
    14, 1 blocks, widths 48, 48, 96, 192, 1280 (a = 0.75, b = 2.5), each starting with
    stride 2; 1000-class head."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = 3
        for c, n in zip((48, 48, 96, 192, 1280), (1, 2, 4, 14, 1), strict=True):
            cout = _ch(c, width)
            for i in range(n):
                blocks.append(_rep_block(cin, cout, stride=2 if i == 0 else 1))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = Classifier(cin)


class MobileOneS0(RepNet):
    """MobileOne-S0 (Vasu et al. 2023), train-time form: a 3x3/2 stem block (3x3-BN + 1x1-BN,
    ReLU), then units of a depthwise block (k = 4 over-parameterized 3x3 depthwise conv-BN
    branches, a 1x1 depthwise "scale" conv-BN branch, identity BN when stride 1) and a
    pointwise block (k = 4 1x1 conv-BN branches, identity BN when the channels match), each
    summed then ReLU; stages of 2, 8, 10, 1 units at 48, 128, 256, 1024 channels (each
    starting with stride 2); 1000-class head."""

    def __init__(self, width: float = 1.0, k: int = 4) -> None:
        super().__init__()
        cin = _ch(48, width)
        blocks: list[nn.Module] = [_rep_block(3, cin, stride=2)]
        for c, n in zip((48, 128, 256, 1024), (2, 8, 10, 1), strict=True):
            cout = _ch(c, width)
            for i in range(n):
                blocks.append(_rep_block(cin, cin, stride=2 if i == 0 else 1, groups=cin,
                                         dense=k))
                blocks.append(_rep_block(cin, cout, kernel=1, dense=k, one=False))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = Classifier(cin)


# ---------------------------------------------------------------------------------------------
# YOLOv5s backbone + PAN neck, U-Net
# ---------------------------------------------------------------------------------------------

def _cbs(cin: int, cout: int, k: int = 1, stride: int = 1, padding: int | None = None
         ) -> ConvBN:
    """YOLOv5's ``Conv``: Conv(no bias)-BN(eps 1e-3)-SiLU."""
    return ConvBN(cin, cout, k, stride, act=nn.SiLU, eps=1e-3, padding=padding)


class YoloBottleneck(nn.Module):
    """YOLOv5 bottleneck: 1x1 -> 3x3 (Conv-BN-SiLU each), plus the input when ``shortcut``."""

    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = _cbs(c, c, 1)
        self.cv2 = _cbs(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cv2(self.cv1(x))
        return x + out if self.shortcut else out


class C3(nn.Module):
    """YOLOv5 C3 (CSP bottleneck, 3 convs): 1x1 -> n bottlenecks, concat with a second 1x1 of
    the input, 1x1 out; hidden width half the output."""

    def __init__(self, cin: int, cout: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        c = cout // 2
        self.cv1 = _cbs(cin, c)
        self.cv2 = _cbs(cin, c)
        self.cv3 = _cbs(2 * c, cout)
        self.m = nn.Sequential(*(YoloBottleneck(c, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """YOLOv5 SPPF: 1x1 halving, three chained 5x5/1 max pools, concat of all four, 1x1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        c = cin // 2
        self.cv1 = _cbs(cin, c)
        self.cv2 = _cbs(4 * c, cout)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class YOLOv5s(nn.Module):
    """YOLOv5s (v6.0 yolov5s.yaml: depth 0.33, width 0.5) CSP-Darknet backbone, SPPF and PAN
    neck, without the Detect head: returns the P3/8, P4/16, P5/32 feature maps."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (_ch(c, width) for c in (32, 64, 128, 256, 512))
        self.b0 = _cbs(3, c1, 6, 2, padding=2)
        self.b1 = _cbs(c1, c2, 3, 2)
        self.b2 = C3(c2, c2, 1)
        self.b3 = _cbs(c2, c3, 3, 2)
        self.b4 = C3(c3, c3, 2)
        self.b5 = _cbs(c3, c4, 3, 2)
        self.b6 = C3(c4, c4, 3)
        self.b7 = _cbs(c4, c5, 3, 2)
        self.b8 = C3(c5, c5, 1)
        self.b9 = SPPF(c5, c5)
        self.h10 = _cbs(c5, c4)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h13 = C3(2 * c4, c4, 1, shortcut=False)
        self.h14 = _cbs(c4, c3)
        self.h17 = C3(2 * c3, c3, 1, shortcut=False)
        self.h18 = _cbs(c3, c3, 3, 2)
        self.h20 = C3(2 * c3, c4, 1, shortcut=False)
        self.h21 = _cbs(c4, c4, 3, 2)
        self.h23 = C3(2 * c4, c5, 1, shortcut=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        x10 = self.h10(self.b9(self.b8(self.b7(p4))))
        x14 = self.h14(self.h13(torch.cat((self.up(x10), p4), 1)))
        out3 = self.h17(torch.cat((self.up(x14), p3), 1))
        out4 = self.h20(torch.cat((self.h18(out3), x14), 1))
        out5 = self.h23(torch.cat((self.h21(out4), x10), 1))
        return out3, out4, out5


class DoubleConv(nn.Sequential):
    """U-Net's (3x3 conv-BN-ReLU) x 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(ConvBN(cin, cout, 3), ConvBN(cout, cout, 3))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BN and "same" padding: double convs of 64, 128,
    256, 512, 1024 channels with 2x2 max pools down, 2x2/2 transposed convs up, each
    concatenated with the skip of its level, a 1x1 conv to 2 classes. Input sides must be
    multiples of 16."""

    def __init__(self, width: float = 1.0, classes: int = 2) -> None:
        super().__init__()
        cs = [_ch(64 * 2**i, width) for i in range(5)]
        self.inc = DoubleConv(3, cs[0])
        self.downs = nn.ModuleList(DoubleConv(cs[i], cs[i + 1]) for i in range(4))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(cs[i + 1], cs[i], 2, 2)
                                 for i in reversed(range(4)))
        self.up_convs = nn.ModuleList(DoubleConv(2 * cs[i], cs[i]) for i in reversed(range(4)))
        self.outc = nn.Conv2d(cs[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            x = conv(torch.cat((skips.pop(), up(x)), 1))
        return self.outc(x)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """One architecture: its builder (width multiplier -> model), full-size and cheap inputs
    (batch first), BN count and the BNs an exact folder must leave."""

    name: str
    factory: Callable[[float], nn.Module]
    input_shape: tuple[int, ...]
    small_input: tuple[int, ...]
    bn_total: int
    bn_left: int
    description: str


_IMAGENET = (1, 3, 224, 224)
_SMALL = (2, 3, 64, 64)


def _resnet18(width: float) -> nn.Module:
    return ResNet((2, 2, 2, 2), bottleneck=False, width=width)


def _resnet50(width: float) -> nn.Module:
    return ResNet((3, 4, 6, 3), bottleneck=True, width=width)


def _resnext50_32x4d(width: float) -> nn.Module:
    return ResNet((3, 4, 6, 3), bottleneck=True, width=width, groups=32, group_width=4)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        # every BN follows a conv read only by it: all fold forward
        Arch("resnet18", _resnet18, _IMAGENET, _SMALL, 20, 0,
             "ResNet-18, basic blocks"),
        # every BN follows a conv read only by it: all fold forward
        Arch("resnet50", _resnet50, _IMAGENET, _SMALL, 53, 0,
             "ResNet-50 v1.5, bottlenecks (stride on the 3x3)"),
        # every BN follows a (grouped) conv read only by it: all fold forward
        Arch("resnext50_32x4d", _resnext50_32x4d, _IMAGENET, _SMALL, 53, 0,
             "ResNeXt-50 32x4d, grouped 3x3 bottlenecks"),
        # every BN follows a conv (depthwise or 1x1) read only by it: all fold forward
        Arch("mobilenet_v2", MobileNetV2, _IMAGENET, _SMALL, 52, 0,
             "MobileNetV2, ReLU6 inverted residuals"),
        # every BN follows a conv read only by it (the SE convs have bias, no BN): all fold
        Arch("mobilenet_v3_large", MobileNetV3Large, _IMAGENET, _SMALL, 46, 0,
             "MobileNetV3-Large, hardswish, SE"),
        # every BN follows a conv read only by it (the SE convs have bias, no BN): all fold
        Arch("efficientnet_b0", EfficientNetB0, _IMAGENET, _SMALL, 49, 0,
             "EfficientNet-B0, SiLU MBConv with SE"),
        # every BN follows a conv read only by it: all fold forward
        Arch("regnety_400mf", RegNetY400MF, _IMAGENET, _SMALL, 53, 0,
             "RegNetY-400MF, grouped 3x3 with SE"),
        # every BN follows a conv read only by it (chunk/concat/shuffle come after): all fold
        Arch("shufflenet_v2_x1_0", ShuffleNetV2, _IMAGENET, _SMALL, 56, 0,
             "ShuffleNetV2 1.0x, channel split and shuffle"),
        # 58 norm1 + 3 transition BNs + norm5 stay: each reads a concat whose inputs other
        # concats also read (or a pool), and feeds a ReLU; the 58 norm2 fold into conv1
        Arch("densenet121", DenseNet121, _IMAGENET, _SMALL, 121, 62,
             "DenseNet-121, pre-activation dense layers with concat"),
        # every BN follows a conv read only by it (the concat comes after the ReLUs)
        Arch("googlenet", GoogLeNet, _IMAGENET, _SMALL, 57, 0,
             "GoogLeNet (Inception v1) with BN, no aux heads"),
        # the 17 identity BNs stay (they read the previous block's ReLU and feed an add);
        # the 3x3 and 1x1 branch BNs fold forward
        Arch("repvgg_a0", RepVGGA0, _IMAGENET, _SMALL, 61, 17,
             "RepVGG-A0, train-time 3x3 + 1x1 + identity-BN branches"),
        # the 35 identity BNs stay (they read the previous block's ReLU and feed an add);
        # every conv branch's BN folds forward
        Arch("mobileone_s0", MobileOneS0, _IMAGENET, _SMALL, 226, 35,
             "MobileOne-S0, train-time k=4 over-parameterized branches"),
        # every BN follows a conv read only by it (concats and upsamples come after SiLUs)
        Arch("cspdarknet_yolov5s", YOLOv5s, (1, 3, 640, 640), _SMALL, 57, 0,
             "YOLOv5s CSP-Darknet backbone + PAN neck, 3 outputs"),
        # every BN follows a conv read only by it
        Arch("unet_bn", UNet, (1, 3, 256, 256), _SMALL, 18, 0,
             "U-Net with BN double convs, transposed-conv up, concat skips"),
    ]
}


@torch.no_grad()
def _init_weights(model: nn.Module) -> None:
    """He-normal conv / linear weights (std sqrt(2 / fan_in)), small random biases: the input
    keeps shaping the output through a hundred layers (PyTorch's default init shrinks the
    signal at every layer until the output hardly depends on the input)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            fan_in = m.weight[0].numel()
            if isinstance(m, nn.ConvTranspose2d):  # weight [in, out / groups, *kernel]
                fan_in = max(1, m.in_channels // m.groups * math.prod(m.kernel_size)
                             // math.prod(m.stride))
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.normal_(0.0, 0.1)


def get(name: str, seed: int = 0, width: float = 1.0) -> nn.Module:
    """Build architecture ``name`` at ``width`` in eval mode: random weights (seeded by
    ``seed``), non-trivial BN statistics."""
    if name not in ARCHS:
        raise KeyError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    model = ARCHS[name].factory(width)
    _init_weights(model)
    randomize_bn_stats(model, seed)
    return model.eval()


def example_input(name: str, seed: int = 1, small: bool = False, batch: int | None = None
                  ) -> torch.Tensor:
    """A fresh random float32 input for ``name``: full size, or ``small`` (cheap, for tests);
    ``batch`` overrides dim 0."""
    spec = ARCHS[name]
    return random_input(spec.small_input if small else spec.input_shape, seed, batch)
