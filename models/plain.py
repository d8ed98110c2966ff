"""BN-free reference nets (the input of ``bnfold.insert_bn``) and their hand-written BN twins.

Each net with a twin takes ``bn=True`` to put BatchNorm after its layers in the model code,
before the activation, exactly where ``insert_bn(..., position="before_activation")`` puts it.
BN construction draws no random numbers, so with the same seed the plain net, the inserted net
and the hand-written twin start from identical weights. The digits nets take scikit-learn's
8x8 handwritten digits (``[N, 1, 8, 8]`` images, or ``[N, 64]`` / ``[N, 8, 8]`` as rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.modules import FeatureBatchNorm


class DigitsCNN(nn.Module):
    """conv(1->16) -> ReLU -> conv(16->32) -> ReLU -> maxpool -> fc(512->64) -> ReLU -> fc(10).

    ``bn=True`` adds BatchNorm2d after each conv and BatchNorm1d after the first fc.
    """

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16) if bn else None
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32) if bn else None
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.bn3 = nn.BatchNorm1d(64) if bn else None
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(self.bn1(x) if self.bn1 is not None else x)
        x = self.conv2(x)
        x = F.relu(self.bn2(x) if self.bn2 is not None else x)
        x = torch.flatten(F.max_pool2d(x, 2), 1)
        x = self.fc1(x)
        x = F.relu(self.bn3(x) if self.bn3 is not None else x)
        return self.fc2(x)


class DeepMLP(nn.Module):
    """``depth`` Linear layers of ``width`` with a saturating activation, then a Linear head.

    ``act`` is ``"sigmoid"`` or ``"tanh"`` (as modules); ``bn=True`` puts BatchNorm1d after
    each hidden Linear, before its activation.
    """

    def __init__(self, depth: int = 8, width: int = 64, act: str = "sigmoid",
                 in_features: int = 64, classes: int = 10, bn: bool = False) -> None:
        super().__init__()
        acts = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(in_features if i == 0 else width, width))
            if bn:
                layers.append(nn.BatchNorm1d(width))
            layers.append(acts[act]())
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.flatten(x, 1))


class TokenMLP(nn.Module):
    """Linear on ``[N, L, C]`` (the 8 rows of a digit as 8 tokens of 8 pixels), GELU, mean over
    tokens, Linear head. ``bn=True`` puts FeatureBatchNorm (BN over C) after the token Linears.
    """

    def __init__(self, c: int = 8, hidden: int = 32, classes: int = 10, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.bn1 = FeatureBatchNorm(hidden) if bn else None
        self.fc2 = nn.Linear(hidden, hidden)
        self.bn2 = FeatureBatchNorm(hidden) if bn else None
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 8, -1)
        h = self.fc1(x)
        h = F.gelu(self.bn1(h) if self.bn1 is not None else h)
        h = self.fc2(h)
        h = F.gelu(self.bn2(h) if self.bn2 is not None else h)
        return self.head(h.mean(1))


class FunctionalNet(nn.Module):
    """Layers as functional calls on Parameters: F.conv2d -> relu -> grouped
    F.conv_transpose2d (8 -> 8 channels, weight ``[8, 4, 2, 2]``, groups 2) -> tanh ->
    mean pool -> F.linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 4, 2, 2) * 0.3)
        self.b2 = nn.Parameter(torch.randn(8) * 0.1)
        self.w3 = nn.Parameter(torch.randn(10, 8) * 0.3)
        self.b3 = nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = torch.tanh(F.conv_transpose2d(x, self.w2, self.b2, stride=2, groups=2))
        return F.linear(x.mean((2, 3)), self.w3, self.b3)


class Conv1dPlain(nn.Module):
    """Conv1d -> SiLU -> grouped ConvTranspose1d -> LeakyReLU -> Conv1d (output)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2)
        self.t2 = nn.ConvTranspose1d(8, 6, 3, stride=2, groups=2)
        self.act = nn.LeakyReLU(0.1)
        self.c3 = nn.Conv1d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.act(self.t2(F.silu(self.c1(x)))))


class Conv3dPlain(nn.Module):
    """Conv3d -> ELU -> ConvTranspose3d -> Hardswish -> Conv3d (output)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1)
        self.t2 = nn.ConvTranspose3d(4, 6, 2, stride=2)
        self.act = nn.Hardswish()
        self.c3 = nn.Conv3d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.act(self.t2(F.elu(self.c1(x)))))


@dataclass(frozen=True)
class PlainModel:
    """A BN-free net: how to build it, its input (batch first), its hand-written BN twin."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    twin: Callable[[], nn.Module] | None
    description: str


PLAIN: dict[str, PlainModel] = {
    m.name: m
    for m in [
        PlainModel("digits_cnn", DigitsCNN, (8, 1, 8, 8), lambda: DigitsCNN(bn=True),
                   "small CNN for 8x8 digits"),
        PlainModel("deep_mlp_sigmoid", DeepMLP, (8, 64),
                   lambda: DeepMLP(bn=True), "8 sigmoid layers"),
        PlainModel("deep_mlp_tanh", lambda: DeepMLP(act="tanh"), (8, 64),
                   lambda: DeepMLP(act="tanh", bn=True), "8 tanh layers"),
        PlainModel("token_mlp", TokenMLP, (8, 8, 8), lambda: TokenMLP(bn=True),
                   "Linear on [N, L, C]"),
        PlainModel("functional_net", FunctionalNet, (2, 3, 8, 8), None,
                   "F.conv2d / F.conv_transpose2d / F.linear"),
        PlainModel("conv1d_plain", Conv1dPlain, (2, 4, 16), None, "Conv1d / ConvTranspose1d"),
        PlainModel("conv3d_plain", Conv3dPlain, (2, 2, 4, 4, 4), None,
                   "Conv3d / ConvTranspose3d"),
    ]
}


def get(name: str, seed: int = 0, twin: bool = False) -> nn.Module:
    """Build plain net ``name`` (or its hand-written BN twin) with weights from ``seed``."""
    if name not in PLAIN:
        raise KeyError(f"unknown plain model {name!r}; choose from {', '.join(PLAIN)}")
    entry = PLAIN[name]
    if twin and entry.twin is None:
        raise KeyError(f"plain model {name!r} has no hand-written BN twin")
    torch.manual_seed(seed)
    return (entry.twin if twin else entry.factory)()


def example_input(name: str, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    """A fresh random float32 input for plain net ``name`` (``batch`` overrides dim 0)."""
    shape = list(PLAIN[name].input_shape)
    if batch is not None:
        shape[0] = batch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
