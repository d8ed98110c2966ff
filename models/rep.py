"""Re-parameterizable nets (parallel Conv+BN branches summed by an Add) and their deploy twins.

``get(name)`` builds one in eval mode with random weights and non-trivial BN statistics;
``example_input(name)`` gives a matching input; ``deploy(model)`` is the same net written
directly in its merged form (one conv per block), with weights computed here by hand, the way
the training libraries' own ``reparameterize()`` helpers do it (fuse each BN into its conv,
zero-pad 1 x 1 kernels to k x k, an identity kernel per group), in float64 torch code that
shares nothing with :mod:`bnfold.branches`. ``CASES[name].merged`` is how many blocks an exact
merger must merge; refusal cases merge none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bnfold.models.stats import randomize_bn_stats

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class RepBlock(nn.Module):
    """``sum(BN(conv_k(x)) for k branches) + BN(conv1x1(x)) [+ BN(x)] [+ scale * x] [+ x]``.

    ``kernel``-sized convs (``dense`` ones, centred zero padding), an optional 1 x 1 branch,
    an identity BN, a per-channel constant scale and a plain identity, all reading ``x``.
    """

    def __init__(self, dims: int, cin: int, cout: int, *, kernel: int = 3, stride: int = 1,
                 groups: int = 1, dense: int = 1, one: bool = True, bn_identity: bool = True,
                 scale: bool = False, identity: bool = False) -> None:
        super().__init__()
        conv, bn = _CONVS[dims], _BNS[dims]
        self.dims = dims
        self.conv = conv(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = bn(cout)
        self.extra = nn.ModuleList(
            nn.Sequential(conv(cin, cout, kernel, stride, kernel // 2, groups=groups,
                               bias=False), bn(cout)) for _ in range(dense - 1))
        self.conv1x1 = conv(cin, cout, 1, stride, groups=groups) if one else None
        self.bn1x1 = bn(cout) if one else None
        keeps = cin == cout and stride == 1
        self.bn_id = bn(cout) if bn_identity and keeps else None
        self.scale = nn.Parameter(torch.randn(cout, *(1,) * dims)) if scale and keeps else None
        self.identity = identity and keeps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        for branch in self.extra:
            out = out + branch(x)
        if self.conv1x1 is not None and self.bn1x1 is not None:
            out = out + self.bn1x1(self.conv1x1(x))
        if self.bn_id is not None:
            out = out + self.bn_id(x)
        if self.scale is not None:
            out = out + x * self.scale
        if self.identity:
            out = out + x
        return out


@torch.no_grad()
def _merged_conv(block: RepBlock) -> nn.Module:
    """The hand-written deploy conv of ``block`` (float64 sums, one cast at the end)."""

    def fuse(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = conv.weight.double() * s.reshape(-1, *(1,) * (conv.weight.dim() - 1))
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        return w, s * b + bn.bias.double() - bn.running_mean.double() * s

    main = block.conv
    k, n = main.kernel_size[0], block.dims
    weight, bias = fuse(main, block.bn)
    for branch in block.extra:
        w, b = fuse(branch[0], branch[1])
        weight, bias = weight + w, bias + b
    cout, per_group = weight.shape[:2]
    if block.conv1x1 is not None:
        w, b = fuse(block.conv1x1, block.bn1x1)
        weight, bias = weight + F.pad(w, [k // 2] * 2 * n), bias + b
    eye = torch.zeros_like(weight)
    centre = (k // 2,) * n
    for c in range(cout):
        eye[(c, c % per_group, *centre)] = 1.0
    diag = torch.zeros(cout, dtype=torch.float64)
    if block.bn_id is not None:
        s = block.bn_id.weight.double() / torch.sqrt(block.bn_id.running_var.double()
                                                      + block.bn_id.eps)
        diag = diag + s
        bias = bias + block.bn_id.bias.double() - block.bn_id.running_mean.double() * s
    if block.scale is not None:
        diag = diag + block.scale.double().reshape(-1)
    if block.identity:
        diag = diag + 1.0
    weight = weight + eye * diag.reshape(-1, *(1,) * (n + 1))
    out = _CONVS[n](main.in_channels, cout, k, main.stride, k // 2, groups=main.groups)
    out.weight.copy_(weight.float())
    out.bias.copy_(bias.float())
    return out


class RepVGGStage(nn.Module):
    """A RepVGG-style stem block and stage: 3x3+1x1 (+identity BN when shapes allow), ReLU."""

    def __init__(self, dims: int = 2, width: int = 16) -> None:
        super().__init__()
        self.stages = nn.ModuleList([
            nn.ModuleList([RepBlock(dims, 3, width, stride=2)]),
            nn.ModuleList([RepBlock(dims, width, width), RepBlock(dims, width, width)]),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            for block in stage:
                x = F.relu(block(x))
        return x


class MobileOneBlock(nn.Module):
    """A MobileOne-style block: depthwise 3x3 with k over-parameterized Conv+BN branches, a 1x1
    Conv+BN, an identity BN and a per-channel scale; then pointwise 1x1 with k branches and an
    identity BN."""

    def __init__(self, channels: int = 32, k: int = 3) -> None:
        super().__init__()
        self.stem = RepBlock(2, 3, channels, stride=2, dense=k)
        self.dw = RepBlock(2, channels, channels, groups=channels, dense=k, scale=True)
        self.pw = RepBlock(2, channels, channels, kernel=1, dense=k, one=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw(F.relu(self.dw(F.relu(self.stem(x))))))


class RepViTMixer(nn.Module):
    """A RepViT-style token mixer: depthwise 3x3 Conv+BN + depthwise 1x1 conv + x, then a BN
    after the sum (as RepViT's ``RepVGGDW``), then a channel mixer."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, 2, 1)
        self.mixer = RepBlock(2, channels, channels, groups=channels, bn_identity=False,
                              identity=True)
        self.bn = nn.BatchNorm2d(channels)
        self.channel = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.channel(F.gelu(self.bn(self.mixer(x))))


@torch.no_grad()
def deploy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`RepBlock` replaced by its merged conv (and the BN
    after RepViT's mixer folded into it, as RepViT's own ``fuse`` does)."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RepBlock):
                setattr(module, child_name, _merged_conv(child))
    if isinstance(out, RepViTMixer):
        conv, bn = out.mixer, out.bn
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        conv.weight.copy_((conv.weight.double() * s.reshape(-1, 1, 1, 1)).float())
        conv.bias.copy_((conv.bias.double() * s + bn.bias.double()
                         - bn.running_mean.double() * s).float())
        out.bn = nn.Identity()
    return out.eval()


# ---------------------------------------------------------------------------------------------
# Blocks that must not merge (and why), each still a valid model.
# ---------------------------------------------------------------------------------------------

class StrideMismatch(nn.Module):
    """3x3 stride 1 unpadded next to 1x1 stride 2: same output size on a 5x5 input only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 0), nn.BatchNorm2d(4)
        self.conv1x1, self.bn1x1 = nn.Conv2d(4, 4, 1, 2), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1x1(self.conv1x1(x))


class DifferentInputs(nn.Module):
    """3x3 and 1x1 read ``x``, the identity BN reads ``relu(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4)
        self.conv1x1, self.bn1x1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn_id = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1x1(self.conv1x1(x)) + self.bn_id(F.relu(x))


class OtherReader(nn.Module):
    """The 1x1 branch's conv output is also read by the network's second output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4)
        self.conv1x1, self.bn1x1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv1x1(x)
        return self.bn(self.conv(x)) + self.bn1x1(y), torch.sigmoid(y)


class PaddingModeMix(nn.Module):
    """A reflect-padded 1x1 branch (padding 1) next to a zero-padded 3x3 (padding 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 2), nn.BatchNorm2d(4)
        self.conv1x1 = nn.Conv2d(4, 4, 1, 1, 1, padding_mode="reflect")
        self.bn1x1 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1x1(self.conv1x1(x))


class DilationMix(nn.Module):
    """3x3 dilation 2 (padding 2) next to 3x3 dilation 1 (padding 1): taps on other grids."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 2, dilation=2), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1(self.conv1(x))


class ReflectWithOneByOne(nn.Module):
    """A reflect-padded 3x3, an unpadded 1x1 and an identity BN: exact (no 1x1 tap reads the
    border), so it merges into one reflect-padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), nn.BatchNorm2d(4)
        self.conv1x1, self.bn1x1 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn_id = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn1x1(self.conv1x1(x)) + self.bn_id(x)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    merged: int  # blocks an exact merger merges (in torch.fx)
    refusal: str = ""  # a phrase of the reason a refused block gets
    onnx_merged: int | None = None  # in an ONNX export, when not ``merged``
    onnx_refusal: str | None = None  # in an ONNX export, when not ``refusal``

    @property
    def merged_onnx(self) -> int:
        return self.merged if self.onnx_merged is None else self.onnx_merged

    @property
    def refusal_onnx(self) -> str:
        return self.refusal if self.onnx_refusal is None else self.onnx_refusal


CASES: dict[str, Case] = {
    "repvgg_stage": Case(RepVGGStage, (2, 3, 32, 32), 3),
    "repvgg_stage_1d": Case(lambda: RepVGGStage(dims=1), (2, 3, 64), 3),
    "repvgg_stage_3d": Case(lambda: RepVGGStage(dims=3, width=8), (2, 3, 8, 8, 8), 3),
    "mobileone_block": Case(MobileOneBlock, (2, 3, 32, 32), 3),
    "repvit_mixer": Case(RepViTMixer, (2, 3, 32, 32), 1),
    # exported, the reflect padding is a Pad node the 3x3 Conv reads instead of x
    "reflect_with_1x1": Case(ReflectWithOneByOne, (2, 4, 8, 8), 1, onnx_merged=0),
    "refuse_stride": Case(StrideMismatch, (2, 4, 5, 5), 0, "different strides"),
    "refuse_inputs": Case(DifferentInputs, (2, 4, 8, 8), 0, "read different tensors"),
    "refuse_reader": Case(OtherReader, (2, 4, 8, 8), 0, "also feeds"),
    # (exported, the reflect padding is a Pad node the ONNX pass does not look through)
    "refuse_padding_mode": Case(PaddingModeMix, (2, 4, 8, 8), 0, "padding modes",
                                onnx_refusal="a Pad node"),
    "refuse_dilation": Case(DilationMix, (2, 4, 8, 8), 0, "different dilations"),
}
PATTERNS = ("repvgg_stage", "mobileone_block", "repvit_mixer")


def get(name: str, seed: int = 0) -> nn.Module:
    """Build case ``name`` in eval mode: random weights, non-trivial BN statistics."""
    torch.manual_seed(seed)
    return randomize_bn_stats(CASES[name].build(), seed).eval()


def example_input(name: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(CASES[name].shape, generator=gen)
