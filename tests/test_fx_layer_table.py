"""The FX layer table (passes/fx/layer_table.py): each row's weight axes and channel counts
match torch's own layers, and the fold and insert passes recognise the same layers."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from bnfold.passes.fx.layer_table import LAYER_FUNCTIONS, LAYER_MODULES, ROWS, convolution_kind
from bnfold.passes.fx.layers import match_layer
from bnfold.passes.fx.sites import is_layer, layer_site


def _module(row, groups: int) -> nn.Module:
    if row.kind == "linear":
        return nn.Linear(6, 4)
    return row.module(6, 4, 3, groups=groups)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.module.__name__)
@pytest.mark.parametrize("groups", [1, 2])
def test_rows_give_the_channels_torch_layers_have(row, groups: int) -> None:
    module = _module(row, groups)
    groups = getattr(module, "groups", 1)
    shape = module.weight.shape
    out = getattr(module, "out_channels", getattr(module, "out_features", None))
    inp = getattr(module, "in_channels", getattr(module, "in_features", None))
    assert row.out_channels(shape, groups) == out
    per_group = (shape[row.weight_in_axis] * groups) if row.weight_in_axis == 1 else \
        shape[row.weight_in_axis]
    assert per_group == inp
    assert LAYER_MODULES[row.module] is row


def test_aten_convolution_rows_come_from_transposed_and_weight_rank() -> None:
    assert convolution_kind(False, 4).module is nn.Conv2d
    assert convolution_kind(True, 5).module is nn.ConvTranspose3d
    assert convolution_kind(False, 7) is None


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.module.__name__)
def test_fold_and_insert_see_the_same_layers_in_export_graphs(row) -> None:
    """Module calls, and the ATen ops torch.export makes of them (also after decompositions,
    aten.convolution): fold's sites and insert's layers match the same nodes, same row."""
    module = _module(row, 1).eval()
    x = torch.randn(2, 6, *([5] * row.spatial))
    traced = fx.symbolic_trace(nn.Sequential(module))
    exported = torch.export.export(module, (x,))
    graphs = [traced, exported.module(), exported.run_decompositions().module()]
    for gm in graphs:
        nodes = [n for n in gm.graph.nodes if is_layer(gm, n)]
        assert len(nodes) == 1 or row.kind == "linear"  # decomposed linear: addmm, no layer
        for node in nodes:
            site, layer = layer_site(gm, node), match_layer(gm, node)
            assert layer is not None and not isinstance(site, str)
            assert (layer.row.kind, layer.row.spatial) == (site.kind, site.spatial)
            assert layer.row is site.row
        if nodes and nodes[0].op == "call_function":
            assert nodes[0].target in LAYER_FUNCTIONS
