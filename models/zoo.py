"""The reference model zoo: small code-defined nets, each named for the case it exercises.

``get(name)`` builds one in eval mode with random weights and non-trivial BN statistics;
``example_input(name)`` gives a matching random input; ``ZOO[name].bn_left`` is how many BNs a
correct, exact folder must leave in the graph (the others can be removed exactly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.models.stats import random_input, randomize_bn_stats


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class MLPBN(nn.Module):
    """Linear -> BatchNorm1d -> ReLU, twice, then a plain Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PlainCNN(nn.Module):
    """Conv -> BN -> ReLU blocks (with and without conv bias), pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn plus a shortcut (conv1x1-bn when it resizes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.down is None else self.down(x)
        return F.relu(out + short)


class ResNetSmall(nn.Module):
    """A small ResNet: stem, three basic blocks (two with downsampling shortcuts), head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = _cbr(3, width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3 (groups = channels), project 1x1."""

    def __init__(self, c: int, expand: int = 4) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
                                       nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class MobileNetBlocks(nn.Module):
    """Depthwise-separable MobileNet-style net."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, stride=2)
        self.dw = _cbr(8, 8, groups=8)
        self.pw = _cbr(8, 16, k=1)
        self.block = InvertedResidual(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.pw(self.dw(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvTransposeDecoder(nn.Module):
    """Grouped ConvTranspose2d decoder (weights laid out [Cin, Cout/groups, kh, kw])."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1, groups=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 6, 3, stride=1, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.up3 = nn.ConvTranspose2d(6, 3, 2, stride=2)
        self.bn3 = nn.BatchNorm2d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.up1(x)))
        x = F.relu(self.bn2(self.up2(x)))
        return torch.tanh(self.bn3(self.up3(x)))


class Conv1dNet(nn.Module):
    """Conv1d and grouped ConvTranspose1d with BatchNorm1d (one BN without affine)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, dilation=2, groups=2, bias=False)
        self.b2 = nn.BatchNorm1d(8, affine=False)
        self.t3 = nn.ConvTranspose1d(8, 4, 3, stride=2, groups=2)
        self.b3 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.b3(self.t3(x))


class Conv3dNet(nn.Module):
    """Conv3d and grouped ConvTranspose3d with BatchNorm3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm3d(4)
        self.t2 = nn.ConvTranspose3d(4, 4, 2, stride=2, groups=2)
        self.b2 = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.t2(F.relu(self.b1(self.c1(x)))))


class BNBeforeConv(nn.Module):
    """BN *before* its layer: input BN -> conv (padding 0), BN -> reflect-padded conv,
    BN1d -> Linear. Each backward fold is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=0)
        self.bn_mid = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2)
        self.bn_head = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(self.bn_in(x)))
        x = F.relu(self.conv2(self.bn_mid(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.bn_head(x))


class SharedConv(nn.Module):
    """One conv module called twice (module reuse), each call followed by a different BN,
    and two convs that share one weight Parameter, each followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(8, 8, 1, bias=False)
        self.right = nn.Conv2d(8, 8, 1, bias=False)
        self.right.weight = self.left.weight
        self.bn_l = nn.BatchNorm2d(8)
        self.bn_r = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_a(self.conv(x)))
        x = F.relu(self.bn_b(self.conv(x)))
        return self.bn_l(self.left(x)) + self.bn_r(self.right(x))


class ConvMultiUse(nn.Module):
    """A conv whose output feeds its BN *and* a residual Add: that BN cannot fold (kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 4, 1)
        self.bn_out = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.stem(x))
        z = F.relu(self.bn(y)) + y
        return self.bn_out(self.out(z))


class MLPHeads(nn.Module):
    """An MLP classifier with a BN trunk and two Linear -> BN1d heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head_a = nn.Sequential(nn.Linear(32, 5), nn.BatchNorm1d(5))
        self.head_b = nn.Sequential(nn.Linear(32, 3, bias=False), nn.BatchNorm1d(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.head_a(h), self.head_b(h)


class LeViTBlock(nn.Module):
    """LeViT-style token MLP on [N, L, C]: Linear then BN over the features, reached through
    ``flatten(0, 1)`` (LeViT's Linear_BN) and through ``transpose(1, 2)`` (BN1d on [N, C, L])."""

    def __init__(self, c: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.bn2 = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.bn1(h.flatten(0, 1)).reshape_as(h)
        h = F.gelu(h)
        y = self.bn2(self.fc2(h).transpose(1, 2)).transpose(1, 2)
        return x + y


class LinearSeqWrongAxis(nn.Module):
    """Linear on [N, L, C] followed by BatchNorm1d, which normalizes dim 1 (L), not the
    Linear's features, although both sizes are 8: must be kept. A second Linear reaches its
    BN through a transpose, on the feature axis: folds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.bn_wrong = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 8)
        self.bn_right = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_wrong(self.fc(x))
        return self.bn_right(self.fc2(y).transpose(1, 2)).transpose(1, 2)


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: how to build it, its input (batch first), and the BNs a fold must leave."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    bn_total: int
    bn_left: int
    description: str


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("mlp_bn1d", MLPBN, (4, 32), 2, 0, "MLP with Linear->BN1d"),
        ZooModel("plain_cnn", PlainCNN, (2, 3, 16, 16), 2, 0, "Conv->BN->ReLU CNN"),
        ZooModel("resnet_small", ResNetSmall, (2, 3, 32, 32), 9, 0, "ResNet basic blocks"),
        ZooModel("mobilenet_blocks", MobileNetBlocks, (2, 3, 16, 16), 6, 0,
                 "depthwise-separable blocks"),
        ZooModel("convtranspose_decoder", ConvTransposeDecoder, (2, 16, 4, 4), 3, 0,
                 "grouped ConvTranspose2d decoder"),
        ZooModel("conv1d_net", Conv1dNet, (2, 4, 32), 3, 0, "Conv1d / ConvTranspose1d"),
        ZooModel("conv3d_net", Conv3dNet, (2, 2, 6, 6, 6), 2, 0, "Conv3d / ConvTranspose3d"),
        ZooModel("bn_before_conv", BNBeforeConv, (2, 3, 12, 12), 3, 0,
                 "BN before conv/linear (backward fold)"),
        ZooModel("shared_conv", SharedConv, (2, 8, 8, 8), 4, 0,
                 "conv module reused; weight shared by two convs"),
        ZooModel("conv_multi_use", ConvMultiUse, (2, 3, 8, 8), 3, 1,
                 "conv output feeds BN and a residual"),
        ZooModel("mlp_heads", MLPHeads, (4, 20), 3, 0, "MLP classifier with Linear->BN1d heads"),
        ZooModel("levit_block", LeViTBlock, (2, 7, 16), 2, 0,
                 "Linear on [N,L,C] -> BN over C via flatten/transpose"),
        ZooModel("linear_seq_wrong_axis", LinearSeqWrongAxis, (2, 8, 16), 2, 1,
                 "Linear on [N,L,C] -> BN1d over L (wrong axis, kept)"),
    ]
}


def get(name: str, seed: int = 0) -> nn.Module:
    """Build zoo model ``name`` in eval mode: random weights, non-trivial BN statistics."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    torch.manual_seed(seed)
    model = ZOO[name].factory()
    randomize_bn_stats(model, seed)
    return model.eval()


def example_input(name: str, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    """A fresh random float32 input for zoo model ``name`` (``batch`` overrides dim 0)."""
    return random_input(ZOO[name].input_shape, seed, batch)
