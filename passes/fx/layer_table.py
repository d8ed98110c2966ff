"""The FX layer table: one row per layer kind that the FX passes fold into, insert after or merge.

A row (:class:`LayerKind`) answers everything the fold (forward and backward), insert and
reparameterize passes ask of a layer: its module class, the BatchNorm class that normalizes its
output, which weight axes hold its output and input channels, how many output channels a weight
of a given shape and ``groups`` makes, and its exactness kind (``kind``, the ``layer`` that
:func:`bnfold.algebra.backward_fold_refusal` and the reports name). The targets that call a
layer map to rows: module classes in :data:`LAYER_MODULES`; ``F.*`` functions (the same objects
as ``torch.conv2d`` etc.) and the ATen ops of ``torch.export`` graphs in
:data:`LAYER_FUNCTIONS`, each with its positional argument names (weight/bias/groups accessors).
Adding a layer kind is one row, its targets, and tests. The core-ATen spellings of a Linear
(``addmm``/``mm`` of the transposed weight, :data:`LOWERED_LINEARS`) are read as
``aten.linear`` calls (:mod:`bnfold.passes.fx.lowered`).

Weight layouts, with ``g`` groups: Conv ``[C_out, C_in/g, *k]``, ConvTranspose
``[C_in, C_out/g, *k]``, Linear ``[C_out, C_in]``. A forward fold scales the weight along
``weight_out_axis`` (``W' = s * W``, exact for every row); a backward fold scales it along
``weight_in_axis`` (exact under the conditions of ``backward_fold_refusal`` for its ``kind``).
FX layers have no bias scale (the bias is added as is, unlike ONNX Gemm's ``beta``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerKind:
    """One layer kind: ``kind`` (exactness kind: "conv" | "conv_transpose" | "linear"),
    ``spatial`` dims (0 for linear), its module class and the BN class inserted after it, and
    the weight axes of output / input channels."""

    kind: str
    spatial: int
    module: type[nn.Module]
    batchnorm: type[nn.Module]
    weight_out_axis: int
    weight_in_axis: int

    def out_channels(self, weight_shape: Sequence[int], groups: int) -> int:
        """Output channels of a weight: its ``weight_out_axis`` length, times ``groups`` when
        that axis holds one group's channels (ConvTranspose)."""
        per_group = self.weight_out_axis != 0
        return int(weight_shape[self.weight_out_axis]) * (groups if per_group else 1)


_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TCONVS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}

ROWS: tuple[LayerKind, ...] = (
    LayerKind("linear", 0, nn.Linear, nn.BatchNorm1d, 0, 1),
    *(LayerKind("conv", n, _CONVS[n], _BN[n], 0, 1) for n in (1, 2, 3)),
    *(LayerKind("conv_transpose", n, _TCONVS[n], _BN[n], 1, 0) for n in (1, 2, 3)),
)
_BY_KIND = {(row.kind, row.spatial): row for row in ROWS}


def layer_kind(kind: str, spatial: int) -> LayerKind:
    """The row of ``kind`` with ``spatial`` dims (``("conv", 2)``: Conv2d)."""
    return _BY_KIND[(kind, spatial)]


LAYER_MODULES: dict[type, LayerKind] = {row.module: row for row in ROWS}


@dataclass(frozen=True)
class LayerCall:
    """How a function target spells a layer: its row (``None`` for ``aten.convolution``, whose
    ``transposed`` argument and weight rank pick it, see :func:`convolution_kind`) and its
    positional argument names (the tensor input is index 0)."""

    row: LayerKind | None
    args: tuple[str, ...]

    def arg(self, node_args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
        """Argument ``name`` of a call (``None`` if absent or not in the signature)."""
        index = self.args.index(name) if name in self.args else len(node_args)
        return node_args[index] if index < len(node_args) else kwargs.get(name)


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TCONV = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_LINEAR = ("input", "weight", "bias")
_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                "output_padding", "groups")
_ATEN = torch.ops.aten

LAYER_FUNCTIONS: dict[Any, LayerCall] = {
    F.linear: LayerCall(layer_kind("linear", 0), _LINEAR),
    _ATEN.linear.default: LayerCall(layer_kind("linear", 0), _LINEAR),
    _ATEN.convolution.default: LayerCall(None, _CONVOLUTION),
}
for _n, _conv, _tconv in ((1, F.conv1d, F.conv_transpose1d), (2, F.conv2d, F.conv_transpose2d),
                          (3, F.conv3d, F.conv_transpose3d)):
    _aten_conv = getattr(_ATEN, f"conv{_n}d")
    _aten_tconv = getattr(_ATEN, f"conv_transpose{_n}d")
    for _target in (_conv, _aten_conv.default, _aten_conv.padding):
        LAYER_FUNCTIONS[_target] = LayerCall(layer_kind("conv", _n), _CONV)
    for _target in (_tconv, _aten_tconv.default if _n == 1 else _aten_tconv.input):
        LAYER_FUNCTIONS[_target] = LayerCall(layer_kind("conv_transpose", _n), _TCONV)


#: The core-ATen spellings of a Linear on a 2-D input (``run_decompositions()``), by the
#: argument index of its input, transposed weight and bias (None: no bias):
#: ``addmm(b, x, W.T)`` and ``mm(x, W.T)``, exactly ``aten.linear(x, W, b)``.
LOWERED_LINEARS: dict[Any, tuple[int, int, int | None]] = {
    _ATEN.addmm.default: (1, 2, 0),
    _ATEN.mm.default: (0, 1, None),
}
#: The ops that give such a call ``W.T`` of a 2-D ``W`` (mm's operands are 2-D): whether the
#: arguments after ``W`` make each a transpose.
WEIGHT_TRANSPOSES: dict[Any, Callable[[Sequence[Any]], bool]] = {
    _ATEN.permute.default: lambda args: [d % 2 for d in args[0]] == [1, 0],
    _ATEN.t.default: lambda args: not args,
    _ATEN.transpose.int: lambda args: sorted(d % 2 for d in args) == [0, 1],
}


def convolution_kind(transposed: Any, weight_rank: int) -> LayerKind | None:
    """The row of an ``aten.convolution`` call (``None``: a rank no row has)."""
    return _BY_KIND.get(("conv_transpose" if transposed else "conv", weight_rank - 2))
